"""Shared test fixtures: the device list, the `cuda` marker, tolerances, and the
helpers that judge whole models against their plain-PyTorch references.

Nothing here touches the GPU at import time: whether CUDA is usable is asked only
when a test that needs it is collected.
"""

import copy
import functools
from typing import Callable, Optional, Tuple

import pytest
import torch
import torch.nn as nn


@functools.lru_cache(maxsize=None)
def cuda_usable() -> bool:
    import ditkernels

    return ditkernels.build_info()["cuda"] and torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device and a CUDA build of ditkernels")
    for item in items:
        if "cuda" in item.keywords and not cuda_usable():
            item.add_marker(skip)


# The CUDA GEMM kernels a test can select (read by the ops at every call): on Hopper
# with an sm_90a build the default is the warp-specialized TMA wgmma kernel ("tma"),
# with the tile width picked per shape; "wgmma" is the cp.async wgmma kernel
# (DITKERNELS_DISABLE_TMA=1); "mma.sync" is what other GPUs run. Elsewhere all of them
# run the same kernel.
GEMM_KERNELS = ["tma-n128", "tma-n192", "tma-n256", "wgmma-n128", "wgmma-n192", "wgmma-n256",
                "mma.sync"]


def set_gemm_kernel(monkeypatch, kernel: str) -> None:
    if kernel == "mma.sync":
        monkeypatch.setenv("DITKERNELS_DISABLE_WGMMA", "1")
        return
    monkeypatch.delenv("DITKERNELS_DISABLE_WGMMA", raising=False)
    if kernel.startswith("tma"):
        monkeypatch.delenv("DITKERNELS_DISABLE_TMA", raising=False)
    else:
        monkeypatch.setenv("DITKERNELS_DISABLE_TMA", "1")
    if kernel not in ("wgmma", "tma"):
        monkeypatch.setenv("DITKERNELS_WGMMA_TILE_N", kernel.split("-n")[1])


# Parametrize over this to run a test on every device; the CUDA case carries the
# `cuda` marker and is skipped where there is no GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]

# Floating dtypes each backend supports (fp64 is CPU-only).
DTYPES = {
    "cpu": [torch.float32, torch.float64, torch.bfloat16, torch.float16],
    "cuda": [torch.float32, torch.bfloat16, torch.float16],
}

# Absolute/relative tolerances for norm-like ops against an fp64 reference
# (STYLE.md rule 7: 1e-2 for fp16/bf16).
NORM_TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
}


