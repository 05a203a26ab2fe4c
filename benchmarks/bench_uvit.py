"""U-ViT end to end: U-ViT-M/2 on ImageNet-256 latents (32x32x4, patch 2: 256 patches +
time and label tokens = 258 tokens, 17 blocks, 8 long skips), forward and training step
(forward+backward) at batch 32 and 128.

Four implementations per case: the plain-PyTorch reference (torch.cat + nn.Linear skips,
eager LayerNorms) in eager mode (the baseline), the reference under torch.compile,
ditkernels (fused skip-concat-linear and residual + LayerNorm), and ditkernels under
torch.compile. Low-precision dtypes run as on a training setup: on CUDA, fp32 weights
under torch.autocast; on CPU, the models are cast to the dtype.
"""

from typing import Dict, List, Tuple

import torch

from benchmarks.common import MODEL_COLUMNS, BenchContext, model_rows
from ditkernels.reference import uvit as ref
from ditkernels.models.uvit import UVIT_CONFIGS, UViT

MODEL = "U-ViT-M/2"
BATCHES = (32, 128)
# ctx.quick: every code path (label token, skips, final conv) at a size that runs in
# moments on a CPU.
TINY = dict(img_size=8, patch_size=2, in_chans=4, embed_dim=64, depth=4, num_heads=2,
            num_classes=10)


def _cases(ctx: BenchContext) -> List[Tuple[str, dict, int]]:
    """(name, constructor arguments, batch)."""
    if ctx.quick:
        return [("U-ViT (tiny)", TINY, 2)]
    return [(MODEL, UVIT_CONFIGS[MODEL], batch) for batch in BATCHES]


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


def _bench_case(ctx: BenchContext, name: str, config: dict, batch: int) -> List[Dict]:
    reference, ours, inputs = _build(ctx, config, batch)
    size, patch = config["img_size"], config["patch_size"]
    tokens = (size // patch) ** 2 + reference.extras
    shape = (f"B={batch} {config['in_chans']}x{size}x{size} N={tokens} "
             f"D={config['embed_dim']} blocks={len(reference.in_blocks) * 2 + 1}")
    # U-ViT predicts noise of its input's shape.
    return model_rows(ctx, dict(family="uvit", op=name, shape=shape), reference, ours, inputs,
                      inputs[0].shape, batch)


def run(ctx: BenchContext) -> List[Dict]:
    rows = []
    for name, config, batch in _cases(ctx):
        rows += _bench_case(ctx, name, config, batch)
    return rows


COLUMNS = MODEL_COLUMNS
