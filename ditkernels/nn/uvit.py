"""U-ViT building blocks on the fused kernels, drop-in for baofff/U-ViT libs/uvit.py.

Constructors, submodule names and parameter shapes mirror the original, so its
state_dicts load with strict=True. A block's long-skip merge
``skip_linear(cat([x, skip], -1))`` runs as skip_concat_linear, which never builds the
[B, N, 2D] concat; its affine LayerNorms run as ln_modulate, and norm2 with the
attention residual before it as one gated_residual_ln_modulate (nn/functional.py).
The whole network, which also fuses norms across blocks, is models/uvit.py.
"""

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch import Tensor

from .dit import Attention as DiTAttention
from .functional import layer_norm, residual_layer_norm, skip_merge


class Attention(DiTAttention):
    """U-ViT's multi-head self-attention: DiT's (timm's layout: qkv Linear(dim, 3*dim)
    laid out [q | k | v], each split into heads; proj Linear(dim, dim)) with U-ViT's
    argument order and scale qk_scale or head_dim**-0.5."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False,
                 qk_scale: Optional[float] = None, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.scale = qk_scale or self.scale


class Mlp(nn.Module):
    """The timm Mlp U-ViT ships: fc1, act (exact GELU by default), fc2, one dropout."""

    def __init__(self, in_features: int, hidden_features: int, act_layer=nn.GELU,
                 drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def build_norm(norm_layer, dim: int) -> nn.LayerNorm:
    """norm_layer(dim), which must be an nn.LayerNorm over the last dim."""
    norm = norm_layer(dim)
    if not isinstance(norm, nn.LayerNorm) or tuple(norm.normalized_shape) != (dim,):
        raise ValueError(f"norm_layer must build an nn.LayerNorm over the last dimension "
                         f"({dim}), which the fused kernels replace; got {norm!r}")
    return norm


class Block(nn.Module):
    """U-ViT block, forward(x [B, L, dim], skip [B, L, dim] or None):
    with skip_linear, x = skip_linear(cat([x, skip], -1)); then
    x = x + attn(norm1(x)); x = x + mlp(norm2(x)).

    As in the original, a block built without ``skip`` ignores a skip it is given.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 qk_scale: Optional[float] = None, act_layer=nn.GELU, norm_layer=nn.LayerNorm,
                 skip: bool = False, use_checkpoint: bool = False):
        super().__init__()
        self.dim = dim
        self.norm1 = build_norm(norm_layer, dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale)
        self.norm2 = build_norm(norm_layer, dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer)
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.use_checkpoint = use_checkpoint

    def merge_skip(self, x: Tensor, skip: Optional[Tensor]) -> Tensor:
        if self.skip_linear is None:
            return x
        if skip is None:
            raise ValueError("this block merges a long skip (built with skip=True): "
                             "call it as block(x, skip)")
        if skip.shape != x.shape:
            raise ValueError(f"skip must have x's shape {tuple(x.shape)}, got "
                             f"{tuple(skip.shape)}")
        return skip_merge(self.skip_linear, x, skip)

    def attention_and_mlp(self, x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
        """Everything between norm1 and the closing residual.

        x: the block input after the skip merge; y = norm1(x). Returns
        (x + attn(y), mlp output h); the caller adds h, which UViT fuses with the next
        norm where one follows.
        """
        x, y = residual_layer_norm(self.norm2, x, self.attn(y))
        return x, self.mlp(y)

    def forward(self, x: Tensor, skip: Optional[Tensor] = None) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [B, L, {self.dim}] tokens, got shape {tuple(x.shape)}")
        if self.use_checkpoint:
            return torch.utils.checkpoint.checkpoint(self._forward, x, skip, use_reentrant=False)
        return self._forward(x, skip)

    def _forward(self, x: Tensor, skip: Optional[Tensor]) -> Tensor:
        x = self.merge_skip(x, skip)
        x, h = self.attention_and_mlp(x, layer_norm(self.norm1, x))
        return x + h


class PatchEmbed(nn.Module):
    """Image [B, C, H, W] -> tokens [B, (H/p)*(W/p), D] by a stride-p convolution."""

    def __init__(self, patch_size: int, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)
