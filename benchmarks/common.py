"""Shared benchmark machinery: interleaved timing, the cache rule for bandwidth claims,
the run's environment, result rows and tables, and the eager / compiled / ditkernels
comparison of whole models.

Every family module (bench_<family>.py) exposes ``run(ctx) -> list[dict]``; the
runner (run.py) builds the context, calls each family and writes JSON + markdown.

How a case is timed (``compare``): every implementation of one case is warmed up, then
measured in rounds; each round runs a block of repetitions of every implementation,
in an order that rotates from round to round, so that clock, thermal and background
drift hit all of them alike. The first round times one call of each, which sizes the
blocks of the rest (ROUNDS rounds in all, fewer for slow calls, never under
MIN_ROUNDS). Rows report the min, median and max over the samples; ratios use
medians. On a CPU, run.py times at one torch thread unless --threads says otherwise.
  CPU   wall clock (time.perf_counter) around a block; one sample per block.
  CUDA  each call between two CUDA events, after a write of twice the L2 that evicts
        its inputs (the write is outside the events): one sample per call.
        Where the case's fastest implementation takes under GRAPH_BELOW_S, the events
        would mostly time launch overhead, so every implementation of the case is
        captured K times into a CUDA graph and the replays are timed (one sample per
        replay, divided by K). A flush inside the graph would be timed with the op, so
        replays run with a warm L2, and the row's timer column says so.
Bandwidth (GB/s, fraction of copy bandwidth) is claimed only where the L2 was flushed
or the bytes moved are at least twice the last-level cache; other rows leave it blank
and say "L2-resident" (CPU: "LLC-resident"). So a fraction of copy bandwidth cannot
come from cache hits.
"""

import contextlib
import dataclasses
import datetime
import functools
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Union

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent

ROUNDS = 10         # interleaving rounds when the calls are short enough
MIN_ROUNDS = 3      # at least this many, however slow: min, median and max differ
MAX_REPS = 1000     # repetitions in one block
GRAPH_BELOW_S = 20e-6    # CUDA graph replay for cases whose fastest call is shorter
GRAPH_SPAN_S = 1e-3      # calls captured per graph: about this much device time


@dataclasses.dataclass
class BenchContext:
    device: torch.device
    dtype: torch.dtype
    quick: bool            # a small shape subset (CPU default, CI smoke runs)
    min_run_time: float    # seconds of measuring per implementation and case
    copy_gbps: float       # measured device copy bandwidth, read + write, GB/s
    compile: bool = True   # include torch.compile baselines
    cache_bytes: Optional[int] = None  # last-level cache (CUDA: L2); None: unknown

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


# ---------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Timing:
    samples: List[float]   # seconds per call
    timer: str             # how the samples were taken, for the row's timer column
    l2_flushed: bool       # inputs evicted from the cache before every timed call

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)


class WallClockSampler:
    """CPU: host wall clock around a block of calls; caches stay warm."""
    timer = "wall clock, cache warm"
    l2_flushed = False

    def __init__(self, fn: Callable[[], object]):
        self.fn = fn

    def sample(self, reps: int) -> List[float]:
        t0 = time.perf_counter()
        for _ in range(reps):
            self.fn()
        return [(time.perf_counter() - t0) / reps]


class CudaEventSampler:
    """CUDA: each call between two events, after a write of `flush` (larger than the
    L2) that evicts the call's inputs. The flush kernel also keeps the GPU busy while
    the host queues the call, so launch latency stays out of the events as long as
    queueing takes less than the flush (some tens of µs: 2x the L2 at HBM speed)."""
    timer = "CUDA events, L2 flushed"
    l2_flushed = True

    def __init__(self, fn: Callable[[], object], flush: torch.Tensor):
        self.fn, self.flush = fn, flush

    def sample(self, reps: int) -> List[float]:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)]
        for start, end in events:
            self.flush.zero_()
            start.record()
            self.fn()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) * 1e-3 for start, end in events]


class CudaGraphSampler:
    """CUDA: `calls` calls captured into one graph; each replay between two events, its
    time divided by `calls`. No launch overhead, and a warm L2 (see the module doc)."""
    l2_flushed = False

    def __init__(self, fn: Callable[[], object], calls: int):
        # Warm-up on a side stream before capture, as torch.cuda.graphs asks (autograd
        # and the caching allocator set up their per-stream state there).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            for _ in range(calls):
                fn()
        self.calls = calls
        self.timer = f"CUDA graph x{calls}, L2 warm"

    def sample(self, reps: int) -> List[float]:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)]
        for start, end in events:
            start.record()
            self.graph.replay()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) * 1e-3 / self.calls for start, end in events]


