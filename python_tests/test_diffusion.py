"""ditkernels.diffusion: schedules, forward process, losses, respacing, samplers, guidance.

Expected values come from closed forms or from independent derivations (Bayes' rule
for the posterior, torch.distributions for the KL), never from the code under test.
"""

import math
import sys

import pytest
import torch
import torch.nn as nn

from ditkernels.diffusion import (
    DiffusionModelAdapter,
    GaussianDiffusion,
    as_denoiser,
    cfg_forward,
    classifier_free_guidance,
    create_diffusion,
    ddim_sample,
    ddim_step,
    ddpm_sample,
    ddpm_step,
    discretized_gaussian_log_likelihood,
    get_named_beta_schedule,
    normal_kl,
    space_timesteps,
)

# Every tensor here is tiny: see conftest.one_thread.
pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _timestep_features(t, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class TinyDenoiser(nn.Module):
    """An MLP denoiser with DiT's duck-typed attributes (in_channels, learn_sigma,
    num_classes, class_dropout_prob) but not DiT's layout."""

    def __init__(self, channels=1, size=4, num_classes=2, learn_sigma=False, hidden=64,
                 class_dropout_prob=0.1):
        super().__init__()
        self.in_channels = channels
        self.learn_sigma = learn_sigma
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob
        dim = channels * size * size
        self.hidden = hidden
        self.inp = nn.Linear(dim, hidden)
        self.label = nn.Embedding(num_classes + 1, hidden)
        self.net = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, dim * (2 if learn_sigma else 1)))

    def forward(self, x, t, y):
        h = self.inp(x.flatten(1)) + _timestep_features(t, self.hidden) + self.label(y)
        return self.net(h).view(x.shape[0], -1, *x.shape[2:])


def _oracle(base: GaussianDiffusion, x0: torch.Tensor, learn_sigma: bool):
    """A perfect eps model for data that is exactly x0: it is called with original
    timesteps, so it reads abar from the unrespaced diffusion."""

    def model(x_t, t, y):
        abar = base.alphas_cumprod[t].to(x_t.dtype).view(-1, 1, 1, 1)
        eps = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], 1) if learn_sigma else eps

    return as_denoiser(model, in_channels=x0.shape[1], learn_sigma=learn_sigma)


def _fixed_random_model(channels=2, learn_sigma=False, num_classes=0, null_class=None):
    """A deterministic, nonlinear function of (x, t, y) standing in for a network."""
    gen = torch.Generator().manual_seed(123)
    w = torch.randn(channels * (2 if learn_sigma else 1), channels, generator=gen,
                    dtype=torch.float64) * 0.3
    class_shift = torch.randn(max(num_classes + 1, 1), generator=gen, dtype=torch.float64)

    def model(x, t, y):
        out = torch.einsum("oc,bchw->bohw", w.to(x.dtype), torch.tanh(x))
        out = out + (t.to(x.dtype) / 1000).view(-1, 1, 1, 1)
        if y is not None:
            out = out + class_shift.to(x.dtype)[y].view(-1, 1, 1, 1)
        if learn_sigma:
            out = torch.cat([out[:, :channels], torch.tanh(out[:, channels:])], 1)
        return out

    return as_denoiser(model, in_channels=channels, learn_sigma=learn_sigma,
                       num_classes=num_classes, null_class=null_class)


# ---------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1000, 250, 7])
def test_linear_schedule_closed_form(T):
    betas = get_named_beta_schedule("linear", T)
    s = 1000 / T
    expected = [s * 1e-4 + (s * 0.02 - s * 1e-4) * i / (T - 1) for i in range(T)]
    assert betas.dtype == torch.float64
    torch.testing.assert_close(betas, torch.tensor(expected, dtype=torch.float64), atol=1e-15,
                               rtol=1e-12)


def test_linear_default_matches_dit():
    # DiT trains on 1000 linear steps from 1e-4 to 0.02.
    betas = create_diffusion().betas
    assert betas.numel() == 1000
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)


