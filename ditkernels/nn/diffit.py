"""DiffiT's blocks on the fused kernels: the transformer block (TMSA + MLP, both
pre-norm, no adaLN), the latent model's output head and the image-space ResBlock.

Every LayerNorm runs as ln_modulate, and norm2 with the attention residual before it
as one gated_residual_ln_modulate (nn/functional.py). Submodule names follow the
public NVlabs/DiffiT code (the ResBlock's are our reconstruction, models/diffit.py).

Mixed precision: under torch.autocast the Linear outputs come back in bf16/fp16 while
the residual stream keeps its dtype; each branch output is cast to the residual
stream's dtype (the residual sums then run in that dtype, as in eager).
"""

from typing import Optional, Tuple

import torch.nn as nn
from torch import Tensor

from .dit import Mlp
from .functional import layer_norm, residual_layer_norm
from .tmsa import TMSA, Size2d


class DiffiTBlock(nn.Module):
    """DiffiT transformer block, forward(x [B, N, D], temb [B, temb_dim]):
    x = x + attn(norm1(x), temb); x = x + mlp(norm2(x)). No adaLN, no gates.

    tmsa_kwargs go to TMSA (window_size, num_leading, temb_dim, qk_scale, proj_drop).
    """

    def __init__(self, hidden_size: int, num_heads: int, grid_size: Size2d,
                 mlp_ratio: float = 4.0, **tmsa_kwargs):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = TMSA(hidden_size, num_heads, grid_size, qkv_bias=True, **tmsa_kwargs)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def attention_and_mlp(self, x: Tensor, y: Tensor, temb: Tensor) -> Tuple[Tensor, Tensor]:
        """Everything between norm1 and the closing residual.

        x: the block input; y = norm1(x). Returns (x + attn(y, temb), mlp output h); the
        caller adds h, which the latent DiffiT fuses with the next norm.
        """
        x, y = residual_layer_norm(self.norm2, x, self.attn(y, temb))
        return x, self.mlp(y).to(x.dtype)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        x, h = self.attention_and_mlp(x, layer_norm(self.norm1, x), temb)
        return x + h


class DiffiTFinalLayer(nn.Module):
    """The latent DiffiT's output head: LayerNorm, SiLU, Linear(D, p*p*out_channels)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.silu = nn.SiLU()

    def head(self, y: Tensor) -> Tensor:
        """The layer after its norm: y = norm_final(x)."""
        return self.linear(self.silu(y))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(layer_norm(self.norm_final, x))


class DiffiTResBlock(nn.Module):
    """DiffiT ResBlock on a [B, C, S, S] feature map: x + DiffiTBlock(Conv3x3(SiLU(
    GroupNorm(x))), temb), the block running on the S*S tokens (row-major)."""

    def __init__(self, channels: int, resolution: int, num_heads: int, temb_dim: int,
                 window_size: Optional[int] = None, mlp_ratio: float = 4.0,
                 num_groups: int = 32):
        super().__init__()
        self.channels = channels
        self.resolution = resolution
        self.norm = nn.GroupNorm(num_groups, channels)
        self.act = nn.SiLU()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.block = DiffiTBlock(channels, num_heads, resolution, mlp_ratio=mlp_ratio,
                                 window_size=window_size, temb_dim=temb_dim)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        expected = (self.channels, self.resolution, self.resolution)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must be a [B, {', '.join(map(str, expected))}] feature map, "
                             f"got shape {tuple(x.shape)}")
        h = self.conv(self.act(self.norm(x)))
        tokens = self.block(h.flatten(2).transpose(1, 2), temb)
        return x + tokens.transpose(1, 2).reshape(h.shape)
