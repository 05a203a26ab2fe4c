"""Timestep-calibrated W8A8 linear: ditkernels.int8_linear against the floating-point
F.linear, the eager int8 path (quantize, torch._int_mm, dequantize as separate
PyTorch ops) and torch.compile of that path (which may fuse the quantize and
dequantize passes around the GEMM), on DiT-XL/2's GEMM shapes; and, on the full grid,
a whole DiT-XL/2 forward in the benchmark dtype against the same model after
quantize_.

GEMM shapes: M = B * 256 tokens (256x256 images), (K, N) = (1152, 3456) qkv,
(1152, 4608) fc1, (4608, 1152) fc2, (1152, 1152) attention proj. Throughput counts
2 * M * K * N operations (TOPS for int8, TFLOP/s for the float baseline, one column).
"""

import copy
import functools
from typing import Dict, List

import torch
import torch.nn.functional as F

import ditkernels
from benchmarks.common import (MMA_SYNC, BenchContext, Timing, compare, hopper_wgmma_build,
                               maybe_compile, prebuilt, speedups, timing_columns)
from ditkernels.models import DIT_CONFIGS, DiT
from ditkernels.quant import (TimestepCalibratedInt8Config, TimestepCalibration, quantize_,
                              quantization_targets, skip_keys)

TOKENS = 256
GEMMS = {"qkv": (1152, 3456), "fc1": (1152, 4608), "fc2": (4608, 1152), "proj": (1152, 1152)}
BATCHES = (8, 32, 64, 128, 256)
END_TO_END = ("DiT-XL/2", 32)
NUM_TIMESTEPS = 1000


def _cases(ctx: BenchContext):
    """(label, B, K, N); activations are [B, 256, K] (quick: [B, 64, K], DiT-S sizes)."""
    if ctx.quick:
        # DiT-S/2's qkv and fc2 at M = 1024 and 2048 rows: the CPU target's sizes.
        return [("tiny", 2, 128, 384), ("tiny", 4, 384, 128), ("S/2 qkv", 16, 384, 1152),
                ("S/2 fc2", 32, 1536, 384)]
    return [(name, B, K, N) for B in BATCHES for name, (K, N) in GEMMS.items()]


def _inputs(B: int, L: int, K: int, N: int, ctx: BenchContext) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, L, K, generator=g)
    w = torch.randn(N, K, generator=g) * K ** -0.5
    w_scale = w.abs().amax(1) / 127
    act_scales = torch.full((NUM_TIMESTEPS,), float(x.abs().max()) / 127)
    return dict(
        x=x.to(ctx.device, ctx.dtype), w=w.to(ctx.device, ctx.dtype),
        w_q=torch.round(w / w_scale[:, None]).to(torch.int8).to(ctx.device),
        w_scale=w_scale.to(ctx.device), act_scales=act_scales.to(ctx.device),
        t=torch.randint(0, NUM_TIMESTEPS, (B,), generator=g).to(ctx.device),
        bias=torch.zeros(N, device=ctx.device, dtype=ctx.dtype))


def eager_int8_linear(x, w_q_t, w_scale, act_scales, t, bias):
    """The unfused int8 path in plain PyTorch: per-sample quantize, torch._int_mm,
    dequantize + bias, each a separate pass over memory."""
    B, L, K = x.shape
    s = act_scales[t].view(B, 1, 1)
    x_q = torch.round(x.float() / s).clamp(-127, 127).to(torch.int8)
    acc = torch._int_mm(x_q.view(B * L, K), w_q_t)
    return ((acc.view(B, L, -1).float() * s) * w_scale + bias.float()).to(x.dtype)


EAGER_INT8, COMPILED_INT8 = "eager int8 (_int_mm)", "torch.compile int8 (_int_mm)"


