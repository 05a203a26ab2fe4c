"""DPM-Solver / DPM-Solver++ (ditkernels.diffusion.dpm_solver_sample).

Expected values come from closed forms (point-mass and Gaussian data, whose
probability-flow ODE is solved exactly), from DDIM (DPM-Solver-1 is DDIM) and from
diffusers' DPMSolverMultistepScheduler, never from the code under test.
"""

import math

import numpy as np
import pytest
import torch

from ditkernels.diffusion import create_diffusion, ddim_sample, dpm_solver_sample
from ditkernels.diffusion import dynamic_threshold

pytestmark = pytest.mark.usefixtures("one_thread")

N = 1000


def _alpha_sigma(base, tau):
    """alpha, sigma of the continuous-time VP at (fractional) model timesteps tau,
    computed independently: log alpha is piecewise linear between the integer
    timesteps, where it is 0.5 log abar."""
    half_log_abar = 0.5 * np.log(base.alphas_cumprod.numpy())
    log_alpha = np.interp(tau.detach().cpu().double().numpy(), np.arange(N), half_log_abar)
    alpha = torch.tensor(np.exp(log_alpha), dtype=torch.float64).view(-1, 1, 1, 1)
    return alpha, (1 - alpha ** 2).sqrt()


def _point_mass_oracle(base, x0, learn_sigma=False):
    """The exact eps model for data that is exactly x0."""

    def model(x, t, y):
        alpha, sigma = _alpha_sigma(base, t)
        eps = (x - alpha * x0) / sigma
        return torch.cat([eps, torch.zeros_like(eps)], 1) if learn_sigma else eps

    return model


MU, STD = 0.3, 0.5


def _gaussian_oracle(base):
    """The exact eps model for data x0 ~ N(MU, STD^2) per element."""

    def model(x, t, y):
        alpha, sigma = _alpha_sigma(base, t)
        x0 = MU + alpha * STD ** 2 * (x - alpha * MU) / (alpha ** 2 * STD ** 2 + sigma ** 2)
        return (x - alpha * x0) / sigma

    return model


def _gaussian_flow_solution(base, noise):
    """The probability-flow ODE from timestep N - 1 to 0 maps each element's quantile
    to the same quantile: x_0 = alpha_0 MU + (x_T - alpha_T MU) std_0 / std_T."""
    (a_T, s_T), (a_0, s_0) = (_alpha_sigma(base, torch.tensor([float(t)])) for t in (N - 1, 0))
    std_T, std_0 = (a_T ** 2 * STD ** 2 + s_T ** 2).sqrt(), (a_0 ** 2 * STD ** 2 + s_0 ** 2).sqrt()
    return a_0 * MU + (noise - a_T * MU) * std_0 / std_T


def _fixed_random_model(channels=2, num_classes=0, null_class=None):
    from ditkernels.diffusion import as_denoiser

    gen = torch.Generator().manual_seed(123)
    w = torch.randn(channels, channels, generator=gen, dtype=torch.float64) * 0.3
    class_shift = torch.randn(num_classes + 1, generator=gen, dtype=torch.float64)

    def model(x, t, y):
        out = torch.einsum("oc,bchw->bohw", w.to(x.dtype), torch.tanh(x))
        out = out + (t.to(x.dtype) / 1000).view(-1, 1, 1, 1)
        if y is not None:
            out = out + class_shift.to(x.dtype)[y].view(-1, 1, 1, 1)
        return out

    return as_denoiser(model, in_channels=channels, num_classes=num_classes,
                       null_class=null_class)


ALL_SOLVERS = [(alg, method, order) for alg in ("dpmsolver++", "dpmsolver")
               for method in ("multistep", "singlestep") for order in (1, 2, 3)]


