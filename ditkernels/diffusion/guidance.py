"""Classifier-free guidance and the model function the samplers call.

Classifier guidance (ADM) lives in the sampler steps, which take the gradient of
log p(y | x_t) that a user's cond_fn returns.
"""

from typing import Callable, Optional

import torch
from torch import Tensor

from .adapters import DiffusionModelAdapter


def classifier_free_guidance(eps_cond: Tensor, eps_uncond: Tensor, scale: float) -> Tensor:
    """eps_uncond + scale * (eps_cond - eps_uncond); scale 1 is the conditional model.

    U-ViT writes the same thing as eps_cond + w (eps_cond - eps_uncond): its w is
    scale - 1.
    """
    return eps_uncond + scale * (eps_cond - eps_uncond)


def cfg_forward(denoiser: DiffusionModelAdapter, x: Tensor, t: Tensor, y: Tensor, scale: float,
                channels: Optional[int] = None) -> Tensor:
    """One batched forward over [cond; uncond], guided on the first ``channels`` channels.

    channels: None guides every eps channel; DiT's sampling script guides only the
    first 3 (``channels=3``, written for 4-channel latents). Channels past the guided
    ones, including the learned-sigma half, come from the conditional half, as in
    DiT's forward_with_cfg.
    """
    if denoiser.null_class is None:
        raise ValueError("classifier-free guidance needs a model with a null class (trained "
                         "with label dropout); pass null_class to as_denoiser")
    batch = x.shape[0]
    out = denoiser(torch.cat([x, x]), torch.cat([t, t]),
                   torch.cat([y, torch.full_like(y, denoiser.null_class)]))
    cond, uncond = out[:batch], out[batch:]
    eps_channels = out.shape[1] // 2 if denoiser.learn_sigma else out.shape[1]
    k = eps_channels if channels is None else channels
    if not 1 <= k <= eps_channels:
        raise ValueError(f"cfg_channels must be in [1, {eps_channels}], got {channels}")
    guided = classifier_free_guidance(cond[:, :k], uncond[:, :k], scale)
    return torch.cat([guided, cond[:, k:]], dim=1)


def guided_model_fn(denoiser: DiffusionModelAdapter, y: Optional[Tensor], batch: int,
                    cfg_scale: float = 1.0, cfg_channels: Optional[int] = None,
                    classifier_guided: bool = False) -> Callable[[Tensor, Tensor], Tensor]:
    """(x_t, t_original) -> model output, with the labels and guidance fixed.

    Checks the combination up front so a bad request fails before any model call:
    guidance or labels for an unconditional model (labels are allowed there only as
    classifier-guidance targets), guidance without a null class or without labels.
    A class-conditional model with a null class and no labels samples unconditionally.
    """
    if y is not None:
        if y.dim() != 1 or y.shape[0] != batch or y.dtype != torch.int64:
            raise ValueError(f"y must be int64 of shape [{batch}], got {y.dtype} "
                             f"{tuple(y.shape)}")
    if not denoiser.class_conditional:
        if cfg_scale != 1.0:
            raise ValueError(f"guidance scale {cfg_scale} given to an unconditional model; "
                             "classifier-free guidance needs a class-conditional model")
        if y is not None and not classifier_guided:
            raise ValueError("labels y given to an unconditional model without a classifier "
                             "guidance cond_fn")
        return lambda x, t: denoiser(x, t, None)

    top = denoiser.num_classes + (1 if denoiser.supports_cfg else 0)
    if y is not None and bool(((y < 0) | (y >= top)).any()):
        raise ValueError(f"labels must lie in [0, {top}), got min {int(y.min())} "
                         f"max {int(y.max())}")
    if cfg_scale != 1.0 and not denoiser.supports_cfg:
        raise ValueError(f"guidance scale {cfg_scale} given to a model without a null class "
                         "(trained without label dropout)")
    if y is None:
        if not denoiser.supports_cfg:
            raise ValueError("this class-conditional model has no null class: pass labels y")
        if cfg_scale != 1.0:
            raise ValueError("classifier-free guidance needs labels y")
        labels = None
    else:
        labels = y

    def model_fn(x: Tensor, t: Tensor) -> Tensor:
        lab = labels if labels is not None else torch.full(
            (x.shape[0],), denoiser.null_class, dtype=torch.int64, device=x.device)
        if cfg_scale == 1.0:
            return denoiser(x, t, lab)
        return cfg_forward(denoiser, x, t, lab, cfg_scale, cfg_channels)

    return model_fn
