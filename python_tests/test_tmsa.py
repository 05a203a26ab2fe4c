"""Tests of TMSA: fused time-dependent attention with a relative-position-bias table."""

import pytest
import torch

import ditkernels
from ditkernels import reference
from conftest import DEVICES, DTYPES, rel_err, rel_err_bound, upcast

HEAD_DIMS = {"cpu": [8, 32, 72], "cuda": [32, 64, 72, 96, 128]}
# Every CUDA head dim has its own backward kernel; two suffice for the CPU's one.
BACKWARD_HEAD_DIMS = {"cpu": [8, 32], "cuda": HEAD_DIMS["cuda"]}


def make_inputs(B, H, D, grid, leading, dtype, device, time=True, table=True):
    gh, gw = grid
    N = leading + gh * gw

    def t(*shape):
        return torch.randn(*shape, dtype=torch.float64).to(device=device, dtype=dtype)

    return dict(qkv=t(B, N, 3, H, D), time_qkv=t(B, 3, H, D) if time else None,
                rel_table=t((2 * gh - 1) * (2 * gw - 1), H) if table else None,
                grid_size=grid, num_leading=leading)


def check_against_reference(ours, args, eager):
    """fp64/fp32 tight; fp16/bf16 at most 2x eager PyTorch's own error against an
    fp64 reference (STYLE.md rule 7), with a floor of one unit of the dtype."""
    exact = reference.tmsa(**upcast(args))
    dtype = args["qkv"].dtype
    err = rel_err(ours, exact)
    bound = rel_err_bound(rel_err(eager, exact), dtype)
    assert err <= bound, f"{dtype}: rel err {err:.3e} > {bound:.3e}"


