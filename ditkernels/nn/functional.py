"""Functional helpers shared by the modules: every LayerNorm of the models as one
fused op, the long-skip merge, and argument checks.

The LayerNorm wrappers take an nn.LayerNorm submodule for its eps and (optional)
affine parameters, so that the modules keep the originals' submodules and
state_dict keys while the forward pass runs the fused kernels. The fused ops take
one dtype: the affine parameters and the branch output h are cast to x's dtype (a
no-op without autocast; under autocast x may be bf16 in U-ViT's out blocks while the
parameters stay fp32). shift, scale and gate are read as given and must already be
in x's dtype (DiT casts its adaLN output once per block).
"""

from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ..ops import gated_residual_ln_modulate, ln_modulate, skip_concat_linear


def _cast(param: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if param is None else param.to(dtype)


def layer_norm(norm: nn.LayerNorm, x: Tensor, shift: Optional[Tensor] = None,
               scale: Optional[Tensor] = None) -> Tensor:
    """norm(x) * (1 + scale[:, None]) + shift[:, None] as one ln_modulate, in x's dtype
    (plain norm(x) without shift and scale)."""
    return ln_modulate(x, shift, scale, norm.eps, _cast(norm.weight, x.dtype),
                       _cast(norm.bias, x.dtype))


def residual_layer_norm(norm: nn.LayerNorm, x: Tensor, h: Tensor, gate: Optional[Tensor] = None,
                        shift: Optional[Tensor] = None,
                        scale: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(x + gate[:, None] * h, layer_norm(norm, that sum, shift, scale)) as one
    gated_residual_ln_modulate, in x's dtype (an ungated residual without gate)."""
    return gated_residual_ln_modulate(x, h.to(x.dtype), gate, shift, scale, norm.eps,
                                      _cast(norm.weight, x.dtype), _cast(norm.bias, x.dtype))


def skip_merge(linear: nn.Linear, x: Tensor, skip: Tensor) -> Tensor:
    """linear(cat([x, skip], -1)) as one skip_concat_linear.

    Under autocast nn.Linear would compute in the autocast dtype; the custom op has no
    autocast rule, so the cast is done here to keep the original's numerics and speed.
    """
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    return skip_concat_linear(x.to(dtype), skip.to(dtype), linear.weight.to(dtype),
                              _cast(linear.bias, dtype))


def head_dim(dim: int, num_heads: int) -> int:
    """dim // num_heads, for a dim that splits into num_heads heads of at least one
    feature (a head dim of 0 would make the default scale head_dim ** -0.5 divide by 0)."""
    if num_heads < 1 or dim < num_heads or dim % num_heads:
        raise ValueError(f"dim={dim} must be a positive multiple of num_heads={num_heads}")
    return dim // num_heads


def check_latent_inputs(model: str, x: Tensor, t: Tensor, y: Tensor, in_channels: int,
                        input_size: int) -> None:
    """Clear errors for a latent model's (x, t, y) of the wrong shapes."""
    expected = (in_channels, input_size, input_size)
    if x.dim() != 4 or tuple(x.shape[1:]) != expected:
        raise ValueError(f"x must be [B, {', '.join(map(str, expected))}] latents for this "
                         f"{model} (in_channels, input_size, input_size), got shape "
                         f"{tuple(x.shape)}")
    for name, v in (("t", t), ("y", y)):
        if tuple(v.shape) != (x.shape[0],):
            raise ValueError(f"{name} must be a [B] = [{x.shape[0]}] vector matching x of "
                             f"shape {tuple(x.shape)}, got shape {tuple(v.shape)}")
