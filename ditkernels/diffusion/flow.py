"""Flow matching with the rectified-flow (linear) interpolant, as SD3 and Flux write it.

    x_t = (1 - t) x_0 + t * noise,   t in [0, 1]: t = 0 is data, t = 1 is N(0, I),

and the model predicts the velocity v = dx_t/dt = noise - x_0 (SiT's linear path is
the same with t reversed: data at t = 1, velocity x_0 - noise). Sampling integrates
dx/dt = v(x, t) from t = 1 down to t = 0. The model receives the timestep time_scale * t (1000 t by default,
SD3's convention), so a DiT, U-ViT or DiffiT sees timesteps in the range it sees
under DDPM training; any model that adapters.as_denoiser accepts works, and the
first C output channels are the velocity (a learned-sigma model's variance half is
ignored and gets no gradient).
"""

from typing import Dict, Optional, Sequence

import torch
from torch import Tensor

from .adapters import as_denoiser
from .gaussian_diffusion import mean_flat
from .guidance import guided_model_fn
from .samplers import _initial_state, _progress

T_SAMPLINGS = ("uniform", "logit_normal")
FLOW_METHODS = ("euler", "heun")


def _velocity(output: Tensor, channels: int) -> Tensor:
    return output[:, :channels]


class RectifiedFlow:
    """The training side of flow matching: time sampling and the velocity loss.

    t_sampling: "uniform" (t ~ U(0, 1)) or "logit_normal" (t = sigmoid(m + s n),
    n ~ N(0, 1), SD3's choice, which favours the middle of the path) with
    logit_mean m and logit_std s. time_scale: the model sees time_scale * t.
    """

    def __init__(self, *, t_sampling: str = "uniform", logit_mean: float = 0.0,
                 logit_std: float = 1.0, time_scale: float = 1000.0):
        if t_sampling not in T_SAMPLINGS:
            raise ValueError(f"RectifiedFlow: unknown t_sampling {t_sampling!r}; expected one "
                             f"of {list(T_SAMPLINGS)}")
        if not logit_std > 0:
            raise ValueError(f"RectifiedFlow: logit_std must be > 0, got {logit_std}")
        self.t_sampling = t_sampling
        self.logit_mean = float(logit_mean)
        self.logit_std = float(logit_std)
        self.time_scale = float(time_scale)

    def sample_t(self, batch: int, generator: Optional[torch.Generator] = None,
                 device=None, dtype: torch.dtype = torch.float32) -> Tensor:
        """[batch] times in (0, 1) drawn by this flow's t_sampling."""
        if self.t_sampling == "uniform":
            return torch.rand(batch, generator=generator, device=device, dtype=dtype)
        n = torch.randn(batch, generator=generator, device=device, dtype=dtype)
        return torch.sigmoid(self.logit_mean + self.logit_std * n)

    @staticmethod
    def interpolate(x_start: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = (1 - t) x_0 + t noise, t [B] broadcast over the other dimensions."""
        t = t.to(x_start.dtype).view(-1, *([1] * (x_start.dim() - 1)))
        return (1 - t) * x_start + t * noise

    def training_losses(self, model, x_start: Tensor, t: Tensor, y: Optional[Tensor] = None,
                        noise: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """Per-sample {"loss", "mse"}: mean over dims of ||v_theta(x_t, t) - (noise - x_0)||^2.

        t: [B] times in [0, 1] (sample_t draws them). model: anything as_denoiser
        accepts, called as model(x_t, time_scale * t, y).
        """
        if t.dim() != 1 or t.shape[0] != x_start.shape[0]:
            raise ValueError(f"RectifiedFlow.training_losses: t must have shape "
                             f"[{x_start.shape[0]}], got {tuple(t.shape)}")
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.interpolate(x_start, noise, t)
        denoiser = as_denoiser(model)
        out = denoiser(x_t, self.time_scale * t.to(x_start.dtype), y)
        mse = mean_flat((_velocity(out, x_start.shape[1]) - (noise - x_start)) ** 2)
        return {"loss": mse, "mse": mse}


@torch.no_grad()
def flow_sample(model, shape: Optional[Sequence[int]] = None, *, steps: int,
                method: str = "euler", y: Optional[Tensor] = None, cfg_scale: float = 1.0,
                cfg_channels: Optional[int] = None, time_scale: float = 1000.0,
                noise: Optional[Tensor] = None, seed: Optional[int] = None, device=None,
                dtype: torch.dtype = torch.float32, progress: bool = True) -> Tensor:
    """Integrate dx/dt = v(x, t) from t = 1 (x = noise) to t = 0 in ``steps`` uniform steps.

    method: "euler" (one model call per step, first order) or "heun" (Heun's
    second-order predictor-corrector, two calls per step except the last, which is
    an Euler step as in EDM: near t = 0 the velocity of real data changes abruptly,
    so a call at t = 0 itself would hurt more than it corrects; 2 steps - 1 calls).
    y, cfg_scale, cfg_channels (classifier-free guidance of the velocity), noise,
    seed, device, dtype, progress: as ddim_sample. time_scale: as RectifiedFlow.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"flow_sample: steps must be a positive integer, got {steps!r}")
    if method not in FLOW_METHODS:
        raise ValueError(f"flow_sample: unknown method {method!r}; expected one of "
                         f"{list(FLOW_METHODS)}")
    x, _ = _initial_state("flow_sample", shape, noise, y, seed, device, dtype)
    model_fn = guided_model_fn(as_denoiser(model), y, x.shape[0], cfg_scale, cfg_channels)
    time_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32

    def velocity(x_t: Tensor, t: float) -> Tensor:
        tau = torch.full((x_t.shape[0],), time_scale * t, dtype=time_dtype, device=x_t.device)
        return _velocity(model_fn(x_t, tau), x_t.shape[1])

    times = [1.0 - i / steps for i in range(steps + 1)]
    for i in _progress(range(steps), progress, steps, f"flow-{method}"):
        t, t_next = times[i], times[i + 1]
        v = velocity(x, t)
        x_euler = x + (t_next - t) * v
        if method == "euler" or i == steps - 1:
            x = x_euler
        else:
            x = x + (t_next - t) * 0.5 * (v + velocity(x_euler, t_next))
    return x
