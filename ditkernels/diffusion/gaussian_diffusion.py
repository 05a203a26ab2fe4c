"""Gaussian diffusion (DDPM / IDDPM / ADM formulation) with epsilon prediction.

Conventions: ``t`` passed to these methods is an index into this diffusion's own
steps (0..num_timesteps-1); after respacing that differs from the original
timestep, and the model is always called with ``model_timesteps(t)``, the original
t in 0..999 that it was trained on. Data is assumed to live in [-1, 1] (pixels) or
to be a roughly unit-variance latent.
"""

import math
from typing import Callable, Dict, Optional, Union

import torch
from torch import Tensor

from .respace import space_timesteps
from .schedules import get_named_beta_schedule

MODEL_VAR_TYPES = ("fixed_small", "fixed_large", "learned_range")

# Per-step schedule tensors that the methods index by t.
_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
            "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
            "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
            "fixed_large_variance", "posterior_mean_coef1", "posterior_mean_coef2",
            "timestep_map")

# (x_t, t_original, y) -> model output: eps [B, C, ...], or [eps | v] with 2C channels
# for learned-range variance.
ModelFn = Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]


def mean_flat(x: Tensor) -> Tensor:
    """Mean over all non-batch dimensions."""
    return x.mean(dim=tuple(range(1, x.dim())))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log P(x) for data quantised to 256 levels in [-1, 1] under N(means, exp(log_scales)^2).

    Each level owns a bin of width 2/255; the two edge bins extend to -inf and +inf so
    the probabilities of the 256 levels sum to one (IDDPM's decoder L_0). The tails use
    log_ndtr, which stays accurate where 1 - cdf underflows.
    """
    inv_std = torch.exp(-log_scales)
    centered = x - means
    upper = inv_std * (centered + 1.0 / 255.0)
    lower = inv_std * (centered - 1.0 / 255.0)
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_sf_lower = torch.special.log_ndtr(-lower)
    delta = torch.special.ndtr(upper) - torch.special.ndtr(lower)
    log_delta = torch.log(delta.clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper,
                       torch.where(x > 0.999, log_sf_lower, log_delta))


class GaussianDiffusion:
    """The forward process, its posterior, the model's reverse step and the losses.

    betas: 1-D, in (0, 1]. model_var_type: "fixed_small" (posterior variance),
    "fixed_large" (beta_t) or "learned_range" (the model outputs v in [-1, 1] per
    element and log Sigma = (v+1)/2 log beta_t + (1-v)/2 log beta~_t, IDDPM; the model
    output then has 2C channels, eps first). timestep_map: the original timestep of
    each step (identity when None).
    """

    def __init__(self, betas: Tensor, *, model_var_type: str = "learned_range",
                 timestep_map: Optional[Tensor] = None):
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
        if betas.dim() != 1 or betas.numel() == 0:
            raise ValueError(f"betas must be a non-empty 1-D tensor, got shape "
                             f"{tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must lie in (0, 1]")
        if model_var_type not in MODEL_VAR_TYPES:
            raise ValueError(f"unknown model_var_type {model_var_type!r}; expected one of "
                             f"{list(MODEL_VAR_TYPES)}")
        self.model_var_type = model_var_type
        self.num_timesteps = int(betas.numel())
        if timestep_map is None:
            timestep_map = torch.arange(self.num_timesteps)
        self.timestep_map = torch.as_tensor(timestep_map, dtype=torch.int64).cpu()
        if self.timestep_map.shape != betas.shape:
            raise ValueError("timestep_map must have one entry per step")

        self.betas = betas
        abar = torch.cumprod(1.0 - betas, dim=0)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        self.alphas_cumprod = abar
        self.alphas_cumprod_prev = abar_prev
        self.sqrt_alphas_cumprod = abar.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - abar).sqrt()
        self.sqrt_recip_alphas_cumprod = abar.rsqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / abar - 1.0).sqrt()
        self.posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        # The posterior variance is 0 at t = 0; its log borrows t = 1's value there so
        # that learned-range interpolation and the likelihood stay finite (IDDPM).
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([pv[1:2], pv[1:]]) if self.num_timesteps > 1 else betas)
        # beta_t, except at t = 0 where the posterior variance stands in so the decoder
        # likelihood is not needlessly broad (IDDPM).
        self.fixed_large_variance = torch.cat([pv[1:2], betas[1:]]) \
            if self.num_timesteps > 1 else betas
        self.posterior_mean_coef1 = betas * abar_prev.sqrt() / (1.0 - abar)
        self.posterior_mean_coef2 = (1.0 - abar_prev) * (1.0 - betas).sqrt() / (1.0 - abar)
        self._device_buffers: Dict[torch.device, Dict[str, Tensor]] = {}

    # -- buffers ---------------------------------------------------------------

    def _buffers(self, device: torch.device) -> Dict[str, Tensor]:
        # One host-to-device copy per device, not one per step.
        if device not in self._device_buffers:
            self._device_buffers[device] = {n: getattr(self, n).to(device) for n in _BUFFERS}
        return self._device_buffers[device]

    def extract(self, name: str, t: Tensor, like: Tensor) -> Tensor:
        """Buffer ``name`` at per-sample steps t, shaped to broadcast against ``like``."""
        out = self._buffers(t.device)[name][t].to(like.dtype)
        return out.view(-1, *([1] * (like.dim() - 1)))

    def model_timesteps(self, t: Tensor) -> Tensor:
        """The original timesteps (int64, what the model sees) of steps t."""
        return self._buffers(t.device)["timestep_map"][t]

    # -- forward process and posterior ------------------------------------------

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Optional[Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)."""
        if noise is None:
            noise = torch.randn(x_start.shape, generator=generator, device=x_start.device,
                                dtype=x_start.dtype)
        return (self.extract("sqrt_alphas_cumprod", t, x_start) * x_start
                + self.extract("sqrt_one_minus_alphas_cumprod", t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start: Tensor, x_t: Tensor, t: Tensor):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (self.extract("posterior_mean_coef1", t, x_t) * x_start
                + self.extract("posterior_mean_coef2", t, x_t) * x_t)
        return (mean, self.extract("posterior_variance", t, x_t),
                self.extract("posterior_log_variance_clipped", t, x_t))

    def predict_xstart_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        return (self.extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                - self.extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps)

    def predict_eps_from_xstart(self, x_t: Tensor, t: Tensor, pred_xstart: Tensor) -> Tensor:
        return ((self.extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart)
                / self.extract("sqrt_recipm1_alphas_cumprod", t, x_t))

    # -- reverse process ---------------------------------------------------------

    def split_model_output(self, model_output: Tensor, x_t: Tensor):
        """(eps, v or None) from the raw model output, checking its channel count."""
        channels = x_t.shape[1]
        if self.model_var_type == "learned_range":
            if model_output.shape[1] != 2 * channels:
                raise ValueError(
                    f"model_var_type 'learned_range' needs a model with 2*C = {2 * channels} "
                    f"output channels (learn_sigma=True), got {model_output.shape[1]}")
            return model_output[:, :channels], model_output[:, channels:]
        if model_output.shape[1] != channels:
            raise ValueError(
                f"model_var_type {self.model_var_type!r} needs a model with C = {channels} "
                f"output channels, got {model_output.shape[1]} (a learn_sigma model needs "
                f"learned_range variance)")
        return model_output, None

    def p_mean_variance(self, model_output: Tensor, x_t: Tensor, t: Tensor,
                        clip_denoised: bool = False) -> Dict[str, Tensor]:
        """p(x_{t-1} | x_t) from the model output at x_t.

        Returns mean, variance, log_variance, pred_xstart and eps (the model's eps).
        clip_denoised clamps the predicted x_0 to [-1, 1] (pixel data) before the mean
        is formed.
        """
        eps, v = self.split_model_output(model_output, x_t)
        if self.model_var_type == "learned_range":
            min_log = self.extract("posterior_log_variance_clipped", t, x_t)
            max_log = torch.log(self.extract("betas", t, x_t))
            frac = (v + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        elif self.model_var_type == "fixed_large":
            variance = self.extract("fixed_large_variance", t, x_t).expand_as(x_t)
            log_variance = torch.log(variance)
        else:
            variance = self.extract("posterior_variance", t, x_t).expand_as(x_t)
            log_variance = self.extract("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance,
                "pred_xstart": pred_xstart, "eps": eps}

    # -- training ----------------------------------------------------------------

    def vb_terms_bpd(self, model_output: Tensor, x_start: Tensor, x_t: Tensor,
                     t: Tensor) -> Tensor:
        """Per-sample variational bound term L_t in bits per dimension.

        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0 and the discretised
        decoder NLL -log p(x_0 | x_1) at t = 0.
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"],
                                 out["log_variance"])) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(
            x_start, out["mean"], 0.5 * out["log_variance"])) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model: ModelFn, x_start: Tensor, t: Tensor,
                        y: Optional[Tensor] = None,
                        noise: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """Per-sample losses at steps t; returns {"loss", "mse"} plus "vb" if learned.

        model(x_t, t_original, y): eps-prediction model (see adapters.as_denoiser).
        loss = ||eps - eps_theta||^2 (mean over dims), plus for learned-range variance
        IDDPM's hybrid term lambda * L_vlb with lambda = 1e-3 and L_vlb = T * L_t; L_t
        sees the eps prediction detached, so it trains only the variance and the mean
        is learned by the simple loss alone.
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        model_output = model(x_t, self.model_timesteps(t), y)
        eps, v = self.split_model_output(model_output, x_t)
        terms = {"mse": mean_flat((noise - eps) ** 2)}
        if v is not None:
            frozen = torch.cat([eps.detach(), v], dim=1)
            terms["vb"] = self.vb_terms_bpd(frozen, x_start, x_t, t) * (self.num_timesteps / 1000.0)
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms

    # -- respacing ---------------------------------------------------------------

    def respaced(self, spec: Union[str, int]) -> "GaussianDiffusion":
        """The same process visiting only the steps chosen by ``spec`` ("250", "ddim50").

        abar at each kept step is unchanged, and betas are recomputed between kept
        steps; the model still receives the original timesteps.
        """
        keep = torch.tensor(space_timesteps(self.num_timesteps, spec), dtype=torch.int64)
        abar = self.alphas_cumprod[keep]
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        return GaussianDiffusion(1.0 - abar / abar_prev, model_var_type=self.model_var_type,
                                 timestep_map=self.timestep_map[keep])


def create_diffusion(timestep_respacing: Union[str, int, None] = None, *,
                     noise_schedule: str = "linear", num_timesteps: int = 1000,
                     learn_sigma: bool = True, sigma_small: bool = False) -> GaussianDiffusion:
    """DiT's diffusion factory: a ``num_timesteps``-step schedule, respaced if asked.

    learn_sigma selects learned-range variance (the model outputs 2C channels);
    otherwise the variance is fixed at the posterior variance (sigma_small) or beta_t.
    timestep_respacing: None or "" for all steps, else a spec such as "250" or "ddim50".
    """
    var_type = "learned_range" if learn_sigma else ("fixed_small" if sigma_small else "fixed_large")
    diffusion = GaussianDiffusion(get_named_beta_schedule(noise_schedule, num_timesteps),
                                  model_var_type=var_type)
    if timestep_respacing not in (None, ""):
        diffusion = diffusion.respaced(timestep_respacing)
    return diffusion
