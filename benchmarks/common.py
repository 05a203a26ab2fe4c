"""Shared benchmark machinery: timing, bandwidth roofline, result rows and tables, and
the eager / compiled / ditkernels comparison of whole models.

Every family module (bench_<family>.py) exposes ``run(ctx) -> list[dict]``; the
runner (run.py) builds the context, calls each family and writes JSON + markdown.
Times are medians from torch.utils.benchmark (CUDA-synchronised on GPU).
"""

import contextlib
import dataclasses
import datetime
import os
import platform
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.utils.benchmark as tb


@dataclasses.dataclass
class BenchContext:
    device: torch.device
    dtype: torch.dtype
    quick: bool            # a small shape subset (CPU default, CI smoke runs)
    min_run_time: float    # seconds per measurement
    copy_gbps: float       # measured device copy bandwidth, read + write, GB/s
    compile: bool = True   # include torch.compile baselines

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def median_seconds(fn: Callable[[], object], min_run_time: float) -> float:
    """Median wall time of fn() in seconds (blocked_autorange synchronises CUDA)."""
    fn()  # warm-up: compilation, allocator, autotuning
    timer = tb.Timer(stmt="fn()", globals={"fn": fn})
    return timer.blocked_autorange(min_run_time=min_run_time).median


@contextlib.contextmanager
def environ(values: Dict[str, str]):
    """Sets environment variables for the duration (the kernels' path switches are
    read at every call)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def hopper_wgmma_build(ctx: BenchContext) -> bool:
    """Whether the GEMM ops run their sm_90a wgmma kernels here: a 9.0 device and a
    build with sm_90a code. Benchmarks then also time the mma.sync kernels
    (DITKERNELS_DISABLE_WGMMA=1) in the same run."""
    import ditkernels
    return (ctx.is_cuda and torch.cuda.get_device_capability(ctx.device) == (9, 0)
            and any(a.startswith("sm_90a") for a in ditkernels.build_info()["cuda_archs"]))


MMA_SYNC = {"DITKERNELS_DISABLE_WGMMA": "1"}


def median_seconds_with(fn: Callable[[], object], min_run_time: float,
                        env: Optional[Dict[str, str]] = None) -> float:
    with environ(env or {}):
        return median_seconds(fn, min_run_time)


def measure_copy_gbps(device: torch.device, dtype: torch.dtype, min_run_time: float,
                      nbytes: int = 1 << 28) -> float:
    """Device copy bandwidth counting read + write, the roofline for memory-bound ops."""
    if device.type == "cpu":
        nbytes = 1 << 26
    n = nbytes // torch.empty((), dtype=dtype).element_size()
    src = torch.randn(n, device=device).to(dtype)
    dst = torch.empty_like(src)
    t = median_seconds(lambda: dst.copy_(src), min_run_time)
    return 2 * n * src.element_size() / t / 1e9


def maybe_compile(fn: Callable, ctx: BenchContext) -> Optional[Callable]:
    """torch.compile(fn), or None when compile baselines are off."""
    return torch.compile(fn, fullgraph=True) if ctx.compile else None


def measure(make_step: Callable[[], Callable[[], object]], ctx: BenchContext,
            may_fail: bool = False) -> Tuple[Optional[float], Optional[str]]:
    """(median seconds of make_step()(), None) or (None, why it could not run). Only
    out-of-memory, and any error where may_fail (a baseline this torch may not support,
    such as FlexAttention at head dim 72), is reported instead of raised."""
    try:
        return median_seconds(make_step(), ctx.min_run_time), None
    except torch.OutOfMemoryError:
        return None, "out of memory"
    except Exception as exc:
        if not may_fail:
            raise
        return None, f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]}"
    finally:
        if ctx.is_cuda:
            torch.cuda.empty_cache()


def environment(ctx: BenchContext) -> Dict[str, object]:
    import ditkernels

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "ditkernels_build": ditkernels.build_info(),
        "device": str(ctx.device),
        "dtype": str(ctx.dtype).replace("torch.", ""),
        "copy_gbps": round(ctx.copy_gbps, 1),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    if ctx.is_cuda:
        env["gpu"] = torch.cuda.get_device_name(ctx.device)
    else:
        env["cpu_threads"] = torch.get_num_threads()
    return env


def markdown_table(rows: List[Dict[str, object]], columns: List[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# whole models: the plain-PyTorch reference against ditkernels', eager and compiled
# ---------------------------------------------------------------------------

MODEL_PASSES = ("fwd", "fwd+bwd")
MODEL_COLUMNS = ["op", "shape", "pass", "impl", "median_ms", "images_per_s",
                 "speedup_vs_eager", "note"]


def model_autocast(ctx: BenchContext):
    """Low precision as on a training setup: on CUDA, fp32 weights under torch.autocast;
    elsewhere the models are cast to the dtype and need no autocast."""
    if ctx.is_cuda and ctx.dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=ctx.dtype)
    return contextlib.nullcontext()


def model_step(model: Callable, module: nn.Module, inputs, out_shape, backward: bool,
               ctx: BenchContext) -> Callable[[], None]:
    """One forward (no grad) or forward+backward of model (module, maybe compiled).
    Inputs that require grad (activations from earlier layers) get their gradients."""
    if not backward:
        def forward():
            with torch.no_grad(), model_autocast(ctx):
                model(*inputs)
        return forward

    # Fresh leaves: no input gradient carries over from another step.
    inputs = tuple(v.detach().requires_grad_(v.requires_grad) for v in inputs)
    grad_out = torch.randn(out_shape, device=ctx.device)

    def forward_backward():
        # set_to_none: accumulating into existing .grad would add a full pass over the
        # weights (2.7 GB for DiT-XL/2) that a training step does not pay.
        module.zero_grad(set_to_none=True)
        with model_autocast(ctx):
            out = model(*inputs)
        out.backward(grad_out.to(out.dtype))
    return forward_backward


def model_rows(ctx: BenchContext, labels: Dict[str, str], reference: nn.Module,
               ours: nn.Module, inputs, out_shape, batch: int) -> List[Dict]:
    """Rows (labels: family, op, shape) for reference and ours (the same weights) at
    inputs, eager and under torch.compile, forward (eval mode, no grad) and
    forward+backward (train mode), with images_per_s and the speedup over the eager
    reference."""
    rows = []
    for pass_name in MODEL_PASSES:
        backward = pass_name == "fwd+bwd"
        reference.train(backward)
        ours.train(backward)
        eager_s = None
        for impl, module, compiled in (("eager", reference, False),
                                       ("compile", reference, True),
                                       ("ditkernels", ours, False),
                                       ("ditkernels+compile", ours, True)):
            model = module
            if compiled:
                # A fresh dynamo state per measurement: static shapes, and no recompile
                # limit reached by the many models of one run.
                torch._dynamo.reset()
                model = maybe_compile(module, ctx)
                if model is None:
                    continue
            seconds, note = measure(
                lambda: model_step(model, module, inputs, out_shape, backward, ctx), ctx)
            if impl == "eager":
                eager_s = seconds
            row = {**labels, "pass": pass_name, "impl": impl, "median_ms": None,
                   "images_per_s": None, "speedup_vs_eager": None}
            if seconds is None:
                row["note"] = note
            else:
                row.update(median_ms=seconds * 1e3, images_per_s=batch / seconds,
                           speedup_vs_eager=eager_s / seconds if eager_s else None)
            rows.append(row)
    return rows