@pytest.mark.parametrize("T", [1000, 50])
def test_cosine_schedule_closed_form(T):
    betas = get_named_beta_schedule("cosine", T)

    def f(t):
        return math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2

    abar = torch.cumprod(1 - betas, 0)
    unclipped = int((betas < 0.999).sum())
    expected = torch.tensor([f(t + 1) / f(0) for t in range(unclipped)], dtype=torch.float64)
    torch.testing.assert_close(abar[:unclipped], expected, atol=1e-12, rtol=1e-10)
    assert bool((betas <= 0.999).all()) and betas[-1].item() == pytest.approx(0.999)


def test_scaled_linear_schedule_closed_form():
    T = 1000
    betas = get_named_beta_schedule("scaled_linear", T)
    a, b = math.sqrt(0.00085), math.sqrt(0.012)
    expected = torch.tensor([(a + (b - a) * i / (T - 1)) ** 2 for i in range(T)],
                            dtype=torch.float64)
    torch.testing.assert_close(betas, expected, atol=1e-15, rtol=1e-12)


def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown noise schedule 'quadratic'.*linear"):
        get_named_beta_schedule("quadratic", 1000)
    with pytest.raises(ValueError, match="unknown noise schedule"):
        create_diffusion(noise_schedule="cosin")


# ---------------------------------------------------------------------------
# forward process, posterior, likelihood terms
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("step", [0, 100, 500, 999])
def test_q_sample_statistics(step):
    d = create_diffusion()
    n = 200_000
    x0 = torch.full((n, 1, 1, 1), 0.7, dtype=torch.float64)
    t = torch.full((n,), step, dtype=torch.int64)
    xt = d.q_sample(x0, t, generator=torch.Generator().manual_seed(0)).flatten()
    abar = float(torch.prod(1 - d.betas[:step + 1]))
    mean, var = math.sqrt(abar) * 0.7, 1 - abar
    # 5 standard errors of the sample mean and of the sample variance.
    assert abs(xt.mean().item() - mean) < 5 * math.sqrt(var / n)
    assert abs(xt.var().item() - var) < 5 * var * math.sqrt(2 / n)


def test_q_posterior_matches_bayes_rule():
    d = create_diffusion(noise_schedule="cosine")
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(6, 2, 3, 3, generator=gen, dtype=torch.float64)
    xt = torch.randn(6, 2, 3, 3, generator=gen, dtype=torch.float64)
    t = torch.tensor([1, 2, 10, 300, 700, 999])
    mean, var, _ = d.q_posterior_mean_variance(x0, xt, t)
    for i, step in enumerate(t.tolist()):
        beta = float(d.betas[step])
        abar_prev = float(torch.prod(1 - d.betas[:step]))
        # q(x_{t-1}|x_0) = N(sqrt(abar_prev) x0, 1 - abar_prev), q(x_t|x_{t-1}) =
        # N(sqrt(1-beta) x_{t-1}, beta): multiply the two Gaussians in x_{t-1}.
        precision = 1 / (1 - abar_prev) + (1 - beta) / beta
        post_mean = (math.sqrt(abar_prev) * x0[i] / (1 - abar_prev)
                     + math.sqrt(1 - beta) * xt[i] / beta) / precision
        torch.testing.assert_close(mean[i], post_mean, atol=1e-10, rtol=1e-9)
        assert var[i].item() == pytest.approx(1 / precision, rel=1e-9)


def test_normal_kl_matches_torch_distributions():
    gen = torch.Generator().manual_seed(2)
    m1, m2, lv1, lv2 = torch.randn(4, 50, generator=gen, dtype=torch.float64)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * lv1).exp()),
        torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected)


def test_discretized_log_likelihood_is_a_distribution_over_256_levels():
    levels = -1 + 2 * torch.arange(256, dtype=torch.float64) / 255
    gen = torch.Generator().manual_seed(3)
    means = torch.rand(5, 1, generator=gen, dtype=torch.float64) * 2.4 - 1.2
    log_scales = torch.tensor([-6.0, -3.0, -1.0, 0.0, 1.0], dtype=torch.float64)[:, None]
    logp = discretized_gaussian_log_likelihood(levels[None].expand(5, 256), means, log_scales)
    torch.testing.assert_close(logp.exp().sum(1), torch.ones(5, dtype=torch.float64),
                               atol=1e-8, rtol=0)


