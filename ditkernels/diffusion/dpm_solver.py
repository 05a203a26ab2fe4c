"""DPM-Solver and DPM-Solver++ (Lu et al. 2022): the probability-flow ODE in 10-25 steps.

A discrete schedule abar_0..abar_{N-1} becomes a continuous-time VP process as in the
DPM-Solver paper (appendix on discrete-time models): log alpha(t) is piecewise linear
in t through the knots (t_n = (n + 1) / N, log alpha = 0.5 log abar_n), sigma(t) =
sqrt(1 - alpha(t)^2), and the model sees the timestep tau = N t - 1, so the knots are
exactly the integer timesteps 0..N-1 it was trained on and points between them get
fractional timesteps. Sampling runs from t = 1 (tau = N - 1) to t = 1 / N (tau = 0).

In the half-logSNR lambda = log(alpha / sigma) the ODE's linear part is solved
exactly and the model term is integrated by a Taylor expansion in lambda:
DPM-Solver expands the noise prediction eps, DPM-Solver++ the data prediction x_0.
With hh = -h (data prediction) or +h (noise prediction), h = lambda_t - lambda_s,
and phi_1 = expm1(hh), phi_2 = phi_1 / hh - 1, phi_3 = phi_2 / hh - 1/2, every update
of the paper reads

    x_t = A x_s - C (phi_1 m_s + phi_2 D1 + phi_3 D2),

with A = sigma_t / sigma_s, C = alpha_t for x_0 prediction, A = alpha_t / alpha_s,
C = sigma_t for eps prediction, m the model's prediction and D1, D2 its first and
second divided differences in lambda (the solver variants differ only in how they
estimate D1 and D2).
"""

import math
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .adapters import as_denoiser
from .gaussian_diffusion import GaussianDiffusion
from .guidance import guided_model_fn
from .samplers import CondFn, _cond_grad, _initial_state, _progress

ALGORITHMS = ("dpmsolver++", "dpmsolver")
METHODS = ("multistep", "singlestep")
SKIP_TYPES = ("time_uniform", "logSNR", "time_quadratic")
SOLVER_TYPES = ("dpmsolver", "taylor")
# Below this many steps the last multistep updates drop to lower orders, whose
# extrapolation from few, widely spaced model outputs is more stable (the reference
# code and diffusers' DPMSolverMultistepScheduler use the same rule).
LOWER_ORDER_FINAL_BELOW = 15


class DiscreteVPSchedule:
    """The continuous-time VP process that DPM-Solver defines from discrete abar_n.

    All times are Python floats in [1 / N, 1]; values are computed in float64.
    """

    def __init__(self, alphas_cumprod: Tensor):
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu().numpy()
        self.num_timesteps = len(abar)
        self.t_knots = np.arange(1, self.num_timesteps + 1, dtype=np.float64) / self.num_timesteps
        self.log_alpha_knots = 0.5 * np.log(abar)
        self.t_start, self.t_end = 1.0, 1.0 / self.num_timesteps

    def log_alpha(self, t: float) -> float:
        return float(np.interp(t, self.t_knots, self.log_alpha_knots))

    def alpha_sigma(self, t: float) -> Tuple[float, float]:
        log_alpha = self.log_alpha(t)
        return math.exp(log_alpha), math.sqrt(-math.expm1(2.0 * log_alpha))

    def lambda_(self, t: float) -> float:
        """Half-logSNR log(alpha_t / sigma_t)."""
        log_alpha = self.log_alpha(t)
        return log_alpha - 0.5 * math.log(-math.expm1(2.0 * log_alpha))

    def inverse_lambda(self, lam: float) -> float:
        """The t with lambda(t) = lam (log alpha decreases in t, so the knots flip)."""
        log_alpha = -0.5 * float(np.logaddexp(0.0, -2.0 * lam))
        return float(np.interp(log_alpha, self.log_alpha_knots[::-1], self.t_knots[::-1]))

    def model_timestep(self, t: float) -> float:
        return t * self.num_timesteps - 1.0

    def time_steps(self, skip_type: str, t_from: float, t_to: float, n: int) -> List[float]:
        """n + 1 times from t_from to t_to, uniform in t, in lambda or in sqrt(t)."""
        if skip_type == "logSNR":
            lambdas = np.linspace(self.lambda_(t_from), self.lambda_(t_to), n + 1)
            times = [self.inverse_lambda(float(lam)) for lam in lambdas]
            # Pin the ends: the round trip through lambda may move them by an ulp.
            times[0], times[-1] = t_from, t_to
            return times
        if skip_type == "time_quadratic":
            return [float(v) ** 2 for v in np.linspace(math.sqrt(t_from), math.sqrt(t_to), n + 1)]
        return [float(v) for v in np.linspace(t_from, t_to, n + 1)]


