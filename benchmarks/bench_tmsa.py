"""TMSA family: ditkernels.tmsa (DiffiT's time-dependent attention with a relative
position bias) against the ways to compute it with PyTorch, in the same run.

Impls, each from qkv [B, N, 3, H, D] (a qkv projection reshaped in place), the time
projection [B, 3, H, D] and the bias table [(2G-1)^2, H] of a G x G token grid:
  ditkernels   ditkernels.tmsa: time add, bias gather and attention in one kernel
  eager        ditkernels.reference.tmsa: materialized [H, N, N] bias and scores,
               eager softmax (the index is rebuilt per call, as the reference does)
  sdpa_mask    time add, then F.scaled_dot_product_attention with the gathered bias as
               attn_mask (the index is precomputed, like a module buffer)
  flex         FlexAttention, compiled, with a score_mod that reads the table (CUDA only,
               and only when torch.compile baselines are on)
  sdpa_nobias  SDPA on the same q, k, v without time add or bias: the attention alone,
               the bound a fused TMSA can approach
  ditkernels (mma.sync)  on Hopper with an sm_90a build, the forward of the mma.sync
               kernel every other GPU runs (DITKERNELS_DISABLE_WGMMA=1), in the same run
               as the wgmma one that `ditkernels` runs there
  ditkernels (64-key backward)  on Hopper, the forward+backward with the backward's
               64-key CTAs (DITKERNELS_TMSA_BWD_KEYS=64), the A100's choice, against
               the 128-key ones `ditkernels` runs there at these head dims
Attention FLOPs: 4 * B * H * N^2 * D forward (QK^T and PV), 2.5x that forward+backward.
speedup_vs_sdpa_mask: sdpa_mask time / time; ratio_vs_sdpa_nobias: time / sdpa_nobias
time.

CUDA cases: N = 256, 1024, 4096 (16x16, 32x32, 64x64 grids), head dims 64 and 72 (as
DiffiT-XL/2), H = 16 and the smallest power-of-two B that fills an H100 with query
tiles: B * H * ceil(N / 128) >= 4 * 132 CTAs (at these head dims a forward CTA owns up
to 128 queries, a backward CTA up to 128 keys). Fewer would time a partly idle GPU.
"""

import functools
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import ditkernels
from ditkernels import reference
from benchmarks.bench_adaln import pass_fn
from benchmarks.common import (MMA_SYNC, BenchContext, Timing, compare, hopper_wgmma_build,
                               maybe_compile, speedups, timing_columns)

HEADS = 16
TILE = 128                # the most queries per forward CTA or keys per backward CTA
MIN_CTAS = 4 * 132        # four waves' worth on an H100's 132 SMs
BASELINE, BOUND = "sdpa_mask", "sdpa_nobias"
# Variants of ditkernels timed under an environment, and the one pass each is for.
MMA_SYNC_IMPL, NARROW_BWD_IMPL = "ditkernels (mma.sync)", "ditkernels (64-key backward)"
VARIANTS = {MMA_SYNC_IMPL: (MMA_SYNC, "fwd"),
            NARROW_BWD_IMPL: ({"DITKERNELS_TMSA_BWD_KEYS": "64"}, "fwd+bwd")}


def cases(ctx: BenchContext):
    """(B, H, G, D): batch, heads, grid side (N = G * G tokens), head dim."""
    if ctx.quick:
        return [(2, 2, 8, 32)]
    out = []
    for grid in (16, 32, 64):
        tiles = -(-grid * grid // TILE)
        batch = 1
        while batch * HEADS * tiles < MIN_CTAS:
            batch *= 2
        for head_dim in (64, 72):
            out.append((batch, HEADS, grid, head_dim))
    return out


def _split(qkv: torch.Tensor, time_qkv: Optional[torch.Tensor]):
    if time_qkv is not None:
        qkv = qkv + time_qkv[:, None]
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # q, k, v: [B, H, N, D]


def implementations(ctx: BenchContext, grid: int) -> Dict[str, Callable]:
    index = reference.relative_position_index(grid, grid, device=ctx.device)

    def fused(qkv, time_qkv, table):
        return ditkernels.tmsa(qkv, time_qkv, table, grid)

    def eager(qkv, time_qkv, table):
        return reference.tmsa(qkv, time_qkv, table, grid)

    def sdpa_mask(qkv, time_qkv, table):
        q, k, v = _split(qkv, time_qkv)
        bias = table[index].permute(2, 0, 1).unsqueeze(0)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2)

    def sdpa_nobias(qkv):
        q, k, v = _split(qkv, None)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)

    impls = {"ditkernels": fused, "eager": eager, BASELINE: sdpa_mask, BOUND: sdpa_nobias}
    if hopper_wgmma_build(ctx):
        impls[MMA_SYNC_IMPL] = fused
        impls[NARROW_BWD_IMPL] = fused
    flex = _flex(ctx, grid)
    if flex is not None:
        impls["flex"] = flex
    return impls


def _flex(ctx: BenchContext, grid: int) -> Optional[Callable]:
    if not ctx.is_cuda:
        return None
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        return None
    span = 2 * grid - 1

    def flex(qkv, time_qkv, table):
        q, k, v = _split(qkv, time_qkv)

        def score_mod(score, b, h, q_idx, kv_idx):
            dy = q_idx // grid - kv_idx // grid + grid - 1
            dx = q_idx % grid - kv_idx % grid + grid - 1
            return score + table[dy * span + dx, h]

        return flex_attention(q, k, v, score_mod=score_mod).transpose(1, 2)

    return maybe_compile(flex, ctx)


def run(ctx: BenchContext) -> List[Dict]:
    rows = []
    for B, H, grid, D in cases(ctx):
        N = grid * grid

        def t(*shape):
            return torch.randn(*shape, device=ctx.device, dtype=ctx.dtype)

        qkv, time_qkv, table = t(B, N, 3, H, D), t(B, 3, H, D), t((2 * grid - 1) ** 2, H)
        # Static shapes per case: compile's best case, not a dynamic kernel.
        torch._dynamo.reset()
        impls = implementations(ctx, grid)
        env = {impl: variables for impl, (variables, _) in VARIANTS.items()}
        for pass_name in ("fwd", "fwd+bwd"):
            flops = 4 * B * H * N * N * D * (2.5 if pass_name == "fwd+bwd" else 1.0)
            times = compare(
                {impl: functools.partial(pass_fn, fn,
                                         (qkv,) if impl == BOUND else (qkv, time_qkv, table),
                                         pass_name)
                 for impl, fn in impls.items()
                 if impl not in VARIANTS or VARIANTS[impl][1] == pass_name},
                ctx, env, may_fail=["flex"])
            for impl, result in times.items():
                row = {"family": "tmsa", "op": "tmsa", "shape": f"B{B} H{H} N{N} D{D}",
                       "pass": pass_name, "impl": impl, **timing_columns(result),
                       **speedups(times, impl, {"speedup_vs_sdpa_mask": BASELINE})}
                if isinstance(result, Timing):
                    row["TFLOP/s"] = flops / result.median / 1e12
                    if isinstance(times[BOUND], Timing):
                        row["ratio_vs_sdpa_nobias"] = result.median / times[BOUND].median
                rows.append(row)
    return rows


COLUMNS = ["op", "shape", "pass", "impl", "min_ms", "median_ms", "max_ms", "TFLOP/s",
           "speedup_vs_sdpa_mask", "ratio_vs_sdpa_nobias", "timer", "note"]
