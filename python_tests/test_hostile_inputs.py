"""Inputs that used to crash or give silent garbage (issue 13), on the CPU kernels and on
the CUDA kernels under the emulator: side inputs in any layout, meta tensors among real
ones, double backward, NaN and Inf, int8 accumulator bounds, backward ops called with
inconsistent inputs, and errors that name the op, the argument and the shapes."""

import pytest
import torch

import ditkernels
from ditkernels import reference
from ditkernels.models.diffit import TMSA
from ditkernels.models.uvit import Attention as UViTAttention
from ditkernels.nn import Attention
from ditkernels.quant import TimestepCalibratedInt8Config, calibrate, quantize_
from conftest import NORM_TOL
from test_quant import forward_calls_sampler, small_dit

ops = torch.ops.ditkernels


@pytest.fixture(params=["cpu", "emulated"])
def backend(request):
    """The CPU kernels, or the CUDA kernels run by the emulator (test_cuda_emulated.py)."""
    if request.param == "emulated":
        import test_cuda_emulated

        if test_cuda_emulated._LIB is None:
            pytest.skip("no emulation library (see test_cuda_emulated.py)")
        request.getfixturevalue("emulated_cuda")
    return request.param


from test_cuda_emulated import emulated_cuda  # noqa: E402,F401  (the fixture above uses it)


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def op_cases(dtype):
    """name -> (op, positional args, indices of the side inputs), small shapes that every
    backend supports (CUDA: TMSA head dim 32, int8 K and N multiples of 16)."""
    B, N, C = 2, 3, 24
    x = _randn(B, N, C, dtype=dtype)
    per_sample = lambda: _randn(B, C, dtype=dtype) * 0.5  # noqa: E731
    per_channel = lambda: _randn(C, dtype=dtype)  # noqa: E731
    D, Dout = 16, 16
    xs = _randn(B, N, D, dtype=dtype)
    H, hd, grid = 2, 32, (2, 2)
    T = (2 * grid[0] - 1) * (2 * grid[1] - 1)
    qkv = _randn(B, 4, 3, H, hd, dtype=dtype)
    time_qkv = _randn(B, 3, H, hd, dtype=dtype)
    table = _randn(T, H, dtype=dtype)
    out, lse = ops.tmsa(qkv, time_qkv, table, *grid, 0, hd ** -0.5)
    K, Nw = 32, 16
    w_q = torch.randint(-127, 128, (Nw, K), dtype=torch.int8)
    w_scale = torch.rand(Nw) * 0.01 + 0.001
    act_scales = torch.rand(10) * 0.05 + 0.01
    t = torch.tensor([3, 7])
    xq = _randn(B, N, K, dtype=dtype)
    return {
        "ln_modulate": (ops.ln_modulate, [x, per_sample(), per_sample(), 1e-6, per_channel(),
                                          per_channel()], [1, 2, 4, 5]),
        "gated_residual_ln_modulate": (
            ops.gated_residual_ln_modulate,
            [x, _randn(B, N, C, dtype=dtype), per_sample(), per_sample(), per_sample(), 1e-6,
             per_channel(), per_channel()], [1, 2, 3, 4, 6, 7]),
        "ln_modulate_backward": (
            ops.ln_modulate_backward,
            [_randn(B, N, C, dtype=dtype), x, per_sample(), per_sample(), 1e-6, per_channel(),
             per_channel()], [0, 2, 3, 5, 6]),
        "skip_concat_linear": (ops.skip_concat_linear,
                               [xs, _randn(B, N, D, dtype=dtype),
                                _randn(Dout, 2 * D, dtype=dtype), _randn(Dout, dtype=dtype)],
                               [1, 2, 3]),
        "skip_concat_linear_backward": (
            ops.skip_concat_linear_backward,
            [_randn(B, N, Dout, dtype=dtype), xs, _randn(B, N, D, dtype=dtype),
             _randn(Dout, 2 * D, dtype=dtype), True], [0, 2, 3]),
        "tmsa": (ops.tmsa, [qkv, time_qkv, table, *grid, 0, hd ** -0.5], [1, 2]),
        "tmsa_backward": (ops.tmsa_backward, [_randn(*out.shape, dtype=dtype), qkv, time_qkv,
                                              table, out, lse, *grid, 0, hd ** -0.5],
                          [0, 2, 3, 4, 5]),
        "int8_linear": (ops.int8_linear, [xq, w_q, w_scale, act_scales, t,
                                          _randn(Nw, dtype=dtype)], [1, 2, 3, 4, 5]),
        "int8_gemm_dequant": (
            ops.int8_gemm_dequant,
            [torch.randint(-127, 128, (B, N, K), dtype=torch.int8), w_q, w_scale, act_scales, t,
             _randn(Nw, dtype=dtype), dtype], [1, 2, 3, 4, 5]),
        "quantize_per_sample": (ops.quantize_per_sample, [xq, act_scales, t], [1, 2]),
        "ln_modulate_int8": (ops.ln_modulate_int8,
                             [x, per_sample(), per_sample(), 1e-6, per_channel(), per_channel(),
                              act_scales, t], [1, 2, 4, 5, 6, 7]),
    }