def _check_args(diffusion: GaussianDiffusion, steps, order, method, algorithm, skip_type,
                solver_type, clip_denoised, thresholding) -> None:
    name = "dpm_solver_sample"
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{name}: steps must be a positive integer, got {steps!r}")
    if order not in (1, 2, 3):
        raise ValueError(f"{name}: order must be 1, 2 or 3, got {order!r}")
    for arg, value, allowed in (("method", method, METHODS), ("algorithm", algorithm, ALGORITHMS),
                                ("skip_type", skip_type, SKIP_TYPES),
                                ("solver_type", solver_type, SOLVER_TYPES)):
        if value not in allowed:
            raise ValueError(f"{name}: unknown {arg} {value!r}; expected one of {list(allowed)}")
    if (clip_denoised or thresholding) and algorithm != "dpmsolver++":
        raise ValueError(f"{name}: clip_denoised and thresholding correct the x_0 prediction, "
                         f"which only algorithm='dpmsolver++' integrates (got {algorithm!r})")
    if not torch.equal(diffusion.timestep_map, torch.arange(diffusion.num_timesteps)):
        raise ValueError(f"{name}: pass the full (unrespaced) diffusion; the solver places its "
                         f"own {steps} steps on the continuous-time schedule")


def dynamic_threshold(x0: Tensor, ratio: float = 0.995, max_value: float = 1.0) -> Tensor:
    """Imagen's dynamic thresholding of an x_0 prediction, per sample.

    s = the ``ratio`` quantile of |x0| clamped to [1, max_value]; x0 is clamped to
    [-s, s] and divided by s. With max_value = 1 it is clipping to [-1, 1].
    """
    flat = x0.reshape(x0.shape[0], -1)
    upcast = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
    s = torch.quantile(upcast.abs(), ratio, dim=1).clamp(min=1.0, max=max_value)
    s = s.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s


class _Solver:
    """The DPM-Solver updates over one schedule, one algorithm and one model function."""

    def __init__(self, schedule: DiscreteVPSchedule, predict: Callable[[Tensor, float], Tensor],
                 data_prediction: bool, solver_type: str):
        self.ns = schedule
        self.predict = predict
        self.data_prediction = data_prediction
        self.solver_type = solver_type

    def _coefficients(self, s: float, t: float, fraction: float = 1.0):
        """A, C and phi_1..phi_3 for the exact step from s to the point ``fraction`` of
        the way in lambda (t itself for fraction 1), and h = lambda_t - lambda_s."""
        h = self.ns.lambda_(t) - self.ns.lambda_(s)
        target = t if fraction == 1.0 else self.ns.inverse_lambda(self.ns.lambda_(s) + fraction * h)
        (alpha_s, sigma_s), (alpha_r, sigma_r) = self.ns.alpha_sigma(s), self.ns.alpha_sigma(target)
        hh = -fraction * h if self.data_prediction else fraction * h
        phi_1 = math.expm1(hh)
        phi_2 = phi_1 / hh - 1.0
        phi_3 = phi_2 / hh - 0.5
        if self.data_prediction:
            a, c = sigma_r / sigma_s, alpha_r
        else:
            a, c = alpha_r / alpha_s, sigma_r
        return a, c, phi_1, phi_2, phi_3, target

    def first_order(self, x: Tensor, s: float, t: float, model_s: Tensor) -> Tensor:
        """DPM-Solver-1 (= DDIM): the model output held constant over the step."""
        a, c, phi_1, _, _, _ = self._coefficients(s, t)
        return a * x - (c * phi_1) * model_s

    def multistep(self, x: Tensor, models: Sequence[Tensor], times: Sequence[float], t: float,
                  order: int) -> Tensor:
        """Multistep update from times[-1] to t reusing the last ``order`` model outputs."""
        if order == 1:
            return self.first_order(x, times[-1], t, models[-1])
        lam = [self.ns.lambda_(s) for s in times[-order:]] + [self.ns.lambda_(t)]
        m = list(models[-order:])
        h = lam[-1] - lam[-2]
        a, c, phi_1, phi_2, phi_3, _ = self._coefficients(times[-1], t)
        r0 = (lam[-2] - lam[-3]) / h
        d1_0 = (m[-1] - m[-2]) / r0
        if order == 2:
            if self.solver_type == "dpmsolver":
                return a * x - (c * phi_1) * m[-1] - (0.5 * c * phi_1) * d1_0
            return a * x - (c * phi_1) * m[-1] - (c * phi_2) * d1_0
        r1 = (lam[-3] - lam[-4]) / h
        d1_1 = (m[-2] - m[-3]) / r1
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        return a * x - (c * phi_1) * m[-1] - (c * phi_2) * d1 - (c * phi_3) * d2

    def singlestep(self, x: Tensor, s: float, t: float, order: int, r1: float,
                   r2: float) -> Tensor:
        """Singlestep update from s to t with order - 1 intermediate model calls at the
        fractions r1 (and r2) of the step in lambda."""
        model_s = self.predict(x, s)
        if order == 1:
            return self.first_order(x, s, t, model_s)
        a1, c1, phi1_1, _, _, s1 = self._coefficients(s, t, r1)
        model_s1 = self.predict(a1 * x - (c1 * phi1_1) * model_s, s1)
        a, c, phi_1, phi_2, phi_3, _ = self._coefficients(s, t)
        if order == 2:
            scale = 0.5 * phi_1 if self.solver_type == "dpmsolver" else phi_2
            return a * x - (c * phi_1) * model_s - (c * scale / r1) * (model_s1 - model_s)
        a2, c2, phi2_1, phi2_2, _, s2 = self._coefficients(s, t, r2)
        x_s2 = (a2 * x - (c2 * phi2_1) * model_s
                - (r2 / r1 * c2 * phi2_2) * (model_s1 - model_s))
        model_s2 = self.predict(x_s2, s2)
        if self.solver_type == "dpmsolver":
            return a * x - (c * phi_1) * model_s - (c * phi_2 / r2) * (model_s2 - model_s)
        d1_0 = (model_s1 - model_s) / r1
        d1_1 = (model_s2 - model_s) / r2
        d1 = (r2 * d1_0 - r1 * d1_1) / (r2 - r1)
        d2 = 2.0 * (d1_1 - d1_0) / (r2 - r1)
        return a * x - (c * phi_1) * model_s - (c * phi_2) * d1 - (c * phi_3) * d2