# ---------------------------------------------------------------------------
# closed forms
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm,method,order", ALL_SOLVERS)
@pytest.mark.parametrize("skip_type", ["time_uniform", "logSNR", "time_quadratic"])
def test_point_mass_oracle_is_integrated_exactly(algorithm, method, order, skip_type):
    # For data that is exactly x0 the ODE solution is x_t = alpha_t x0 + sigma_t e with
    # e fixed by x_T; its eps and x0 predictions are constant along it, so every
    # order's correction terms vanish and each update is exact.
    base = create_diffusion(learn_sigma=True)
    gen = torch.Generator().manual_seed(4)
    x0 = torch.rand(3, 2, 4, 4, generator=gen, dtype=torch.float64) * 2 - 1
    noise = torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64)
    model = _point_mass_oracle(base, x0, learn_sigma=True)
    kwargs = dict(noise=noise, steps=7, order=order, method=method, algorithm=algorithm,
                  skip_type=skip_type, progress=False)

    a_T, s_T = base.alphas_cumprod[-1].sqrt(), (1 - base.alphas_cumprod[-1]).sqrt()
    a_0, s_0 = base.alphas_cumprod[0].sqrt(), (1 - base.alphas_cumprod[0]).sqrt()
    expected = a_0 * x0 + s_0 * (noise - a_T * x0) / s_T
    out = dpm_solver_sample(base, model, **kwargs)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    # The extra model call of denoise_to_zero lands on x0 itself.
    out = dpm_solver_sample(base, model, denoise_to_zero=True, **kwargs)
    torch.testing.assert_close(out, x0, atol=1e-12, rtol=0)


# (method, order, solver_type) -> the least convergence order observed between 48 and
# 96 logSNR-uniform steps. A multistep solver's warm-up starts with a first-order
# step whose O(h^2) local error caps its global order at 2; singlestep reaches its
# order (the third-order one its asymptotic order of 3 and more).
CONVERGENCE = [("multistep", 1, "dpmsolver", 1), ("multistep", 2, "dpmsolver", 2),
               ("multistep", 2, "taylor", 2), ("multistep", 3, "dpmsolver", 2),
               ("singlestep", 2, "dpmsolver", 2), ("singlestep", 2, "taylor", 2),
               ("singlestep", 3, "dpmsolver", 3), ("singlestep", 3, "taylor", 3)]


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "dpmsolver"])
@pytest.mark.parametrize("method,order,solver_type,expected_order", CONVERGENCE)
def test_convergence_order_on_gaussian_data(algorithm, method, order, solver_type,
                                            expected_order):
    base = create_diffusion(learn_sigma=False)
    noise = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(0),
                        dtype=torch.float64)
    exact = _gaussian_flow_solution(base, noise)
    errors = []
    for steps in (48, 96):
        out = dpm_solver_sample(base, _gaussian_oracle(base), noise=noise, steps=steps,
                                order=order, method=method, algorithm=algorithm,
                                skip_type="logSNR", solver_type=solver_type,
                                lower_order_final=False, progress=False)
        errors.append((out - exact).abs().max().item())
    observed = math.log2(errors[0] / errors[1])
    assert observed > expected_order - 0.15, (errors, observed)


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "dpmsolver"])
@pytest.mark.parametrize("with_cond_fn", [False, True])
def test_first_order_is_ddim(algorithm, with_cond_fn):
    # 27 time-uniform steps visit the integer timesteps 999, 962, ..., 37, 0: the
    # respacing "28" of DDIM. DDIM's last step returns its x0 prediction at t = 0,
    # which is denoise_to_zero. Classifier guidance shifts eps by -sigma_t * grad in both.
    base = create_diffusion(learn_sigma=False)
    model = _fixed_random_model(num_classes=3, null_class=3)
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1),
                        dtype=torch.float64)
    y = torch.tensor([0, 2, 1])
    cond_fn = (lambda x, t, y: 0.1 * torch.sin(x) + 0.01 * y.view(-1, 1, 1, 1)) \
        if with_cond_fn else None
    ours = dpm_solver_sample(base, model, noise=noise, steps=27, order=1, algorithm=algorithm,
                             skip_type="time_uniform", y=y, cond_fn=cond_fn, cfg_scale=2.0,
                             denoise_to_zero=True, progress=False)
    ddim = ddim_sample(base.respaced("28"), model, noise=noise, y=y, cond_fn=cond_fn,
                       cfg_scale=2.0, progress=False)
    torch.testing.assert_close(ours, ddim, atol=1e-9, rtol=1e-9)


