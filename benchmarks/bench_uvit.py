"""U-ViT end to end: U-ViT-M/2 on ImageNet-256 latents (32x32x4, patch 2: 256 patches +
time and label tokens = 258 tokens, 17 blocks, 8 long skips), forward and training step
(forward+backward) at batch 32 and 128.

Four implementations per case: the plain-PyTorch reference (torch.cat + nn.Linear skips,
eager LayerNorms) in eager mode (the baseline), the reference under torch.compile,
ditkernels (fused skip-concat-linear and residual + LayerNorm), and ditkernels under
torch.compile. Low-precision dtypes run as on a training setup: on CUDA, fp32 weights
under torch.autocast; on CPU, the models are cast to the dtype.
"""

import contextlib
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from benchmarks.common import BenchContext, maybe_compile, median_seconds
from ditkernels import reference_uvit as ref
from ditkernels.models.uvit import UVIT_CONFIGS, UViT

MODEL = "U-ViT-M/2"
BATCHES = (32, 128)
# ctx.quick: every code path (label token, skips, final conv) at a size that runs in
# moments on a CPU.
TINY = dict(img_size=8, patch_size=2, in_chans=4, embed_dim=64, depth=4, num_heads=2,
            num_classes=10)
PASSES = ("fwd", "fwd+bwd")


def _cases(ctx: BenchContext) -> List[Tuple[str, dict, int]]:
    """(name, constructor arguments, batch)."""
    if ctx.quick:
        return [("U-ViT (tiny)", TINY, 2)]
    return [(MODEL, UVIT_CONFIGS[MODEL], batch) for batch in BATCHES]


def _autocast(ctx: BenchContext):
    if ctx.is_cuda and ctx.dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=ctx.dtype)
    return contextlib.nullcontext()


def _build(ctx: BenchContext, config: dict, batch: int):
    """(reference model, ditkernels model with the same weights, inputs)."""
    dtype = torch.float32 if ctx.is_cuda else ctx.dtype
    reference = ref.UViT(**config)
    ours = UViT(**config)
    ours.load_state_dict(reference.state_dict())
    size, channels = config["img_size"], config["in_chans"]
    x = torch.randn(batch, channels, size, size, device=ctx.device, dtype=dtype)
    t = torch.rand(batch, device=ctx.device) * 999
    inputs = (x, t)
    if config.get("num_classes", -1) > 0:
        inputs += (torch.randint(0, config["num_classes"], (batch,), device=ctx.device),)
    return reference.to(ctx.device, dtype), ours.to(ctx.device, dtype), inputs


def _step(model: Callable, module: nn.Module, inputs, backward: bool,
          ctx: BenchContext) -> Callable[[], None]:
    """One forward (no grad) or forward+backward of model (module, maybe compiled)."""
    if not backward:
        def forward():
            with torch.no_grad(), _autocast(ctx):
                model(*inputs)
        return forward

    grad_out = torch.randn(inputs[0].shape, device=ctx.device)

    def forward_backward():
        # set_to_none: accumulating into existing .grad would add a pass over the
        # weights that a training step does not pay.
        module.zero_grad(set_to_none=True)
        with _autocast(ctx):
            out = model(*inputs)
        out.backward(grad_out.to(out.dtype))
    return forward_backward


def _measure(fn: Callable[[], None], ctx: BenchContext) -> Optional[float]:
    try:
        return median_seconds(fn, ctx.min_run_time)
    except torch.OutOfMemoryError:
        return None
    finally:
        if ctx.is_cuda:
            torch.cuda.empty_cache()


def _bench_case(ctx: BenchContext, name: str, config: dict, batch: int) -> List[Dict]:
    reference, ours, inputs = _build(ctx, config, batch)
    size, patch = config["img_size"], config["patch_size"]
    tokens = (size // patch) ** 2 + reference.extras
    shape = (f"B={batch} {config['in_chans']}x{size}x{size} N={tokens} "
             f"D={config['embed_dim']} blocks={len(reference.in_blocks) * 2 + 1}")
    rows = []
    for pass_name in PASSES:
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
            seconds = _measure(_step(model, module, inputs, backward, ctx), ctx)
            if impl == "eager":
                eager_s = seconds
            row = {"family": "uvit", "op": name, "shape": shape, "pass": pass_name,
                   "impl": impl, "median_ms": None, "images_per_s": None,
                   "speedup_vs_eager": None}
            if seconds is None:
                row["note"] = "out of memory"
            else:
                row.update(median_ms=seconds * 1e3, images_per_s=batch / seconds,
                           speedup_vs_eager=eager_s / seconds if eager_s else None)
            rows.append(row)
    return rows


def run(ctx: BenchContext) -> List[Dict]:
    rows = []
    for name, config, batch in _cases(ctx):
        rows += _bench_case(ctx, name, config, batch)
    return rows


COLUMNS = ["op", "shape", "pass", "impl", "median_ms", "images_per_s", "speedup_vs_eager",
           "note"]
