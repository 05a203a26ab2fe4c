"""DiffiT (Hatamizadeh et al., "DiffiT: Diffusion Vision Transformers for Image
Generation") on the fused kernels: the latent DiffiT and the image-space (U-shaped)
DiffiT.

The attention (TMSA, ditkernels.nn.tmsa: one fused ditkernels.tmsa call per layer)
and the blocks (DiffiTBlock, DiffiTFinalLayer, DiffiTResBlock, ditkernels.nn.diffit)
are modules of nn/; this module holds the two networks and their named
configurations. Every LayerNorm runs as ln_modulate, and each one that follows a
residual add runs with it as gated_residual_ln_modulate.

Latent DiffiT: constructor, submodule names, construction order and initialisation
follow the DiffiT class of the public NVlabs/DiffiT diffit/diffit.py, read from that
file: ``x_embedder.proj``, ``t_embedder.mlp.{0,2}``, ``y_embedder.embedding_table``,
``pos_embed`` (fixed 2-D sin-cos), ``blocks.{i}.attn.{qkv_temb, qkv, proj,
relative_position_bias_table, relative_position_index}``, ``blocks.{i}.mlp.{fc1,fc2}``,
``final_layer.linear``; the LayerNorms have no affine parameters (eps 1e-6). So a
state_dict of that class loads here with strict=True and the other way round; we
have not loaded a released checkpoint. Departures: the constructor's ``depth``
defaults to 28, the published configuration (the public class defaults to 30 while
its ``Diffit()`` constructor uses 28), and it has no ``mask_ratio`` /
``decode_layer`` arguments, which the public class accepts and ignores.
``relative_position_index`` is kept only because the public class stores it in its
state_dict (nn/tmsa.py).

Image-space DiffiT: no public code exists. The structure is the paper's: a symmetric
U-shaped encoder/decoder, L DiffiT ResBlocks per resolution, ResBlock
x + DiffiTBlock(Conv3x3(Swish(GroupNorm(x))), x_t) on the feature map's tokens,
convolutional down/upsampling and skip connections at every resolution. The rest is
our reconstruction, not a port, and its names are ours: stride-2 3x3 convolutions
down, nearest x2 upsampling + 3x3 convolution up, a skip joined by concatenation and a
1x1 convolution (the lowest resolution passes straight from encoder to decoder), the
time embedding (sinusoid + MLP, 4x the base width) projected by each TMSA's
``qkv_temb``, and windowed TMSA wherever the feature map is larger than the window.
The named configurations use the widths of the DDPM++/NCSN++ networks DiffiT is
compared with on CIFAR-10 and FFHQ-64 (128 base channels, multipliers 1, 2, 2, 2,
4 ResBlocks per resolution) and 8 x 8 windows; they are not the paper's checkpoints.

Mixed precision: under torch.autocast the Linear outputs come back in bf16/fp16 while
the residual stream keeps its dtype; the fused ops take one dtype, so the time
projection and the bias table are cast to the qkv dtype and each branch output to
the residual stream's dtype (the residual sums then run in that dtype, as in eager).
"""

import math
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

# Earlier code imports DiffiT's blocks from here.
from ..nn.diffit import DiffiTBlock, DiffiTFinalLayer, DiffiTResBlock  # noqa: F401
from ..nn.embed import (LabelEmbedder, PatchEmbed, TimestepEmbedder, get_2d_sincos_pos_embed,
                        unpatchify)
from ..nn.functional import check_latent_inputs, layer_norm, residual_layer_norm
from ..nn.tmsa import TMSA  # noqa: F401  (importable from here)
from .registry import register_configs


# The public forward_with_cfg ramps the guidance scale over the sampling trajectory
# for latents up to this size (256px) and keeps it constant above (512px).
_CFG_RAMP_MAX_INPUT_SIZE = 32


