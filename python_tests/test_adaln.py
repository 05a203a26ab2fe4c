"""Tests of the fused adaLN family: ln_modulate and gated_residual_ln_modulate."""

import itertools

import pytest
import torch

import ditkernels
from ditkernels import reference
from conftest import (CPU_CAPABILITIES, DEVICES, DTYPES, NORM_TOL, rel_err, rel_err_bound,
                      run_with_cpu_capability, upcast)

OPS = ["ln_modulate", "gated_residual_ln_modulate"]
EPS = 1e-6


def make_inputs(op, B, N, C, dtype, device, *, gate=True, shift=True, scale=True, affine=True,
                requires_grad=False):
    """Random inputs in the op's argument order. Per-sample vectors are row views
    of a [B, 6C] tensor, as DiT's adaLN chunks are."""
    def t(*shape):
        return torch.randn(*shape, dtype=torch.float64).to(device=device, dtype=dtype)

    ada = t(B, 6 * C)
    chunks = list(ada.chunk(6, dim=1))
    args = {"x": t(B, N, C)}
    if op == "gated_residual_ln_modulate":
        args["h"] = t(B, N, C)
        args["gate"] = chunks[2] if gate else None
    args["shift"] = chunks[0] if shift else None
    args["scale"] = chunks[1] if scale else None
    args["eps"] = EPS
    args["weight"] = t(C) if affine else None
    args["bias"] = t(C) if affine else None
    if requires_grad:
        for k, v in args.items():
            if isinstance(v, torch.Tensor):
                args[k] = v.detach().requires_grad_()
    return args


def call(impl, op, args):
    out = getattr(impl, op)(**args)
    return out if isinstance(out, tuple) else (out,)




# ---------------------------------------------------------------------------
# forward against the plain-PyTorch reference
# ---------------------------------------------------------------------------

SHAPES = [(2, n, c) for n, c in itertools.product([1, 17, 256, 258], [1, 7, 384, 1152, 4097])]


def check_forward(ours, args):
    """Each output against fp64 reference math. x_out is an output in the input dtype,
    and y is defined from it (as in eager PyTorch), so y is checked against the
    reference norm of our rounded x_out."""
    dtype = args["x"].dtype
    ref_args = upcast(args)
    if len(ours) == 2:
        x_out, y = ours
        ref_x_out, _ = reference.gated_residual_ln_modulate(**ref_args)
        torch.testing.assert_close(x_out.double(), ref_x_out, **NORM_TOL[dtype])
        ref_args = {k: v for k, v in ref_args.items() if k not in ("h", "gate")}
        ref_args["x"] = x_out.double()
        ours = (y,)
    (r,) = call(reference, "ln_modulate", ref_args)
    (y,) = ours
    assert y.dtype == dtype and y.shape == r.shape and y.is_contiguous()
    torch.testing.assert_close(y.double(), r, **NORM_TOL[dtype])


def _forward_case(device, dtype, op, B, N, C, **flags):
    args = make_inputs(op, B, N, C, dtype, device, **flags)
    check_forward(call(ditkernels, op, args), args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("B,N,C", SHAPES)
def test_forward_matches_reference(device, op, B, N, C):
    for dtype in DTYPES[device]:
        _forward_case(device, dtype, op, B, N, C)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
# Every CUDA configuration: warp team (C <= 256) and block team up to the C = 8192
# limit, with vectorised (C % 8 == 0) and scalar rows.
@pytest.mark.parametrize("C", [8, 255, 256, 257, 264, 1000, 2048, 3000, 8191, 8192])
def test_forward_feature_sizes(device, op, C):
    for dtype in DTYPES[device]:
        _forward_case(device, dtype, op, 2, 5, C)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("flags", [
    dict(affine=False),
    dict(shift=False, scale=False),
    dict(shift=False),
    dict(scale=False, affine=False),
    dict(gate=False),
])
def test_forward_optional_arguments(device, op, flags):
    if op == "ln_modulate" and flags == dict(gate=False):
        pytest.skip("ln_modulate has no gate")
    for dtype in DTYPES[device]:
        _forward_case(device, dtype, op, 3, 17, 40, **flags)


def _make_strided(t):
    """The same values in a non-contiguous layout."""
    if t.dim() == 3:
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    if t.dim() == 2:
        return t.t().contiguous().t()
    return torch.stack([t, t], dim=-1)[..., 0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_non_contiguous_and_misaligned_inputs(device, op):
    for dtype in DTYPES[device]:
        check_non_contiguous_and_misaligned(device, dtype, op)


def check_non_contiguous_and_misaligned(device, dtype, op):
    args = make_inputs(op, 3, 17, 64, dtype, device, requires_grad=False)
    strided = {k: (_make_strided(v) if isinstance(v, torch.Tensor) else v)
               for k, v in args.items()}
    assert not strided["x"].is_contiguous()
    # x starting one element past a 16-byte boundary forces the scalar path.
    flat = torch.empty(args["x"].numel() + 1, dtype=dtype, device=device)
    misaligned = dict(args, x=flat[1:].view_as(args["x"]).copy_(args["x"]))
    for variant in (strided, misaligned):
        check_forward(call(ditkernels, op, variant), args)


# ---------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------

def _grads(impl, op, args, seed_grads):
    outs = call(impl, op, args)
    torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, seed_grads)])
    return {k: v.grad for k, v in args.items() if isinstance(v, torch.Tensor)}