def _singlestep_plan(steps: int, order: int) -> List[int]:
    """The orders of the singlestep updates that spend exactly ``steps`` model calls:
    as many order-``order`` steps as fit, the remainder in one or two lower ones."""
    full, rest = divmod(steps, order)
    if order == 3 and rest == 0:
        return [3] * (full - 1) + [2, 1]
    return [order] * full + ([rest] if rest else [])


def dpm_solver_sample(diffusion: GaussianDiffusion, model, shape: Optional[Sequence[int]] = None,
                      *, steps: int, order: int = 2, method: str = "multistep",
                      algorithm: str = "dpmsolver++", skip_type: str = "logSNR",
                      solver_type: str = "dpmsolver", lower_order_final: bool = True,
                      denoise_to_zero: bool = False, y: Optional[Tensor] = None,
                      cfg_scale: float = 1.0, cfg_channels: Optional[int] = None,
                      cond_fn: Optional[CondFn] = None, clip_denoised: bool = False,
                      thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                      sample_max_value: float = 1.0, noise: Optional[Tensor] = None,
                      seed: Optional[int] = None, device=None,
                      dtype: torch.dtype = torch.float32, progress: bool = True) -> Tensor:
    """Sample the probability-flow ODE of ``diffusion`` with DPM-Solver(++) in ``steps`` steps.

    diffusion: the full discrete-time process the model was trained with (not
    respaced: its abar_n define the continuous-time VP, see the module docstring).
    steps: model evaluations, excluding the final one of denoise_to_zero. order 1-3;
    order 1 is DDIM. method: "multistep" (one model call per step, earlier outputs
    reused; DPM-Solver++(2M) is order=2, the default, and suits guided sampling) or
    "singlestep" (order - 1 extra calls inside each step; the steps hold the same
    total). algorithm: "dpmsolver++" integrates the x_0 prediction, "dpmsolver" the
    eps prediction. skip_type places the steps uniformly in logSNR ("logSNR", the
    paper's choice), in t ("time_uniform", the reference code's and diffusers'
    default) or in sqrt(t) ("time_quadratic"). Time-uniform steps end with one long
    step in logSNR (timesteps ~50 -> 0 at 20 steps: lambda 1.7 -> 4.6), over which
    second-order multistep extrapolation overshoots once lower_order_final no longer
    applies: on the digits DiT, DPM-Solver++(2M) at 20 time-uniform steps was
    further from the converged ODE solution than at 10, while logSNR and quadratic
    steps were 4-6x closer than DDIM-20. solver_type: "dpmsolver"
    (the paper's) or "taylor" estimates of the derivative terms. lower_order_final:
    with fewer than 15 steps the last multistep updates use orders 1 and 2.
    denoise_to_zero: one more model call at the end, replacing x by its x_0
    prediction at t = 1 / N (timestep 0); otherwise the output keeps the noise level
    sigma of timestep 0 (about 0.01 for DiT's linear schedule).

    clip_denoised (clamp x_0 to [-1, 1]) and thresholding (Imagen's dynamic
    thresholding with dynamic_thresholding_ratio and sample_max_value, as in diffusers)
    correct the x_0 prediction, so need dpmsolver++. The model receives fractional
    timesteps tau = N t - 1 in [0, N - 1] (float32, float64 for float64 samples).
    A learned-sigma model's variance channels are ignored. y, cfg_scale, cfg_channels,
    cond_fn (eps <- eps - sigma_t * cond_fn(x, tau, y)), noise, seed, device, dtype,
    progress: as ddim_sample.
    """
    _check_args(diffusion, steps, order, method, algorithm, skip_type, solver_type,
                clip_denoised, thresholding)
    if cond_fn is not None and y is None:
        raise ValueError("dpm_solver_sample: classifier guidance (cond_fn) needs target labels y")
    x, _ = _initial_state("dpm_solver_sample", shape, noise, y, seed, device, dtype)
    model_fn = guided_model_fn(as_denoiser(model), y, x.shape[0], cfg_scale, cfg_channels,
                               classifier_guided=cond_fn is not None)
    schedule = DiscreteVPSchedule(diffusion.alphas_cumprod)
    time_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    data_prediction = algorithm == "dpmsolver++"

    def predict(x_t: Tensor, t: float) -> Tensor:
        tau = torch.full((x_t.shape[0],), schedule.model_timestep(t), dtype=time_dtype,
                         device=x_t.device)
        eps, _ = diffusion.split_model_output(model_fn(x_t, tau), x_t)
        alpha, sigma = schedule.alpha_sigma(t)
        if cond_fn is not None:
            eps = eps - sigma * _cond_grad(cond_fn, x_t, tau, y)
        if not data_prediction:
            return eps
        x0 = (x_t - sigma * eps) / alpha
        if thresholding:
            x0 = dynamic_threshold(x0, dynamic_thresholding_ratio, sample_max_value)
        return x0.clamp(-1, 1) if clip_denoised else x0

    solver = _Solver(schedule, predict, data_prediction, solver_type)
    with torch.no_grad():
        if method == "multistep":
            x = _run_multistep(solver, x, steps, order, skip_type, lower_order_final, progress)
        else:
            x = _run_singlestep(solver, x, steps, order, skip_type, progress)
        if denoise_to_zero:
            prediction = predict(x, schedule.t_end)
            if data_prediction:
                x = prediction
            else:
                alpha, sigma = schedule.alpha_sigma(schedule.t_end)
                x = (x - sigma * prediction) / alpha
    return x


