"""U-ViT (Bao et al., "All are Worth Words") on the fused kernels, a drop-in for
baofff/U-ViT libs/uvit.py.

Same constructor, submodule names and initialisation as the original, so its
checkpoints load unchanged with strict=True. Everything is a token: [label (when
class-conditional), time, patches]. ``depth`` is not the block count: the network
has depth // 2 ``in_blocks``, one ``mid_block`` and depth // 2 ``out_blocks``
(depth + 1 blocks for even depth; U-ViT-S's depth 12 is 13 blocks), out block i
merging the output of in block depth // 2 - 1 - i (last in, first out).

Where the fused ops replace eager code:
  - each out block's long-skip merge ``skip_linear(cat([x, skip], -1))`` runs as
    skip_concat_linear, which never builds the [B, N, 2D] concat;
  - every affine LayerNorm (eps and parameters of the nn.LayerNorm submodules) runs as
    ln_modulate, and a LayerNorm that directly follows a residual add runs with it as
    one gated_residual_ln_modulate: norm2 after the attention residual in every block,
    and, across blocks, the next block's norm1 (or the final ``norm``) after the MLP
    residual wherever no skip merge sits between them.

Mixed precision follows what the original computes under torch.autocast: the
residual stream is fp32 up to the skip merges, whose Linear (here the fused op,
which autocast does not know) runs in the autocast dtype, so the out blocks carry a
low-precision stream as in the original. The fused norms take x's dtype, so their
parameters and the branch outputs are cast to it.

The blocks are ditkernels.nn.uvit's; this module holds the network and its named
configurations.
"""

from typing import List, Optional

import torch
import torch.nn as nn
from torch import Tensor

from ..nn.embed import timestep_embedding
# Earlier code imports U-ViT's blocks and the fused-norm helpers from here.
from ..nn.functional import layer_norm, residual_layer_norm, skip_merge  # noqa: F401
from ..nn.uvit import Attention, Block, Mlp, PatchEmbed, build_norm  # noqa: F401
from .registry import config_constructor, register_configs