def _gemm_rows(ctx: BenchContext) -> List[Dict]:
    rows = []
    dtype_name = str(ctx.dtype).replace("torch.", "")
    float_impl = f"F.linear ({dtype_name})"
    baselines = {"speedup_vs_float": float_impl, "speedup_vs_eager_int8": EAGER_INT8,
                 "speedup_vs_compiled_int8": COMPILED_INT8}
    L = 64 if ctx.quick else TOKENS
    for label, B, K, N in _cases(ctx):
        a = _inputs(B, L, K, N, ctx)
        x_q = ditkernels.quantize_per_sample(a["x"], a["act_scales"], a["t"])
        impls = {
            float_impl: lambda: F.linear(a["x"], a["w"], a["bias"]),
            "ditkernels.int8_linear": lambda: ditkernels.int8_linear(
                a["x"], a["w_q"], a["w_scale"], a["act_scales"], a["t"], a["bias"]),
            # The GEMM alone, as the models run it after ln_modulate_int8.
            "ditkernels.int8_gemm_dequant": lambda: ditkernels.int8_gemm_dequant(
                x_q, a["w_q"], a["w_scale"], a["act_scales"], a["t"], a["bias"], ctx.dtype),
        }
        # On Hopper: also the mma.sync kernels, whose int8_linear quantizes in its A load,
        # the GEMM at the narrowest wgmma tile, and the GEMM never split along K.
        env = {}
        if hopper_wgmma_build(ctx):
            for impl in ("ditkernels.int8_linear", "ditkernels.int8_gemm_dequant"):
                impls[f"{impl} (mma.sync)"] = impls[impl]
                env[f"{impl} (mma.sync)"] = MMA_SYNC
            narrow = "ditkernels.int8_gemm_dequant (wgmma n128)"
            impls[narrow] = impls["ditkernels.int8_gemm_dequant"]
            env[narrow] = {"DITKERNELS_WGMMA_TILE_N": "128"}
            # The launch plan's K split against none (the plan's cost model is an estimate).
            unsplit = "ditkernels.int8_gemm_dequant (no split-K)"
            impls[unsplit] = impls["ditkernels.int8_gemm_dequant"]
            env[unsplit] = {"DITKERNELS_SPLIT_K": "1"}
        int8_args = (a["x"], a["w_q"].t(), a["w_scale"], a["act_scales"], a["t"], a["bias"])
        try:
            eager_int8_linear(*int8_args)
        except (RuntimeError, NotImplementedError) as exc:
            print(f"int8 {label} B={B}: no torch._int_mm baseline here ({exc})".splitlines()[0])
        else:
            impls[EAGER_INT8] = functools.partial(eager_int8_linear, *int8_args)
            torch._dynamo.reset()
            compiled = maybe_compile(eager_int8_linear, ctx)
            if compiled is not None:
                impls[COMPILED_INT8] = functools.partial(compiled, *int8_args)
        times = compare({impl: prebuilt(fn) for impl, fn in impls.items()}, ctx, env)
        M = B * L
        for impl, result in times.items():
            row = {"family": "int8", "op": f"linear {label}", "shape": f"M={M} K={K} N={N}",
                   "impl": impl, **timing_columns(result), **speedups(times, impl, baselines)}
            if isinstance(result, Timing):
                row["TOPS"] = 2 * M * K * N / result.median / 1e12
            rows.append(row)
    return rows


def synthetic_calibration(model, config: TimestepCalibratedInt8Config,
                          value: float = 4.0) -> TimestepCalibration:
    """A calibration with the same range at every timestep for every layer config
    selects: stands in for a measured one where only speed and memory matter."""
    linears, skip_blocks = quantization_targets(model, config)
    keys = linears + [k for name in skip_blocks for k in skip_keys(name)]
    T = config.num_timesteps
    return TimestepCalibration(
        num_timesteps=T, method=config.method, percentile=None, smoothquant_alpha=None,
        ranges={k: torch.full((T,), value) for k in keys}, channel_absmax={}, smoothing={},
        samples=torch.ones(T, dtype=torch.int64))


def _state_megabytes(model) -> float:
    return sum(v.numel() * v.element_size() for v in model.state_dict().values()) / 2 ** 20


def _end_to_end_rows(ctx: BenchContext) -> List[Dict]:
    name, batch = END_TO_END
    dtype_name = str(ctx.dtype).replace("torch.", "")
    torch.manual_seed(0)
    model = DiT(input_size=32, **DIT_CONFIGS[name]).eval()
    config = TimestepCalibratedInt8Config(groups=10)
    quantized = quantize_(copy.deepcopy(model), config, synthetic_calibration(model, config))
    model = model.to(ctx.device, ctx.dtype)
    quantized = quantized.to(ctx.device, ctx.dtype)
    x = torch.randn(batch, 4, 32, 32, device=ctx.device, dtype=ctx.dtype)
    t = torch.randint(0, NUM_TIMESTEPS, (batch,), device=ctx.device)
    y = torch.randint(0, 1000, (batch,), device=ctx.device)
    models = {f"ditkernels DiT ({dtype_name})": model,
              "ditkernels DiT int8 (quantize_)": quantized}
    with torch.no_grad():
        times = compare({impl: prebuilt(functools.partial(m, x, t, y))
                         for impl, m in models.items()}, ctx)
    baselines = {"speedup_vs_float": f"ditkernels DiT ({dtype_name})"}
    return [{"family": "int8", "op": f"{name} forward", "shape": f"B={batch} 4x32x32",
             "impl": impl, **timing_columns(result), **speedups(times, impl, baselines),
             "weight_MB": _state_megabytes(models[impl])} for impl, result in times.items()]


def run(ctx: BenchContext):
    rows = _gemm_rows(ctx)
    if not ctx.quick:
        rows += _end_to_end_rows(ctx)
    return rows


COLUMNS = ["op", "shape", "impl", "min_ms", "median_ms", "max_ms", "TOPS",
           "speedup_vs_float", "speedup_vs_eager_int8", "speedup_vs_compiled_int8",
           "weight_MB", "timer", "note"]