def _leaf(args, dtype=None):
    out = {}
    for k, v in args.items():
        if isinstance(v, torch.Tensor):
            v = v.detach() if dtype is None else v.detach().to(dtype)
            v = v.clone().requires_grad_()
        out[k] = v
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("B,N,C", [(2, 1, 1), (3, 17, 7), (2, 258, 384), (2, 256, 1152),
                                   (1, 17, 4097)])
def test_backward_matches_reference(device, op, B, N, C):
    """Gradients of every input against fp64 autograd of the reference. Low-precision
    errors may be at most 2x those of eager PyTorch in the same dtype (STYLE.md rule 7)."""
    for dtype in DTYPES[device]:
        check_backward(device, dtype, op, B, N, C)


def check_backward(device, dtype, op, B, N, C):
    args = make_inputs(op, B, N, C, dtype, device)
    n_out = 2 if op == "gated_residual_ln_modulate" else 1
    seeds = [torch.randn(B, N, C, dtype=torch.float64, device=device) for _ in range(n_out)]
    # The seed grads are rounded to dtype first, so all three see the same values.
    seeds = [s.to(dtype).double() for s in seeds]
    ours = _grads(ditkernels, op, _leaf(args), seeds)
    exact = _grads(reference, op, _leaf(args, torch.float64), seeds)
    eager = _grads(reference, op, _leaf(args), seeds)
    for name, g in ours.items():
        assert g.dtype == dtype and g.shape == args[name].shape, name
        err = rel_err(g, exact[name])
        bound = rel_err_bound(rel_err(eager[name], exact[name]), dtype)
        assert err <= bound, f"{dtype} grad of {name}: rel err {err:.2e} > {bound:.2e}"


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("flags", [dict(), dict(affine=False), dict(shift=False, scale=False),
                                   dict(gate=False), dict(scale=False)])
def test_gradcheck_float64_cpu(op, flags):
    if op == "ln_modulate" and "gate" in flags:
        pytest.skip("ln_modulate has no gate")
    args = make_inputs(op, 2, 9, 6, torch.float64, "cpu", requires_grad=True, **flags)
    names = [k for k, v in args.items() if isinstance(v, torch.Tensor)]

    def fn(*tensors):
        return call(ditkernels, op, dict(args, **dict(zip(names, tensors))))

    assert torch.autograd.gradcheck(fn, [args[k] for k in names])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_backward_is_deterministic(device, op):
    dtype = torch.float32
    args = make_inputs(op, 4, 300, 384, dtype, device)
    seeds = [torch.randn(4, 300, 384, device=device) for _ in range(2)]
    first = _grads(ditkernels, op, _leaf(args), seeds)
    for _ in range(3):
        again = _grads(ditkernels, op, _leaf(args), seeds)
        for k in first:
            assert torch.equal(first[k], again[k]), k


def _outputs_and_grads(op, args, seeds):
    leaves = _leaf(args)
    outs = [o.detach() for o in call(ditkernels, op, leaves)]
    grads = _grads(ditkernels, op, leaves, seeds)
    return outs + list(grads.values())