def relayout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """t's values in another memory layout."""
    if layout == "strided":  # every dim strided, the last one too
        big = torch.zeros([2 * s for s in t.shape], dtype=t.dtype)
        view = big[tuple(slice(None, None, 2) for _ in t.shape)]
    elif layout == "padded":  # unit stride along the last dim, rows further apart
        view = torch.zeros(*t.shape[:-1], t.shape[-1] + 3, dtype=t.dtype)[..., :t.shape[-1]]
    elif layout == "transposed":  # reversed dim order in memory
        view = torch.zeros(t.shape[::-1], dtype=t.dtype).permute(*reversed(range(t.dim())))
    else:  # "offset": starts one element into its storage (misaligned rows on CUDA)
        view = torch.zeros(t.numel() + 1, dtype=t.dtype)[1:].view(t.shape)
    return view.copy_(t)


def broadcast_values(t: torch.Tensor) -> torch.Tensor:
    """t's first slice repeated along dim 0, as an expanded (stride 0) view."""
    return t[:1].expand(t.shape)


def _outputs(result):
    return result if isinstance(result, tuple) else (result,)


def _assert_same(got, want, exact):
    for g, w in zip(_outputs(got), _outputs(want)):
        if exact or not g.is_floating_point():
            assert g.shape == w.shape and g.dtype == w.dtype
            assert torch.equal(g, w)
        else:
            torch.testing.assert_close(g, w)


