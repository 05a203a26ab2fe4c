"""Text-to-image U-ViT (Bao et al., "All are Worth Words") on the fused kernels, a
drop-in for baofff/U-ViT libs/uvit_t2i.py.

The text enters as tokens: a frozen text encoder (CLIP ViT-L/14's text transformer in
the original, whose last hidden state is [B, 77, 768]) encodes the prompt outside the
model, ``context_embed`` Linear(clip_dim, embed_dim) projects each of its
num_clip_token vectors, and the tokens are laid out [time, context tokens, patches].
Everything else is ditkernels.models.uvit's UViT, blocks and fused kernels included
(skip_concat_linear for the long skips, ln_modulate / gated_residual_ln_modulate for
the LayerNorms).

Same constructor, submodule names, construction order and initialisation as the
original, so its released MS-COCO checkpoints (U-ViT-S/2 and U-ViT-S/2 deep) load
unchanged with strict=True. Classifier-free guidance in the original conditions the
unconditional half on the encoding of the empty prompt (its ``empty_context``):
``diffusion.as_denoiser(model, context=..., null_context=...)`` does the same. The
original trains and samples with timesteps 1..1000 for the noise levels that
ditkernels.diffusion numbers 0..999, so its checkpoints are called with t + 1.
"""

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from .uvit import UViT, _config_constructor


class UViTT2I(UViT):
    """U-ViT conditioned on text-encoder tokens: forward(x [B, in_chans, img_size,
    img_size], timesteps [B], context [B, num_clip_token, clip_dim]) -> [B, in_chans,
    img_size, img_size].

    clip_dim: width of the text encoder's output; num_clip_token: its sequence length
    (both fixed by the encoder: 768 and 77 for CLIP ViT-L/14). Other arguments as UViT.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = False, qk_scale: Optional[float] = None,
                 norm_layer=nn.LayerNorm, mlp_time_embed: bool = False,
                 use_checkpoint: bool = False, clip_dim: int = 768, num_clip_token: int = 77,
                 conv: bool = True, skip: bool = True):
        if clip_dim < 1 or num_clip_token < 0:
            raise ValueError(f"UViTT2I needs clip_dim >= 1 and num_clip_token >= 0, got "
                             f"clip_dim={clip_dim}, num_clip_token={num_clip_token}")
        # Plain attributes, read by _add_condition_embedding while UViT builds the model.
        self.clip_dim = clip_dim
        self.num_clip_token = num_clip_token
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                         embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                         mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale,
                         norm_layer=norm_layer, mlp_time_embed=mlp_time_embed, num_classes=-1,
                         use_checkpoint=use_checkpoint, conv=conv, skip=skip)

    def _add_condition_embedding(self, embed_dim: int) -> int:
        self.context_embed = nn.Linear(self.clip_dim, embed_dim)
        return self.num_clip_token

    def _check_context(self, x: Tensor, context: Optional[Tensor]) -> None:
        expected = (x.shape[0], self.num_clip_token, self.clip_dim)
        if context is None:
            raise ValueError(f"this U-ViT is text-conditioned: pass context, the text "
                             f"encoder's output of shape {list(expected)} (B, num_clip_token, "
                             f"clip_dim)")
        if tuple(context.shape) != expected or not context.is_floating_point():
            raise ValueError(f"context must be a floating [B, num_clip_token, clip_dim] = "
                             f"{list(expected)} tensor matching x of shape {tuple(x.shape)}, "
                             f"got shape {tuple(context.shape)} and dtype {context.dtype}")

    def forward(self, x: Tensor, timesteps: Tensor, context: Optional[Tensor]) -> Tensor:
        self._check_inputs(x, timesteps, None)
        self._check_context(x, context)
        x = self.patch_embed(x)
        tokens = torch.cat([self._time_token(timesteps), self.context_embed(context), x], dim=1)
        return self._blocks_and_decoder(tokens + self.pos_embed)


# Constructor arguments of the published MS-COCO models (baofff/U-ViT
# configs/mscoco_uvit_small.py; the deep one is the same with depth 16): 256x256
# images as 32x32x4 latents, CLIP ViT-L/14 text tokens, 1 + 77 + 256 = 334 tokens.
UVIT_T2I_CONFIGS = {
    "U-ViT-S/2-mscoco": dict(img_size=32, patch_size=2, in_chans=4, embed_dim=512, depth=12,
                             num_heads=8, mlp_ratio=4, qkv_bias=False, mlp_time_embed=False,
                             clip_dim=768, num_clip_token=77),
}
UVIT_T2I_CONFIGS["U-ViT-S/2-deep-mscoco"] = dict(UVIT_T2I_CONFIGS["U-ViT-S/2-mscoco"], depth=16)

UViTT2I_S_2_mscoco = _config_constructor("U-ViT-S/2-mscoco", UViTT2I, UVIT_T2I_CONFIGS)
UViTT2I_S_2_deep_mscoco = _config_constructor("U-ViT-S/2-deep-mscoco", UViTT2I,
                                              UVIT_T2I_CONFIGS)

UViTT2I_models = {"U-ViT-S/2-mscoco": UViTT2I_S_2_mscoco,
                  "U-ViT-S/2-deep-mscoco": UViTT2I_S_2_deep_mscoco}