@pytest.mark.parametrize("op", OPS)
def test_cpu_results_independent_of_thread_count(op):
    """Rows split over threads, and backward slots of 32 tokens, by the thread count;
    results must not move. N = 300 leaves a partial slot, C = 390 a vector tail."""
    B, N, C = 5, 300, 390
    args = make_inputs(op, B, N, C, torch.float32, "cpu")
    seeds = [torch.randn(B, N, C) for _ in range(2)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _outputs_and_grads(op, args, seeds)
        torch.set_num_threads(4)
        multi = _outputs_and_grads(op, args, seeds)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(single, multi):
        assert torch.equal(a, b)


@pytest.mark.parametrize("capability", CPU_CAPABILITIES)
def test_cpu_instruction_set_variants(capability):
    """The baseline and AVX2 kernels (this process runs the best the CPU has) against
    the reference, at vector tails and rows shorter than one vector."""
    run_with_cpu_capability(capability, """
import test_adaln as t
for dtype in t.DTYPES["cpu"]:
    for op in t.OPS:
        for B, N, C in [(2, 5, 7), (2, 33, 390), (1, 3, 4097)]:
            t._forward_case("cpu", dtype, op, B, N, C)
            t.check_backward("cpu", dtype, op, B, N, C)
""")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_empty_batch_or_tokens(device, op):
    for B, N in [(0, 5), (2, 0)]:
        args = make_inputs(op, B, N, 8, torch.float32, device, requires_grad=True)
        outs = call(ditkernels, op, args)
        assert all(o.shape == (B, N, 8) for o in outs)
        sum(o.sum() for o in outs).backward()
        for k, v in args.items():
            if isinstance(v, torch.Tensor):
                assert v.grad is not None and v.grad.shape == v.shape
                assert not v.grad.any(), k


# ---------------------------------------------------------------------------
# custom-op machinery: opcheck and torch.compile
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("flags", [dict(), dict(affine=False, gate=False),
                                   dict(shift=False, scale=False)])
def test_opcheck(device, op, flags):
    if op == "ln_modulate":
        flags = {k: v for k, v in flags.items() if k != "gate"}
    args = make_inputs(op, 2, 5, 24, torch.float32, device, requires_grad=True, **flags)
    torch.library.opcheck(getattr(torch.ops.ditkernels, op).default, tuple(args.values()))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_backward_ops(device):
    fwd = make_inputs("gated_residual_ln_modulate", 2, 5, 24, torch.float32, device)
    gy, gxo = torch.randn_like(fwd["x"]), torch.randn_like(fwd["x"])
    torch.library.opcheck(torch.ops.ditkernels.ln_modulate_backward.default,
                          (gy, fwd["x"], fwd["shift"], fwd["scale"], EPS, fwd["weight"],
                           fwd["bias"]))
    for grad_x_out in (gxo, None):
        torch.library.opcheck(torch.ops.ditkernels.gated_residual_ln_modulate_backward.default,
                              (grad_x_out, gy, fwd["x"], fwd["h"], fwd["gate"], fwd["shift"],
                               fwd["scale"], EPS, fwd["weight"], fwd["bias"]))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    """A DiT-like pair of branches under torch.compile(fullgraph=True), forward and
    backward, matches eager execution of the same ops."""
    torch._dynamo.reset()

    def branch_pair(x, h1, h2, ada, lib):
        shift1, scale1, gate1, shift2, scale2, gate2 = ada.chunk(6, dim=1)
        y = lib.ln_modulate(x, shift1, scale1, 1e-6)
        x, y = lib.gated_residual_ln_modulate(x, h1 * y, gate1, shift2, scale2, 1e-6)
        return x + gate2[:, None] * (h2 * y)

    B, N, C = 2, 9, 32
    inputs = [torch.randn(B, N, C, device=device) for _ in range(3)] + [
        torch.randn(B, 6 * C, device=device)]
    compiled = torch.compile(lambda *a: branch_pair(*a, ditkernels), fullgraph=True)
    results = []
    for fn in (compiled, lambda *a: branch_pair(*a, ditkernels)):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = fn(*leaves)
        out.square().sum().backward()
        results.append([out] + [t.grad for t in leaves])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------

def _bad_cases(device):
    x = torch.randn(2, 5, 8, device=device)
    v = torch.randn(2, 8, device=device)
    w = torch.randn(8, device=device)
    return [
        ("x must have shape \\[B, N, C\\]", "ln_modulate", dict(x=x[0], shift=v[0:1], scale=v[0:1])),
        ("shift must have shape \\[B, C\\] = \\[2, 8\\]", "ln_modulate",
         dict(x=x, shift=torch.randn(3, 8, device=device), scale=v)),
        ("scale must have shape \\[B, C\\] = \\[2, 8\\]", "ln_modulate",
         dict(x=x, shift=v, scale=torch.randn(2, 9, device=device))),
        ("weight must have shape \\[C\\] = \\[8\\]", "ln_modulate",
         dict(x=x, shift=v, scale=v, weight=torch.randn(7, device=device))),
        ("bias must have shape \\[C\\]", "ln_modulate",
         dict(x=x, shift=v, scale=v, bias=torch.randn(2, 8, device=device))),
        ("shift has dtype Double but x has dtype Float", "ln_modulate",
         dict(x=x, shift=v.double(), scale=v)),
        ("at least one feature", "ln_modulate", dict(x=x[..., :0], shift=None, scale=None)),
        ("x has dtype Int", "ln_modulate", dict(x=x.int(), shift=None, scale=None)),
        ("h must have the shape of x", "gated_residual_ln_modulate",
         dict(x=x, h=x[:, :4], gate=v, shift=v, scale=v)),
        ("gate must have shape \\[B, C\\]", "gated_residual_ln_modulate",
         dict(x=x, h=x, gate=v[:1], shift=v, scale=v)),
        ("h has dtype BFloat16 but x has dtype Float", "gated_residual_ln_modulate",
         dict(x=x, h=x.bfloat16(), gate=v, shift=v, scale=v)),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_raise_clear_errors(device):
    for pattern, op, kwargs in _bad_cases(device):
        with pytest.raises(RuntimeError, match=pattern):
            getattr(ditkernels, op)(**kwargs)


@pytest.mark.cuda
def test_cuda_specific_errors():
    x = torch.randn(2, 5, 8, device="cuda")
    v = torch.randn(2, 8, device="cuda")
    with pytest.raises(RuntimeError, match="shift is on cpu but x is on cuda"):
        ditkernels.ln_modulate(x, v.cpu(), v)
    with pytest.raises(RuntimeError, match="x has dtype Double; the CUDA kernels support"):
        ditkernels.ln_modulate(x.double(), None, None)
    with pytest.raises(RuntimeError, match="C <= 8192, got C = 8193"):
        ditkernels.ln_modulate(torch.randn(1, 2, 8193, device="cuda"), None, None)