# ---------------------------------------------------------------------------
# diffusers
# ---------------------------------------------------------------------------


# diffusers deprecates its algorithm_type "dpmsolver" and warns about numpy's copy=.
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize("algorithm", ["dpmsolver++", "dpmsolver"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("steps", [9, 27])
def test_multistep_matches_diffusers(algorithm, order, steps):
    """diffusers' DPMSolverMultistepScheduler with the mapping:

    trained_betas = our betas; timestep_spacing "linspace" visits
    round(linspace(999, 0, steps + 1))[:-1] and ends at final_sigmas_type
    "sigma_min" (timestep 0); our time_uniform grid t = linspace(1, 1/N, steps + 1)
    is the model timesteps linspace(999, 0, steps + 1), the same points when steps
    divides 999 (9, 27, 37, ...), where diffusers' rounding is exact. Its "midpoint"
    solver_type is the reference code's (and our) "dpmsolver"; both drop to lower
    orders at the end below 15 steps. diffusers computes in float32.
    """
    diffusers = pytest.importorskip("diffusers")
    base = create_diffusion(learn_sigma=False)
    gaussian = _gaussian_oracle(base)
    w = torch.randn(2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def model(x, t, y):
        # A realistic denoiser (Gaussian data) plus a nonlinear perturbation.
        t = t.to(torch.float64)
        eps = gaussian(x.double(), t, y) + 0.2 * torch.einsum("oc,bchw->bohw", w,
                                                              torch.tanh(x.double()))
        return eps.to(x.dtype)

    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=N, trained_betas=base.betas.numpy(), solver_order=order,
        algorithm_type=algorithm, solver_type="midpoint", lower_order_final=True,
        timestep_spacing="linspace", final_sigmas_type="sigma_min",
        prediction_type="epsilon")
    scheduler.set_timesteps(steps)
    assert scheduler.timesteps.tolist() == [round(999 - i * 999 / steps) for i in range(steps)]
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(5))
    x = noise.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t.expand(x.shape[0]), None), t, x).prev_sample
    ours = dpm_solver_sample(base, model, noise=noise.double(), steps=steps, order=order,
                             algorithm=algorithm, skip_type="time_uniform", progress=False)
    scale = ours.abs().max().item()
    torch.testing.assert_close(x.double(), ours, atol=2e-5 * scale, rtol=0)


def test_dynamic_threshold_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DPMSolverMultistepScheduler(thresholding=True,
                                                      dynamic_thresholding_ratio=0.9,
                                                      sample_max_value=1.5)
    x0 = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0)) * 1.3
    torch.testing.assert_close(dynamic_threshold(x0, 0.9, 1.5), scheduler._threshold_sample(x0))


# ---------------------------------------------------------------------------
# arguments, determinism, guidance
# ---------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible():
    base = create_diffusion(learn_sigma=False)
    model = _fixed_random_model()
    kwargs = dict(steps=6, progress=False)
    a = dpm_solver_sample(base, model, (2, 2, 3, 3), seed=7, **kwargs)
    b = dpm_solver_sample(base, model, (2, 2, 3, 3), seed=7, **kwargs)
    c = dpm_solver_sample(base, model, (2, 2, 3, 3), seed=8, **kwargs)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    torch.manual_seed(0)
    d = dpm_solver_sample(base, model, noise=a.clone(), **kwargs)
    torch.manual_seed(1)
    e = dpm_solver_sample(base, model, noise=a.clone(), **kwargs)
    assert torch.equal(d, e)


def test_thresholding_and_clipping_bound_the_x0_prediction():
    # One step from pure noise, then the x0 prediction at timestep 0: the output is a
    # corrected x0 prediction, which this model (it knows nothing of [-1, 1]) exceeds.
    base = create_diffusion(learn_sigma=False)
    kwargs = dict(steps=1, seed=0, denoise_to_zero=True, progress=False)
    raw = dpm_solver_sample(base, _fixed_random_model(), (2, 2, 3, 3), **kwargs)
    assert raw.abs().max() > 1.5
    for correction in (dict(clip_denoised=True),
                       dict(thresholding=True, sample_max_value=4.0,
                            dynamic_thresholding_ratio=0.5)):
        out = dpm_solver_sample(base, _fixed_random_model(), (2, 2, 3, 3), **kwargs,
                                **correction)
        assert out.abs().max() <= 1.0 + 1e-6