def rotations(names: List[str], rounds: int, first: int = 0) -> Iterable[List[str]]:
    """The order of each round: round r starts at the r-th name (mod len)."""
    for r in range(first, first + rounds):
        k = r % len(names)
        yield names[k:] + names[:k]


def interleave(samplers: Dict[str, object], reps: Dict[str, int], rounds: int,
               envs: Dict[str, Dict[str, str]], first: int = 0):
    """Rounds first, first + 1, ... of blocks: reps[name] calls of each sampler per
    round, names in rotating order, envs[name] set around each of its blocks. Returns
    (samples: seconds per call, wall: the most host seconds one repetition took) per
    name."""
    samples = {name: [] for name in samplers}
    wall = {name: 0.0 for name in samplers}
    for order in rotations(list(samplers), rounds, first):
        for name in order:
            with environ(envs.get(name, {})):
                t0 = time.perf_counter()
                samples[name] += samplers[name].sample(reps[name])
                wall[name] = max(wall[name], (time.perf_counter() - t0) / reps[name])
    return samples, wall


@functools.lru_cache(maxsize=None)
def _flush_buffer(device: torch.device) -> torch.Tensor:
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return torch.empty(2 * l2, dtype=torch.int8, device=device)


def prebuilt(fn: Callable[[], object]) -> Callable[[], Callable[[], object]]:
    """compare()'s maker for a call that needs no setup."""
    return lambda: fn


def compare(makers: Dict[str, Callable[[], Callable[[], object]]], ctx: BenchContext,
            envs: Optional[Dict[str, Dict[str, str]]] = None,
            may_fail: Iterable[str] = ()) -> Dict[str, Union[Timing, str]]:
    """Times every implementation of one case, interleaved (see the module doc).
    makers[name]() builds the zero-argument call to time; envs[name] is set while it is
    built and timed. Returns a Timing per name, or a string saying why it could not
    run: out of memory, or any error of a name in may_fail (a baseline this torch may
    not support, such as FlexAttention at head dim 72). Other errors propagate."""
    envs, may_fail = envs or {}, set(may_fail)
    results: Dict[str, Union[Timing, str]] = {}
    samplers = {}
    try:
        for name, make in makers.items():
            try:
                with environ(envs.get(name, {})):
                    fn = make()
                    fn()  # warm-up: compilation, autotuning, allocator, lazy init
                    if ctx.is_cuda:
                        torch.cuda.synchronize()
                samplers[name] = (CudaEventSampler(fn, _flush_buffer(ctx.device))
                                  if ctx.is_cuda else WallClockSampler(fn))
            except torch.OutOfMemoryError:
                results[name] = "out of memory"
            except Exception as exc:
                if name not in may_fail:
                    raise
                results[name] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]}"
        if not samplers:
            return results
        # Round 0 times one call of each: samples, and the block sizes of the rest.
        ones = {name: 1 for name in samplers}
        samples, wall = interleave(samplers, ones, 1, envs)
        if ctx.is_cuda and min(min(v) for v in samples.values()) < GRAPH_BELOW_S:
            for name, sampler in list(samplers.items()):
                per_call = max(min(samples[name]), 1e-7)  # events tick in about 0.5 us
                calls = max(1, min(MAX_REPS, math.ceil(GRAPH_SPAN_S / per_call)))
                try:
                    with environ(envs.get(name, {})):
                        samplers[name] = CudaGraphSampler(sampler.fn, calls)
                except Exception as exc:  # not capturable: keep its events, say so
                    print(f"graph capture of {name} failed ({type(exc).__name__}); "
                          "timed with events")
            samples, wall = interleave(samplers, ones, 1, envs)
        rounds = max(MIN_ROUNDS, min(ROUNDS, int(ctx.min_run_time / max(wall.values()))))
        reps = {name: max(1, min(MAX_REPS, int(ctx.min_run_time / rounds / wall[name])))
                for name in samplers}
        more, _ = interleave(samplers, reps, rounds - 1, envs, first=1)
        for name, sampler in samplers.items():
            results[name] = Timing(samples[name] + more[name], sampler.timer,
                                   sampler.l2_flushed)
        return {name: results[name] for name in makers}
    finally:
        samplers.clear()
        if ctx.is_cuda:
            torch.cuda.empty_cache()


