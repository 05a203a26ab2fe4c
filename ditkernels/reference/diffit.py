"""Plain-PyTorch DiffiT, the oracle for ditkernels.models.diffit.

TMSA is written out as the public NVlabs/DiffiT DiffiTAttention computes it: the time
projection added to the qkv projection, q * scale @ k^T, the [H, n, n] bias gathered
from the table through the stored Swin relative_position_index, an eager softmax,
then @ v. Local windows are cut out of the token grid and folded into the batch
(Swin's window_partition / window_reverse). The latent DiffiT follows the public
DiffiT class; the image-space DiffiT is the reconstruction documented in
ditkernels.models.diffit, written here independently (a recursion over the
resolutions, plain containers). Parameter names, construction order and
initialisation are identical to ditkernels.models.diffit, so weights load strictly
both ways and a seed gives both the same initial weights. No ditkernels op is used in
this file.

Departures from the public code, none visible in fp32 or under autocast: the timestep
sinusoid is cast to the model's dtype (reference.dit.TimestepEmbedder), so the
model also runs cast to fp64 (the tests' oracle); TMSA accepts leading tokens without
position bias and non-square grids and windows, which the public class does not have.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dit import LabelEmbedder, Mlp, PatchEmbed, TimestepEmbedder, get_2d_sincos_pos_embed


def _pair(size):
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def window_partition(x, grid_size, window_size):
    """[B, Gh*Gw, C] tokens in row-major grid order -> [B * nW, wh*ww, C] windows."""
    B, _, C = x.shape
    (gh, gw), (wh, ww) = grid_size, window_size
    x = x.view(B, gh // wh, wh, gw // ww, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, C)


def window_reverse(windows, grid_size, window_size):
    """The inverse of window_partition."""
    (gh, gw), (wh, ww) = grid_size, window_size
    C = windows.shape[-1]
    x = windows.view(-1, gh // wh, gw // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, gh * gw, C)


class TMSA(nn.Module):
    def __init__(self, dim, num_heads, grid_size, qkv_bias=True, window_size=None,
                 num_leading=0, temb_dim=None, qk_scale=None, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.grid_size = _pair(grid_size)
        wh, ww = self.grid_size if window_size is None else _pair(window_size)
        self.window_size = (min(wh, self.grid_size[0]), min(ww, self.grid_size[1]))
        self.num_leading = num_leading
        temb_dim = dim if temb_dim is None else temb_dim

        self.qkv_temb = nn.Linear(temb_dim, dim * 3)
        ws = self.window_size
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * ws[0] - 1) * (2 * ws[1] - 1), num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

        coords = torch.stack(torch.meshgrid(torch.arange(ws[0]), torch.arange(ws[1]),
                                            indexing="ij"))
        coords_flat = torch.flatten(coords, 1)
        relative_coords = coords_flat[:, :, None] - coords_flat[:, None, :]
        relative_coords = relative_coords.permute(1, 2, 0).contiguous()
        relative_coords[:, :, 0] += ws[0] - 1
        relative_coords[:, :, 1] += ws[1] - 1
        relative_coords[:, :, 0] *= 2 * ws[1] - 1
        self.register_buffer("relative_position_index", relative_coords.sum(-1))

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def attention(self, x, temb):
        B, N, C = x.shape
        qkv = self.qkv_temb(temb).unsqueeze(1).to(x.dtype) + self.qkv(x)
        qkv = qkv.reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        n = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, -1).permute(2, 0, 1)
        # Leading tokens (before the grid) get no position bias.
        bias = F.pad(bias, (self.num_leading, 0, self.num_leading, 0))
        attn = (attn + bias.unsqueeze(0)).softmax(dim=-1)
        return (attn @ v).transpose(1, 2).reshape(B, N, C)

    def forward(self, x, temb):
        if self.window_size == self.grid_size:
            x = self.attention(x, temb)
        else:
            windows = window_partition(x, self.grid_size, self.window_size)
            temb = temb.repeat_interleave(windows.shape[0] // x.shape[0], dim=0)
            x = window_reverse(self.attention(windows, temb), self.grid_size,
                               self.window_size)
        return self.proj_drop(self.proj(x))


class DiffiTBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, grid_size, mlp_ratio=4.0, **tmsa_kwargs):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = TMSA(hidden_size, num_heads, grid_size, qkv_bias=True, **tmsa_kwargs)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(in_features=hidden_size, hidden_features=int(hidden_size * mlp_ratio),
                       act_layer=lambda: nn.GELU(approximate="tanh"))

    def forward(self, x, temb):
        x = x + self.attn(self.norm1(x), temb)
        x = x + self.mlp(self.norm2(x))
        return x


class DiffiTFinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.silu = nn.SiLU()

    def forward(self, x):
        return self.linear(self.silu(self.norm_final(x)))


class DiffiT(nn.Module):
    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
                 num_heads=16, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000,
                 learn_sigma=True):
        super().__init__()
        self.input_size = input_size
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        grid_size = input_size // patch_size

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([
            DiffiTBlock(hidden_size, num_heads, grid_size, mlp_ratio=mlp_ratio)
            for _ in range(depth)])
        self.final_layer = DiffiTFinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)

        grid_size = int(self.x_embedder.num_patches ** 0.5)
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid_size)
        self.pos_embed.data.copy_(pos_embed.float().unsqueeze(0))

        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x):
        """[B, T, p*p*C] -> [B, C, H, W]."""
        c = self.out_channels
        p = self.x_embedder.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, h * p)

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x))

    def forward_with_cfg(self, x, t, y, cfg_scale=None, diffusion_steps=1000, scale_pow=4.0):
        if cfg_scale is None:
            return self.forward(x, t, y)
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        model_out = self.forward(combined, t, y)
        eps, rest = model_out[:, :3], model_out[:, 3:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        if self.input_size <= 32:
            phase = ((1 - t / diffusion_steps) ** scale_pow) * math.pi
            scale_step = 0.5 * (1 - torch.cos(phase))
            real_cfg_scale = (cfg_scale - 1) * scale_step + 1
            real_cfg_scale = real_cfg_scale[: len(x) // 2].view(-1, 1, 1, 1)
        else:
            real_cfg_scale = cfg_scale
        half_eps = uncond_eps + real_cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)


class DiffiTResBlock(nn.Module):
    def __init__(self, channels, resolution, num_heads, temb_dim, window_size=None,
                 mlp_ratio=4.0, num_groups=32):
        super().__init__()
        self.norm = nn.GroupNorm(num_groups, channels)
        self.act = nn.SiLU()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.block = DiffiTBlock(channels, num_heads, resolution, mlp_ratio=mlp_ratio,
                                 window_size=window_size, temb_dim=temb_dim)

    def forward(self, x, temb):
        B, C, H, W = x.shape
        h = self.conv(self.act(self.norm(x)))
        h = self.block(h.flatten(2).transpose(1, 2), temb)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class Upsample(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DiffiTUNet(nn.Module):
    """Image-space DiffiT, written from the paper's description and the reconstruction
    documented in ditkernels.models.diffit, not from that module's code.

    A U-Net over len(channel_mult) resolutions, img_size / 2**i with
    base_channels * channel_mult[i] channels: going down, num_res_blocks ResBlocks per
    resolution and a stride-2 3x3 convolution to the next; at the lowest resolution
    the encoder's ResBlocks are followed straight by the decoder's; going up,
    nearest x2 + 3x3 convolution, the encoder's output at that resolution joined by
    concatenation and a 1x1 convolution, then num_res_blocks ResBlocks. The forward
    pass is the same U written as a recursion over the resolutions.

    Submodules are plain containers named as in ditkernels.models.diffit
    (encoder.{i}.blocks / .downsample, decoder.{j}.upsample / .skip_merge / .blocks,
    decoder.0 being the lowest resolution), built in the same order so that weights
    load strictly both ways and a seed gives both the same initial weights.
    """

    def __init__(self, img_size=32, in_channels=3, base_channels=128,
                 channel_mult=(1, 2, 2, 2), num_res_blocks=4, num_heads=4, mlp_ratio=4.0,
                 window_size=8, num_groups=32, num_classes=0, class_dropout_prob=0.0,
                 learn_sigma=False):
        super().__init__()
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        temb_dim = 4 * base_channels
        lowest = len(channel_mult) - 1

        def resblocks(ch, res):
            return nn.ModuleList([
                DiffiTResBlock(ch, res, num_heads, temb_dim, window_size=window_size,
                               mlp_ratio=mlp_ratio, num_groups=num_groups)
                for _ in range(num_res_blocks)])

        self.t_embedder = TimestepEmbedder(temb_dim)
        self.y_embedder = None
        if num_classes > 0:
            self.y_embedder = LabelEmbedder(num_classes, temb_dim, class_dropout_prob)
        self.conv_in = nn.Conv2d(in_channels, base_channels * channel_mult[0], 3, padding=1)

        self.encoder = nn.ModuleList()
        for i, mult in enumerate(channel_mult):
            ch, res = base_channels * mult, img_size // 2 ** i
            level = nn.Module()
            level.blocks = resblocks(ch, res)
            level.downsample = None
            if i < lowest:
                next_ch = base_channels * channel_mult[i + 1]
                level.downsample = nn.Conv2d(ch, next_ch, 3, stride=2, padding=1)
            self.encoder.append(level)

        self.decoder = nn.ModuleList()
        for i in range(lowest, -1, -1):
            ch, res = base_channels * channel_mult[i], img_size // 2 ** i
            blocks = resblocks(ch, res)
            level = nn.Module()
            level.upsample = level.skip_merge = None
            if i < lowest:
                level.upsample = Upsample(base_channels * channel_mult[i + 1], ch)
                level.skip_merge = nn.Conv2d(2 * ch, ch, 1)
            level.blocks = blocks
            self.decoder.append(level)

        ch = base_channels * channel_mult[0]
        self.norm_out = nn.GroupNorm(num_groups, ch)
        self.act_out = nn.SiLU()
        self.conv_out = nn.Conv2d(ch, self.out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _u(self, i, h, temb):
        """Resolution i and everything below it: [B, C_i, S_i, S_i] -> the same shape."""
        down, up = self.encoder[i], self.decoder[len(self.decoder) - 1 - i]
        for block in down.blocks:
            h = block(h, temb)
        if down.downsample is not None:
            below = self._u(i + 1, down.downsample(h), temb)
            h = up.skip_merge(torch.cat([up.upsample(below), h], dim=1))
        for block in up.blocks:
            h = block(h, temb)
        return h

    def forward(self, x, t, y=None):
        temb = self.t_embedder(t)
        if self.y_embedder is not None:
            temb = temb + self.y_embedder(y, self.training)
        h = self._u(0, self.conv_in(x), temb)
        return self.conv_out(self.act_out(self.norm_out(h)))
