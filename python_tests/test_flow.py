"""Flow matching: the rectified-flow loss, its time sampling, Euler and Heun samplers.

Expected values come from closed forms: straight paths for point-mass data and the
exact (affine) flow of Gaussian data, never from the code under test.
"""

import math

import pytest
import torch

from ditkernels.diffusion import RectifiedFlow, as_denoiser, flow_sample
from test_diffusion import _package_models

pytestmark = pytest.mark.usefixtures("one_thread")

MU, STD = 0.3, 0.5


def _point_mass_velocity(x0):
    """The exact velocity for data that is exactly x0: paths are straight lines from
    x0 to the noise, so v(x_t, t) = (x_t - x0) / t; the model sees 1000 t."""

    def model(x, tau, y):
        return (x - x0) / (tau.to(x.dtype) / 1000).view(-1, 1, 1, 1)

    return model


def _gaussian_velocity(x, tau, y):
    """E[noise - x0 | x_t] for x0 ~ N(MU, STD^2) per element: affine in x_t."""
    t = (tau.to(x.dtype) / 1000).view(-1, 1, 1, 1)
    var = (1 - t) ** 2 * STD ** 2 + t ** 2
    centred = x - (1 - t) * MU
    return t * centred / var - (MU + (1 - t) * STD ** 2 * centred / var)


@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("steps", [1, 3, 10])
def test_exact_velocity_reproduces_point_mass_data(method, steps):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 2, 4, 4, generator=gen, dtype=torch.float64) * 2 - 1
    noise = torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64)
    out = flow_sample(_point_mass_velocity(x0), noise=noise, steps=steps, method=method,
                      progress=False)
    torch.testing.assert_close(out, x0, atol=1e-12, rtol=0)


@pytest.mark.parametrize("method,order", [("euler", 1), ("heun", 2)])
def test_convergence_order_on_the_gaussian_flow(method, order):
    # Gaussian data's flow is the linear ODE dx/dt = a(t) x + b(t), solved by the
    # quantile map x_0 = MU + STD x_1.
    noise = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(1),
                        dtype=torch.float64)
    exact = MU + STD * noise
    errors = [(flow_sample(_gaussian_velocity, noise=noise, steps=steps, method=method,
                           progress=False) - exact).abs().max().item() for steps in (32, 64)]
    observed = math.log2(errors[0] / errors[1])
    assert abs(observed - order) < 0.15, (errors, observed)


def test_loss_is_the_velocity_error():
    flow = RectifiedFlow()
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn(5, 2, 3, 3, generator=gen, dtype=torch.float64)
    noise = torch.randn(5, 2, 3, 3, generator=gen, dtype=torch.float64)
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    seen = {}

    def zero_model(x, tau, y):
        seen["x"], seen["tau"] = x, tau
        return torch.zeros_like(x)

    terms = flow.training_losses(zero_model, x0, t, noise=noise)
    expected_x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    torch.testing.assert_close(seen["x"], expected_x_t, atol=1e-15, rtol=0)
    torch.testing.assert_close(seen["tau"], 1000 * t)
    torch.testing.assert_close(terms["loss"], ((noise - x0) ** 2).mean(dim=(1, 2, 3)))
    # The exact velocity of this noise-data pairing has zero loss; a learned-sigma
    # model's second half is not part of it.
    exact = flow.training_losses(
        as_denoiser(lambda x, tau, y: torch.cat([noise - x0, torch.randn_like(x)], 1),
                    in_channels=2, learn_sigma=True), x0, t, noise=noise)
    assert exact["loss"].abs().max() == 0


def test_time_sampling_distributions():
    gen = torch.Generator().manual_seed(3)
    n = 200_000
    uniform = RectifiedFlow(t_sampling="uniform").sample_t(n, gen, dtype=torch.float64)
    assert uniform.min() >= 0 and uniform.max() < 1
    # U(0, 1): mean 1/2, variance 1/12, standard errors ~6e-4 and ~2e-4.
    assert abs(uniform.mean() - 0.5) < 4e-3 and abs(uniform.var() - 1 / 12) < 2e-3
    t = RectifiedFlow(t_sampling="logit_normal", logit_mean=0.5, logit_std=0.8).sample_t(
        n, gen, dtype=torch.float64)
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean() - 0.5) < 1e-2 and abs(logit.std() - 0.8) < 1e-2


