"""Property-based tests: hypothesis draws shapes, dtypes, memory layouts of every
tensor input (strided, transposed, offset and expanded views) and special values, and
every op is compared with ditkernels.reference, on the CPU kernels and on the CUDA
kernels under the emulator. The profile is derandomized, so CI runs the same examples
each time; HYPOTHESIS_PROFILE=explore draws fresh ones, more of them."""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ditkernels
from ditkernels import reference
from conftest import NORM_TOL
from test_hostile_inputs import backend, emulated_cuda, relayout  # noqa: F401  (fixtures)

_COMMON = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.function_scoped_fixture,
                                      HealthCheck.too_slow])
settings.register_profile("ci", derandomize=True, max_examples=40, **_COMMON)
settings.register_profile("explore", max_examples=300, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DTYPES = {"cpu": [torch.float32, torch.float64, torch.bfloat16, torch.float16],
          "emulated": [torch.float32, torch.bfloat16, torch.float16]}
LAYOUTS = ["contiguous", "strided", "padded", "transposed", "offset", "expanded"]
# 3e19 ** 2 overflows fp32: the norms must still normalize such rows.
SPECIALS = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e19, -3e19]


@st.composite
def tensors(draw, shape, dtype, scale=1.0, specials=False, floor=None):
    """A random tensor of `shape` in a drawn layout, optionally with special values;
    with `floor`, positive: |randn| * scale + floor."""
    seed = draw(st.integers(0, 2 ** 31 - 1))
    gen = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale)
    if floor is not None:
        t = t.abs() + floor
    layout = draw(st.sampled_from(LAYOUTS))
    if layout == "expanded" and t.dim() > 0 and t.shape[0] > 0:
        t = t[:1].expand(t.shape)
    if specials and t.numel() > 0 and draw(st.booleans()):
        flat = t.contiguous().flatten()
        for _ in range(draw(st.integers(1, 3))):
            flat[draw(st.integers(0, flat.numel() - 1))] = draw(st.sampled_from(SPECIALS))
        t = flat.view(shape)
    t = t.to(dtype)
    if layout in ("strided", "padded", "transposed", "offset") and t.dim() > 0:
        t = relayout(t, layout)
    return t


def dtype_for(backend, data):
    return data.draw(st.sampled_from(DTYPES[backend]))


def maybe(data, strategy):
    return data.draw(st.one_of(st.none(), strategy))


def assert_close_to_reference(ours, ref, dtype, tol=None):
    tol = tol or NORM_TOL[dtype]
    torch.testing.assert_close(ours.double(), ref.double(), equal_nan=True, **tol)


@given(data=st.data())
def test_adaln_matches_reference(backend, data):
    dtype = dtype_for(backend, data)
    B, N, C = data.draw(st.integers(1, 3)), data.draw(st.integers(0, 5)), data.draw(
        st.integers(1, 70))
    x = data.draw(tensors((B, N, C), dtype, scale=data.draw(st.sampled_from([1.0, 1e3])),
                          specials=dtype != torch.float16))
    side = dict(shift=maybe(data, tensors((B, C), dtype, 0.5)),
                scale=maybe(data, tensors((B, C), dtype, 0.5)),
                weight=maybe(data, tensors((C,), dtype)), bias=maybe(data, tensors((C,), dtype)))
    up = {k: None if v is None else v.double() for k, v in side.items()}
    if data.draw(st.booleans()):
        h, gate = data.draw(tensors((B, N, C), dtype)), maybe(data, tensors((B, C), dtype))
        x_out, y = ditkernels.gated_residual_ln_modulate(x, h, gate, **side)
        # x_out is rounded to the input dtype before the norm: the reference starts there.
        x_ref = reference.gated_residual_ln_modulate(x, h, gate)[0]
        assert_close_to_reference(x_out, x_ref, dtype)
        assert_close_to_reference(y, reference.ln_modulate(x_out.double(), **up), dtype)
    else:
        y = ditkernels.ln_modulate(x, **side)
        assert_close_to_reference(y, reference.ln_modulate(x.double(), **up), dtype)


