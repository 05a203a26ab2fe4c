"""DDPM ancestral and DDIM samplers over a (possibly respaced) GaussianDiffusion.

Both take any model through adapters.as_denoiser, class labels, classifier-free
guidance (cfg_scale, cfg_channels) and an optional classifier-guidance function
``cond_fn(x_t, t_original, y) -> scale * grad_x log p(y | x_t)`` (ADM). cond_fn runs
with autograd enabled, so it may call backward on a classifier directly.
"""

from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor

from .adapters import as_denoiser
from .gaussian_diffusion import GaussianDiffusion
from .guidance import guided_model_fn

CondFn = Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]


def ddpm_step(diffusion: GaussianDiffusion, model_output: Tensor, x_t: Tensor, t: Tensor,
              noise: Tensor, *, clip_denoised: bool = False,
              cond_grad: Optional[Tensor] = None) -> Tensor:
    """x_{t-1} ~ p(x_{t-1} | x_t), no noise added at t = 0.

    cond_grad (classifier guidance) shifts the mean by Sigma * cond_grad (ADM).
    """
    out = diffusion.p_mean_variance(model_output, x_t, t, clip_denoised)
    mean = out["mean"]
    if cond_grad is not None:
        mean = mean + out["variance"] * cond_grad
    nonzero = (t != 0).to(x_t.dtype).view(-1, *([1] * (x_t.dim() - 1)))
    return mean + nonzero * torch.exp(0.5 * out["log_variance"]) * noise


def ddim_step(diffusion: GaussianDiffusion, model_output: Tensor, x_t: Tensor, t: Tensor,
              noise: Optional[Tensor] = None, *, eta: float = 0.0, clip_denoised: bool = False,
              cond_grad: Optional[Tensor] = None) -> Tensor:
    """DDIM's update from step t to the previous step of ``diffusion``.

    sigma = eta * sqrt((1 - abar_prev) / (1 - abar)) * sqrt(1 - abar / abar_prev);
    eta = 0 is deterministic, eta = 1 is DDPM with the posterior variance. eps is
    re-derived from the (possibly clipped) x_0 prediction so the two stay consistent.
    cond_grad enters through the score: eps <- eps - sqrt(1 - abar) * cond_grad (ADM).
    """
    out = diffusion.p_mean_variance(model_output, x_t, t, clip_denoised)
    pred_xstart = out["pred_xstart"]
    eps = diffusion.predict_eps_from_xstart(x_t, t, pred_xstart)
    abar = diffusion.extract("alphas_cumprod", t, x_t)
    abar_prev = diffusion.extract("alphas_cumprod_prev", t, x_t)
    if cond_grad is not None:
        eps = eps - (1 - abar).sqrt() * cond_grad
        pred_xstart = diffusion.predict_xstart_from_eps(x_t, t, eps)
    sigma = eta * ((1 - abar_prev) / (1 - abar)).sqrt() * (1 - abar / abar_prev).sqrt()
    x_prev = abar_prev.sqrt() * pred_xstart + (1 - abar_prev - sigma ** 2).sqrt() * eps
    if eta == 0.0:
        return x_prev
    if noise is None:
        raise ValueError("ddim_step with eta > 0 needs noise")
    nonzero = (t != 0).to(x_t.dtype).view(-1, *([1] * (x_t.dim() - 1)))
    return x_prev + nonzero * sigma * noise


def _progress(steps: Iterable[int], enabled: bool, total: int, desc: str) -> Iterable[int]:
    """A tqdm bar over ``steps`` when asked for and tqdm is installed (it is optional)."""
    if not enabled:
        return steps
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return steps
    return tqdm(steps, total=total, desc=desc, leave=False)


def _initial_state(name: str, shape: Optional[Sequence[int]], noise: Optional[Tensor],
                   y: Optional[Tensor], seed: Optional[int], device, dtype: torch.dtype):
    """(x_T, generator): x_T is ``noise`` or drawn with ``seed``; the generator (None
    without a seed) is seeded once, so a sampler that draws more noise continues it."""
    if noise is None and shape is None:
        raise ValueError(f"{name}: pass the sample shape or the starting noise x_T")
    if noise is not None and shape is not None and tuple(noise.shape) != tuple(shape):
        raise ValueError(f"{name}: noise has shape {tuple(noise.shape)}, shape says "
                         f"{tuple(shape)}")
    if device is None:
        device = noise.device if noise is not None else (y.device if y is not None else "cpu")
    device = torch.device(device)
    generator = None if seed is None else torch.Generator(device).manual_seed(seed)
    if noise is None:
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype), \
            generator
    return noise.to(device), generator


