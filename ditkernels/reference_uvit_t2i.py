"""Plain-PyTorch text-to-image U-ViT as published (Bao et al., baofff/U-ViT
libs/uvit_t2i.py), the oracle for ditkernels.models.uvit_t2i.

The original module repeats libs/uvit.py's Attention, Mlp, Block, PatchEmbed,
timestep_embedding and unpatchify unchanged, so they are taken from
ditkernels.reference_uvit, with the same two departures (qk_scale honoured, the fp32
timestep sinusoid cast to the model's dtype). Only the network differs: a Linear
``context_embed`` projects the text encoder's tokens, which stand between the time
token and the patches, and there is no label embedding. Constructor arguments,
parameter names, construction order and initialisation follow the original, so its
checkpoints load here with strict=True. No ditkernels op is used in this file.
"""

import torch
import torch.nn as nn

from . import reference_uvit
from .reference_uvit import Block, PatchEmbed, timestep_embedding, unpatchify


class UViT(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4.0, qkv_bias=False, qk_scale=None,
                 norm_layer=nn.LayerNorm, mlp_time_embed=False, use_checkpoint=False,
                 clip_dim=768, num_clip_token=77, conv=True, skip=True):
        super().__init__()
        self.num_features = self.embed_dim = embed_dim
        self.in_chans = in_chans

        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim)
        num_patches = (img_size // patch_size) ** 2

        self.time_embed = nn.Sequential(
            nn.Linear(embed_dim, 4 * embed_dim),
            nn.SiLU(),
            nn.Linear(4 * embed_dim, embed_dim),
        ) if mlp_time_embed else nn.Identity()

        self.context_embed = nn.Linear(clip_dim, embed_dim)
        self.extras = 1 + num_clip_token

        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + num_patches, embed_dim))

        self.in_blocks = nn.ModuleList([
            Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                  qk_scale=qk_scale, norm_layer=norm_layer, use_checkpoint=use_checkpoint)
            for _ in range(depth // 2)])
        self.mid_block = Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio,
                               qkv_bias=qkv_bias, qk_scale=qk_scale, norm_layer=norm_layer,
                               use_checkpoint=use_checkpoint)
        self.out_blocks = nn.ModuleList([
            Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                  qk_scale=qk_scale, norm_layer=norm_layer, skip=skip,
                  use_checkpoint=use_checkpoint)
            for _ in range(depth // 2)])

        self.norm = norm_layer(embed_dim)
        self.patch_dim = patch_size ** 2 * in_chans
        self.decoder_pred = nn.Linear(embed_dim, self.patch_dim, bias=True)
        if conv:
            self.final_layer = nn.Conv2d(self.in_chans, self.in_chans, 3, padding=1)
        else:
            self.final_layer = nn.Identity()

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(self._init_weights)

    _init_weights = reference_uvit.UViT._init_weights

    def forward(self, x, timesteps, context):
        x = self.patch_embed(x)
        L = x.shape[1]
        time_token = self.time_embed(
            timestep_embedding(timesteps, self.embed_dim).to(self.pos_embed.dtype))
        context_token = self.context_embed(context)
        x = torch.cat((time_token.unsqueeze(dim=1), context_token, x), dim=1)
        x = x + self.pos_embed

        skips = []
        for blk in self.in_blocks:
            x = blk(x)
            skips.append(x)
        x = self.mid_block(x)
        for blk in self.out_blocks:
            x = blk(x, skips.pop())

        x = self.decoder_pred(self.norm(x))
        assert x.shape[1] == self.extras + L
        x = x[:, self.extras:, :]
        return self.final_layer(unpatchify(x, self.in_chans))