CASES = list(op_cases(torch.float32))
LAYOUTS = ["strided", "padded", "transposed", "offset", "expanded"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", CASES)
def test_side_inputs_in_any_layout(backend, name, layout):
    """Each side input in turn, as a strided, padded, transposed, offset or expanded view, gives
    the result of its contiguous copy: exactly on CPU, except where BLAS reads the view in
    place (tmsa_backward's grad_out and out) and rounds after its layout; up to rounding on
    CUDA, where a misaligned view can select a kernel of another vector width."""
    dtypes = [torch.float32] if backend == "cpu" else [torch.float32, torch.bfloat16]
    for dtype in dtypes:
        op, args, side = op_cases(dtype)[name]
        for i in side:
            if layout == "expanded":
                values = broadcast_values(args[i])
                contiguous = list(args)
                contiguous[i] = values.contiguous()
                want = op(*contiguous)
            else:
                values = relayout(args[i], layout)
                want = op(*args)
            varied = list(args)
            varied[i] = values
            _assert_same(op(*varied), want, exact=backend == "cpu" and name != "tmsa_backward")


def test_strided_scale_table_matches_reference():
    """act_scales[::2] used to be read as if contiguous on CPU."""
    op, args, _ = op_cases(torch.float32)["int8_linear"]
    x, w_q, w_scale, act_scales, t, bias = args
    table = torch.rand(20) * 0.05 + 0.01
    want = reference.int8_linear(x, w_q, w_scale, table[::2].contiguous(), t, bias)
    torch.testing.assert_close(op(x, w_q, w_scale, table[::2], t, bias), want)


# ---------------------------------------------------------------------------
# meta tensors among CPU ones
# ---------------------------------------------------------------------------

SCHEMA_NAMES = {name: [a.name for a in getattr(ops, name).default._schema.arguments]
                for name in CASES}


@pytest.mark.parametrize("name", CASES)
def test_meta_side_input_raises(name):
    op, args, side = op_cases(torch.float32)[name]
    names = SCHEMA_NAMES[name]
    main = 0 if side[0] != 0 else 1  # x, x_q or qkv: the first argument not a side input
    main_name = {"x_out": "x"}.get(names[main], names[main])
    for i in side:
        varied = list(args)
        varied[i] = args[i].to("meta")
        with pytest.raises(RuntimeError, match=f"{name}: {names[i]} is on meta but "
                                               f"{main_name} is on cpu"):
            op(*varied)


@pytest.mark.parametrize("name", CASES)
def test_meta_main_input_with_cpu_side_inputs_raises(name):
    op, args, side = op_cases(torch.float32)[name]
    main = 0 if side[0] != 0 else 1
    varied = list(args)
    varied[main] = args[main].to("meta")
    with pytest.raises(RuntimeError, match=f"{name}: .* is on cpu but .* is on meta"):
        op(*varied)


@pytest.mark.parametrize("name", CASES)
def test_all_meta_inputs_give_meta_outputs(name):
    op, args, _ = op_cases(torch.float32)[name]
    want = _outputs(op(*args))
    got = _outputs(op(*[a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]))
    assert [(g.device.type, g.shape, g.dtype) for g in got] == [
        ("meta", w.shape, w.dtype) for w in want]


# ---------------------------------------------------------------------------
# double backward
# ---------------------------------------------------------------------------

def _differentiable_calls():
    x = _randn(2, 3, 8, dtype=torch.float64)
    shift, scale = _randn(2, 8, dtype=torch.float64), _randn(2, 8, dtype=torch.float64)
    args = _tmsa_args()
    return {
        "ln_modulate": (ditkernels.ln_modulate, reference.ln_modulate, [x, shift, scale]),
        "gated_residual_ln_modulate": (
            lambda *a: sum(o.sum() for o in ditkernels.gated_residual_ln_modulate(*a)),
            lambda *a: sum(o.sum() for o in reference.gated_residual_ln_modulate(*a)),
            [x, _randn(2, 3, 8, dtype=torch.float64), shift, shift, scale]),
        "skip_concat_linear": (ditkernels.skip_concat_linear, reference.skip_concat_linear,
                               [x, _randn(2, 3, 8, dtype=torch.float64),
                                _randn(5, 16, dtype=torch.float64)]),
        "tmsa": (lambda *a: ditkernels.tmsa(*a, grid_size=(2, 2)),
                 lambda *a: reference.tmsa(*a, grid_size=(2, 2)), args),
    }


def _tmsa_args():
    """(qkv, time_qkv, rel_table) in fp64 for a 2 x 2 grid."""
    return [_randn(1, 4, 3, 2, 8, dtype=torch.float64), _randn(1, 3, 2, 8, dtype=torch.float64),
            _randn(9, 2, dtype=torch.float64)]


@pytest.mark.parametrize("name", ["ln_modulate", "gated_residual_ln_modulate",
                                  "skip_concat_linear", "tmsa"])
def test_double_backward_raises_but_create_graph_gradients_are_right(name):
    ours, ref, inputs = _differentiable_calls()[name]
    leaves = [t.clone().requires_grad_() for t in inputs]
    grads = torch.autograd.grad(ours(*leaves).sum(), leaves, create_graph=True)
    want = torch.autograd.grad(ref(*leaves).sum(), leaves)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w)
    with pytest.raises(RuntimeError, match="double backward is not implemented"):
        sum((g * g).sum() for g in grads).backward()


