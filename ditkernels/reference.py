"""Plain-PyTorch definitions of every ditkernels op: the readable spec and the test oracle.

Each function computes in the input dtype with eager PyTorch, exactly as a model
without ditkernels would.
"""

import torch
import torch.nn.functional as F


def ln_modulate(x, shift=None, scale=None, eps=1e-6, weight=None, bias=None):
    """LayerNorm over the last dim (optionally affine), then DiT's modulate.

    x: [B, N, C]; shift, scale: [B, C] or None; weight, bias: [C] or None.
    y = LayerNorm(x) * (1 + scale[:, None]) + shift[:, None]
    """
    y = F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    if scale is not None:
        y = y * (1 + scale[:, None])
    if shift is not None:
        y = y + shift[:, None]
    return y


def gated_residual_ln_modulate(x, h, gate=None, shift=None, scale=None, eps=1e-6, weight=None,
                               bias=None):
    """The gated residual of one DiT branch followed by the norm of the next.

    x_out = x + gate[:, None] * h;  y = ln_modulate(x_out, shift, scale, eps, weight, bias)
    Returns (x_out, y).
    """
    x_out = x + (h if gate is None else gate[:, None] * h)
    return x_out, ln_modulate(x_out, shift, scale, eps, weight, bias)


def skip_concat_linear(x, skip, weight, bias=None):
    """U-ViT's long-skip merge: Linear(2D -> Dout) over cat([x, skip], -1)."""
    return F.linear(torch.cat([x, skip], dim=-1), weight, bias)