def timing_columns(result: Union[Timing, str, None]) -> Dict[str, object]:
    """min_ms, median_ms, max_ms and timer of a compare() result; note when it failed."""
    if not isinstance(result, Timing):
        return {"min_ms": None, "median_ms": None, "max_ms": None, "timer": None,
                "note": result}
    return {"min_ms": result.min * 1e3, "median_ms": result.median * 1e3,
            "max_ms": result.max * 1e3, "timer": result.timer}


def cache_label(ctx: BenchContext) -> str:
    return "L2" if ctx.is_cuda else "LLC"


def bandwidth_columns(nbytes: int, timing: Timing, ctx: BenchContext) -> Dict[str, object]:
    """GB/s and the fraction of the measured copy bandwidth, claimed only where the L2
    was flushed or nbytes (the bytes the op moves) is at least twice the cache; else
    blank, and the cache column says the data could have stayed in the cache."""
    if timing.l2_flushed:
        state = f"{cache_label(ctx)} flushed"
    elif ctx.cache_bytes is not None and nbytes >= 2 * ctx.cache_bytes:
        state = f">= 2x {cache_label(ctx)}"
    else:
        return {"GB/s": None, "frac_copy_bw": None, "cache": f"{cache_label(ctx)}-resident"}
    gbps = nbytes / timing.median / 1e9
    return {"GB/s": gbps, "frac_copy_bw": gbps / ctx.copy_gbps, "cache": state}


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

# Copy tensors are at least this large, and at least the cache, so that read + write
# is at least twice the cache; the cap keeps a CPU with a huge L3 out of swap.
COPY_BYTES = {"cuda": 1 << 28, "cpu": 1 << 26}
COPY_BYTES_CAP = 1 << 30


def measure_copy_gbps(device: torch.device, dtype: torch.dtype, min_run_time: float,
                      cache_bytes: Optional[int]) -> float:
    """Device copy bandwidth counting read + write, the roofline for memory-bound ops."""
    nbytes = min(COPY_BYTES_CAP, max(COPY_BYTES[device.type], cache_bytes or 0))
    n = nbytes // torch.empty((), dtype=dtype).element_size()
    # uniform_, not randn: the same bytes to copy, and a CPU fills 1 GB in a blink.
    src = torch.empty(n, device=device, dtype=dtype).uniform_()
    dst = torch.empty_like(src)
    ctx = BenchContext(device=device, dtype=dtype, quick=True, min_run_time=min_run_time,
                       copy_gbps=float("nan"), compile=False, cache_bytes=cache_bytes)
    timing = compare({"copy": prebuilt(functools.partial(dst.copy_, src))}, ctx)["copy"]
    return 2 * n * src.element_size() / timing.median / 1e9


def maybe_compile(fn: Callable, ctx: BenchContext) -> Optional[Callable]:
    """torch.compile(fn), or None when compile baselines are off."""
    return torch.compile(fn, fullgraph=True) if ctx.compile else None


def speedups(times: Dict[str, Union[Timing, str]], impl: str,
             baselines: Dict[str, str]) -> Dict[str, Optional[float]]:
    """{column: baseline median / impl median} for each baseline that was timed."""
    out = {}
    for column, baseline in baselines.items():
        mine, theirs = times.get(impl), times.get(baseline)
        ok = isinstance(mine, Timing) and isinstance(theirs, Timing)
        out[column] = theirs.median / mine.median if ok else None
    return out


# ---------------------------------------------------------------------------
# the run's environment, stamped on results.json and on every table
# ---------------------------------------------------------------------------

def _command(*args: str) -> Optional[str]:
    """A command's stdout, stripped, or None when it is absent or fails."""
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def git_commit() -> Optional[str]:
    """HEAD (+ "-dirty"), or DITKERNELS_BENCH_COMMIT where the tree has no .git (a copy
    sent to a GPU machine: the sender names the commit)."""
    commit = _command("git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD")
    if commit is None:
        return os.environ.get("DITKERNELS_BENCH_COMMIT")
    if _command("git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"):
        commit += "-dirty"
    return commit


