"""DiffiT's time-dependent multi-head self-attention (TMSA) on the fused kernel.

q = x W_qs + x_t W_qt (likewise k, v), attention softmax(q k^T * scale + B) v with B
read from a Swin-style relative-position-bias table. It runs as one ditkernels.tmsa
call that reads the qkv projection in place ([B, N, 3, H, D], no transposed copy),
adds the per-sample time projection and gathers the bias per (query, key) pair
inside the kernel; the [H, N, N] bias and the [B, H, N, N] scores never exist in
memory. Constructor, submodule names and construction order follow the public
NVlabs/DiffiT DiffiTAttention, so its state_dicts load strictly. The fused op takes
one dtype: under torch.autocast the time projection and the bias table are cast to
the dtype of the qkv projection.
"""

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from ..ops import tmsa, tmsa_windowed
from .functional import head_dim

Size2d = Union[int, Sequence[int]]


def _pair(size: Size2d) -> Tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def relative_position_index(grid_h: int, grid_w: int) -> Tensor:
    """Swin's relative_position_index of a Gh x Gw token grid, [Gh*Gw, Gh*Gw] int64:
    tokens i, j in row-major order at (y, x) read table row
    (y_i - y_j + Gh - 1) * (2 Gw - 1) + (x_i - x_j + Gw - 1).

    The kernel derives it from the token positions; TMSA keeps it as a buffer only
    because the public DiffiT stores it in its state_dict ([N, N] int64 per block,
    8 MiB per block at 512px).
    """
    ys, xs = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    return ((ys[:, None] - ys[None, :] + grid_h - 1) * (2 * grid_w - 1)
            + xs[:, None] - xs[None, :] + grid_w - 1)


class TMSA(nn.Module):
    """Time-dependent multi-head self-attention with a relative position bias,
    forward(x [B, N, dim], temb [B, temb_dim]) -> [B, N, dim].

    grid_size: the (Gh, Gw) token grid (an int for a square one), preceded by
    ``num_leading`` tokens that get no position bias, N = num_leading + Gh * Gw.
    window_size: None for global attention over the grid (the latent DiffiT: the
    table covers the whole grid), or local attention in non-overlapping windows of
    that size with the window's table; a window that covers the grid along an axis
    is clipped to it, so a window at least as large as the grid means global
    attention. temb_dim: width of the time embedding (default dim). qk_scale
    overrides head_dim ** -0.5.
    """

    def __init__(self, dim: int, num_heads: int, grid_size: Size2d, qkv_bias: bool = True,
                 window_size: Optional[Size2d] = None, num_leading: int = 0,
                 temb_dim: Optional[int] = None, qk_scale: Optional[float] = None,
                 proj_drop: float = 0.0):
        super().__init__()
        gh, gw = self.grid_size = _pair(grid_size)
        wh, ww = (gh, gw) if window_size is None else _pair(window_size)
        wh, ww = min(wh, gh), min(ww, gw)
        if min(gh, gw, wh, ww) < 1 or gh % wh or gw % ww:
            raise ValueError(f"window_size {(wh, ww)} must divide grid_size {(gh, gw)}")
        if (wh, ww) != (gh, gw) and num_leading:
            raise ValueError("leading tokens need global attention: window_size must be "
                             "None (or cover the grid) when num_leading > 0")
        self.window_size = (wh, ww)
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = head_dim(dim, num_heads)
        self.scale = qk_scale or self.head_dim ** -0.5
        self.num_leading = num_leading
        self.temb_dim = dim if temb_dim is None else temb_dim

        # Construction order follows the public DiffiTAttention, so that a given seed
        # gives its initial weights.
        self.qkv_temb = nn.Linear(self.temb_dim, 3 * dim)
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        # Unused by the kernel; kept so that original state_dicts load strictly.
        self.register_buffer("relative_position_index", relative_position_index(wh, ww))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    @property
    def windowed(self) -> bool:
        return self.window_size != self.grid_size

    def _check_inputs(self, x: Tensor, temb: Tensor) -> None:
        gh, gw = self.grid_size
        tokens = self.num_leading + gh * gw
        if x.dim() != 3 or x.shape[1:] != (tokens, self.dim):
            raise ValueError(f"x must be [B, {tokens}, {self.dim}] tokens ({self.num_leading} "
                             f"leading + a {gh} x {gw} grid, dim {self.dim}), got shape "
                             f"{tuple(x.shape)}")
        if temb.dim() != 2 or tuple(temb.shape) != (x.shape[0], self.temb_dim):
            raise ValueError(f"temb must be [B, temb_dim] = [{x.shape[0]}, {self.temb_dim}] "
                             f"for x of shape {tuple(x.shape)}, got shape {tuple(temb.shape)}")

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        self._check_inputs(x, temb)
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        time_qkv = self.qkv_temb(temb).reshape(B, 3, self.num_heads, self.head_dim)
        time_qkv = time_qkv.to(qkv.dtype)
        table = self.relative_position_bias_table.to(qkv.dtype)
        if self.windowed:
            out = tmsa_windowed(qkv, time_qkv, table, self.grid_size, self.window_size,
                                self.scale)
        else:
            out = tmsa(qkv, time_qkv, table, self.grid_size, self.num_leading, self.scale)
        return self.proj_drop(self.proj(out.reshape(B, N, C)))