# (grid, leading tokens): N = 1, 7 (odd, leading only in part), 16, 66 (258/4-ish),
# 256 + 2 = 258 (U-ViT-style extras), 99 odd grid, 1024 on CUDA only.
CASES = [((1, 1), 0), ((2, 3), 1), ((4, 4), 0), ((8, 8), 2), ((16, 16), 2), ((9, 11), 0)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grid,leading", CASES)
def test_forward_matches_reference(device, grid, leading):
    for dtype in DTYPES[device]:
        for D in HEAD_DIMS[device]:
            check_forward(device, dtype, D, grid, leading)


def check_forward(device, dtype, D, grid, leading):
    args = make_inputs(2, 3, D, grid, leading, dtype, device)
    out = ditkernels.tmsa(**args)
    assert out.shape == (2, leading + grid[0] * grid[1], 3, D) and out.dtype == dtype
    assert out.is_contiguous()
    check_against_reference(out, args, reference.tmsa(**args))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("time,table", [(False, True), (True, False), (False, False)])
def test_optional_time_and_table(device, time, table):
    for dtype in DTYPES[device]:
        check_optional_time_and_table(device, dtype, time, table)


def check_optional_time_and_table(device, dtype, time, table):
    args = make_inputs(2, 2, 32, (5, 5), 1, dtype, device, time=time, table=table)
    if not table:
        args["grid_size"] = None
    check_against_reference(ditkernels.tmsa(**args), args, reference.tmsa(**args))


@pytest.mark.cuda
@pytest.mark.parametrize("grid,leading", [((32, 32), 0), ((16, 16), 3), ((64, 64), 0)])
def test_forward_long_sequences_cuda(grid, leading):
    for D in (64, 72):
        args = make_inputs(1, 2, D, grid, leading, torch.bfloat16, "cuda")
        check_against_reference(ditkernels.tmsa(**args), args, reference.tmsa(**args))


@pytest.mark.parametrize("device", DEVICES)
def test_qkv_read_in_place_from_projection(device):
    for dtype in DTYPES[device]:
        check_qkv_read_in_place(device, dtype)


def check_qkv_read_in_place(device, dtype):
    """qkv as the reshaped output of a Linear, a non-contiguous layout, and a time
    term that starts one element past a 16-byte boundary."""
    B, N, H, D = 2, 17, 2, 32
    x = torch.randn(B, N, 3 * H * D + 8, dtype=torch.float64).to(device, dtype)
    qkv = x[..., :3 * H * D].reshape(B, N, 3, H, D)  # a strided view
    assert not qkv.is_contiguous()
    flat = torch.empty(B * 3 * H * D + 1, dtype=dtype, device=device)
    time_qkv = flat[1:].view(B, 3, H, D).copy_(torch.randn(B, 3, H, D, dtype=torch.float64))
    args = dict(qkv=qkv, time_qkv=time_qkv,
                rel_table=torch.randn(7 * 7, H, dtype=torch.float64).to(device, dtype),
                grid_size=(4, 4), num_leading=1)
    check_against_reference(ditkernels.tmsa(**args), args, reference.tmsa(**args))


def _grads(fn, args, grad):
    leaves = {k: (v.detach().clone().requires_grad_() if isinstance(v, torch.Tensor) else v)
              for k, v in args.items()}
    out = fn(**leaves)
    names = [k for k, v in leaves.items() if isinstance(v, torch.Tensor)]
    return dict(zip(names, torch.autograd.grad(out, [leaves[k] for k in names],
                                               grad.to(out.dtype))))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grid,leading", [((2, 3), 1), ((8, 8), 2), ((9, 11), 0)])
def test_backward_matches_reference(device, grid, leading):
    for dtype in DTYPES[device]:
        for D in BACKWARD_HEAD_DIMS[device]:
            check_backward(device, dtype, D, grid, leading)


def check_backward(device, dtype, D, grid, leading):
    args = make_inputs(2, 3, D, grid, leading, dtype, device)
    N = leading + grid[0] * grid[1]
    grad = torch.randn(2, N, 3, D, dtype=torch.float64, device=device).to(dtype).double()
    ours = _grads(ditkernels.tmsa, args, grad)
    exact = _grads(reference.tmsa, upcast(args), grad)
    eager = _grads(reference.tmsa, args, grad)
    for name, g in ours.items():
        assert g.dtype == dtype and g.shape == args[name].shape, name
        err = rel_err(g, exact[name])
        bound = rel_err_bound(rel_err(eager[name], exact[name]), dtype)
        assert err <= bound, f"{dtype} D={D} grad of {name}: {err:.3e} > {bound:.3e}"


@pytest.mark.parametrize("time,table", [(True, True), (False, True), (True, False)])
def test_gradcheck_float64_cpu(time, table):
    args = make_inputs(2, 2, 4, (2, 3), 1, torch.float64, "cpu", time=time, table=table)
    if not table:
        args["grid_size"] = None
    names = [k for k, v in args.items() if isinstance(v, torch.Tensor)]
    for k in names:
        args[k].requires_grad_()
    fn = lambda *t: ditkernels.tmsa(**dict(args, **dict(zip(names, t))))
    assert torch.autograd.gradcheck(fn, [args[k] for k in names])


@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_deterministic(device):
    """Bitwise-equal gradients run to run, table gradient included (on CUDA the fused
    backward sums dQ and the table with integer atomics, which are order-independent)."""
    for dtype in DTYPES[device]:
        check_backward_is_deterministic(device, dtype)


def check_backward_is_deterministic(device, dtype):
    args = make_inputs(3, 2, 64, (8, 8), 1, dtype, device)  # N = 65: two key tiles
    grad = torch.randn(3, 65, 2, 64, device=device).to(dtype)
    first = _grads(ditkernels.tmsa, args, grad)
    for _ in range(2):
        again = _grads(ditkernels.tmsa, args, grad)
        for k in first:
            assert torch.equal(first[k], again[k]), (dtype, k)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    args = make_inputs(2, 2, 32, (3, 3), 1, torch.float32, device)
    qkv, t, table = (args[k].requires_grad_() for k in ("qkv", "time_qkv", "rel_table"))
    torch.library.opcheck(torch.ops.ditkernels.tmsa.default, (qkv, t, table, 3, 3, 1, 0.2))
    out, lse = torch.ops.ditkernels.tmsa(qkv, t, table, 3, 3, 1, 0.2)
    torch.library.opcheck(torch.ops.ditkernels.tmsa_backward.default,
                          (torch.randn_like(out), qkv.detach(), t.detach(), table.detach(),
                           out.detach(), lse, 3, 3, 1, 0.2))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    args = make_inputs(2, 2, 32, (3, 3), 1, torch.float32, device)

    def fn(qkv, t, table):
        return ditkernels.tmsa(qkv, t, table, (3, 3), 1).square().sum()

    leaves = [args[k].clone().requires_grad_() for k in ("qkv", "time_qkv", "rel_table")]
    compiled = torch.compile(fn, fullgraph=True)(*leaves)
    compiled.backward()
    grads = [x.grad for x in leaves]
    eager_leaves = [x.detach().clone().requires_grad_() for x in leaves]
    fn(*eager_leaves).backward()
    for a, b in zip(grads, [x.grad for x in eager_leaves]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_windowed_matches_per_window_reference(device):
    B, H, D, gh, gw, ws = 2, 2, 32, 8, 12, 4
    qkv = torch.randn(B, gh * gw, 3, H, D, device=device)
    t = torch.randn(B, 3, H, D, device=device)
    table = torch.randn((2 * ws - 1) ** 2, H, device=device)
    out = ditkernels.tmsa_windowed(qkv, t, table, (gh, gw), ws)
    grid = qkv.view(B, gh, gw, 3, H, D)
    for wy in range(gh // ws):
        for wx in range(gw // ws):
            win = grid[:, wy * ws:(wy + 1) * ws, wx * ws:(wx + 1) * ws].reshape(B, ws * ws, 3, H, D)
            ref = reference.tmsa(win, t, table, ws)
            got = out.view(B, gh, gw, H, D)[:, wy * ws:(wy + 1) * ws, wx * ws:(wx + 1) * ws]
            torch.testing.assert_close(got.reshape(B, ws * ws, H, D), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_raise_clear_errors(device):
    qkv = torch.randn(2, 10, 3, 2, 32, device=device)
    t = torch.randn(2, 3, 2, 32, device=device)
    table = torch.randn(9, 2, device=device)
    cases = [
        ("qkv must have shape \\[B, N, 3, H, D\\]", dict(qkv=qkv[:, :, :2])),
        ("time_qkv must have shape \\[B, 3, H, D\\] = \\[2, 3, 2, 32\\]",
         dict(qkv=qkv, time_qkv=t[:1])),
        ("rel_table must have shape .* = \\[9, 2\\] for a 2 x 2 grid",
         dict(qkv=qkv[:, :5], rel_table=torch.randn(10, 2, device=device), grid_size=2,
              num_leading=1)),
        ("N = 10 tokens do not match num_leading \\(0\\) \\+ grid 2 x 2 = 4",
         dict(qkv=qkv, rel_table=table, grid_size=2)),
        ("rel_table has dtype Double but qkv has dtype Float",
         dict(qkv=qkv[:, :4], rel_table=table.double(), grid_size=2)),
        ("qkv has dtype Int", dict(qkv=qkv.int())),
    ]
    for pattern, kwargs in cases:
        with pytest.raises(RuntimeError, match=pattern):
            ditkernels.tmsa(**kwargs)
    with pytest.raises(ValueError, match="rel_table needs grid_size"):
        ditkernels.tmsa(qkv[:, :4], rel_table=table)


@pytest.mark.cuda
def test_cuda_specific_errors():
    qkv = torch.randn(1, 4, 3, 2, 48, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="head dim 48 is not supported"):
        ditkernels.tmsa(qkv)
    with pytest.raises(RuntimeError, match="time_qkv is on cpu but qkv is on cuda"):
        ditkernels.tmsa(qkv, torch.randn(1, 3, 2, 48, dtype=torch.bfloat16))


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_does_not_change_the_computation(device):
    """The op computes in its inputs' dtype even inside torch.autocast (its CPU and
    fp32 paths are written with ATen matmuls that autocast would otherwise recast)."""
    args = make_inputs(2, 2, 32, (4, 4), 1, torch.float32, device)
    plain = ditkernels.tmsa(**args)
    with torch.autocast(device, dtype=torch.bfloat16):
        under = ditkernels.tmsa(**args)
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, plain, atol=0, rtol=0)
