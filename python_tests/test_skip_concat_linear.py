"""Tests of skip_concat_linear: Linear(cat([x, skip], -1)) without the concat."""

import pytest
import torch

import ditkernels
from ditkernels import reference
from conftest import DEVICES, DTYPES, GEMM_KERNELS, set_gemm_kernel, upcast

# Output tolerance against an fp64 reference: GEMMs with fp32 accumulation over
# K = 2D products, rounded once to the output dtype.
GEMM_TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=5e-2, rtol=2e-2),
}


def make_inputs(lead, D, Dout, dtype, device, bias=True):
    def t(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    # Weights scaled like nn.Linear's init keep outputs O(1) at every D.
    return dict(x=t(*lead, D), skip=t(*lead, D), weight=t(Dout, 2 * D, scale=(2 * D) ** -0.5),
                bias=t(Dout) if bias else None)


# M = B * tokens, including U-ViT's 258 tokens, a single row and odd counts; D a
# multiple of 8 (the CUDA kernel's requirement) with k-tiles that straddle x/skip.
CASES = [((2, 258), 64, 64), ((1,), 8, 8), ((3, 7), 40, 24), ((5, 97), 136, 130),
         ((1, 129), 256, 200), ((2, 65), 1152, 1152), ((300,), 8, 3)]


def check_forward(device, dtype, lead, D, Dout, bias):
    args = make_inputs(lead, D, Dout, dtype, device, bias)
    y = ditkernels.skip_concat_linear(**args)
    ref = reference.skip_concat_linear(**upcast(args))
    assert y.dtype == dtype and y.shape == (*lead, Dout)
    torch.testing.assert_close(y.double(), ref, **GEMM_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead,D,Dout", CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_reference(device, lead, D, Dout, bias):
    for dtype in DTYPES[device]:
        check_forward(device, dtype, lead, D, Dout, bias)


def check_non_contiguous_and_misaligned(device, dtype):
    args = make_inputs((4, 33), 48, 40, dtype, device)
    ref = reference.skip_concat_linear(**upcast(args))
    strided = dict(args, x=args["x"].transpose(0, 1).contiguous().transpose(0, 1),
                   skip=torch.cat([args["skip"], args["skip"]], -1)[..., :48],
                   weight=args["weight"].t().contiguous().t())
    flat = torch.empty(args["x"].numel() + 1, dtype=dtype, device=device)
    misaligned = dict(args, x=flat[1:].view_as(args["x"]).copy_(args["x"]))
    for variant in (strided, misaligned):
        y = ditkernels.skip_concat_linear(**variant)
        torch.testing.assert_close(y.double(), ref, **GEMM_TOL[dtype])


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", GEMM_KERNELS)
def test_forward_every_cuda_kernel(kernel, monkeypatch):
    """Each CUDA GEMM the op can run, selected by hand: the default picks one per shape,
    and the small test shapes alone would never reach the wider wgmma tiles."""
    set_gemm_kernel(monkeypatch, kernel)
    for lead, D, Dout in CASES:
        for dtype in (torch.bfloat16, torch.float16):
            check_forward("cuda", dtype, lead, D, Dout, True)
    check_non_contiguous_and_misaligned("cuda", torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_and_misaligned_inputs(device):
    for dtype in DTYPES[device]:
        check_non_contiguous_and_misaligned(device, dtype)


def check_backward(device, dtype, bias):
    args = make_inputs((3, 17), 40, 24, dtype, device, bias)
    grad = torch.randn(3, 17, 24, dtype=torch.float64).to(device=device, dtype=dtype)
    names = [k for k, v in args.items() if v is not None]

    def grads(fn, a):
        leaves = {k: (v.detach().clone().requires_grad_() if v is not None else None)
                  for k, v in a.items()}
        out = fn(**leaves)
        return torch.autograd.grad(out, [leaves[k] for k in names], grad.to(out.dtype))

    ours = grads(ditkernels.skip_concat_linear, args)
    ref = grads(reference.skip_concat_linear, upcast(args))
    for name, g, r in zip(names, ours, ref):
        assert g.dtype == dtype and g.shape == args[name].shape, name
        # dW and db sum over all 51 rows.
        torch.testing.assert_close(g.double(), r, **GEMM_TOL[dtype], msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
def test_backward_matches_reference(device, bias):
    for dtype in DTYPES[device]:
        check_backward(device, dtype, bias)


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64_cpu(bias):
    args = make_inputs((2, 5), 3, 4, torch.float64, "cpu", bias)
    tensors = {k: v.requires_grad_() for k, v in args.items() if v is not None}
    fn = lambda *t: ditkernels.skip_concat_linear(**dict(args, **dict(zip(tensors, t))))
    assert torch.autograd.gradcheck(fn, list(tensors.values()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(device, bias):
    args = make_inputs((2, 9), 16, 24, torch.float32, device, bias)
    for v in args.values():
        if v is not None:
            v.requires_grad_()
    torch.library.opcheck(torch.ops.ditkernels.skip_concat_linear.default, tuple(args.values()))
    gy = torch.randn(2, 9, 24, device=device)
    torch.library.opcheck(torch.ops.ditkernels.skip_concat_linear_backward.default,
                          (gy, args["x"].detach(), args["skip"].detach(),
                           args["weight"].detach(), bias))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_rows(device):
    args = make_inputs((0, 5), 16, 8, torch.float32, device)
    for v in args.values():
        v.requires_grad_()
    y = ditkernels.skip_concat_linear(**args)
    assert y.shape == (0, 5, 8)
    y.sum().backward()
    assert not args["weight"].grad.any() and not args["bias"].grad.any()


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    args = make_inputs((2, 9), 16, 24, torch.float32, device)
    fn = torch.compile(lambda x, s, w, b: ditkernels.skip_concat_linear(x, s, w, b).relu(),
                       fullgraph=True)
    torch.testing.assert_close(fn(*args.values()),
                               reference.skip_concat_linear(**args).relu(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_raise_clear_errors(device):
    x = torch.randn(2, 5, 8, device=device)
    w = torch.randn(4, 16, device=device)
    cases = [
        ("skip must have the shape of x", dict(x=x, skip=x[:, :4], weight=w)),
        ("weight must have shape \\[Dout, 2 \\* D\\] = \\[Dout, 16\\]",
         dict(x=x, skip=x, weight=torch.randn(4, 8, device=device))),
        ("bias must have shape \\[Dout\\] = \\[4\\]",
         dict(x=x, skip=x, weight=w, bias=torch.randn(5, device=device))),
        ("weight has dtype Double but x has dtype Float", dict(x=x, skip=x, weight=w.double())),
        ("x has dtype Int", dict(x=x.int(), skip=x.int(), weight=w.int())),
        ("at least one dim", dict(x=x[0, 0, 0], skip=x[0, 0, 0], weight=w)),
    ]
    for pattern, kwargs in cases:
        with pytest.raises(RuntimeError, match=pattern):
            ditkernels.skip_concat_linear(**kwargs)


@pytest.mark.cuda
def test_cuda_specific_errors():
    x = torch.randn(2, 5, 12, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4, 24, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="multiple of 8, got x of shape \\[2, 5, 12\\]"):
        ditkernels.skip_concat_linear(x, x, w)
    with pytest.raises(RuntimeError, match="weight is on cpu but x is on cuda"):
        ditkernels.skip_concat_linear(x, x, w.cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_does_not_change_the_computation(device):
    args = make_inputs((3, 5), 16, 24, torch.float32, device)
    for v in args.values():
        v.requires_grad_()
    plain = ditkernels.skip_concat_linear(**args)
    g_plain = torch.autograd.grad(plain.sum(), list(args.values()))
    with torch.autocast(device, dtype=torch.bfloat16):
        under = ditkernels.skip_concat_linear(**args)
        g_under = torch.autograd.grad(under.sum(), list(args.values()))
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, plain, atol=0, rtol=0)
    for a, b in zip(g_under, g_plain):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