class DiffiT(nn.Module):
    """Latent DiffiT: forward(x [B, C, H, W] latents, t [B] timesteps, y [B] class
    labels) -> [B, out_channels, H, W] (eps, then sigma when learn_sigma).

    A ViT over the (input_size / patch_size)^2 token grid with global TMSA; the time
    token of every TMSA is the conditioning c = t_embedder(t) + y_embedder(y).
    """

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4,
                 hidden_size: int = 1152, depth: int = 28, num_heads: int = 16,
                 mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool = True):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size={input_size} is not a multiple of "
                             f"patch_size={patch_size}")
        self.input_size = input_size
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        grid_size = input_size // patch_size

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # A Parameter that never trains: original checkpoints store it under this key.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size),
                                      requires_grad=False)
        self.blocks = nn.ModuleList([
            DiffiTBlock(hidden_size, num_heads, grid_size, mlp_ratio=mlp_ratio)
            for _ in range(depth)])
        self.final_layer = DiffiTFinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The public initialisation: xavier Linears with zero biases, the fixed sin-cos
        pos_embed, and a zero final linear, so the model's output starts at zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        grid_size = self.input_size // self.patch_size
        with torch.no_grad():
            self.pos_embed.copy_(get_2d_sincos_pos_embed(self.hidden_size, grid_size)[None])
        # The patch embedding is a linear map of flattened patches: init it like one.
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: Tensor) -> Tensor:
        """[B, T, p*p*C] -> [B, C, H, W]."""
        return unpatchify(x, self.out_channels, self.patch_size, self.input_size)

    def _check_inputs(self, x: Tensor, t: Tensor, y: Tensor) -> None:
        check_latent_inputs("DiffiT", x, t, y, self.in_channels, self.input_size)

    def _blocks_chainable(self) -> bool:
        """Whether the fused cross-block chain computes what calling each block would.

        It calls the blocks' parts directly, so it is valid only while every block is
        still a DiffiTBlock (not swapped or wrapped) and no hook expects to see a block
        or the final layer run.
        """
        parts = [*self.blocks, self.final_layer]
        return (len(self.blocks) > 0
                and all(type(b) is DiffiTBlock for b in self.blocks)
                and type(self.final_layer) is DiffiTFinalLayer
                and not any(p._forward_hooks or p._forward_pre_hooks for p in parts))

    def _chained_blocks_and_final_layer(self, x: Tensor, c: Tensor) -> Tensor:
        """Every block's closing residual runs fused with the next norm (the next block's
        norm1, or the final norm)."""
        blocks: List[DiffiTBlock] = list(self.blocks)
        y = layer_norm(blocks[0].norm1, x)
        for i, block in enumerate(blocks):
            x, h = block.attention_and_mlp(x, y, c)
            next_norm = (blocks[i + 1].norm1 if i + 1 < len(blocks)
                         else self.final_layer.norm_final)
            x, y = residual_layer_norm(next_norm, x, h)
        return self.final_layer.head(y)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        self._check_inputs(x, t, y)
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        if self._blocks_chainable():
            x = self._chained_blocks_and_final_layer(x, c)
        else:
            for block in self.blocks:
                x = block(x, c)
            x = self.final_layer(x)
        return self.unpatchify(x)

    def forward_with_cfg(self, x: Tensor, t: Tensor, y: Tensor,
                         cfg_scale: Optional[float] = None, diffusion_steps: int = 1000,
                         scale_pow: float = 4.0) -> Tensor:
        """Classifier-free guidance as in the public code: the batch holds [cond; uncond]
        halves (y of the second half is the null class) and only the first half of x is
        read. The guided eps (first 3 channels) fills both halves; the rest (learned
        sigma) passes through. For input_size <= 32 (256px) the scale ramps with the
        timestep, s(t) = 1 + (cfg_scale - 1) * (1 - cos(pi * (1 - t / steps) ** scale_pow)) / 2;
        above, it is cfg_scale. cfg_scale None: the plain forward."""
        if cfg_scale is None:
            return self.forward(x, t, y)
        half = x[: len(x) // 2]
        model_out = self.forward(torch.cat([half, half], dim=0), t, y)
        eps, rest = model_out[:, :3], model_out[:, 3:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        if self.input_size <= _CFG_RAMP_MAX_INPUT_SIZE:
            phase = ((1 - t / diffusion_steps) ** scale_pow) * math.pi
            scale = (cfg_scale - 1) * 0.5 * (1 - torch.cos(phase)) + 1
            scale = scale[: len(x) // 2].view(-1, 1, 1, 1)
        else:
            scale = cfg_scale
        half_eps = uncond_eps + scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


# ---------------------------------------------------------------------------
# image-space DiffiT
# ---------------------------------------------------------------------------


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 convolution."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class EncoderLevel(nn.Module):
    """One resolution of the contracting path: ResBlocks, then (except at the lowest
    resolution) a stride-2 3x3 convolution to the next width."""

    def __init__(self, blocks: List[DiffiTResBlock], downsample: Optional[nn.Conv2d]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample


class DecoderLevel(nn.Module):
    """One resolution of the expanding path: (except at the lowest resolution) upsample
    from the level below and join the encoder's skip, then ResBlocks."""

    def __init__(self, blocks: List[DiffiTResBlock], upsample: Optional[Upsample],
                 skip_merge: Optional[nn.Conv2d]):
        super().__init__()
        self.upsample = upsample
        self.skip_merge = skip_merge
        self.blocks = nn.ModuleList(blocks)


class DiffiTUNet(nn.Module):
    """Image-space DiffiT: forward(x [B, in_channels, img_size, img_size], t [B],
    y [B] class labels when num_classes > 0, else None) -> [B, out_channels, ...].

    Level i works at img_size / 2**i with base_channels * channel_mult[i] channels and
    num_res_blocks ResBlocks in both the encoder and the decoder. TMSA is windowed
    (window_size x window_size) wherever the feature map is larger than the window
    and global elsewhere. Conditioning: temb = t_embedder(t) (+ y_embedder(y)), of
    width 4 * base_channels. See the module docstring for what is reconstructed.
    """

    def __init__(self, img_size: int = 32, in_channels: int = 3, base_channels: int = 128,
                 channel_mult: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 4,
                 num_heads: int = 4, mlp_ratio: float = 4.0, window_size: int = 8,
                 num_groups: int = 32, num_classes: int = 0, class_dropout_prob: float = 0.0,
                 learn_sigma: bool = False):
        super().__init__()
        levels = len(channel_mult)
        if levels < 1 or img_size % 2 ** (levels - 1):
            raise ValueError(f"img_size={img_size} must be divisible by 2 ** (len(channel_mult) "
                             f"- 1) = {2 ** (levels - 1)}")
        self.img_size = img_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.num_classes = num_classes
        temb_dim = 4 * base_channels
        widths = [base_channels * m for m in channel_mult]

        def res_blocks(level: int) -> List[DiffiTResBlock]:
            return [DiffiTResBlock(widths[level], img_size >> level, num_heads, temb_dim,
                                   window_size, mlp_ratio, num_groups)
                    for _ in range(num_res_blocks)]

        self.t_embedder = TimestepEmbedder(temb_dim)
        self.y_embedder = (LabelEmbedder(num_classes, temb_dim, class_dropout_prob)
                           if num_classes > 0 else None)
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.encoder = nn.ModuleList([
            EncoderLevel(res_blocks(i), nn.Conv2d(widths[i], widths[i + 1], 3, stride=2,
                                                  padding=1) if i + 1 < levels else None)
            for i in range(levels)])
        self.decoder = nn.ModuleList([
            DecoderLevel(res_blocks(i),
                         Upsample(widths[i + 1], widths[i]) if i + 1 < levels else None,
                         nn.Conv2d(2 * widths[i], widths[i], 1) if i + 1 < levels else None)
            for i in reversed(range(levels))])
        self.norm_out = nn.GroupNorm(num_groups, widths[0])
        self.act_out = nn.SiLU()
        self.conv_out = nn.Conv2d(widths[0], self.out_channels, 3, padding=1)
        # The network starts as the zero function, as ADM-style U-Nets do.
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _check_inputs(self, x: Tensor, t: Tensor, y: Optional[Tensor]) -> None:
        expected = (self.in_channels, self.img_size, self.img_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must be [B, {', '.join(map(str, expected))}] images for this "
                             f"DiffiT (in_channels, img_size, img_size), got shape "
                             f"{tuple(x.shape)}")
        if tuple(t.shape) != (x.shape[0],):
            raise ValueError(f"t must be a [B] = [{x.shape[0]}] vector matching x of shape "
                             f"{tuple(x.shape)}, got shape {tuple(t.shape)}")
        if self.y_embedder is None:
            if y is not None:
                raise ValueError("this DiffiT is unconditional (num_classes=0): y must be None")
        elif y is None or tuple(y.shape) != (x.shape[0],):
            raise ValueError(f"this DiffiT is class-conditional (num_classes={self.num_classes})"
                             f": y must be a [B] = [{x.shape[0]}] vector of class ids, got "
                             f"{None if y is None else tuple(y.shape)}")

    def forward(self, x: Tensor, t: Tensor, y: Optional[Tensor] = None) -> Tensor:
        self._check_inputs(x, t, y)
        temb = self.t_embedder(t)
        if self.y_embedder is not None:
            temb = temb + self.y_embedder(y, self.training)
        h = self.conv_in(x)
        skips = []
        for level in self.encoder:
            for block in level.blocks:
                h = block(h, temb)
            skips.append(h)
            if level.downsample is not None:
                h = level.downsample(h)
        for level in self.decoder:
            skip = skips.pop()
            if level.upsample is not None:
                h = level.skip_merge(torch.cat([level.upsample(h), skip], dim=1))
            for block in level.blocks:
                h = block(h, temb)
        return self.conv_out(self.act_out(self.norm_out(h)))


# ---------------------------------------------------------------------------
# named configurations
# ---------------------------------------------------------------------------

# Constructor arguments by name. Latent (class-conditional ImageNet, SD-VAE latents):
# 'DiffiT-XL/2', the published model, at 256px (32x32x4 latents, 256 tokens, head_dim
# 72) and at 512px ('-512': 64x64x4, 1024 tokens); 'DiffiT-S/2' has DiT-S's sizes
# (12 blocks, 384 wide, 6 heads), a small model for tests and experiments that DiffiT
# did not publish. Image space (unconditional): 'DiffiT-CIFAR10' (32x32) and
# 'DiffiT-FFHQ64' (64x64), our reconstruction (module docstring).
DIFFIT_CONFIGS = {
    "DiffiT-XL/2": dict(input_size=32, patch_size=2, hidden_size=1152, depth=28, num_heads=16),
    "DiffiT-XL/2-512": dict(input_size=64, patch_size=2, hidden_size=1152, depth=28,
                            num_heads=16),
    "DiffiT-S/2": dict(input_size=32, patch_size=2, hidden_size=384, depth=12, num_heads=6),
}
DIFFIT_IMAGE_CONFIGS = {
    "DiffiT-CIFAR10": dict(img_size=32, in_channels=3, base_channels=128,
                           channel_mult=(1, 2, 2, 2), num_res_blocks=4, num_heads=4,
                           window_size=8),
    "DiffiT-FFHQ64": dict(img_size=64, in_channels=3, base_channels=128,
                          channel_mult=(1, 2, 2, 2), num_res_blocks=4, num_heads=4,
                          window_size=8),
}


DiffiT_models = {**register_configs(DiffiT, DIFFIT_CONFIGS),
                 **register_configs(DiffiTUNet, DIFFIT_IMAGE_CONFIGS)}
DiffiT_XL_2 = DiffiT_models["DiffiT-XL/2"]
DiffiT_XL_2_512 = DiffiT_models["DiffiT-XL/2-512"]
DiffiT_S_2 = DiffiT_models["DiffiT-S/2"]
DiffiT_CIFAR10 = DiffiT_models["DiffiT-CIFAR10"]
DiffiT_FFHQ64 = DiffiT_models["DiffiT-FFHQ64"]
