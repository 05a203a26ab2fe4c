"""Tests of the timestep-calibrated int8 ops: int8_linear, int8_gemm_dequant,
quantize_per_sample and ln_modulate_int8. Integer paths are exact: every result is
compared bit for bit with the integer reference in ditkernels.reference."""

import pytest
import torch

import ditkernels
from ditkernels import reference
from conftest import (CPU_CAPABILITIES, DEVICES, DTYPES, GEMM_KERNELS,
                      run_with_cpu_capability, set_gemm_kernel)

T_STEPS = 1000


def make_gemm_inputs(lead, K, N, dtype, device, bias=True, one_t=False):
    g = torch.Generator().manual_seed(sum(lead) * 131 + K + N)
    samples = lead[0] if len(lead) == 2 else lead[0]
    x = torch.randn(*lead, K, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    w_q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8).to(device)
    w_scale = (torch.rand(N, generator=g) * 0.02 + 1e-3).to(device)
    # Scales of very different sizes, so clamping to +-127 happens for small ones.
    act_scales = (torch.rand(T_STEPS, generator=g) * 0.05 + 0.002).to(device)
    t = torch.randint(0, T_STEPS, (1 if one_t else samples,), generator=g).to(device)
    b = torch.randn(N, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return dict(x=x, w_q=w_q, w_scale=w_scale, act_scales=act_scales, t=t,
                bias=b if bias else None)


# x as [B, L, K] with one timestep per sample, as [M, K] with one per row, and
# with a single timestep; K, N multiples of 16 with k-tile tails; odd M.
CASES = [((2, 17), 64, 48, False), ((3, 129), 96, 160, False), ((33,), 32, 16, False),
         ((1, 258), 1152, 144, False), ((5, 7), 208, 16, True)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead,K,N,one_t", CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_bit_identical_to_integer_reference(device, lead, K, N, one_t, bias):
    for dtype in DTYPES[device]:
        check_int8_linear(device, dtype, lead, K, N, one_t, bias)


def check_int8_linear(device, dtype, lead, K, N, one_t, bias):
    args = make_gemm_inputs(lead, K, N, dtype, device, bias, one_t)
    y = ditkernels.int8_linear(**args)
    ref = reference.int8_linear(**args)
    assert y.dtype == dtype and y.shape == (*lead, N)
    assert torch.equal(y, ref), (y - ref).abs().max()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead,K,N,one_t", CASES[:3])
def test_int8_gemm_dequant_and_quantize(device, lead, K, N, one_t):
    check_gemm_dequant_and_quantize(device, DTYPES[device], lead, K, N, one_t)


def check_gemm_dequant_and_quantize(device, out_dtypes, lead, K, N, one_t):
    args = make_gemm_inputs(lead, K, N, torch.float32, device, True, one_t)
    x_q = ditkernels.quantize_per_sample(args["x"], args["act_scales"], args["t"])
    assert x_q.dtype == torch.int8
    assert torch.equal(x_q, reference.quantize_per_sample(args["x"], args["act_scales"],
                                                          args["t"]))
    for out_dtype in out_dtypes:
        gemm_args = dict(args, x_q=x_q, bias=args["bias"].to(out_dtype), out_dtype=out_dtype)
        del gemm_args["x"]
        y = ditkernels.int8_gemm_dequant(**gemm_args)
        assert y.dtype == out_dtype
        assert torch.equal(y, reference.int8_gemm_dequant(**gemm_args))


def test_quantize_rounds_half_to_even_and_clamps():
    s = torch.tensor([0.5])
    # x / s overflows to +-inf for the last two.
    x = torch.tensor([[0.25, 0.75, -0.25, 1.25, 200.0, -200.0, 0.0, 3e38, -3e38]])
    q = ditkernels.quantize_per_sample(x, s, torch.tensor([0]))
    assert q.tolist() == [[0, 2, 0, 2, 127, -127, 0, 127, -127]]


# The CPU kernels take any K and N: sizes off every vector width, and M >= 1024
# rows, where the quantize loop and the dequantization run many full vectors.
# K = 1 is an outer product (torch._int_mm gets it wrong on CPU).
CPU_ODD_CASES = [((1030,), 37, 23, False), ((3, 400), 1153, 129, False), ((2, 9), 1, 7, True)]


@pytest.mark.parametrize("lead,K,N,one_t", CPU_ODD_CASES)
def test_cpu_int8_linear_odd_sizes(lead, K, N, one_t):
    for dtype in DTYPES["cpu"]:
        check_int8_linear("cpu", dtype, lead, K, N, one_t, True)


@pytest.mark.parametrize("capability", CPU_CAPABILITIES)
def test_cpu_instruction_set_variants(capability):
    """The baseline and AVX2 quantize kernels (this process runs the best the CPU
    has) against the integer reference, bit for bit."""
    run_with_cpu_capability(capability, """
import test_int8 as t
for dtype in t.DTYPES["cpu"]:
    for lead, K, N, one_t in t.CASES + t.CPU_ODD_CASES:
        t.check_int8_linear("cpu", dtype, lead, K, N, one_t, True)
    t.check_quantize_rows_of_eight("cpu", dtype)
""")


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_rows_of_eight(device):
    for dtype in DTYPES[device]:
        check_quantize_rows_of_eight(device, dtype)


def check_quantize_rows_of_eight(device, dtype):
    """K % 8 == 0 takes the CUDA kernel's vector path: ties, clamps, overflow to inf,
    per-sample scales and a non-contiguous input, against the reference exactly."""
    special = torch.tensor([0.25, 0.75, -0.25, 1.25, 200.0, -200.0, 0.0, 3e38, -3e38,
                            2.5, -2.5, 63.5, 0.125, -1.75, 100.0, 1.0])
    x = torch.randn(3, 5, 32)
    x[1, 2, :16] = special * 0.5
    x = x.to(device, dtype).transpose(0, 1)  # [5, 3, 32], rows not contiguous
    act_scales = torch.tensor([0.5, 0.02, 0.1, 0.25], device=device)
    t = torch.tensor([1, 0, 3, 2, 0], device=device)
    q = ditkernels.quantize_per_sample(x, act_scales, t)
    assert torch.equal(q, reference.quantize_per_sample(x, act_scales, t))
    assert (q[2, 1, :9] == torch.tensor([0, 2, 0, 2, 127, -127, 0, 127, -127],
                                        dtype=torch.int8, device=device)).all()


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", GEMM_KERNELS)
def test_every_cuda_kernel_is_bit_identical(kernel, monkeypatch):
    """On Hopper every GEMM (the TMA and the cp.async wgmma kernels at each tile width,
    after a quantize pass; mma.sync, quantizing in its A load) matches the integer
    reference bit for bit."""
    set_gemm_kernel(monkeypatch, kernel)
    for lead, K, N, one_t in CASES:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            check_int8_linear("cuda", dtype, lead, K, N, one_t, True)
        check_gemm_dequant_and_quantize("cuda", DTYPES["cuda"], lead, K, N, one_t)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_timesteps_in_one_batch(device):
    """Each sample uses its own row of the table: a batch with mixed t equals the
    samples run one by one."""
    args = make_gemm_inputs((4, 9), 64, 32, torch.float32, device)
    args["t"] = torch.tensor([0, 999, 500, 0], device=device)
    y = ditkernels.int8_linear(**args)
    for b in range(4):
        alone = ditkernels.int8_linear(**dict(args, x=args["x"][b:b + 1], t=args["t"][b:b + 1]))
        assert torch.equal(y[b:b + 1], alone)
    # And the lookup matters: sample 0 at t = 999 instead of 0 gives another result.
    swapped = ditkernels.int8_linear(**dict(args, t=torch.tensor([999, 999, 500, 0], device=device)))
    assert not torch.equal(swapped[0], y[0]) and torch.equal(swapped[2:], y[2:])


@pytest.mark.parametrize("device", DEVICES)
def test_ln_modulate_int8_matches_quantized_ln_modulate(device):
    for dtype in DTYPES[device]:
        check_ln_modulate_int8(device, dtype)


def check_ln_modulate_int8(device, dtype):
    B, N, C = 3, 17, 72
    x = torch.randn(B, N, C, device=device).to(dtype)
    ada = torch.randn(B, 2 * C, device=device).to(dtype)
    shift, scale = ada[:, :C], ada[:, C:]
    act_scales = torch.rand(T_STEPS, device=device) * 0.05 + 0.01
    t = torch.tensor([3, 700, 999], device=device)
    q = ditkernels.ln_modulate_int8(x, shift, scale, act_scales, t)
    y = ditkernels.ln_modulate(x, shift, scale)
    assert q.dtype == torch.int8
    assert torch.equal(q, reference.quantize_per_sample(y, act_scales, t))
    # Against the plain-PyTorch norm: at most one step where rounding of y differs.
    ref = reference.ln_modulate_int8(x, shift, scale, act_scales, t)
    assert (q.int() - ref.int()).abs().max() <= 1


@pytest.mark.parametrize("device", DEVICES)
def test_int8_linear_straight_through_gradient(device):
    args = make_gemm_inputs((2, 5), 32, 16, torch.float32, device)
    x = args["x"].requires_grad_()
    bias = args["bias"].requires_grad_()
    y = ditkernels.int8_linear(**dict(args, x=x, bias=bias))
    gy = torch.randn_like(y)
    gx, gb = torch.autograd.grad(y, [x, bias], gy)
    w = args["w_q"].float() * args["w_scale"][:, None]
    torch.testing.assert_close(gx, gy @ w)
    torch.testing.assert_close(gb, gy.sum((0, 1)))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    args = make_gemm_inputs((2, 9), 32, 16, torch.float32, device)
    torch.library.opcheck(torch.ops.ditkernels.int8_linear.default, tuple(args.values()),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))
    x_q = ditkernels.quantize_per_sample(args["x"], args["act_scales"], args["t"])
    torch.library.opcheck(torch.ops.ditkernels.int8_gemm_dequant.default,
                          (x_q, args["w_q"], args["w_scale"], args["act_scales"], args["t"],
                           args["bias"], torch.float32))
    torch.library.opcheck(torch.ops.ditkernels.quantize_per_sample.default,
                          (args["x"], args["act_scales"], args["t"]))
    torch.library.opcheck(torch.ops.ditkernels.ln_modulate_int8.default,
                          (args["x"], None, None, 1e-6, None, None, args["act_scales"],
                           args["t"]))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    args = make_gemm_inputs((2, 9), 32, 16, torch.float32, device)
    fn = torch.compile(lambda *a: ditkernels.int8_linear(*a).relu(), fullgraph=True)
    assert torch.equal(fn(*args.values()), reference.int8_linear(**args).relu())


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_raise_clear_errors(device, monkeypatch):
    # On CUDA the values of t are checked on the host only in the debug mode (on the
    # device otherwise: see check_bad_values_fail_on_the_device); the CPU always checks.
    monkeypatch.setenv("DITKERNELS_HOST_CHECKS", "1")
    args = make_gemm_inputs((2, 5), 32, 16, torch.float32, device)
    cases = [
        ("t holds timesteps in \\[0, 1000\\] but act_scales has only 1000 entries",
         dict(t=torch.tensor([0, 1000], device=device))),
        ("w_q must be an int8 matrix", dict(w_q=args["w_q"].float())),
        ("w_scale must be float32 of shape \\[N\\] = \\[16\\]", dict(w_scale=args["w_scale"].half())),
        ("act_scales must be a non-empty float32 vector", dict(act_scales=args["act_scales"].double())),
        ("w_q has K = 32 .* but x has K = 16", dict(x=args["x"][..., :16])),
        ("t has 3 entries but x of shape \\[2, 5, 32\\] holds 2 samples",
         dict(t=torch.tensor([1, 2, 3], device=device))),
        ("t must be an int64 vector", dict(t=args["t"].int())),
        ("bias must have dtype Float and shape \\[N\\] = \\[16\\]", dict(bias=args["bias"][:8])),
    ]
    for pattern, change in cases:
        with pytest.raises(RuntimeError, match=pattern):
            ditkernels.int8_linear(**dict(args, **change))


@pytest.mark.cuda
def test_cuda_shape_requirements():
    args = make_gemm_inputs((2, 5), 40, 16, torch.bfloat16, "cuda")
    with pytest.raises(RuntimeError, match="K and N to be multiples of 16, got K = 40"):
        ditkernels.int8_linear(**args)


def value_check_calls(device):
    """(name, call(act_scales, t)) of every int8 op, on inputs of 2 samples."""
    args = make_gemm_inputs((2, 5), 32, 16, torch.float32, device)
    x, w_q, w_scale, bias = args["x"], args["w_q"], args["w_scale"], args["bias"]
    x_q = torch.randint(-127, 128, x.shape, dtype=torch.int8).to(device)
    return [
        ("int8_linear", lambda s, t: ditkernels.int8_linear(x, w_q, w_scale, s, t, bias)),
        ("int8_gemm_dequant",
         lambda s, t: ditkernels.int8_gemm_dequant(x_q, w_q, w_scale, s, t, bias, torch.float32)),
        ("quantize_per_sample (K % 8 == 0)", lambda s, t: ditkernels.quantize_per_sample(x, s, t)),
        ("quantize_per_sample (K % 8 != 0)",
         lambda s, t: ditkernels.quantize_per_sample(x[..., :13], s, t)),
        ("ln_modulate_int8", lambda s, t: ditkernels.ln_modulate_int8(x, None, None, s, t)),
    ], args["act_scales"]


def check_bad_values_fail_on_the_device(device, monkeypatch):
    """A timestep outside the table, or a scale that is zero, negative, Inf or NaN,
    fails the kernel that reads it (the emulator reports the device-side check; the
    host never looked at the values, or its own message would come first). With
    DITKERNELS_HOST_CHECKS=1 the host reports them instead, naming the values."""
    calls, good = value_check_calls(device)
    bad_scales = good.clone()
    bad_scales[7] = float("nan")
    bad_scales[8] = 0.0
    cases = [
        (good, [0, 1000], "a timestep t is outside \\[0, act_scales.numel\\(\\)\\)",
         "t holds timesteps in \\[0, 1000\\] but act_scales has only 1000 entries"),
        (good, [-1, 3], "a timestep t is outside",
         "t holds timesteps in \\[-1, 3\\]"),
        (bad_scales, [7, 3], "act_scales\\[t\\] holds a scale that is zero, negative or not finite",
         "act_scales\\[t\\] holds 1 scales that are zero, negative or not finite"),
        (bad_scales, [8, 8], "zero, negative or not finite",
         "act_scales\\[t\\] holds 2 scales"),
    ]
    for name, call in calls:
        for scales, t, device_msg, host_msg in cases:
            t = torch.tensor(t, device=device)
            monkeypatch.delenv("DITKERNELS_HOST_CHECKS", raising=False)
            with pytest.raises(RuntimeError, match="device-side check failed: int8: .*" + device_msg):
                call(scales, t)
            monkeypatch.setenv("DITKERNELS_HOST_CHECKS", "1")
            with pytest.raises(RuntimeError, match=host_msg):
                call(scales, t)
        # Good values pass both ways, with the same result.
        t = torch.tensor([0, 999], device=device)
        monkeypatch.delenv("DITKERNELS_HOST_CHECKS", raising=False)
        on_device = call(good, t)
        monkeypatch.setenv("DITKERNELS_HOST_CHECKS", "1")
        assert torch.equal(call(good, t), on_device), name


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", GEMM_KERNELS)
def test_cuda_calls_never_synchronize(kernel, monkeypatch):
    """Under torch.cuda's sync debug mode "error", any host synchronisation raises:
    none of the int8 ops has one. And int8_linear captures into a CUDA graph whose
    replay gives the eager result."""
    set_gemm_kernel(monkeypatch, kernel)
    calls, scales = value_check_calls("cuda")
    t = torch.tensor([5, 999], device="cuda")
    eager = [call(scales, t) for _, call in calls]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for (name, call), want in zip(calls, eager):
            assert torch.equal(call(scales, t), want), name
    finally:
        torch.cuda.set_sync_debug_mode("default")
    name, int8_linear = calls[0]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        int8_linear(scales, t)  # warm-up outside the capture (cudaFuncSetAttribute)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = int8_linear(scales, t)
    t.copy_(torch.tensor([999, 0]))
    graph.replay()
    assert torch.equal(y, int8_linear(scales, t))