def test_learned_range_interpolates_between_posterior_and_beta():
    d = create_diffusion(learn_sigma=True)
    x = torch.zeros(3, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([1, 400, 999])
    for v, expected in ((-1.0, d.posterior_log_variance_clipped[t]), (1.0, d.betas[t].log())):
        out = torch.cat([torch.zeros_like(x), torch.full_like(x, v)], 1)
        log_var = d.p_mean_variance(out, x, t)["log_variance"]
        torch.testing.assert_close(log_var[:, 0, 0, 0], expected)


def test_model_variance_types():
    assert create_diffusion().model_var_type == "learned_range"
    assert create_diffusion(learn_sigma=False).model_var_type == "fixed_large"
    assert create_diffusion(learn_sigma=False, sigma_small=True).model_var_type == "fixed_small"


def test_learned_sigma_channel_mismatch_is_a_clear_error():
    d = create_diffusion(learn_sigma=True)
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="learned_range.*6 output channels"):
        d.p_mean_variance(torch.zeros(2, 3, 4, 4), x, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="3 output channels"):
        create_diffusion(learn_sigma=False).p_mean_variance(torch.zeros(2, 6, 4, 4), x,
                                                            torch.tensor([1, 2]))


# ---------------------------------------------------------------------------
# training losses
# ---------------------------------------------------------------------------


def test_vb_term_trains_only_the_variance():
    d = create_diffusion(learn_sigma=True)
    x0 = torch.rand(4, 1, 4, 4) * 2 - 1
    out = torch.randn(4, 2, 4, 4, requires_grad=True)
    terms = d.training_losses(lambda x, t, y: out * 1.0, x0, torch.tensor([0, 5, 500, 999]))
    terms["vb"].sum().backward()
    assert bool((out.grad[:, :1] == 0).all())
    assert out.grad[:, 1:].abs().sum() > 0
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_training_loss_decreases_on_a_tiny_problem(learn_sigma):
    torch.manual_seed(0)
    d = create_diffusion(learn_sigma=learn_sigma)
    protos = torch.tensor([[1.0, -1.0, 1.0, -1.0] * 4, [-1.0, -1.0, 1.0, 1.0] * 4]).view(2, 1, 4, 4)
    model = TinyDenoiser(learn_sigma=learn_sigma)
    gen = torch.Generator().manual_seed(0)
    y_eval = torch.randint(0, 2, (256,), generator=gen)
    t_eval = torch.randint(0, 1000, (256,), generator=gen)
    noise_eval = torch.randn(256, 1, 4, 4, generator=gen)

    def eval_loss():
        with torch.no_grad():
            return d.training_losses(model, protos[y_eval], t_eval, y_eval,
                                     noise_eval)["loss"].mean().item()

    before = eval_loss()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(200):
        y = torch.randint(0, 2, (64,), generator=gen)
        t = torch.randint(0, 1000, (64,), generator=gen)
        loss = d.training_losses(model, protos[y], t, y)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < 0.5 * before


# ---------------------------------------------------------------------------
# respacing
# ---------------------------------------------------------------------------


def test_respacing_ddim_uses_uniform_stride():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    d = create_diffusion("ddim50")
    assert d.num_timesteps == 50
    assert d.timestep_map.tolist() == list(range(0, 1000, 20))


@pytest.mark.parametrize("spec,total", [("250", 250), ("10,15,20", 45), (25, 25), ("1000", 1000)])
def test_respacing_sections(spec, total):
    steps = space_timesteps(1000, spec)
    assert len(steps) == total and len(set(steps)) == total
    assert steps == sorted(steps) and steps[0] == 0 and 0 <= steps[-1] <= 999
    if isinstance(spec, str) and "," in spec:
        # Section i of [0, 1000) holds exactly the i-th count.
        counts = [int(c) for c in spec.split(",")]
        bounds = [0, 334, 667, 1000]
        for i, c in enumerate(counts):
            assert sum(bounds[i] <= s < bounds[i + 1] for s in steps) == c
    else:
        assert steps[-1] == 999


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_respaced_diffusion_keeps_original_alphas_cumprod(schedule):
    base = create_diffusion(noise_schedule=schedule)
    for spec in ("ddim25", "100", "5,10"):
        sub = base.respaced(spec)
        torch.testing.assert_close(sub.alphas_cumprod, base.alphas_cumprod[sub.timestep_map])
    twice = base.respaced("100").respaced("ddim10")
    torch.testing.assert_close(twice.alphas_cumprod, base.alphas_cumprod[twice.timestep_map])


