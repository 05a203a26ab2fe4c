"""DiT end to end: one DiT-XL/2 block, and whole DiT-S/2 and DiT-XL/2 at 256x256
(32x32x4 latents), forward and forward+backward at batch 8/32/128.

Four implementations per case: the plain-PyTorch reference in eager mode (the
baseline), the reference under torch.compile, ditkernels, and ditkernels under
torch.compile. Low-precision dtypes run as on a training setup: on CUDA, fp32 weights
under torch.autocast; on CPU, the models are cast to the dtype.
"""

from typing import Dict, List, Tuple

import torch
import torch.nn as nn

from benchmarks.common import MODEL_COLUMNS, BenchContext, model_rows
from ditkernels.reference import dit as ref
from ditkernels.models import DIT_CONFIGS, DiT
from ditkernels.nn import DiTBlock

INPUT_SIZE = 32  # 256x256 images through the 8x-downsampling VAE
BATCHES = (8, 32, 128)
MODELS = ("DiT-S/2", "DiT-XL/2")
BLOCK_CONFIG = "DiT-XL/2"


def _cases(ctx: BenchContext) -> List[Tuple[str, str, int]]:
    """(what, config name, batch) with what in {'block', 'model'}."""
    if ctx.quick:
        return [("block", "DiT-S/2", 2), ("model", "DiT-S/2", 2)]
    return ([("block", BLOCK_CONFIG, b) for b in BATCHES]
            + [("model", name, b) for name in MODELS for b in BATCHES])


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
        # Block inputs come from earlier layers and need gradients; latents do not.
        x = torch.randn(batch, tokens, hidden, device=ctx.device, dtype=dtype,
                        requires_grad=True)
        c = torch.randn(batch, hidden, device=ctx.device, dtype=dtype, requires_grad=True)
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


def run(ctx: BenchContext) -> List[Dict]:
    rows = []
    for what, name, batch in _cases(ctx):
        reference, ours, inputs, out_shape, op, shape = _build(ctx, what, name, batch)
        rows += model_rows(ctx, dict(family="dit", op=op, shape=shape), reference, ours,
                           inputs, out_shape, batch)
    return rows


COLUMNS = MODEL_COLUMNS