def last_level_cache_bytes(device: torch.device) -> Optional[int]:
    """CUDA: the L2. CPU: the largest cache level sysfs lists for cpu0 (None if none)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    best = None
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((index / "level").read_text())
            size = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
        nbytes = int(size.rstrip("KMG")) * scale
        if best is None or level > best[0]:
            best = (level, nbytes)
    return best[1] if best else None


NVIDIA_SMI_FIELDS = ("name", "driver_version", "clocks.sm", "clocks.max.sm", "clocks.mem",
                     "clocks.max.mem")


def nvidia_smi(device: torch.device) -> Dict[str, str]:
    """nvidia-smi's reading for this GPU ({} when nvidia-smi is absent or fails). Asked
    by PCI address, which CUDA_VISIBLE_DEVICES does not renumber."""
    props = torch.cuda.get_device_properties(device)
    gpu = (f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
           if all(hasattr(props, f"pci_{k}_id") for k in ("domain", "bus", "device"))
           else str(device.index or 0))
    out = _command("nvidia-smi", f"--id={gpu}", "--query-gpu=" + ",".join(NVIDIA_SMI_FIELDS),
                   "--format=csv,noheader,nounits")
    values = [v.strip() for v in out.splitlines()[0].split(",")] if out else []
    return dict(zip(NVIDIA_SMI_FIELDS, values)) if len(values) == len(NVIDIA_SMI_FIELDS) else {}


def _cpu_model() -> Optional[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def environment(ctx: BenchContext) -> Dict[str, object]:
    """What the numbers depend on. Called after the copy measurement, so the clocks
    nvidia-smi reads are those of a busy GPU, not an idle one."""
    import ditkernels

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "ditkernels_build": ditkernels.build_info(),
        "device": str(ctx.device),
        "dtype": str(ctx.dtype).replace("torch.", ""),
        "copy_gbps": round(ctx.copy_gbps, 1),
        "cache_bytes": ctx.cache_bytes,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    if ctx.is_cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        env.update(gpu=props.name, sm_count=props.multi_processor_count,
                   capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2 ** 30, 1),
                   # cudaDevAttrClockRate, in kHz; absent from older torch.
                   clock_rate_khz=getattr(props, "clock_rate", None),
                   nvidia_smi=nvidia_smi(ctx.device))
    else:
        env.update(cpu=_cpu_model(), cpu_threads=torch.get_num_threads())
    return env


def table_header(env: Dict[str, object]) -> str:
    """One line naming the device, clocks, driver, CUDA, torch, dtype, copy bandwidth,
    date and commit: printed above every table, so a table copied alone keeps them."""
    mb = f"{env['cache_bytes'] / 2 ** 20:.0f} MB" if env.get("cache_bytes") else "n/a"
    if "gpu" in env:
        smi = env.get("nvidia_smi") or {}
        if smi:
            clocks = (f"SM clock {smi['clocks.sm']} MHz (max {smi['clocks.max.sm']}), "
                      f"memory {smi['clocks.mem']} MHz")
        elif env.get("clock_rate_khz"):
            clocks = f"SM clock max {env['clock_rate_khz'] / 1e3:.0f} MHz (device props)"
        else:
            clocks = "clocks n/a"
        device = (f"{env['gpu']} ({env['sm_count']} SMs, L2 {mb}) | {clocks} | "
                  f"driver {smi.get('driver_version', 'n/a')} | CUDA {env['torch_cuda']}")
    else:
        device = f"CPU {env.get('cpu') or ''} (torch threads {env['cpu_threads']}, LLC {mb})"
    return (f"{device} | torch {env['torch']} | {env['dtype']} | "
            f"copy {env['copy_gbps']} GB/s | {env['date']} | commit {env['git_commit'] or 'n/a'}")


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
MODEL_COLUMNS = ["op", "shape", "pass", "impl", "min_ms", "median_ms", "max_ms",
                 "images_per_s", "speedup_vs_eager", "timer", "note"]


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
    forward+backward (train mode), the four timed interleaved, with images_per_s and
    the speedup over the eager reference."""
    rows = []
    for pass_name in MODEL_PASSES:
        backward = pass_name == "fwd+bwd"
        reference.train(backward)
        ours.train(backward)
        # A fresh dynamo state per case: static shapes, and no recompile limit reached
        # by the many models of one run.
        torch._dynamo.reset()
        makers = {}
        for impl, module, compiled in (("eager", reference, False),
                                       ("compile", reference, True),
                                       ("ditkernels", ours, False),
                                       ("ditkernels+compile", ours, True)):
            model = maybe_compile(module, ctx) if compiled else module
            if model is not None:
                makers[impl] = functools.partial(model_step, model, module, inputs,
                                                 out_shape, backward, ctx)
        times = compare(makers, ctx)
        for impl, result in times.items():
            row = {**labels, "pass": pass_name, "impl": impl, **timing_columns(result),
                   **speedups(times, impl, {"speedup_vs_eager": "eager"})}
            if isinstance(result, Timing):
                row["images_per_s"] = batch / result.median
            rows.append(row)
    return rows