ONLY_DATA_PREDICTION = "clip_denoised and thresholding .*only algorithm='dpmsolver\\+\\+'"


@pytest.mark.parametrize("kwargs,match", [
    (dict(order=4), "order must be 1, 2 or 3, got 4"),
    (dict(order=0), "order must be 1, 2 or 3, got 0"),
    (dict(steps=0), "steps must be a positive integer, got 0"),
    (dict(steps=2.5), "steps must be a positive integer, got 2.5"),
    (dict(skip_type="karras"), "unknown skip_type 'karras'; expected one of"),
    (dict(method="adaptive"), "unknown method 'adaptive'"),
    (dict(algorithm="sde-dpmsolver++"), "unknown algorithm 'sde-dpmsolver\\+\\+'"),
    (dict(solver_type="heun"), "unknown solver_type 'heun'"),
    (dict(algorithm="dpmsolver", thresholding=True), ONLY_DATA_PREDICTION),
    (dict(algorithm="dpmsolver", clip_denoised=True), ONLY_DATA_PREDICTION),
])
def test_bad_arguments_are_clear_errors(kwargs, match):
    base = create_diffusion(learn_sigma=False)
    args = dict(steps=5) | kwargs
    with pytest.raises(ValueError, match="dpm_solver_sample: " + match):
        dpm_solver_sample(base, _fixed_random_model(), (1, 2, 2, 2), progress=False, **args)


def test_respaced_diffusion_is_rejected():
    with pytest.raises(ValueError, match="pass the full \\(unrespaced\\) diffusion"):
        dpm_solver_sample(create_diffusion("ddim10", learn_sigma=False), _fixed_random_model(),
                          (1, 2, 2, 2), steps=5, progress=False)


@pytest.mark.parametrize("skip_type", ["logSNR", "time_quadratic"])
def test_step_placement(skip_type):
    base = create_diffusion(learn_sigma=False)
    taus = []

    def model(x, t, y):
        taus.append(float(t[0]))
        return torch.zeros_like(x)

    dpm_solver_sample(base, model, (1, 1, 2, 2), steps=6, skip_type=skip_type,
                      denoise_to_zero=True, dtype=torch.float64, progress=False)
    taus = torch.tensor(taus, dtype=torch.float64)
    # Six steps from timestep 999, then the denoise_to_zero call at timestep 0.
    assert taus[0] == N - 1 and taus[-1] == 0
    if skip_type == "logSNR":
        alpha, sigma = _alpha_sigma(base, taus)
        spacing = torch.diff(torch.log(alpha / sigma).flatten())
    else:
        spacing = torch.diff(((taus + 1) / N).sqrt())
    torch.testing.assert_close(spacing, spacing[:1].expand_as(spacing), rtol=1e-9, atol=0)


def test_cfg_and_labels_reach_the_model():
    base = create_diffusion(learn_sigma=False)
    calls = []
    inner = _fixed_random_model(num_classes=3, null_class=3)

    def model(x, t, y):
        calls.append((x.shape[0], y.clone(), t.clone()))
        return inner(x, t, y)

    from ditkernels.diffusion import as_denoiser

    denoiser = as_denoiser(inner, forward=model)
    y = torch.tensor([0, 2])
    dpm_solver_sample(base, denoiser, (2, 2, 3, 3), steps=4, y=y, cfg_scale=3.0, cfg_channels=1,
                      skip_type="time_uniform", seed=0, progress=False)
    # One batched [cond; uncond] call per step, at the time-uniform timesteps N t - 1.
    assert len(calls) == 4
    for batch, labels, t in calls:
        assert batch == 4 and labels.tolist() == [0, 2, 3, 3]
    torch.testing.assert_close(torch.stack([c[2][0] for c in calls]),
                               torch.tensor([999.0, 749.25, 499.5, 249.75]))
