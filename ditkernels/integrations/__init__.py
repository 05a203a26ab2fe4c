"""Integrations with other libraries. Each imports its library only when called, so
ditkernels itself never depends on them."""

from typing import List

import torch.nn as nn


def patch_diffusers(model: nn.Module) -> List[str]:
    """Run the adaLN LayerNorm + modulate and gated-residual steps of a diffusers
    transformer (DiT, PixArt, SD3/SD3.5, Flux), or of every model in a diffusers
    pipeline, on ditkernels' fused ops, in place.
    Needs diffusers (``pip install "ditkernels[diffusers]"``); see
    ditkernels.integrations.diffusers.patch_diffusers."""
    from .diffusers import patch_diffusers as patch

    return patch(model)


__all__ = ["patch_diffusers"]