def _run_multistep(solver: _Solver, x: Tensor, steps: int, order: int, skip_type: str,
                   lower_order_final: bool, progress: bool) -> Tensor:
    ns = solver.ns
    times = ns.time_steps(skip_type, ns.t_start, ns.t_end, steps)
    models, visited = [], []
    for i in _progress(range(steps), progress, steps, "dpm-solver"):
        models.append(solver.predict(x, times[i]))
        visited.append(times[i])
        # Warm-up: step i has only i + 1 model outputs to extrapolate from.
        step_order = min(order, i + 1)
        if lower_order_final and steps < LOWER_ORDER_FINAL_BELOW:
            step_order = min(step_order, steps - i)
        x = solver.multistep(x, models, visited, times[i + 1], step_order)
        # The next update extrapolates from at most order - 1 of these.
        del models[:len(models) - (order - 1)], visited[:len(visited) - (order - 1)]
    return x


def _run_singlestep(solver: _Solver, x: Tensor, steps: int, order: int, skip_type: str,
                    progress: bool) -> Tensor:
    ns = solver.ns
    orders = _singlestep_plan(steps, order)
    if skip_type == "logSNR":
        outer = ns.time_steps(skip_type, ns.t_start, ns.t_end, len(orders))
    else:
        # The steps' ends are the grid points a model call would land on.
        grid = ns.time_steps(skip_type, ns.t_start, ns.t_end, steps)
        outer = [grid[int(k)] for k in np.cumsum([0] + orders)]
    for i in _progress(range(len(orders)), progress, len(orders), "dpm-solver"):
        s, t, step_order = outer[i], outer[i + 1], orders[i]
        # Intermediate points where the skip type would put them inside [s, t].
        inner = [ns.lambda_(u) for u in ns.time_steps(skip_type, s, t, step_order)]
        h = inner[-1] - inner[0]
        r1 = (inner[1] - inner[0]) / h if step_order > 1 else 0.0
        r2 = (inner[2] - inner[0]) / h if step_order > 2 else 0.0
        x = solver.singlestep(x, s, t, step_order, r1, r2)
    return x