@given(data=st.data())
def test_adaln_backward_matches_reference(backend, data):
    dtype = data.draw(st.sampled_from([torch.float32] + ([torch.float64] if backend == "cpu"
                                                          else [])))
    B, N, C = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 5)), data.draw(
        st.integers(1, 40))
    inputs = [data.draw(tensors((B, N, C), dtype)), data.draw(tensors((B, C), dtype, 0.5)),
              data.draw(tensors((B, C), dtype, 0.5)), data.draw(tensors((C,), dtype)),
              data.draw(tensors((C,), dtype))]
    grad = data.draw(tensors((B, N, C), dtype))
    ours = [t.detach().clone().requires_grad_() for t in inputs]
    ref = [t.detach().double().requires_grad_() for t in inputs]
    g = torch.autograd.grad(ditkernels.ln_modulate(ours[0], ours[1], ours[2], 1e-6, *ours[3:]),
                            ours, grad)
    g_ref = torch.autograd.grad(reference.ln_modulate(ref[0], ref[1], ref[2], 1e-6, *ref[3:]),
                                ref, grad.double())
    # Sums over B * N rows: the tolerance grows with them.
    tol = dict(atol=1e-4 * N * B, rtol=1e-4) if dtype == torch.float32 else None
    for a, b in zip(g, g_ref):
        assert_close_to_reference(a, b, dtype, tol)


@given(data=st.data())
def test_skip_concat_linear_matches_reference(backend, data):
    dtype = dtype_for(backend, data)
    lead = data.draw(st.lists(st.integers(0, 4), min_size=0, max_size=2))
    D = data.draw(st.sampled_from([8, 16, 24]) if backend == "emulated" else st.integers(1, 20))
    Dout = data.draw(st.sampled_from([8, 16]) if backend == "emulated" else st.integers(1, 20))
    x, skip = data.draw(tensors((*lead, D), dtype)), data.draw(tensors((*lead, D), dtype))
    weight = data.draw(tensors((Dout, 2 * D), dtype, (2 * D) ** -0.5))
    bias = maybe(data, tensors((Dout,), dtype))
    y = ditkernels.skip_concat_linear(x, skip, weight, bias)
    y_ref = reference.skip_concat_linear(x.double(), skip.double(), weight.double(),
                                         None if bias is None else bias.double())
    tol = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-4, rtol=1e-4)}
    assert_close_to_reference(y, y_ref, dtype, tol.get(dtype, dict(atol=3e-2, rtol=3e-2)))


@given(data=st.data())
def test_tmsa_matches_reference(backend, data):
    dtype = dtype_for(backend, data)
    B, H = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2))
    D = data.draw(st.sampled_from([32, 64]) if backend == "emulated" else st.integers(1, 24))
    gh, gw = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    L = data.draw(st.integers(0, 2))
    N = L + gh * gw
    qkv = data.draw(tensors((B, N, 3, H, D), dtype))
    time_qkv = maybe(data, tensors((B, 3, H, D), dtype))
    table = maybe(data, tensors(((2 * gh - 1) * (2 * gw - 1), H), dtype))
    up = lambda t: None if t is None else t.double().requires_grad_()  # noqa: E731
    args = [qkv.detach().clone().requires_grad_(),
            None if time_qkv is None else time_qkv.detach().clone().requires_grad_(),
            None if table is None else table.detach().clone().requires_grad_()]
    ref_args = [up(t) for t in (qkv, time_qkv, table)]
    out = ditkernels.tmsa(*args, grid_size=(gh, gw), num_leading=L)
    out_ref = reference.tmsa(*ref_args, grid_size=(gh, gw), num_leading=L)
    low = dtype in (torch.bfloat16, torch.float16)
    tol = dict(atol=2e-2, rtol=2e-2) if low else dict(atol=1e-4, rtol=1e-4)
    assert_close_to_reference(out, out_ref, dtype, tol)
    grad = data.draw(tensors(tuple(out.shape), dtype))
    live = [(a, r) for a, r in zip(args, ref_args) if a is not None]
    g = torch.autograd.grad(out, [a for a, _ in live], grad)
    g_ref = torch.autograd.grad(out_ref, [r for _, r in live], grad.double())
    gtol = dict(atol=5e-2 * B * N, rtol=5e-2) if low else dict(atol=1e-3 * B * N, rtol=1e-3)
    for a, b in zip(g, g_ref):
        assert_close_to_reference(a, b, dtype, gtol)