class UViT(nn.Module):
    """U-ViT: forward(x [B, in_chans, img_size, img_size], timesteps [B], y [B] class
    labels when num_classes > 0, else None) -> [B, in_chans, img_size, img_size].

    depth: depth // 2 in blocks + a mid block + depth // 2 out blocks (see the module
    docstring). use_checkpoint recomputes each block in the backward pass.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = False, qk_scale: Optional[float] = None,
                 norm_layer=nn.LayerNorm, mlp_time_embed: bool = False, num_classes: int = -1,
                 use_checkpoint: bool = False, conv: bool = True, skip: bool = True):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} is not a multiple of "
                             f"patch_size={patch_size}")
        self.num_features = self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = img_size
        self.patch_size = patch_size

        # Construction order follows the original, so that a given seed gives the
        # original's initial weights.
        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim)
        num_patches = (img_size // patch_size) ** 2

        self.time_embed = nn.Sequential(
            nn.Linear(embed_dim, 4 * embed_dim),
            nn.SiLU(),
            nn.Linear(4 * embed_dim, embed_dim),
        ) if mlp_time_embed else nn.Identity()

        self.extras = 1 + self._add_condition_embedding(embed_dim)

        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + num_patches, embed_dim))

        def block(with_skip: bool) -> Block:
            return Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio,
                         qkv_bias=qkv_bias, qk_scale=qk_scale, norm_layer=norm_layer,
                         skip=with_skip, use_checkpoint=use_checkpoint)

        self.in_blocks = nn.ModuleList([block(False) for _ in range(depth // 2)])
        self.mid_block = block(False)
        self.out_blocks = nn.ModuleList([block(skip) for _ in range(depth // 2)])

        self.norm = build_norm(norm_layer, embed_dim)
        self.patch_dim = patch_size ** 2 * in_chans
        self.decoder_pred = nn.Linear(embed_dim, self.patch_dim, bias=True)
        self.final_layer = (nn.Conv2d(self.in_chans, self.in_chans, 3, padding=1) if conv
                            else nn.Identity())

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(self._init_weights)

    def _add_condition_embedding(self, embed_dim: int) -> int:
        """Builds the embedding of the condition tokens and returns their count.

        Runs where the original builds it, between time_embed and pos_embed, so that
        subclasses with other conditions (UViTT2I) keep the original's construction
        order, hence its state_dict order and a seed's initial weights.
        """
        if self.num_classes > 0:
            self.label_emb = nn.Embedding(self.num_classes, embed_dim)
            return 1
        return 0

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed"}

    def unpatchify(self, x: Tensor) -> Tensor:
        """[B, h*w, p*p*C] (each patch laid out p1, p2, C) -> [B, C, h*p, w*p]."""
        p, c = self.patch_size, self.in_chans
        h = w = self.img_size // p
        x = x.reshape(x.shape[0], h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def _check_inputs(self, x: Tensor, timesteps: Tensor, y: Optional[Tensor]) -> None:
        expected = (self.in_chans, self.img_size, self.img_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must be [B, {', '.join(map(str, expected))}] for this U-ViT "
                             f"(in_chans, img_size, img_size), got shape {tuple(x.shape)}")
        if tuple(timesteps.shape) != (x.shape[0],):
            raise ValueError(f"timesteps must be a [B] = [{x.shape[0]}] vector matching x of "
                             f"shape {tuple(x.shape)}, got shape {tuple(timesteps.shape)}")
        if self.num_classes > 0:
            if y is None:
                raise ValueError(f"this U-ViT is class-conditional (num_classes="
                                 f"{self.num_classes}): pass y, a [B] vector of class ids")
            if tuple(y.shape) != (x.shape[0],) or y.is_floating_point() or y.is_complex():
                raise ValueError(f"y must be a [B] = [{x.shape[0]}] vector of integer class "
                                 f"ids, got shape {tuple(y.shape)} and dtype {y.dtype}")
        elif y is not None:
            raise ValueError("this U-ViT is unconditional (num_classes <= 0): y must be None")

    def _blocks_chainable(self) -> bool:
        """Whether the fused cross-block chain computes what calling each block would.

        It calls the blocks' parts directly, so it is valid only while every block is
        still a ditkernels Block without checkpointing (which needs whole-block calls),
        the final norm is still a LayerNorm, and no hook expects to see a block or the
        final norm run.
        """
        blocks = [*self.in_blocks, self.mid_block, *self.out_blocks]
        return (all(type(b) is Block and not b.use_checkpoint for b in blocks)
                and isinstance(self.norm, nn.LayerNorm)
                and not any(m._forward_hooks or m._forward_pre_hooks
                            for m in [*blocks, self.norm]))

    def _chained_blocks_and_norm(self, x: Tensor) -> Tensor:
        """All blocks and the final norm; returns norm(x). Each LayerNorm runs fused with
        the residual add before it, except where a skip merge comes between them."""
        blocks: List[Block] = [*self.in_blocks, self.mid_block, *self.out_blocks]
        num_in = len(self.in_blocks)
        skips: List[Tensor] = []
        y = layer_norm(blocks[0].norm1, x)
        for i, block in enumerate(blocks):
            if block.skip_linear is not None:
                x = block.merge_skip(x, skips.pop())
                y = layer_norm(block.norm1, x)
            x, h = block.attention_and_mlp(x, y)
            if i + 1 == len(blocks):
                x, y = residual_layer_norm(self.norm, x, h)
            elif blocks[i + 1].skip_linear is None:
                x, y = residual_layer_norm(blocks[i + 1].norm1, x, h)
            else:
                x = x + h
            if i < num_in:
                skips.append(x)
        return y

    def forward(self, x: Tensor, timesteps: Tensor, y: Optional[Tensor] = None) -> Tensor:
        self._check_inputs(x, timesteps, y)
        x = self.patch_embed(x)
        tokens = [self._time_token(timesteps), x]
        if y is not None:
            tokens.insert(0, self.label_emb(y).unsqueeze(1))
        return self._blocks_and_decoder(torch.cat(tokens, dim=1) + self.pos_embed)

    def _time_token(self, timesteps: Tensor) -> Tensor:
        """[B] timesteps -> the time token [B, 1, embed_dim]."""
        # The sinusoid is fp32; the original concatenates it as is (fine in fp32 and
        # under autocast), a model cast to bf16/fp64 needs it in its own dtype.
        return self.time_embed(
            timestep_embedding(timesteps, self.embed_dim).to(self.pos_embed.dtype)).unsqueeze(1)

    def _blocks_and_decoder(self, x: Tensor) -> Tensor:
        """Tokens [B, extras + patches, embed_dim], position embedding added -> the
        output image [B, in_chans, img_size, img_size]."""
        if self._blocks_chainable():
            x = self._chained_blocks_and_norm(x)
        else:
            skips = []
            for blk in self.in_blocks:
                x = blk(x)
                skips.append(x)
            x = self.mid_block(x)
            for blk in self.out_blocks:
                x = blk(x, skips.pop())
            x = self.norm(x)

        x = self.decoder_pred(x)[:, self.extras:, :]
        return self.final_layer(self.unpatchify(x))


# (embed_dim, depth, num_heads) of the published model sizes; depth + 1 blocks each.
UVIT_SIZES = {"S": (512, 12, 8), "M": (768, 16, 12), "L": (1024, 20, 16), "H": (1152, 28, 16)}


def _size(name: str) -> dict:
    embed_dim, depth, num_heads = UVIT_SIZES[name]
    return dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads)


# Released U-ViT-H checkpoints have no final conv.
_CONV = {"S": True, "M": True, "L": True, "H": False}

# Constructor arguments of named configurations, e.g. UVIT_CONFIGS['U-ViT-H/2'].
#   U-ViT-{S,M,L,H}/2: ImageNet 256x256 latents (32x32x4, 258 tokens), 1000 classes plus
#     the null class (id 1000) for classifier-free guidance, as the released
#     ImageNet-256 checkpoints (L, H); -uncond: the same without the label token.
#   The other names are the published setups of baofff/U-ViT's configs/.
UVIT_CONFIGS = {
    **{f"U-ViT-{s}/2": dict(_size(s), img_size=32, patch_size=2, in_chans=4, num_classes=1001,
                            conv=_CONV[s]) for s in UVIT_SIZES},
    **{f"U-ViT-{s}/2-uncond": dict(_size(s), img_size=32, patch_size=2, in_chans=4,
                                   num_classes=-1, conv=_CONV[s]) for s in UVIT_SIZES},
    "U-ViT-S/2-cifar10": dict(_size("S"), img_size=32, patch_size=2, in_chans=3),
    "U-ViT-S/4-celeba64": dict(_size("S"), img_size=64, patch_size=4, in_chans=3),
    "U-ViT-M/4-imagenet64": dict(_size("M"), img_size=64, patch_size=4, in_chans=3,
                                 num_classes=1000),
    "U-ViT-L/4-imagenet64": dict(_size("L"), img_size=64, patch_size=4, in_chans=3,
                                 num_classes=1000),
    "U-ViT-L/4-imagenet512": dict(_size("L"), img_size=64, patch_size=4, in_chans=4,
                                  num_classes=1001),
    "U-ViT-H/4-imagenet512": dict(_size("H"), img_size=64, patch_size=4, in_chans=4,
                                  num_classes=1001, conv=False),
}


UViT_models = register_configs(UViT, UVIT_CONFIGS, family="U-ViT")
UViT_S_2 = UViT_models["U-ViT-S/2"]
UViT_M_2 = UViT_models["U-ViT-M/2"]
UViT_L_2 = UViT_models["U-ViT-L/2"]
UViT_H_2 = UViT_models["U-ViT-H/2"]
UViT_S_2_uncond = UViT_models["U-ViT-S/2-uncond"]
UViT_M_2_uncond = UViT_models["U-ViT-M/2-uncond"]
UViT_L_2_uncond = UViT_models["U-ViT-L/2-uncond"]
UViT_H_2_uncond = UViT_models["U-ViT-H/2-uncond"]
UViT_S_2_cifar10 = UViT_models["U-ViT-S/2-cifar10"]
UViT_S_4_celeba64 = UViT_models["U-ViT-S/4-celeba64"]
UViT_M_4_imagenet64 = UViT_models["U-ViT-M/4-imagenet64"]
UViT_L_4_imagenet64 = UViT_models["U-ViT-L/4-imagenet64"]
UViT_L_4_imagenet512 = UViT_models["U-ViT-L/4-imagenet512"]
UViT_H_4_imagenet512 = UViT_models["U-ViT-H/4-imagenet512"]


def _config_constructor(name: str, cls=UViT, configs=UVIT_CONFIGS):
    """A U-ViT-family constructor (registry.config_constructor) named as UViT's are, for
    variants (subclasses of UViT with configurations of their own)."""
    return config_constructor(name, cls, configs, family="U-ViT")
