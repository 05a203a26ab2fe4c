"""skip_concat_linear against torch.cat + F.linear (cuBLAS), torch.compile of it, and
two cuBLAS GEMMs accumulating into one output (x W1^T + b, then += skip W2^T: no concat
either), the choice a dispatcher would have for shapes where our kernel loses.

FLOPs: forward 2 * M * (2D) * Dout; forward+backward three times that (dX and dW).
Shapes follow U-ViT: M = B * 258 tokens (256 patches + time and label tokens).
"""

import functools

import torch

import ditkernels
from ditkernels import reference
from benchmarks.bench_adaln import pass_fn
from benchmarks.common import (MMA_SYNC, BenchContext, Timing, compare, hopper_wgmma_build,
                               maybe_compile, speedups, timing_columns)


def shapes(ctx: BenchContext):
    if ctx.quick:
        return [(2 * 258, 64), (8 * 258, 256)]
    return [(B * 258, D) for D in (512, 768, 1024, 1152) for B in (8, 32, 128, 256)]


def two_gemms(x, skip, weight, bias):
    D = x.shape[-1]
    return torch.addmm(bias, x, weight[:, :D].t()).addmm_(skip, weight[:, D:].t())


def run(ctx: BenchContext):
    impls = {"cat+linear": reference.skip_concat_linear,
             "ditkernels": ditkernels.skip_concat_linear,
             "2 GEMMs": two_gemms}
    # On Hopper the op runs its wgmma kernel (tile width and K split planned per shape);
    # the same run times the mma.sync kernel, the 128-wide wgmma tile and the kernel
    # never split along K, forward only.
    env = {}
    if hopper_wgmma_build(ctx):
        impls["ditkernels (mma.sync)"] = ditkernels.skip_concat_linear
        impls["ditkernels (wgmma n128)"] = ditkernels.skip_concat_linear
        impls["ditkernels (no split-K)"] = ditkernels.skip_concat_linear
        env = {"ditkernels (mma.sync)": MMA_SYNC,
               "ditkernels (wgmma n128)": {"DITKERNELS_WGMMA_TILE_N": "128"},
               "ditkernels (no split-K)": {"DITKERNELS_SPLIT_K": "1"}}
    compiled = maybe_compile(reference.skip_concat_linear, ctx)
    if compiled is not None:
        impls["torch.compile"] = compiled
    rows = []
    for M, D in shapes(ctx):
        def t(*shape, scale=1.0):
            return torch.randn(*shape, device=ctx.device, dtype=ctx.dtype) * scale

        inputs = (t(M, D), t(M, D), t(D, 2 * D, scale=(2 * D) ** -0.5), t(D))
        torch._dynamo.reset()
        for pass_name, flop_factor in (("fwd", 1), ("fwd+bwd", 3)):
            flops = flop_factor * 2 * M * 2 * D * D
            times = compare({impl: functools.partial(pass_fn, fn, inputs, pass_name)
                             for impl, fn in impls.items()
                             if impl not in env or pass_name == "fwd"}, ctx, env)
            for impl, result in times.items():
                row = {"family": "skip_concat_linear", "op": "skip_concat_linear",
                       "shape": f"M{M} D{D} Dout{D}", "pass": pass_name, "impl": impl,
                       **timing_columns(result),
                       **speedups(times, impl, {"speedup_vs_cat_linear": "cat+linear"})}
                if isinstance(result, Timing):
                    row["TFLOP/s"] = flops / result.median / 1e12
                rows.append(row)
    return rows


COLUMNS = ["shape", "pass", "impl", "min_ms", "median_ms", "max_ms", "TFLOP/s",
           "speedup_vs_cat_linear", "timer"]