def upcast(args: dict) -> dict:
    """The fp64 copy of an op's keyword arguments (tensors detached), for the oracle."""
    return {k: (v.detach().double() if isinstance(v, torch.Tensor) else v)
            for k, v in args.items()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error of a against b. Values that are exactly zero in theory
    (C = 1 makes LayerNorm's dx vanish) are measured against an RMS floor of 1e-3,
    far below the O(1) values elsewhere."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / (b.norm() + 1e-3 * max(b.numel(), 1) ** 0.5)).item()


def rel_err_bound(eager_rel_err: float, dtype: torch.dtype) -> float:
    """The largest rel_err an op may show against its fp64 oracle: fixed for fp64 and
    fp32, which accumulate at their own precision; for fp16/bf16 EAGER_SLACK times
    eager PyTorch's own error (STYLE.md rule 7), never below one unit of the dtype, so
    a lucky eager run cannot fail the test."""
    if dtype == torch.float64:
        return 1e-10
    if dtype == torch.float32:
        return 1e-5
    return max(EAGER_SLACK * eager_rel_err, torch.finfo(dtype).eps)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One intra-op thread, for modules whose tensors are all tiny: a second thread buys
    nothing, and on a loaded 2-core machine its barriers slowed small ops down by an
    order of magnitude (a diffusion training loop 30x). Opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------
# models against their plain-PyTorch references (test_dit, test_uvit, test_diffit)
# ---------------------------------------------------------------------------

# STYLE.md rule 7: against an fp64 run of the reference, ditkernels may be at most
# EAGER_SLACK times as far off as the eager reference at the same precision.
EAGER_SLACK = 2.0


# (parameter name, module holding it) -> (mean, std) for that parameter, or None.
ParamScale = Callable[[str, nn.Module], Optional[Tuple[float, float]]]


def randomize_(model: nn.Module, scale: Optional[ParamScale] = None) -> nn.Module:
    """Random values of realistic scale in every trainable parameter, including those a
    model initialises to zero or constants (adaLN, final layers, biases), so that every
    one of them matters: N(0, fan_in ** -0.5) for matrices, N(0, 0.1) otherwise, or
    N(mean, std) where scale(name, module holding the parameter) gives (mean, std)."""
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            owner = model.get_submodule(name.rpartition(".")[0])
            mean_std = scale(name, owner) if scale is not None else None
            mean, std = mean_std or (0.0, p[0].numel() ** -0.5 if p.dim() > 1 else 0.1)
            p.copy_(mean + torch.randn(p.shape, generator=gen, dtype=torch.float64) * std)
    return model


def ditkernels_copy(reference_model: nn.Module, cls, config: dict) -> nn.Module:
    """cls(**config) with reference_model's weights, device, dtype and train mode."""
    like = next(reference_model.parameters())
    model = cls(**config).to(like.device, like.dtype)
    model.load_state_dict(reference_model.state_dict(), strict=True)
    return model.train(reference_model.training)


def image_model_inputs(batch: int, channels: int, size: int, num_classes: int, device,
                       dtype=torch.float32):
    """(x, t, y) for a diffusion model of [channels, size, size] images or latents:
    timesteps in [0, 999), labels below num_classes; (x, t) where num_classes <= 0.
    The same values at every call."""
    gen = torch.Generator().manual_seed(99)
    x = torch.randn(batch, channels, size, size, generator=gen).to(device, dtype)
    t = (torch.rand(batch, generator=gen) * 999).to(device)
    if num_classes <= 0:
        return x, t
    y = torch.randint(0, num_classes, (batch,), generator=gen).to(device)
    return x, t, y


def forward_backward(model, inputs, autocast_dtype=None, *, every_input=False):
    """Output and gradients of (out * w).sum() for a fixed random w: {"x": the first
    input's} (every_input: {"input i": every floating input's}), then every trainable
    parameter's by name.

    Seeding first makes the label dropout of train mode draw the same labels everywhere.
    """
    model.zero_grad(set_to_none=True)
    differentiated = len(inputs) if every_input else 1
    inputs = [v.detach().clone().requires_grad_(True)
              if i < differentiated and v.is_floating_point() else v
              for i, v in enumerate(inputs)]
    torch.manual_seed(0)
    with torch.autocast(inputs[0].device.type, dtype=autocast_dtype or torch.bfloat16,
                        enabled=autocast_dtype is not None):
        out = model(*inputs)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (out * w.to(out)).sum().backward()
    if every_input:
        grads = {f"input {i}": v.grad for i, v in enumerate(inputs) if v.requires_grad}
    else:
        grads = {"x": inputs[0].grad}
    grads.update({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    return out.detach(), grads


# The floor under the 2x-eager rule: two correct fp32 evaluations of a whole model
# differ by the order of their sums, which every path carries out in fp32 (fp64 for
# fp64). Eager PyTorch against the fp64 oracle lands anywhere from 1 to 18 ulps of a
# tensor's largest value in the fp32 model tests (test_dit, test_uvit, test_diffit on
# CPU, torch 2.14.1, 2026-12-02), so 2x eager alone fails whenever eager is lucky,
# and how lucky depends on the torch version and thread count. 32 ulps of the
# accumulation precision sits above that noise and still 10^4 below any real bug's
# footprint; low-precision dtypes keep their 4 ulps, which are larger.
ACCUMULATION_ULPS = 32


def error_floor(oracle: torch.Tensor, dtype: torch.dtype) -> float:
    """The absolute error no test asks ditkernels to beat, for values compared in
    dtype against the fp64 oracle."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    ulps = max(4 * torch.finfo(dtype).eps, ACCUMULATION_ULPS * torch.finfo(acc).eps)
    return ulps * oracle.abs().max().item()


def assert_within_eager_error(ours, eager, oracle, what, dtype, floor_like=None):
    """ours at most EAGER_SLACK times as far from the fp64 oracle as eager, plus
    error_floor for values eager gets right by luck (of floor_like's scale if given)."""
    oracle = oracle.double()
    eager_err = (eager.double() - oracle).abs().max().item()
    our_err = (ours.double() - oracle).abs().max().item()
    floor = error_floor(oracle if floor_like is None else floor_like.double(), dtype)
    assert our_err <= EAGER_SLACK * eager_err + floor, (
        f"{what}: ditkernels error {our_err:.3g} vs eager error {eager_err:.3g} "
        f"(floor {floor:.3g}) against the fp64 reference")


def assert_matches_reference(ours_model, ref_model, inputs, autocast_dtype=None, *,
                             every_input=False, floor_from=None):
    """Forward and backward of ours_model vs ref_model at the inputs' precision (or under
    autocast), each judged against ref_model in fp64; every_input as in
    forward_backward. floor_from maps a gradient's name to the gradient whose scale sets
    its error floor, for sums that cancel to (nearly) zero in exact arithmetic, whose
    rounding error scales with the terms summed rather than the result. Returns the
    fp64 gradients."""
    floor_from = floor_from or {}
    ours_out, ours_grads = forward_backward(ours_model, inputs, autocast_dtype,
                                            every_input=every_input)
    eager_out, eager_grads = forward_backward(ref_model, inputs, autocast_dtype,
                                              every_input=every_input)
    oracle_inputs = [v.double() if v.is_floating_point() else v for v in inputs]
    oracle_out, oracle_grads = forward_backward(copy.deepcopy(ref_model).double(),
                                                oracle_inputs, every_input=every_input)
    dtype = autocast_dtype or inputs[0].dtype
    assert ours_out.dtype == eager_out.dtype and ours_out.shape == eager_out.shape
    assert_within_eager_error(ours_out, eager_out, oracle_out, "output", dtype)
    assert ours_grads.keys() == oracle_grads.keys()
    for name, oracle_grad in oracle_grads.items():
        assert ours_grads[name].dtype == eager_grads[name].dtype, name
        floor_like = oracle_grads[floor_from[name]] if name in floor_from else None
        assert_within_eager_error(ours_grads[name], eager_grads[name], oracle_grad,
                                  f"grad of {name}", dtype, floor_like)
    return oracle_grads


def assert_compiled_matches_eager(module, inputs, backend="inductor", *, every_input=False):
    """torch.compile(module, fullgraph=True), from a fresh dynamo state, gives eager's
    output and gradients (forward_backward, every_input as there) to 1e-5."""
    eager_out, eager_grads = forward_backward(module, inputs, every_input=every_input)
    torch._dynamo.reset()
    compiled = torch.compile(module, backend=backend, fullgraph=True)
    out, grads = forward_backward(compiled, inputs, every_input=every_input)
    grads = {name.removeprefix("_orig_mod."): grad for name, grad in grads.items()}
    torch.testing.assert_close(out, eager_out, atol=1e-5, rtol=1e-5)
    assert grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def assert_same_state(a: nn.Module, b: nn.Module):
    """The same state_dict keys in the same order, and bitwise the same values."""
    state_a, state_b = a.state_dict(), b.state_dict()
    assert list(state_a) == list(state_b)
    for name, value in state_a.items():
        torch.testing.assert_close(value, state_b[name], atol=0, rtol=0, msg=name)


# CPU kernels are compiled once per instruction set and pick one by ATen's CPU
# capability; a test reaches the others only in a child process started with
# ATEN_CPU_CAPABILITY set.
CPU_CAPABILITIES = ["DEFAULT", "AVX2"]


def run_with_cpu_capability(capability: str, code: str) -> None:
    """Runs `code` (with this folder and the tested ditkernels importable) in a child
    Python whose ATen capability is `capability`, and fails on any error there."""
    import os
    import subprocess
    import sys

    import ditkernels

    if capability == "AVX2" and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("the CPU has no AVX2")
    here = os.path.dirname(os.path.abspath(__file__))
    package_root = os.path.dirname(os.path.dirname(ditkernels.__file__))
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability.lower(),
               PYTHONPATH=os.pathsep.join([package_root, here, os.environ.get("PYTHONPATH", "")]))
    check = f"import torch\nassert torch.backends.cpu.get_cpu_capability() == {capability!r}\n"
    run = subprocess.run([sys.executable, "-c", check + code], env=env, cwd=here,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