def test_sampler_gives_the_model_original_timesteps():
    d = create_diffusion("ddim10", learn_sigma=False)
    seen = []

    def model(x, t, y):
        seen.append(t.tolist())
        return torch.zeros_like(x)

    ddim_sample(d, model, (2, 1, 2, 2), progress=False)
    assert seen == [[s, s] for s in reversed(range(0, 1000, 100))]


@pytest.mark.parametrize("spec", ["ddim2000", "1001", "600,600", "ddim0", "fast", "10,x"])
def test_bad_respacing_is_a_clear_error(spec):
    with pytest.raises(ValueError, match="respacing"):
        space_timesteps(1000, spec)


def test_respacing_more_steps_than_schedule_names_both():
    with pytest.raises(ValueError, match="1200 steps but the schedule has only 1000"):
        create_diffusion("1200")


# ---------------------------------------------------------------------------
# samplers
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [None, "ddim10", "37"])
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_ddim_eta0_reproduces_x0_with_an_oracle(spec, learn_sigma):
    base = create_diffusion(learn_sigma=learn_sigma)
    d = base if spec is None else base.respaced(spec)
    gen = torch.Generator().manual_seed(4)
    x0 = torch.rand(3, 2, 4, 4, generator=gen, dtype=torch.float64) * 2 - 1
    noise = torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64)
    out = ddim_sample(d, _oracle(base, x0, learn_sigma), noise=noise, progress=False)
    torch.testing.assert_close(out, x0, atol=1e-9, rtol=0)


