"""Fused adaLN family: ln_modulate and gated_residual_ln_modulate against eager
PyTorch and torch.compile of the same eager code (ditkernels.reference), forward,
forward+backward, and backward alone (the autograd graph of one forward, replayed
with retain_graph), since the op's target is for its backward.

Memory traffic counts the [B, N, C] tensors each pass must read and write at least
(the [B, C] and [C] vectors are negligible):
  ln_modulate                 fwd: x -> y (2)            bwd: x, dy -> dx (3)
  gated_residual_ln_modulate  fwd: x, h -> x_out, y (4)  bwd: x_out, h, dy, dx_out -> dx, dh (6)
and fwd+bwd the sum. speedup_vs_eager and speedup_vs_compile: that baseline's median
time over the row's.
"""

import functools

import torch
import torch._functorch.config

import ditkernels
from ditkernels import reference
from benchmarks.common import (BenchContext, bandwidth_columns, compare, maybe_compile,
                               speedups, timing_columns, Timing)

TENSOR_PASSES = {
    ("ln_modulate", "fwd"): 2,
    ("ln_modulate", "bwd"): 3,
    ("gated_residual_ln_modulate", "fwd"): 4,
    ("gated_residual_ln_modulate", "bwd"): 6,
}
PASSES = ("fwd", "fwd+bwd", "bwd")


def tensor_passes(op: str, pass_name: str) -> int:
    return sum(TENSOR_PASSES[op, p] for p in pass_name.split("+"))


def shapes(ctx: BenchContext):
    if ctx.quick:
        # Small DiT-S and DiT-XL batches, where per-call overheads weigh most on CPU.
        return [(2, 256, 384), (8, 256, 384), (4, 256, 1152), (8, 256, 1152)]
    out = []
    for C in (384, 768, 1152):
        out += [(8, 256, C), (32, 256, C), (128, 256, C), (256, 256, C), (8, 1024, C),
                (64, 1024, C)]
    return out


def make_inputs(op, B, N, C, ctx):
    def t(*shape):
        return torch.randn(*shape, device=ctx.device, dtype=ctx.dtype)

    ada = t(B, 6 * C)
    shift, scale, gate = ada[:, :C], ada[:, C:2 * C], ada[:, 2 * C:3 * C]
    if op == "ln_modulate":
        return (t(B, N, C), shift, scale)
    return (t(B, N, C), t(B, N, C), gate, shift, scale)


def pass_fn(fn, inputs, pass_name):
    """A zero-argument callable running one forward ("fwd"), forward and backward
    ("fwd+bwd"), or backward ("bwd": of one forward whose graph is kept) pass."""
    if pass_name == "fwd":
        return lambda: fn(*inputs)
    leaves = [x.detach().requires_grad_() for x in inputs]
    if pass_name == "bwd":
        # A compiled backward that reuses ("donates") its saved buffers refuses
        # retain_graph; this one keeps them, at a cost in memory, not in passes.
        with torch._functorch.config.patch(donated_buffer=False):
            outs = fn(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        grads = [torch.randn_like(o) for o in outs]
        return lambda: torch.autograd.grad(outs, leaves, grads, retain_graph=True)
    probe = fn(*leaves)
    outs = probe if isinstance(probe, tuple) else (probe,)
    grads = [torch.randn_like(o) for o in outs]

    def run():
        res = fn(*leaves)
        res = res if isinstance(res, tuple) else (res,)
        return torch.autograd.grad(res, leaves, grads)

    return run


def run(ctx: BenchContext):
    rows = []
    for op in ("ln_modulate", "gated_residual_ln_modulate"):
        impls = {"eager": getattr(reference, op), "ditkernels": getattr(ditkernels, op)}
        compiled = maybe_compile(getattr(reference, op), ctx)
        if compiled is not None:
            impls["torch.compile"] = compiled
        for B, N, C in shapes(ctx):
            inputs = make_inputs(op, B, N, C, ctx)
            for pass_name in PASSES:
                # Static shapes per case: compile's best case, not a dynamic kernel;
                # and "bwd" compiles without donated buffers (pass_fn).
                torch._dynamo.reset()
                nbytes = tensor_passes(op, pass_name) * B * N * C * inputs[0].element_size()
                times = compare({impl: functools.partial(pass_fn, fn, inputs, pass_name)
                                 for impl, fn in impls.items()}, ctx)
                for impl, result in times.items():
                    row = {"family": "adaln", "op": op, "shape": f"B{B} N{N} C{C}",
                           "pass": pass_name, "impl": impl, **timing_columns(result),
                           **speedups(times, impl, BASELINES)}
                    if isinstance(result, Timing):
                        row.update(bandwidth_columns(nbytes, result, ctx))
                    rows.append(row)
    return rows


BASELINES = {"speedup_vs_eager": "eager", "speedup_vs_compile": "torch.compile"}
COLUMNS = ["op", "shape", "pass", "impl", "min_ms", "median_ms", "max_ms", "GB/s",
           "frac_copy_bw", "cache", "speedup_vs_eager", "speedup_vs_compile", "timer"]