# ---------------------------------------------------------------------------
# NaN and Inf
# ---------------------------------------------------------------------------

def test_quantize_nan_and_inf(backend):
    """NaN quantizes to 0 and +-Inf saturates to +-127 on every backend, as the reference."""
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0, -0.0, 2.5, 300.0])
    x = torch.cat([special, special.flip(0), torch.zeros(2)]).repeat(2, 1).view(2, 1, 16)
    act_scales, t = torch.tensor([0.5, 2.0]), torch.tensor([0, 1])
    for dtype in [torch.float32, torch.bfloat16]:
        xd = x.to(dtype)
        q = ops.quantize_per_sample(xd, act_scales, t)
        assert torch.equal(q, reference.quantize_per_sample(xd, act_scales, t))
        assert q[0, 0, 0] == 0 and q[0, 0, 1] == 127 and q[0, 0, 2] == -127
        w_q = torch.randint(-127, 128, (16, 16), dtype=torch.int8)
        w_scale = torch.rand(16) * 0.01
        assert torch.equal(ops.int8_linear(xd, w_q, w_scale, act_scales, t, None),
                           reference.int8_linear(xd, w_q, w_scale, act_scales, t))


def test_ln_modulate_int8_nan_row_quantizes_to_zero(backend):
    x = _randn(2, 3, 16)
    x[1, 2, 5] = float("nan")
    act_scales, t = torch.tensor([0.05]), torch.tensor([0, 0])
    q = ops.ln_modulate_int8(x, None, None, 1e-6, None, None, act_scales, t)
    assert torch.equal(q, reference.ln_modulate_int8(x, None, None, act_scales, t))
    assert (q[1, 2] == 0).all() and (q[0] != 0).any()


@pytest.mark.parametrize("magnitude", [1e19, 1e30, 1e-19])
def test_layer_norm_of_huge_and_tiny_rows(backend, magnitude):
    """fp32 rows of finite values near 1e19 and beyond, whose squares overflow fp32, are
    normalized as in fp64 (they used to give zeros), forward and backward."""
    x = (_randn(2, 5, 40, dtype=torch.float64) * magnitude)
    shift, scale = _randn(2, 40, dtype=torch.float64), _randn(2, 40, dtype=torch.float64)
    gy = _randn(2, 5, 40, dtype=torch.float64)
    f32 = [t.float().requires_grad_() for t in (x, shift, scale)]
    y = ditkernels.ln_modulate(*f32)
    grads = torch.autograd.grad(y, f32, gy.float())
    f64 = [t.clone().requires_grad_() for t in (x.float().double(), shift, scale)]
    y_ref = reference.ln_modulate(*f64)
    grads_ref = torch.autograd.grad(y_ref, f64, gy)
    tol = NORM_TOL[torch.float32]
    torch.testing.assert_close(y.double(), y_ref, **tol)
    # d/dx scales as 1 / magnitude: judged relative to its largest entry.
    top = grads_ref[0].abs().max()
    torch.testing.assert_close(grads[0].double() / top, grads_ref[0] / top, **tol)
    for g, w in zip(grads[1:], grads_ref[1:]):
        torch.testing.assert_close(g.double(), w, **tol)


def test_layer_norm_propagates_inf_and_nan(backend):
    x = _randn(2, 3, 16)
    x[0, 1, 3], x[1, 2, 0] = float("inf"), float("nan")
    y = ditkernels.ln_modulate(x)
    assert y[0, 1].isnan().all() and y[1, 2].isnan().all()
    finite = torch.ones(2, 3, dtype=torch.bool)
    finite[0, 1] = finite[1, 2] = False
    torch.testing.assert_close(y[finite], reference.ln_modulate(x)[finite])


@pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan")])
def test_tmsa_backward_nonfinite_grad_out_poisons_its_head(backend, value):
    """A non-finite grad_out of (sample b, head h) makes all gradients of (b, h) and the
    table's column h NaN on every backend; the other heads keep their gradients."""
    dtypes = [torch.float64] if backend == "cpu" else [torch.float32, torch.bfloat16]
    for dtype in dtypes:
        qkv = _randn(2, 4, 3, 2, 32, dtype=dtype)
        time_qkv = _randn(2, 3, 2, 32, dtype=dtype)
        table = _randn(9, 2, dtype=dtype)
        out, lse = ops.tmsa(qkv, time_qkv, table, 2, 2, 0, 32 ** -0.5)
        grad_out = _randn(*out.shape, dtype=dtype)
        clean = ops.tmsa_backward(grad_out, qkv, time_qkv, table, out, lse, 2, 2, 0, 32 ** -0.5)
        grad_out[0, 1, 1, 7] = value
        gqkv, gtime, gtable = ops.tmsa_backward(grad_out, qkv, time_qkv, table, out, lse, 2, 2,
                                                0, 32 ** -0.5)
        assert gqkv[0, :, :, 1].isnan().all() and gtime[0, :, 1].isnan().all()
        assert gtable[:, 1].isnan().all()
        tol = dict(atol=1e-2, rtol=1e-2) if dtype == torch.bfloat16 else {}
        torch.testing.assert_close(gqkv[1], clean[0][1], **tol)
        torch.testing.assert_close(gqkv[0, :, :, 0], clean[0][0, :, :, 0], **tol)
        torch.testing.assert_close(gtable[:, 0], clean[2][:, 0], **tol)


# ---------------------------------------------------------------------------
# int8 bounds and scale tables
# ---------------------------------------------------------------------------

def test_int8_accumulator_bound_on_k():
    """127 * 127 * K must fit int32: at the largest K the worst case is exact, one more
    is refused (the CPU and CUDA kernels share this host check)."""
    K = 2 ** 31 // (127 * 127)
    x_q = torch.full((1, K), 127, dtype=torch.int8)
    w_q = torch.full((1, K), 127, dtype=torch.int8)
    ones, t = torch.ones(1), torch.zeros(1, dtype=torch.long)
    y = ops.int8_gemm_dequant(x_q, w_q, ones, ones, t, None, torch.float64)
    assert y.item() == torch.tensor(127 * 127 * K, dtype=torch.float32).item()  # fp32 epilogue
    big = torch.ones((1, K + 1), dtype=torch.int8)
    with pytest.raises(RuntimeError, match=rf"int8_gemm_dequant: K = {K + 1} \(w_q of shape "
                                           rf"\[1, {K + 1}\]\) exceeds {K}"):
        ops.int8_gemm_dequant(big, big, ones, ones, t, None, torch.float32)


def test_int8_linear_with_no_input_features_is_the_bias(backend):
    """nn.Linear(0, N) is legal; so is K = 0 here (y = bias, or zeros)."""
    x = torch.empty(2, 3, 0)
    w_q = torch.empty(16, 0, dtype=torch.int8)
    act_scales, t = torch.ones(4), torch.tensor([1, 2])
    bias = _randn(16)
    y = ops.int8_linear(x, w_q, torch.ones(16), act_scales, t, bias)
    assert torch.equal(y, bias.expand(2, 3, 16))
    assert torch.equal(ops.int8_linear(x, w_q, torch.ones(16), act_scales, t, None),
                       torch.zeros(2, 3, 16))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
@pytest.mark.parametrize("name", ["int8_linear", "int8_gemm_dequant", "quantize_per_sample",
                                  "ln_modulate_int8"])