def test_ddim_eta0_is_deterministic_given_x_T():
    d = create_diffusion("ddim20", learn_sigma=True)
    model = _fixed_random_model(learn_sigma=True)
    noise = torch.randn(4, 2, 3, 3)
    torch.manual_seed(1)
    a = ddim_sample(d, model, noise=noise, progress=False)
    torch.manual_seed(2)
    b = ddim_sample(d, model, noise=noise, progress=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("sampler", [ddpm_sample, ddim_sample])
def test_seeded_sampling_is_reproducible(sampler):
    d = create_diffusion("20", learn_sigma=True)
    model = _fixed_random_model(learn_sigma=True)
    kwargs = dict(progress=False, eta=1.0) if sampler is ddim_sample else dict(progress=False)
    a = sampler(d, model, (4, 2, 3, 3), seed=7, **kwargs)
    b = sampler(d, model, (4, 2, 3, 3), seed=7, **kwargs)
    c = sampler(d, model, (4, 2, 3, 3), seed=8, **kwargs)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_ddim_eta1_is_ddpm_with_posterior_variance():
    # With sigma^2 equal to the posterior variance, DDIM's update is the DDPM posterior
    # mean written differently; the same seed draws the same noise in both.
    d = create_diffusion("50", learn_sigma=False, sigma_small=True)
    model = _fixed_random_model()
    kwargs = dict(seed=3, dtype=torch.float64, progress=False)
    a = ddpm_sample(d, model, (3, 2, 4, 4), **kwargs)
    b = ddim_sample(d, model, (3, 2, 4, 4), eta=1.0, **kwargs)
    torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_progress_bar_is_optional(monkeypatch):
    d = create_diffusion("ddim5", learn_sigma=False)
    model = _fixed_random_model()
    noise = torch.randn(2, 2, 3, 3)
    with_bar = ddim_sample(d, model, noise=noise, progress=True)
    # A None entry in sys.modules makes `import tqdm.auto` raise ImportError.
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    without_tqdm = ddim_sample(d, model, noise=noise, progress=True)
    assert torch.equal(with_bar, without_tqdm)


# ---------------------------------------------------------------------------
# classifier-free guidance
# ---------------------------------------------------------------------------


def _recording_model(learn_sigma, channels=4, null_class=10):
    calls = []
    inner = _fixed_random_model(channels, learn_sigma, num_classes=10, null_class=null_class)

    def model(x, t, y):
        calls.append((x.shape[0], y.clone()))
        return inner(x, t, y)

    return as_denoiser(inner, forward=model), inner, calls


def test_classifier_free_guidance_formula():
    gen = torch.Generator().manual_seed(5)
    c, u = torch.randn(2, 3, 4, generator=gen)
    for s in (0.0, 1.0, 1.5, 4.0):
        expected = u + s * (c - u)
        torch.testing.assert_close(classifier_free_guidance(c, u, s), expected)
    torch.testing.assert_close(classifier_free_guidance(c, u, 1.0), c)
    torch.testing.assert_close(classifier_free_guidance(c, u, 0.0), u)


@pytest.mark.parametrize("learn_sigma,channels", [(False, None), (True, None), (True, 3)])
def test_cfg_forward_batches_cond_and_uncond_once(learn_sigma, channels):
    model, inner, calls = _recording_model(learn_sigma)
    x = torch.randn(3, 4, 2, 2)
    t = torch.tensor([5, 500, 999])
    y = torch.tensor([1, 2, 3])
    scale = 2.5
    out = cfg_forward(model, x, t, y, scale, channels)
    assert len(calls) == 1 and calls[0][0] == 6
    assert calls[0][1].tolist() == [1, 2, 3, 10, 10, 10]
    cond, uncond = inner(x, t, y), inner(x, t, torch.full_like(y, 10))
    k = 4 if channels is None else channels
    torch.testing.assert_close(out[:, :k], uncond[:, :k] + scale * (cond[:, :k] - uncond[:, :k]))
    torch.testing.assert_close(out[:, k:], cond[:, k:])


def test_cfg_matches_dit_forward_with_cfg():
    from ditkernels.models import DiT

    torch.manual_seed(0)
    dit = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
              num_classes=10, learn_sigma=True).eval()
    # adaLN-Zero starts with a zero output; perturb so guidance has something to mix.
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    y = torch.tensor([3, 7])
    with torch.no_grad():
        ref = dit.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]),
                                   torch.cat([y, torch.full_like(y, 10)]), 4.0)[:2]
        ours = cfg_forward(as_denoiser(dit), x, t, y, 4.0, channels=3)
    torch.testing.assert_close(ours, ref)


def test_cfg_scale_one_runs_one_plain_forward():
    model, _, calls = _recording_model(False)
    d = create_diffusion("ddim3", learn_sigma=False)
    ddim_sample(d, model, (2, 4, 2, 2), y=torch.tensor([0, 9]), progress=False)
    assert [n for n, _ in calls] == [2, 2, 2]
    calls.clear()
    ddim_sample(d, model, (2, 4, 2, 2), y=torch.tensor([0, 9]), cfg_scale=3.0, progress=False)
    assert [n for n, _ in calls] == [4, 4, 4]


def test_conditional_model_without_labels_samples_the_null_class():
    model, _, calls = _recording_model(False)
    ddim_sample(create_diffusion("ddim2", learn_sigma=False), model, (3, 4, 2, 2),
                progress=False)
    assert all(y.tolist() == [10, 10, 10] for _, y in calls)


def test_guidance_errors_are_clear():
    d = create_diffusion("ddim2", learn_sigma=False)
    uncond = _fixed_random_model(4)
    with pytest.raises(ValueError, match="guidance scale 4.0 given to an unconditional model"):
        ddim_sample(d, uncond, (2, 4, 2, 2), cfg_scale=4.0, progress=False)
    with pytest.raises(ValueError, match="unconditional model"):
        ddim_sample(d, uncond, (2, 4, 2, 2), y=torch.tensor([1, 2]), progress=False)
    no_null = _fixed_random_model(4, num_classes=10, null_class=None)
    with pytest.raises(ValueError, match="without a null class"):
        ddim_sample(d, no_null, (2, 4, 2, 2), y=torch.tensor([1, 2]), cfg_scale=2.0,
                    progress=False)
    with pytest.raises(ValueError, match="no null class: pass labels"):
        ddim_sample(d, no_null, (2, 4, 2, 2), progress=False)
    cond = _fixed_random_model(4, num_classes=10, null_class=10)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 11\)"):
        ddim_sample(d, cond, (2, 4, 2, 2), y=torch.tensor([1, 11]), progress=False)
    with pytest.raises(ValueError, match="int64 of shape"):
        ddim_sample(d, cond, (2, 4, 2, 2), y=torch.tensor([1.0, 2.0]), progress=False)