def _cond_grad(cond_fn: CondFn, x: Tensor, t: Tensor, y: Optional[Tensor]) -> Tensor:
    """cond_fn's scaled grad log p(y | x_t), with autograd on and its shape checked."""
    with torch.enable_grad():
        grad = cond_fn(x.detach(), t, y).detach()
    if grad.shape != x.shape:
        raise ValueError(f"cond_fn returned shape {tuple(grad.shape)}, expected "
                         f"{tuple(x.shape)}")
    return grad


@torch.no_grad()
def _sample_loop(step: Callable, stochastic: bool, desc: str, diffusion: GaussianDiffusion,
                 model, shape: Optional[Sequence[int]], *, y: Optional[Tensor],
                 cfg_scale: float, cfg_channels: Optional[int], cond_fn: Optional[CondFn],
                 noise: Optional[Tensor], seed: Optional[int], device, dtype: torch.dtype,
                 progress: bool) -> Tensor:
    if cond_fn is not None and y is None:
        raise ValueError("classifier guidance (cond_fn) needs target labels y")
    x, generator = _initial_state(f"{desc}_sample", shape, noise, y, seed, device, dtype)
    device = x.device
    batch = x.shape[0]
    model_fn = guided_model_fn(as_denoiser(model), y, batch, cfg_scale, cfg_channels,
                               classifier_guided=cond_fn is not None)

    n = diffusion.num_timesteps
    for i in _progress(reversed(range(n)), progress, n, desc):
        t = torch.full((batch,), i, dtype=torch.int64, device=device)
        t_model = diffusion.model_timesteps(t)
        model_output = model_fn(x, t_model)
        cond_grad = None if cond_fn is None else _cond_grad(cond_fn, x, t_model, y)
        z = (torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
             if stochastic else None)
        x = step(diffusion, model_output, x, t, z, cond_grad=cond_grad)
    return x


def ddpm_sample(diffusion: GaussianDiffusion, model, shape: Optional[Sequence[int]] = None, *,
                y: Optional[Tensor] = None, cfg_scale: float = 1.0,
                cfg_channels: Optional[int] = None, cond_fn: Optional[CondFn] = None,
                clip_denoised: bool = False, noise: Optional[Tensor] = None,
                seed: Optional[int] = None, device=None, dtype: torch.dtype = torch.float32,
                progress: bool = True) -> Tensor:
    """Ancestral sampling through every step of ``diffusion`` (respace it for fewer).

    model: anything as_denoiser accepts. y: int64 [B] labels (None: unconditional, or
    the null class of a conditional model). cfg_scale: classifier-free guidance scale
    (1 = plain conditional). cfg_channels: guide only the first k eps channels (DiT
    uses 3). noise: x_T (default drawn from N(0, I) with ``seed``). seed: a private
    generator seeds x_T and every step's noise, so the result is reproducible;
    without it the global RNG is used. clip_denoised: clamp predicted x_0 to [-1, 1].
    """
    def step(diffusion, out, x, t, z, cond_grad):
        return ddpm_step(diffusion, out, x, t, z, clip_denoised=clip_denoised, cond_grad=cond_grad)

    return _sample_loop(step, True, "ddpm", diffusion, model, shape, y=y, cfg_scale=cfg_scale,
                        cfg_channels=cfg_channels, cond_fn=cond_fn, noise=noise, seed=seed,
                        device=device, dtype=dtype, progress=progress)


def ddim_sample(diffusion: GaussianDiffusion, model, shape: Optional[Sequence[int]] = None, *,
                eta: float = 0.0, y: Optional[Tensor] = None, cfg_scale: float = 1.0,
                cfg_channels: Optional[int] = None, cond_fn: Optional[CondFn] = None,
                clip_denoised: bool = False, noise: Optional[Tensor] = None,
                seed: Optional[int] = None, device=None, dtype: torch.dtype = torch.float32,
                progress: bool = True) -> Tensor:
    """DDIM sampling through every step of ``diffusion`` (usually respaced, "ddim50").

    eta = 0 (default) is deterministic given x_T. Other arguments as ddpm_sample.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")

    def step(diffusion, out, x, t, z, cond_grad):
        return ddim_step(diffusion, out, x, t, z, eta=eta, clip_denoised=clip_denoised,
                         cond_grad=cond_grad)

    return _sample_loop(step, eta > 0, "ddim", diffusion, model, shape, y=y, cfg_scale=cfg_scale,
                        cfg_channels=cfg_channels, cond_fn=cond_fn, noise=noise, seed=seed,
                        device=device, dtype=dtype, progress=progress)
