"""DiT (Peebles & Xie) on the fused kernels, a drop-in for facebookresearch/DiT models.py.

Same constructor, state_dict keys and initialisation as the original, so its
checkpoints load unchanged with strict=True. forward chains the blocks so that each
block's closing gated residual and the next norm (the next block's norm1, or the final
layer's norm) run as one gated_residual_ln_modulate: every LayerNorm in the network is
then fused with the residual add before it.
"""

import torch
import torch.nn as nn
from torch import Tensor

from ..nn.dit import DiTBlock, FinalLayer, LabelEmbedder, TimestepEmbedder
from ..nn.embed import PatchEmbed, get_2d_sincos_pos_embed, unpatchify
from ..nn.functional import check_latent_inputs, layer_norm, residual_layer_norm
from .registry import register_configs


class DiT(nn.Module):
    """Diffusion transformer: forward(x [B, C, H, W] latents, t [B] timesteps,
    y [B] class labels) -> [B, out_channels, H, W] (eps, then sigma when learn_sigma)."""

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4,
                 hidden_size: int = 1152, depth: int = 28, num_heads: int = 16,
                 mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool = True):
        super().__init__()
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.input_size = input_size
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.hidden_size = hidden_size

        # Construction order follows the original, so that a given seed gives the
        # original's initial weights.
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # A Parameter that never trains: original checkpoints store it under this key.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size),
                                      requires_grad=False)
        self.blocks = nn.ModuleList(
            [DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The original's initialisation, adaLN-Zero: every block starts as the identity
        and the model's output starts at zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        grid_size = self.input_size // self.patch_size
        self.pos_embed.copy_(get_2d_sincos_pos_embed(self.hidden_size, grid_size).unsqueeze(0))

        # The patch embedding is a linear map of flattened patches: init it like one.
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: Tensor) -> Tensor:
        """[B, T, p*p*C] -> [B, C, H, W]."""
        return unpatchify(x, self.out_channels, self.patch_size, self.input_size)

    def _check_inputs(self, x: Tensor, t: Tensor, y: Tensor) -> None:
        check_latent_inputs("DiT", x, t, y, self.in_channels, self.input_size)

    def _blocks_chainable(self) -> bool:
        """Whether the fused cross-block chain computes what calling each block would.

        It calls the blocks' parts directly, so it is valid only while every block is
        still a ditkernels DiTBlock (not swapped or wrapped, e.g. by checkpointing) and
        no hook expects to see each block's input and output.
        """
        parts = [*self.blocks, self.final_layer]
        return (all(isinstance(b, DiTBlock) for b in self.blocks)
                and isinstance(self.final_layer, FinalLayer)
                and not any(p._forward_hooks or p._forward_pre_hooks for p in parts))

    def _chained_blocks_and_final_layer(self, x: Tensor, c: Tensor) -> Tensor:
        blocks = list(self.blocks)
        modulation = blocks[0].modulation(c, x.dtype)
        y = layer_norm(blocks[0].norm1, x, modulation[0], modulation[1])
        for i, block in enumerate(blocks):
            x, h = block.attention_and_mlp(x, y, modulation)
            gate_mlp = modulation[5]
            if i + 1 < len(blocks):
                next_norm = blocks[i + 1].norm1
                modulation = blocks[i + 1].modulation(c, x.dtype)
                shift, scale = modulation[0], modulation[1]
            else:
                next_norm = self.final_layer.norm_final
                shift, scale = self.final_layer.modulation(c, x.dtype)
            x, y = residual_layer_norm(next_norm, x, h, gate_mlp, shift, scale)
        return self.final_layer.linear(y)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        self._check_inputs(x, t, y)
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        if len(self.blocks) > 0 and self._blocks_chainable():
            x = self._chained_blocks_and_final_layer(x, c)
        else:
            for block in self.blocks:
                x = block(x, c)
            x = self.final_layer(x, c)
        return self.unpatchify(x)

    def forward_with_cfg(self, x: Tensor, t: Tensor, y: Tensor, cfg_scale: float) -> Tensor:
        """Classifier-free guidance: the batch holds [cond; uncond] halves (y of the second
        half is the null class). Only the first half of x is used for both halves; the
        guided eps is returned in both halves, and channels past the first 3 (the learned
        sigma) pass through unguided, as in the original."""
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        model_out = self.forward(combined, t, y)
        eps, rest = model_out[:, :3], model_out[:, 3:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)


# (depth, hidden_size, num_heads) of the published model sizes.
_SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}

# Constructor arguments of every published configuration, e.g. DIT_CONFIGS['DiT-XL/2'].
DIT_CONFIGS = {
    f"DiT-{size}/{patch}": dict(depth=depth, hidden_size=hidden, patch_size=patch,
                                num_heads=heads)
    for size, (depth, hidden, heads) in _SIZES.items() for patch in (2, 4, 8)
}


DiT_models = register_configs(DiT, DIT_CONFIGS)
DiT_XL_2 = DiT_models["DiT-XL/2"]
DiT_XL_4 = DiT_models["DiT-XL/4"]
DiT_XL_8 = DiT_models["DiT-XL/8"]
DiT_L_2 = DiT_models["DiT-L/2"]
DiT_L_4 = DiT_models["DiT-L/4"]
DiT_L_8 = DiT_models["DiT-L/8"]
DiT_B_2 = DiT_models["DiT-B/2"]
DiT_B_4 = DiT_models["DiT-B/4"]
DiT_B_8 = DiT_models["DiT-B/8"]
DiT_S_2 = DiT_models["DiT-S/2"]
DiT_S_4 = DiT_models["DiT-S/4"]
DiT_S_8 = DiT_models["DiT-S/8"]