# ---------------------------------------------------------------------------
# classifier guidance (ADM)
# ---------------------------------------------------------------------------


def test_ddpm_classifier_guidance_shifts_the_mean_by_sigma_grad():
    d = create_diffusion("100", learn_sigma=True)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64)
    out = torch.randn(3, 4, 4, 4, generator=gen, dtype=torch.float64).tanh()
    noise = torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64)
    grad = torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 40, 99])
    plain = ddpm_step(d, out, x, t, noise)
    guided = ddpm_step(d, out, x, t, noise, cond_grad=grad)
    variance = d.p_mean_variance(out, x, t)["variance"]
    torch.testing.assert_close(guided - plain, variance * grad)


def test_ddim_classifier_guidance_shifts_eps_by_the_score():
    d = create_diffusion("ddim20", learn_sigma=False)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 2, 4, 4, generator=gen, dtype=torch.float64)
    eps = torch.randn(2, 2, 4, 4, generator=gen, dtype=torch.float64)
    grad = torch.randn(2, 2, 4, 4, generator=gen, dtype=torch.float64)
    t = torch.tensor([3, 19])
    abar = d.alphas_cumprod[t].view(-1, 1, 1, 1)
    abar_prev = d.alphas_cumprod_prev[t].view(-1, 1, 1, 1)
    # eta = 0: x_prev = sqrt(abar_prev / abar) (x - sqrt(1 - abar) eps) + sqrt(1 - abar_prev) eps
    # is linear in eps, and guidance replaces eps by eps - sqrt(1 - abar) grad.
    d_xprev_d_eps = (1 - abar_prev).sqrt() - (abar_prev / abar).sqrt() * (1 - abar).sqrt()
    expected = d_xprev_d_eps * -(1 - abar).sqrt() * grad
    shift = ddim_step(d, eps, x, t, cond_grad=grad) - ddim_step(d, eps, x, t)
    torch.testing.assert_close(shift, expected)


@pytest.mark.parametrize("sampler", [ddpm_sample, ddim_sample])
def test_classifier_guidance_pulls_samples_toward_the_class(sampler):
    d = create_diffusion("25", learn_sigma=False)
    model = _fixed_random_model(2)  # unconditional: y only reaches cond_fn
    targets = torch.tensor([[-0.8, 0.8], [0.8, -0.8]], dtype=torch.float64)
    seen_t = []

    def cond_fn(x, t, y):
        seen_t.append(t[0].item())
        x = x.requires_grad_(True)
        log_p = -0.5 * ((x - targets[y].view(-1, 2, 1, 1)) ** 2).sum()
        return 5.0 * torch.autograd.grad(log_p, x)[0]

    y = torch.tensor([0, 1, 0, 1])
    kwargs = dict(seed=0, dtype=torch.float64, progress=False)
    plain = sampler(d, model, (4, 2, 3, 3), **kwargs)
    guided = sampler(d, model, (4, 2, 3, 3), y=y, cond_fn=cond_fn, **kwargs)
    target = targets[y].view(-1, 2, 1, 1)
    assert ((guided - target) ** 2).mean() < 0.5 * ((plain - target) ** 2).mean()
    assert seen_t == d.timestep_map.flip(0).tolist()


# ---------------------------------------------------------------------------
# adapters
# ---------------------------------------------------------------------------


