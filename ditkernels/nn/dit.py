"""DiT building blocks on the fused adaLN kernels, drop-in for facebookresearch/DiT.

Constructors, submodule names and parameter shapes mirror DiT's models.py (with
timm's Attention and Mlp), so its state_dicts load with strict=True. The forward
passes run every LayerNorm + modulate, and the gated residual that precedes the
second one, as single ditkernels ops instead of ~6 eager elementwise passes each.

Mixed precision: under torch.autocast the residual stream x stays fp32 while the
Linear / attention outputs come back in bf16/fp16. The fused ops require one dtype,
so the small per-sample adaLN outputs and each branch output are cast to x's dtype
before they meet the residual stream (the residual sum is then fp32, as in eager).

DiT's TimestepEmbedder and LabelEmbedder live in nn/embed.py (DiffiT shares them)
and are importable from here too.
"""

from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .embed import LabelEmbedder, TimestepEmbedder  # noqa: F401  (importable from here)
from .functional import head_dim, layer_norm, residual_layer_norm

# The LayerNorm wrappers under DiT's names, where earlier code imports them.
ln_modulate_with = layer_norm
gated_residual_ln_modulate_with = residual_layer_norm


def _check_tokens(x: Tensor, hidden_size: int) -> None:
    if x.dim() != 3:
        raise ValueError(f"x must be [B, N, {hidden_size}] tokens, got shape {tuple(x.shape)}")
    if x.shape[-1] != hidden_size:
        raise ValueError(f"x has hidden size {x.shape[-1]} (shape {tuple(x.shape)}), "
                         f"but the module was built for hidden_size={hidden_size}")


def _check_condition(c: Tensor, x: Tensor, hidden_size: int) -> None:
    expected = (x.shape[0], hidden_size)
    if c.dim() != 2 or tuple(c.shape) != expected:
        raise ValueError(f"c must be [B, hidden_size] = {list(expected)} for x of shape "
                         f"{tuple(x.shape)}, got shape {tuple(c.shape)}")


class Attention(nn.Module):
    """Multi-head self-attention with timm's parameter layout.

    qkv: Linear(dim, 3*dim) whose output is laid out [q | k | v], each split into heads;
    proj: Linear(dim, dim). Attention runs through F.scaled_dot_product_attention.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim(dim, num_heads)
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        q, k, v = (self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
                   .permute(2, 0, 3, 1, 4).unbind(0))
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))


class Mlp(nn.Module):
    """timm's Mlp with DiT's activation (tanh-approximated GELU): fc1, act, fc2."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class DiTBlock(nn.Module):
    """DiT block with adaLN-Zero conditioning, forward(x [B, N, D], c [B, D]).

    block_kwargs go to the attention module (attn_drop, proj_drop), as in DiT.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0,
                 **block_kwargs):
        super().__init__()
        self.hidden_size = hidden_size
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, **block_kwargs)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def modulation(self, c: Tensor, dtype: torch.dtype) -> Tuple[Tensor, ...]:
        """(shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp), each [B, D].

        Chunks are strided views of one [B, 6D] tensor; the fused ops read them in place.
        """
        return self.adaLN_modulation(c).to(dtype).chunk(6, dim=1)

    def attention_and_mlp(self, x: Tensor, y: Tensor,
                          modulation: Tuple[Tensor, ...]) -> Tuple[Tensor, Tensor]:
        """Everything between norm1 and the final gated residual.

        x: the block input; y = ln_modulate(norm1(x), shift_msa, scale_msa).
        Returns (x + gate_msa * attn(y), mlp output h); the caller adds gate_mlp * h,
        which DiT fuses with the next block's norm1.
        """
        _, _, gate_msa, shift_mlp, scale_mlp, _ = modulation
        x, y = residual_layer_norm(self.norm2, x, self.attn(y), gate_msa, shift_mlp, scale_mlp)
        return x, self.mlp(y).to(x.dtype)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        _check_tokens(x, self.hidden_size)
        _check_condition(c, x, self.hidden_size)
        modulation = self.modulation(c, x.dtype)
        shift_msa, scale_msa, gate_mlp = modulation[0], modulation[1], modulation[5]
        y = layer_norm(self.norm1, x, shift_msa, scale_msa)
        x, h = self.attention_and_mlp(x, y, modulation)
        return torch.addcmul(x, gate_mlp.unsqueeze(1), h)


class FinalLayer(nn.Module):
    """DiT's output head: adaLN-modulated LayerNorm, then Linear(D, p*p*out_channels)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def modulation(self, c: Tensor, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        """(shift, scale), each [B, D]."""
        return self.adaLN_modulation(c).to(dtype).chunk(2, dim=1)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        _check_tokens(x, self.hidden_size)
        _check_condition(c, x, self.hidden_size)
        shift, scale = self.modulation(c, x.dtype)
        return self.linear(layer_norm(self.norm_final, x, shift, scale))

