"""Fused adaLN family: ln_modulate and gated_residual_ln_modulate against eager
PyTorch and torch.compile of the same eager code (ditkernels.reference).

Memory traffic counts the [B, N, C] tensors each pass must read and write at least
(the [B, C] and [C] vectors are negligible):
  ln_modulate                 fwd: x -> y (2)                     fwd+bwd: 2 + (x, dy -> dx) 3
  gated_residual_ln_modulate  fwd: x, h -> x_out, y (4)           fwd+bwd: 4 + (x_out, h, dy, dx_out -> dx, dh) 6
"""

import torch

import ditkernels
from ditkernels import reference
from benchmarks.common import BenchContext, maybe_compile, median_seconds

TENSOR_PASSES = {
    ("ln_modulate", "fwd"): 2,
    ("ln_modulate", "fwd+bwd"): 5,
    ("gated_residual_ln_modulate", "fwd"): 4,
    ("gated_residual_ln_modulate", "fwd+bwd"): 10,
}


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
    """A zero-argument callable running one forward (and backward) pass."""
    if pass_name == "fwd":
        return lambda: fn(*inputs)
    leaves = [x.detach().requires_grad_() for x in inputs]
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
            for pass_name in ("fwd", "fwd+bwd"):
                nbytes = TENSOR_PASSES[op, pass_name] * B * N * C * inputs[0].element_size()
                times = {}
                for impl, fn in impls.items():
                    if impl == "torch.compile":
                        # Static shapes per case: compile's best case, not a dynamic kernel.
                        torch._dynamo.reset()
                    times[impl] = median_seconds(pass_fn(fn, inputs, pass_name),
                                                 ctx.min_run_time)
                for impl, sec in times.items():
                    gbps = nbytes / sec / 1e9
                    rows.append({
                        "family": "adaln", "op": op, "shape": f"B{B} N{N} C{C}",
                        "pass": pass_name, "impl": impl, "median_ms": sec * 1e3,
                        "GB/s": gbps, "frac_copy_bw": gbps / ctx.copy_gbps,
                        "speedup_vs_eager": times["eager"] / sec,
                    })
    return rows


COLUMNS = ["op", "shape", "pass", "impl", "median_ms", "GB/s", "frac_copy_bw",
           "speedup_vs_eager"]
