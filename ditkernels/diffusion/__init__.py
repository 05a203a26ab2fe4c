"""Gaussian diffusion for DiT-style models: schedules, losses, respacing, samplers (DDPM,
DDIM, DPM-Solver), guidance; and flow matching (rectified flow, Euler and Heun)."""

from .adapters import DiffusionModelAdapter, as_denoiser
from .dpm_solver import dpm_solver_sample, dynamic_threshold
from .flow import FLOW_METHODS, RectifiedFlow, flow_sample
from .gaussian_diffusion import (
    GaussianDiffusion,
    create_diffusion,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
)
from .guidance import cfg_forward, classifier_free_guidance, guided_model_fn
from .respace import space_timesteps
from .samplers import ddim_sample, ddim_step, ddpm_sample, ddpm_step
from .schedules import (
    SCHEDULES,
    cosine_betas,
    get_named_beta_schedule,
    linear_betas,
    scaled_linear_betas,
)

__all__ = [
    "DiffusionModelAdapter", "FLOW_METHODS", "GaussianDiffusion", "RectifiedFlow", "SCHEDULES",
    "as_denoiser", "cfg_forward", "classifier_free_guidance", "cosine_betas", "create_diffusion",
    "ddim_sample", "ddim_step", "ddpm_sample", "ddpm_step", "discretized_gaussian_log_likelihood",
    "dpm_solver_sample", "dynamic_threshold", "flow_sample", "get_named_beta_schedule",
    "guided_model_fn", "linear_betas", "mean_flat", "normal_kl", "scaled_linear_betas",
    "space_timesteps",
]