@given(data=st.data())
def test_int8_ops_are_bit_identical_to_reference(backend, data):
    dtype = dtype_for(backend, data)
    three_d = data.draw(st.booleans())
    B, L = data.draw(st.integers(1, 3)), data.draw(st.integers(0, 4))
    K = data.draw(st.sampled_from([0, 16, 32]) if backend == "emulated" else st.integers(0, 40))
    Nw = data.draw(st.sampled_from([16, 32]) if backend == "emulated" else st.integers(1, 20))
    shape = (B, L, K) if three_d else (B, K)
    x = data.draw(tensors(shape, dtype, specials=True))
    T = data.draw(st.integers(1, 6))
    act_scales = data.draw(tensors((T,), torch.float32, 0.05, floor=0.01))
    t = torch.tensor(data.draw(st.lists(st.integers(0, T - 1), min_size=B, max_size=B)))
    if data.draw(st.booleans()):
        t = t[:1]
    t = relayout(t, data.draw(st.sampled_from(LAYOUTS[1:5])))
    w_q = torch.randint(-127, 128, (Nw, K), dtype=torch.int8)
    if K and data.draw(st.booleans()):
        w_q = w_q.t().contiguous().t()
    w_scale = data.draw(tensors((Nw,), torch.float32, 0.01, floor=0.0))
    bias = maybe(data, tensors((Nw,), dtype))
    q = ditkernels.quantize_per_sample(x, act_scales, t)
    assert torch.equal(q, reference.quantize_per_sample(x, act_scales, t))
    y = ditkernels.int8_linear(x, w_q, w_scale, act_scales, t, bias)
    assert torch.equal(y, reference.int8_linear(x, w_q, w_scale, act_scales, t, bias))
    y_q = ditkernels.int8_gemm_dequant(q, w_q, w_scale, act_scales, t, bias, dtype)
    assert torch.equal(y_q, reference.int8_gemm_dequant(q, w_q, w_scale, act_scales, t, bias,
                                                        dtype))


@given(data=st.data())
def test_ln_modulate_int8_within_one_step_of_reference(backend, data):
    """ln_modulate rounds differently from an fp64 reference in its last bit, so the
    quantized value may differ by one step, never more. (Eager fp32 LayerNorm is no
    reference here: it returns zeros for rows whose squares overflow.)"""
    dtype = dtype_for(backend, data)
    B, N, C = data.draw(st.integers(1, 3)), data.draw(st.integers(0, 4)), data.draw(
        st.integers(1, 40))
    x = data.draw(tensors((B, N, C), dtype, specials=dtype != torch.float16))
    shift, scale = maybe(data, tensors((B, C), dtype, 0.5)), maybe(data, tensors((B, C), dtype,
                                                                                 0.5))
    act_scales = data.draw(tensors((4,), torch.float32, 0.05, floor=0.005))
    t = torch.tensor(data.draw(st.lists(st.integers(0, 3), min_size=B, max_size=B)))
    q = ditkernels.ln_modulate_int8(x, shift, scale, act_scales, t)
    up = lambda v: None if v is None else v.double()  # noqa: E731
    y_ref = reference.ln_modulate(x.double(), up(shift), up(scale)).to(dtype)
    q_ref = reference.quantize_per_sample(y_ref, act_scales, t)
    assert q.shape == q_ref.shape
    assert torch.all((q.int() - q_ref.int()).abs() <= 1)