def test_unusable_scales_raise(backend, name, bad, monkeypatch):
    """The host's message (CPU; CUDA in the debug mode DITKERNELS_HOST_CHECKS=1), or the
    CUDA kernels' device-side check."""
    op, args, _ = op_cases(torch.float32)[name]
    names = SCHEMA_NAMES[name]
    a, ti = names.index("act_scales"), names.index("t")
    args[a] = args[a].clone()
    args[a][args[ti][1]] = bad
    monkeypatch.setenv("DITKERNELS_HOST_CHECKS", "1")
    with pytest.raises(RuntimeError, match=rf"{name}: act_scales\[t\] holds 1 scales that are "
                                           rf"zero, negative or not finite \(act_scales of shape "
                                           rf"\[10\], t of shape \[2\]\)"):
        op(*args)
    if backend == "emulated":
        monkeypatch.delenv("DITKERNELS_HOST_CHECKS")
        with pytest.raises(RuntimeError, match=r"device-side check failed: int8: act_scales\[t\] "
                                               r"holds a scale that is zero, negative or not finite"):
            op(*args)
    for host_checks in ("1", "0"):
        monkeypatch.setenv("DITKERNELS_HOST_CHECKS", host_checks)
        args[a][args[ti][1]] = 0.5
        args[a][0] = bad  # an entry that t does not select is not checked
        op(*args)


# ---------------------------------------------------------------------------
# backward ops called directly with inconsistent inputs; unclear errors
# ---------------------------------------------------------------------------

def test_backward_ops_check_shapes_and_dtypes(backend):
    op, args, _ = op_cases(torch.float32)["skip_concat_linear_backward"]
    bad = list(args)
    bad[0] = args[0].reshape(3, 2, 16)  # right numel, wrong shape
    with pytest.raises(RuntimeError, match=r"skip_concat_linear_backward: grad_y must have "
                                           r"shape \[2, 3, 16\], got \[3, 2, 16\]"):
        op(*bad)
    op, args, _ = op_cases(torch.float32)["ln_modulate_backward"]
    bad = list(args)
    bad[0] = args[0].reshape(3, 2, 24)
    with pytest.raises(RuntimeError, match=r"ln_modulate_backward: grad_y must have the shape "
                                           r"of x \[2, 3, 24\], got \[3, 2, 24\]"):
        op(*bad)
    op, args, _ = op_cases(torch.float32)["tmsa_backward"]
    bad = list(args)
    bad[5] = args[5].double()
    with pytest.raises(RuntimeError, match="tmsa_backward: lse must have dtype Float for qkv of "
                                           "dtype Float, got Double"):
        op(*bad)


def test_head_dim_zero_raises_clear_errors():
    with pytest.raises(RuntimeError, match=r"tmsa: qkv must have at least one head and one "
                                           r"feature, got \[1, 4, 3, 2, 0\]"):
        ditkernels.tmsa(torch.randn(1, 4, 3, 2, 0))
    for make in [lambda: Attention(0, 8), lambda: UViTAttention(0, 8),
                 lambda: TMSA(0, 8, grid_size=2)]:
        with pytest.raises(ValueError, match="must be a positive multiple of num_heads=8"):
            make()


def test_huge_grid_raises_clear_error():
    qkv = torch.randn(1, 4, 3, 1, 8)
    g = 2 ** 62
    with pytest.raises(RuntimeError, match=rf"tmsa: a {g} x {g} grid after 0 leading tokens "
                                           rf"does not fit N = 4 tokens"):
        ops.tmsa(qkv, None, torch.randn(9, 1), g, g, 0, 1.0)


def test_calibrating_with_too_few_timesteps_names_them():
    """A model run at t = 999 calibrated with a 100-step table used to fail with an index
    error inside scatter_reduce."""
    config = TimestepCalibratedInt8Config(include=("blocks.0.attn.qkv",), num_timesteps=100,
                                          groups=1)
    with pytest.raises(ValueError, match=r"calibrate: the model ran at timesteps t in "
                                         r"\[999, 999\] \(t of shape \(2,\)\) but the config "
                                         r"has num_timesteps=100"):
        calibrate(small_dit(), forward_calls_sampler(batch=2, timesteps=(999,)), config)


def test_quantizing_twice_says_so():
    config = TimestepCalibratedInt8Config(include=("blocks.0.*",))
    model = quantize_(small_dit(), config)
    with pytest.raises(ValueError, match=r"quantize_: the model is already quantized \(\d+ int8 "
                                         r"layers, the first 'blocks.0.attn.qkv'\)"):
        quantize_(model, config)
