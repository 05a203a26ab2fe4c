"""DiT end to end: one DiT-XL/2 block, and whole DiT-S/2 and DiT-XL/2 at 256x256
(32x32x4 latents), forward and forward+backward at batch 8/32/128.

Four implementations per case: the plain-PyTorch reference in eager mode (the
baseline), the reference under torch.compile, ditkernels, and ditkernels under
torch.compile. Low-precision dtypes run as on a training setup: on CUDA, fp32 weights
under torch.autocast; on CPU, the models are cast to the dtype.
"""

import contextlib
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from benchmarks.common import BenchContext, maybe_compile, median_seconds
from ditkernels import reference_models as ref
from ditkernels.models import DIT_CONFIGS, DiT
from ditkernels.nn import DiTBlock

INPUT_SIZE = 32  # 256x256 images through the 8x-downsampling VAE
BATCHES = (8, 32, 128)
MODELS = ("DiT-S/2", "DiT-XL/2")
BLOCK_CONFIG = "DiT-XL/2"
PASSES = ("fwd", "fwd+bwd")


def _cases(ctx: BenchContext) -> List[Tuple[str, str, int]]:
    """(what, config name, batch) with what in {'block', 'model'}."""
    if ctx.quick:
        return [("block", "DiT-S/2", 2), ("model", "DiT-S/2", 2)]
    return ([("block", BLOCK_CONFIG, b) for b in BATCHES]
            + [("model", name, b) for name in MODELS for b in BATCHES])


def _autocast(ctx: BenchContext):
    if ctx.is_cuda and ctx.dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=ctx.dtype)
    return contextlib.nullcontext()


def _weights_dtype(ctx: BenchContext) -> torch.dtype:
    return torch.float32 if ctx.is_cuda else ctx.dtype


def _build(ctx: BenchContext, what: str, name: str, batch: int):
    """(reference module, ditkernels module with the same weights, inputs, output shape,
    op, shape label)."""
    config = DIT_CONFIGS[name]
    hidden, heads = config["hidden_size"], config["num_heads"]
    tokens = (INPUT_SIZE // config["patch_size"]) ** 2
    dtype = _weights_dtype(ctx)
    if what == "block":
        reference, ours = ref.DiTBlock(hidden, heads), DiTBlock(hidden, heads)
        x = torch.randn(batch, tokens, hidden, device=ctx.device, dtype=dtype)
        c = torch.randn(batch, hidden, device=ctx.device, dtype=dtype)
        inputs, out_shape = (x, c), x.shape
        op, shape = f"DiTBlock ({name})", f"B={batch} N={tokens} D={hidden} H={heads}"
    else:
        reference = ref.DiT(input_size=INPUT_SIZE, **config)
        ours = DiT(input_size=INPUT_SIZE, **config)
        x = torch.randn(batch, 4, INPUT_SIZE, INPUT_SIZE, device=ctx.device, dtype=dtype)
        t = torch.randint(0, 1000, (batch,), device=ctx.device)
        y = torch.randint(0, 1000, (batch,), device=ctx.device)
        inputs, out_shape = (x, t, y), (batch, reference.out_channels, INPUT_SIZE, INPUT_SIZE)
        op, shape = name, f"B={batch} 4x{INPUT_SIZE}x{INPUT_SIZE} N={tokens} D={hidden}"
    # adaLN-Zero would start every gate at zero; give the modulation realistic values.
    for module in reference.modules():
        if isinstance(module, ref.DiTBlock):
            nn.init.normal_(module.adaLN_modulation[-1].weight, std=0.02)
    ours.load_state_dict(reference.state_dict())
    return (reference.to(ctx.device, dtype), ours.to(ctx.device, dtype), inputs, out_shape,
            op, shape)


def _step(model: Callable, module: nn.Module, inputs, out_shape, backward: bool,
          ctx: BenchContext) -> Callable[[], None]:
    """One forward (no grad) or forward+backward of model (module, maybe compiled)."""
    if not backward:
        def forward():
            with torch.no_grad(), _autocast(ctx):
                model(*inputs)
        return forward

    # Block inputs come from earlier layers and need gradients; latents do not.
    inputs = tuple(v.detach().requires_grad_(v.dim() != 4) if v.is_floating_point() else v
                   for v in inputs)
    grad_out = torch.randn(out_shape, device=ctx.device)

    def forward_backward():
        # set_to_none: accumulating into existing .grad would add a full pass over the
        # weights (2.7 GB for DiT-XL/2) that a training step does not pay.
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


def _bench_case(ctx: BenchContext, what: str, name: str, batch: int) -> List[Dict]:
    reference, ours, inputs, out_shape, op, shape = _build(ctx, what, name, batch)
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
            seconds = _measure(_step(model, module, inputs, out_shape, backward, ctx), ctx)
            if impl == "eager":
                eager_s = seconds
            row = {"family": "dit", "op": op, "shape": shape, "pass": pass_name, "impl": impl,
                   "median_ms": None, "images_per_s": None, "speedup_vs_eager": None}
            if seconds is None:
                row["note"] = "out of memory"
            else:
                row.update(median_ms=seconds * 1e3, images_per_s=batch / seconds,
                           speedup_vs_eager=eager_s / seconds if eager_s else None)
            rows.append(row)
    return rows


def run(ctx: BenchContext) -> List[Dict]:
    rows = []
    for what, name, batch in _cases(ctx):
        rows += _bench_case(ctx, what, name, batch)
    return rows


COLUMNS = ["op", "shape", "pass", "impl", "median_ms", "images_per_s", "speedup_vs_eager", "note"]
