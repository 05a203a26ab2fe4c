"""Noise schedules: beta_t for t = 0..T-1 as float64 CPU tensors.

float64 because abar_t = prod(1 - beta) over 1000 steps and the 1 / sqrt(abar_t)
factors near t = T lose digits in fp32; every derived quantity is cast to the
sample's dtype only when it is used.
"""

import math
from typing import Callable, Dict

import torch
from torch import Tensor


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """DDPM's linear schedule (DiT's default at 1000 steps).

    The endpoints are DDPM's values for T = 1000; they are scaled by 1000 / T (as in
    IDDPM) so that another T still ends near abar_T = 0 instead of far from pure noise.
    """
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """IDDPM's cosine schedule: abar(t) = cos^2(((t / T + s) / (1 + s)) * pi / 2), normalised.

    beta_t = 1 - abar(t + 1) / abar(t), clipped at max_beta because the last steps
    would otherwise reach beta = 1 and make 1 / sqrt(1 - beta) singular.
    """
    frac = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((frac + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


def scaled_linear_betas(num_timesteps: int, beta_start: float = 0.00085,
                        beta_end: float = 0.012) -> Tensor:
    """Latent Diffusion / Stable Diffusion's schedule: linear in sqrt(beta).

    The endpoints are not rescaled with T, matching the schedule those models were
    trained with.
    """
    return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps,
                          dtype=torch.float64) ** 2


SCHEDULES: Dict[str, Callable[[int], Tensor]] = {
    "linear": linear_betas,
    "cosine": cosine_betas,
    "scaled_linear": scaled_linear_betas,
}


def get_named_beta_schedule(name: str, num_timesteps: int) -> Tensor:
    """The betas of schedule ``name`` ("linear", "cosine" or "scaled_linear")."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; expected one of {sorted(SCHEDULES)}")
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    return SCHEDULES[name](num_timesteps)
