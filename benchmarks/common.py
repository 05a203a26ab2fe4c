"""Shared benchmark machinery: timing, bandwidth roofline, result rows and tables.

Every family module (bench_<family>.py) exposes ``run(ctx) -> list[dict]``; the
runner (run.py) builds the context, calls each family and writes JSON + markdown.
Times are medians from torch.utils.benchmark (CUDA-synchronised on GPU).
"""

import dataclasses
import datetime
import platform
from typing import Callable, Dict, List, Optional

import torch
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