def test_seeded_sampling_is_reproducible():
    model = lambda x, tau, y: torch.tanh(x) + tau.view(-1, 1, 1, 1) / 1000  # noqa: E731
    a = flow_sample(model, (2, 1, 3, 3), steps=4, seed=5, progress=False)
    b = flow_sample(model, (2, 1, 3, 3), steps=4, seed=5, progress=False)
    c = flow_sample(model, (2, 1, 3, 3), steps=4, seed=6, progress=False)
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_cfg_guides_the_velocity(method):
    # Guided sampling equals sampling the unconditional model whose velocity is the
    # guided combination, computed here by hand; the guided run batches [cond; uncond].
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(2, 2, generator=gen, dtype=torch.float64) * 0.3
    shift = torch.randn(4, generator=gen, dtype=torch.float64)
    calls = []

    def conditional(x, tau, y):
        calls.append(y.tolist())
        return (torch.einsum("oc,bchw->bohw", w, torch.tanh(x)) + shift[y].view(-1, 1, 1, 1)
                + tau.view(-1, 1, 1, 1) / 1000)

    y = torch.tensor([0, 2])
    scale = 2.5

    def guided_by_hand(x, tau, _):
        cond = conditional(x, tau, y)
        uncond = conditional(x, tau, torch.full_like(y, 3))
        return uncond + scale * (cond - uncond)

    noise = torch.randn(2, 2, 3, 3, generator=gen, dtype=torch.float64)
    model = as_denoiser(conditional, in_channels=2, num_classes=3, null_class=3)
    guided = flow_sample(model, noise=noise, steps=5, method=method, y=y, cfg_scale=scale,
                         progress=False)
    assert calls and all(labels == [0, 2, 3, 3] for labels in calls)
    by_hand = flow_sample(guided_by_hand, noise=noise, steps=5, method=method, progress=False)
    torch.testing.assert_close(guided, by_hand, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(steps=0), "flow_sample: steps must be a positive integer, got 0"),
    (dict(steps=3, method="rk4"), "flow_sample: unknown method 'rk4'"),
])
def test_bad_sampler_arguments_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        flow_sample(lambda x, t, y: x, (1, 1, 2, 2), progress=False, **kwargs)


def test_bad_flow_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="RectifiedFlow: unknown t_sampling 'beta'"):
        RectifiedFlow(t_sampling="beta")
    with pytest.raises(ValueError, match="RectifiedFlow: logit_std must be > 0"):
        RectifiedFlow(t_sampling="logit_normal", logit_std=0.0)
    with pytest.raises(ValueError, match="t must have shape \\[2\\]"):
        RectifiedFlow().training_losses(lambda x, t, y: x, torch.zeros(2, 1, 2, 2),
                                        torch.zeros(3))


@pytest.mark.parametrize("name", ["dit", "diffit", "diffit_unet", "uvit", "uvit_uncond"])
def test_package_models_train_and_sample_with_flow_matching(name):
    torch.manual_seed(0)
    model, overrides = _package_models()[name]
    denoiser = as_denoiser(model, **overrides)
    conditional = name != "uvit_uncond"
    flow = RectifiedFlow(t_sampling="logit_normal")
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    y = torch.tensor([0, 1, 2, 1]) if conditional else None
    loss = flow.training_losses(denoiser, x0, flow.sample_t(4), y)["loss"]
    loss.mean().backward()
    assert torch.isfinite(loss).all()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())

    model.eval()
    out = flow_sample(denoiser, (4, 1, 8, 8), steps=2, method="heun", y=y,
                      cfg_scale=2.0 if conditional else 1.0, seed=0, progress=False)
    assert out.shape == (4, 1, 8, 8) and torch.isfinite(out).all()
