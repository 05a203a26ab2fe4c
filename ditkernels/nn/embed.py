"""Embeddings and token layouts shared by the models: timestep sinusoids and their
MLP embedder, class labels, patches in and out, and the fixed 2-D sin-cos position
table. Constructors, submodule names and initial values follow DiT's models.py (with
timm's PatchEmbed), which U-ViT's sinusoid and DiffiT's embedders share.
"""

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000) -> Tensor:
    """[B] (possibly fractional) timesteps -> fp32 [B, dim] laid out cat[cos, sin]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class TimestepEmbedder(nn.Module):
    """Scalar timesteps [B] -> [B, D]: sinusoidal features, then Linear, SiLU, Linear."""

    timestep_embedding = staticmethod(timestep_embedding)

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t: Tensor) -> Tensor:
        if t.dim() != 1:
            raise ValueError(f"t must be a [B] vector of timesteps, got shape {tuple(t.shape)}")
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        # The sinusoid is built in fp32 for accuracy; a model cast to bf16/fp16 (no
        # autocast) needs it in its own dtype.
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels [B] -> [B, D]; with dropout_prob > 0 the table has one extra row,
    the null class used for label dropout and classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: Tensor, force_drop_ids: Optional[Tensor] = None) -> Tensor:
        """Replace labels by the null class, at random or where force_drop_ids == 1."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels: Tensor, train: bool,
                force_drop_ids: Optional[Tensor] = None) -> Tensor:
        if labels.dim() != 1:
            raise ValueError(f"labels must be a [B] vector of class ids, got shape "
                             f"{tuple(labels.shape)}")
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            if self.dropout_prob == 0:
                raise ValueError("force_drop_ids needs a null-class row: build the "
                                 "LabelEmbedder with dropout_prob > 0")
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    """Image [B, C, H, W] -> tokens [B, (H/p)*(W/p), D] by a stride-p convolution
    (timm's PatchEmbed layout: ``proj`` conv, tokens in row-major order)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int,
                 bias: bool = True):
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size,
                              bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def unpatchify(x: Tensor, channels: int, patch_size: int, input_size: int) -> Tensor:
    """Patch tokens [B, T, p*p*C] back to images [B, C, H, W] (DiT's layout)."""
    p = patch_size
    h = w = input_size // p
    x = x.reshape(x.shape[0], h, w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], channels, h * p, w * p)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> Tensor:
    """MAE's fixed 2-D sin-cos position table, [grid_size**2, embed_dim] in fp64.

    Token i*grid_size + j (row i, column j): the first embed_dim/2 channels encode the
    column j and the last embed_dim/2 the row i, each half laid out [sin | cos] with
    frequencies 10000**(-k / (embed_dim/4)).
    """
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    return torch.cat([_1d_sincos_pos_embed(embed_dim // 2, cols.reshape(-1)),
                      _1d_sincos_pos_embed(embed_dim // 2, rows.reshape(-1))], dim=1)


def _1d_sincos_pos_embed(embed_dim: int, positions: Tensor) -> Tensor:
    omega = 10000.0 ** -(torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2))
    angles = positions[:, None] * omega[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