def test_as_denoiser_reads_dit_attributes():
    from ditkernels.models import DiT

    small = dict(input_size=8, patch_size=4, in_channels=3, hidden_size=32, depth=1,
                 num_heads=2, num_classes=7)
    a = as_denoiser(DiT(**small, learn_sigma=True))
    assert (a.in_channels, a.learn_sigma, a.num_classes, a.null_class) == (3, True, 7, 7)
    b = as_denoiser(DiT(**small, learn_sigma=False, class_dropout_prob=0.0))
    assert (b.learn_sigma, b.num_classes, b.null_class) == (False, 7, None)
    out = b(torch.randn(2, 3, 8, 8), torch.tensor([1, 999]), torch.tensor([0, 6]))
    assert out.shape == (2, 3, 8, 8)


def test_as_denoiser_duck_typing_and_overrides():
    tiny = TinyDenoiser(channels=1, num_classes=2, learn_sigma=True)
    a = as_denoiser(tiny)
    assert (a.in_channels, a.learn_sigma, a.num_classes, a.null_class) == (1, True, 2, 2)
    assert as_denoiser(a) is a
    # A model with another call signature goes through forward=.
    b = as_denoiser(tiny, forward=lambda x, t, y: tiny(x, t, y), null_class=None)
    assert b.null_class is None and b.num_classes == 2
    plain = as_denoiser(lambda x, t, y: torch.zeros_like(x))
    assert not plain.class_conditional and plain.in_channels is None


def test_adapter_checks_shapes_and_labels():
    a = as_denoiser(lambda x, t, y: torch.zeros_like(x), in_channels=2, learn_sigma=True,
                    num_classes=3, null_class=3)
    with pytest.raises(ValueError, match="output has 2 channels, expected 4"):
        a(torch.zeros(1, 2, 2, 2), torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="expects 2 input channels"):
        a(torch.zeros(1, 3, 2, 2), torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="class-conditional: pass labels"):
        a(torch.zeros(1, 2, 2, 2), torch.tensor([0]))
    with pytest.raises(ValueError, match="no null class"):
        DiffusionModelAdapter(forward=lambda x, t, y: x, null_class=0)


def _package_models():
    """Small instances of every model family in ditkernels.models, with the adapter
    arguments each needs (none, except U-ViT's null class, which counts in its
    num_classes)."""
    from ditkernels.models import DiT, DiffiT, DiffiTUNet, UViT

    return {
        "dit": (DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1,
                    num_heads=2, num_classes=3), {}),
        "diffit": (DiffiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1,
                          num_heads=2, num_classes=3, learn_sigma=False), {}),
        "diffit_unet": (DiffiTUNet(img_size=8, in_channels=1, base_channels=16,
                                   channel_mult=(1, 2), num_res_blocks=1, num_heads=2,
                                   window_size=4, num_groups=8, num_classes=3,
                                   class_dropout_prob=0.1, learn_sigma=True), {}),
        "uvit": (UViT(img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=2,
                      num_heads=2, num_classes=4), dict(num_classes=3, null_class=3)),
        "uvit_uncond": (UViT(img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=2,
                             num_heads=2), {}),
    }


@pytest.mark.parametrize("name", ["dit", "diffit", "diffit_unet", "uvit", "uvit_uncond"])
def test_package_models_train_and_sample_through_the_adapter(name):
    torch.manual_seed(0)
    model, overrides = _package_models()[name]
    denoiser = as_denoiser(model, **overrides)
    expected_sigma = {"dit": True, "diffit": False, "diffit_unet": True, "uvit": False,
                      "uvit_uncond": False}[name]
    assert denoiser.in_channels == 1 and denoiser.learn_sigma == expected_sigma
    conditional = name != "uvit_uncond"
    assert denoiser.num_classes == (3 if conditional else 0)
    assert denoiser.null_class == (3 if conditional else None)

    d = create_diffusion(learn_sigma=denoiser.learn_sigma)
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    y = torch.tensor([0, 1, 2, 1]) if conditional else None
    loss = d.training_losses(denoiser, x0, torch.tensor([0, 10, 500, 999]), y)["loss"]
    loss.mean().backward()
    assert torch.isfinite(loss).all()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())

    model.eval()
    out = ddim_sample(d.respaced("ddim3"), denoiser, (4, 1, 8, 8), y=y,
                      cfg_scale=2.0 if conditional else 1.0, clip_denoised=True, seed=0,
                      progress=False)
    assert out.shape == (4, 1, 8, 8) and torch.isfinite(out).all()
