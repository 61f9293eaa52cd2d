"""Tests for DiffusionLab: the math against exact results, then every user-facing path with tiny settings.

Run with `python -m pytest` (a few minutes on a 2-core CPU). Nothing here needs a GPU, the network or ../shared:
the tests make the small data sets they need. Each test's docstring says which property it checks; tolerances
are derived in the tests from the number of samples (k standard errors) or from float32 rounding.
"""
import errno
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

# As the scripts do, before torch loads: one OpenMP place per core (README: "Threads on a shared CPU").
if os.environ.get("OMP_NUM_THREADS") != "1" and hasattr(os, "sched_getaffinity"):
    os.environ.setdefault("OMP_PLACES", ",".join(f"{{{cpu}}}" for cpu in sorted(os.sched_getaffinity(0))))
import ddpm  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import train_cifar  # noqa: E402
import train_mnist  # noqa: E402
import train_moons  # noqa: E402

HERE = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def main_thread_is_left_free():
    """After every test the main thread may run on every core again: a path that bound it (use_threads) and left
    it bound would confine every process started after it, which inherit the binding, to one core."""
    yield
    if hasattr(os, "sched_getaffinity"):
        assert os.sched_getaffinity(0) == ddpm.CPU_MASK


# ----------------------------------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------------------------------

def test_linear_schedule_matches_ddpm_and_closed_form():
    """T = 1000: β runs from 1e-4 to 0.02 in equal steps [DDPM §4], and ᾱ_T equals exp(Σ log(1 − β)), which is
    about exp(−Σβ − Σβ²/2) = 4.0e-5 (the next term, Σβ³/3 ≈ 0.003, bounds the difference at 0.3 %)."""
    d = ddpm.Diffusion(1000, "linear")
    betas = d.betas.double()
    assert betas[0].item() == pytest.approx(1e-4, rel=1e-6)
    assert betas[-1].item() == pytest.approx(0.02, rel=1e-6)
    steps = betas.diff()
    assert torch.allclose(steps, torch.full_like(steps, (0.02 - 1e-4) / 999), rtol=1e-4)
    exact = torch.exp(torch.log1p(-ddpm.make_beta_schedule("linear", 1000)).sum()).item()
    approx = math.exp(-betas.sum().item() - (betas ** 2).sum().item() / 2)
    assert d.alphas_cumprod[-1].item() == pytest.approx(exact, rel=1e-4)
    assert exact == pytest.approx(approx, rel=0.005)
    assert 3.9e-5 < exact < 4.2e-5


def test_linear_schedule_scales_with_T():
    """For T ≠ 1000 both ends scale by 1000/T, so ᾱ_T stays near zero: x_T is pure noise for any T."""
    for T in (50, 200, 4000):
        betas = ddpm.make_beta_schedule("linear", T)
        assert betas[0].item() == pytest.approx(1e-4 * 1000 / T)
        assert betas[-1].item() == pytest.approx(min(0.02 * 1000 / T, 0.999))
        assert torch.prod(1 - betas).item() < 1e-3


def test_cosine_schedule_follows_its_definition():
    """[IDDPM Eq. 17]: ᾱ_t = f(t)/f(0) with f(t) = cos²(((t/T + s)/(1 + s))·π/2) wherever β is not capped;
    β ≤ 0.999 everywhere, and ᾱ decreases from nearly 1 to nearly 0."""
    T, s = 1000, 0.008
    betas = ddpm.make_beta_schedule("cosine", T)
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    t = torch.arange(1, T + 1, dtype=torch.float64)
    f = lambda u: torch.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    expected = f(t) / f(torch.zeros(1, dtype=torch.float64))
    uncapped = betas < 0.999
    assert torch.allclose(alphas_cumprod[uncapped], expected[uncapped], rtol=1e-9, atol=1e-12)
    assert betas.max().item() <= 0.999 and (alphas_cumprod.diff() < 0).all()
    assert alphas_cumprod[0] > 0.9999 and alphas_cumprod[-1] < 1e-6


def test_unknown_schedule_lists_the_valid_ones():
    """A schedule name that does not exist raises a ValueError naming every valid one."""
    with pytest.raises(ValueError, match="linear, cosine"):
        ddpm.Diffusion(10, "quadratic")


def test_posterior_matches_gaussian_conditioning():
    """q(x_{t−1} | x_t, x_0) from Eq. 7 equals what conditioning the joint Gaussian of (x_{t−1}, x_t) given x_0
    gives, derived independently here in float64: mean √ᾱ_{t−1}x_0 + c·(x_t − √ᾱ_t·x_0), c = Cov/Var(x_t)."""
    d = ddpm.Diffusion(1000, "cosine")
    betas = ddpm.make_beta_schedule("cosine", 1000)
    abar = torch.cumprod(1 - betas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    t = torch.tensor([0, 1, 10, 500, 999])
    x0, x_t = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    cov = (1 - betas[t]).sqrt() * (1 - abar_prev[t])          # Cov(x_{t−1}, x_t | x_0)
    c = (cov / (1 - abar[t]))[:, None]
    mean_expected = abar_prev[t].sqrt()[:, None] * x0 + c * (x_t - abar[t].sqrt()[:, None] * x0)
    var_expected = (1 - abar_prev[t]) - cov ** 2 / (1 - abar[t])
    mean, var = d.q_posterior(x0.float(), x_t.float(), t)
    assert torch.allclose(mean.double(), mean_expected, atol=1e-5)
    assert torch.allclose(var.flatten().double(), var_expected, rtol=1e-4, atol=1e-9)
    assert var.flatten()[0].item() == 0.0  # t = 1: x_0 is known, no variance left


# ----------------------------------------------------------------------------------------------------------------------
# Forward process and loss
# ----------------------------------------------------------------------------------------------------------------------

def test_q_sample_has_the_eq4_statistics():
    """x_t = q_sample(x_0, t, ε) with ε ~ N(0, I) has mean √ᾱ_t·x_0 and variance 1 − ᾱ_t [DDPM Eq. 4]; with n draws
    the sample mean is within 5 standard errors √((1 − ᾱ)/n) and the variance within 5·(1 − ᾱ)·√(2/n)."""
    d = ddpm.Diffusion(1000)
    torch.manual_seed(0)
    n = 200_000
    for k in (0, 100, 999):
        x0 = torch.full((n, 1), 0.7)
        t = torch.full((n,), k)
        x_t = d.q_sample(x0, t, torch.randn(n, 1)).double()
        abar = d.alphas_cumprod[k].item()
        assert abs(x_t.mean().item() - math.sqrt(abar) * 0.7) < 5 * math.sqrt((1 - abar) / n)
        assert abs(x_t.var().item() - (1 - abar)) < 5 * (1 - abar) * math.sqrt(2 / n)


def test_predict_x0_inverts_q_sample_for_points_and_images():
    """predict_x0(q_sample(x_0, t, ε), t, ε) = x_0: Eq. 15 is Eq. 4 solved for x_0 (float32 rounding is amplified
    by 1/√ᾱ_t, hence the tolerance)."""
    d = ddpm.Diffusion(1000)
    for shape in [(7, 2), (5, 3, 8, 8)]:
        x0, noise = torch.randn(shape), torch.randn(shape)
        t = torch.randint(0, 1000, (shape[0],))
        x0_pred = d.predict_x0(d.q_sample(x0, t, noise), t, noise)
        tol = 1e-5 / ddpm.broadcast(d.sqrt_alphas_cumprod, t, x0)
        assert ((x0_pred - x0).abs() <= tol).all()


def test_eq11_mean_equals_posterior_mean_of_predicted_x0():
    """The Eq. 11 mean 1/√α_t·(x_t − β_t/√(1 − ᾱ_t)·ε_θ) equals μ̃_t(x_t, x̂_0) with x̂_0 from Eq. 15, the form the
    samplers use."""
    d = ddpm.Diffusion(1000)
    x_t, eps = torch.randn(64, 2).double(), torch.randn(64, 2).double()
    t = torch.arange(0, 1000, 1000 // 64)[:64]
    b = lambda v: ddpm.broadcast(v.double(), t, x_t)  # noqa: E731
    eq11 = (x_t - b(d.betas) / b(d.sqrt_one_minus_alphas_cumprod) * eps) / b(d.alphas).sqrt()
    d64 = d.double()
    mean, _ = d64.q_posterior(d64.predict_x0(x_t, t, eps), x_t, t)
    assert torch.allclose(mean, eq11, atol=1e-4, rtol=1e-4)


class Recorder(nn.Module):
    """A backbone that predicts ε = 0 and remembers the labels it was given."""

    def forward(self, x_t, t, y=None):
        self.seen_y = y
        return torch.zeros_like(x_t)


def test_loss_of_zero_predictor_and_label_dropout():
    """With ε_θ = 0 the loss is E‖ε‖²/dim = 1 (n·dim draws: within 5·√(2/(n·dim))); labels are replaced by the null
    label with probability p_uncond (within 5 binomial standard errors)."""
    torch.manual_seed(0)
    d, model = ddpm.Diffusion(100, p_uncond=0.2), Recorder()
    n, dim = 50_000, 2
    loss = d.loss(model, torch.randn(n, dim), torch.randint(0, 3, (n,)))
    assert abs(loss.item() - 1) < 5 * math.sqrt(2 / (n * dim))
    dropped = (model.seen_y == ddpm.NULL_LABEL).double().mean().item()
    assert abs(dropped - 0.2) < 5 * math.sqrt(0.2 * 0.8 / n)
    d.loss(model, torch.randn(8, 2))
    assert model.seen_y is None  # unlabelled data stays unlabelled


class NoiseFromX0(nn.Module):
    """Knows x_0, so it can predict ε exactly by solving Eq. 4 for it: ε = (x_t − √ᾱ_t·x_0)/√(1 − ᾱ_t)."""

    def __init__(self, diffusion, x0):
        super().__init__()
        self.diffusion, self.x0 = diffusion, x0

    def forward(self, x_t, t, y=None):
        self.seen_t = t
        d = self.diffusion
        return ((x_t - ddpm.broadcast(d.sqrt_alphas_cumprod, t, x_t) * self.x0)
                / ddpm.broadcast(d.sqrt_one_minus_alphas_cumprod, t, x_t))


def test_loss_feeds_the_network_eq4_x_t_at_uniform_timesteps():
    """The network is shown x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε, so the exact inverse of Eq. 4 has loss 0 (up to float32
    rounding amplified by 1/√(1 − ᾱ_1) ≈ 14: far below 1e-8); t is uniform on all of 0..T−1: each of the T values
    drawn n/T times within 5 binomial standard errors."""
    torch.manual_seed(0)
    T, n = 20, 5000
    d = ddpm.Diffusion(T)
    x0 = torch.randn(n, 3, 2, 2)
    model = NoiseFromX0(d, x0)
    assert d.loss(model, x0).item() < 1e-8
    counts = torch.bincount(model.seen_t, minlength=T)
    assert len(counts) == T and (counts - n / T).abs().max() < 5 * math.sqrt(n / T * (1 - 1 / T))


# ----------------------------------------------------------------------------------------------------------------------
# Samplers, driven by the exact ε-predictor of a Gaussian mixture
# ----------------------------------------------------------------------------------------------------------------------

class MixtureOracle(nn.Module):
    """The exact ε*(x_t, t) = E[ε | x_t] for data from a mixture of isotropic Gaussians N(μ_k, s_k²·I):
    given component k, x_t ~ N(√ᾱ·μ_k, (ᾱ·s_k² + 1 − ᾱ)·I), E[x_0 | x_t, k] = μ_k + √ᾱ·s_k²/(ᾱ·s_k² + 1 − ᾱ)·(x_t −
    √ᾱ·μ_k); mixing over the posterior weights of k and solving Eq. 4 for ε gives ε* = (x_t − √ᾱ·E[x_0|x_t])/√(1−ᾱ).
    A label y picks one component (the conditional oracle); y = None or ∅ mixes them all."""

    def __init__(self, diffusion, means, stds, weights):
        super().__init__()
        self.d = diffusion
        self.means, self.stds, self.weights = (torch.tensor(v, dtype=torch.float64) for v in (means, stds, weights))

    def forward(self, x_t, t, y=None):
        x = x_t.double()
        abar = self.d.alphas_cumprod.double()[t][:, None, None]                      # (B, 1, 1)
        var = abar * self.stds[None, :, None] ** 2 + 1 - abar                       # (B, K, 1)
        centre = abar.sqrt() * self.means[None]                                     # (B, K, D)
        log_p = (-((x[:, None] - centre) ** 2).sum(-1, keepdim=True) / (2 * var)
                 - x.shape[1] / 2 * var.log() + self.weights[None, :, None].log())  # (B, K, 1)
        if y is not None:  # condition on a component: all other weights → 0
            mask = (torch.arange(len(self.weights))[None, :] == y[:, None]) | (y[:, None] == ddpm.NULL_LABEL)
            log_p = log_p.masked_fill(~mask[..., None], -math.inf)
        resp = torch.softmax(log_p, dim=1)
        x0_k = self.means[None] + abar.sqrt() * self.stds[None, :, None] ** 2 / var * (x[:, None] - centre)
        x0 = (resp * x0_k).sum(1)
        return ((x - abar[:, 0].sqrt() * x0) / (1 - abar[:, 0]).sqrt()).to(x_t.dtype)


MEANS, STDS, WEIGHTS = [[-2.0, 0.0], [1.5, 1.0]], [0.3, 0.5], [0.3, 0.7]


def check_mixture(samples, slack, n_sigma=5.0):
    """Samples match the mixture: the weight of each component (assigned by the nearer mean) within n_sigma binomial
    standard errors, and its mean and per-axis std within n_sigma standard errors plus `slack`, an allowance for the
    samplers' time discretisation (measured with 20,000 samples: under 0.005 for the ancestral sampler with
    T = 1000, about 0.015 for 100 DDIM steps)."""
    x = samples.double()
    k = ((x[:, None] - torch.tensor(MEANS, dtype=torch.float64)[None]) ** 2).sum(-1).argmin(1)
    n = len(x)
    for j, (mu, s, w) in enumerate(zip(MEANS, STDS, WEIGHTS)):
        part = x[k == j]
        assert abs(len(part) / n - w) < n_sigma * math.sqrt(w * (1 - w) / n)
        se_mean, se_std = s / math.sqrt(len(part)), s / math.sqrt(2 * len(part))
        assert (part.mean(0) - torch.tensor(mu)).abs().max() < n_sigma * se_mean + slack
        assert (part.std(0) - s).abs().max() < n_sigma * se_std + slack


def test_ancestral_sampler_recovers_the_data_distribution():
    """With the exact ε-predictor and no training, ancestral sampling [Alg. 2] turns N(0, I) into the mixture."""
    d = ddpm.Diffusion(1000)
    samples = d.sample(MixtureOracle(d, MEANS, STDS, WEIGHTS), (4000, 2), generator=torch.Generator().manual_seed(1))
    check_mixture(samples, slack=0.01)


def test_ddim_sampler_recovers_the_data_distribution():
    """The same with deterministic DDIM (η = 0) on 100 of the 1000 timesteps."""
    d = ddpm.Diffusion(1000)
    oracle = MixtureOracle(d, MEANS, STDS, WEIGHTS)
    samples = d.ddim_sample(oracle, (4000, 2), steps=100, generator=torch.Generator().manual_seed(2))
    check_mixture(samples, slack=0.03)


def test_guided_sampling_with_conditional_oracle_draws_the_requested_component():
    """With the conditional oracle, labels pick a component: every sample lands at its label's mean (guidance w = 1
    is the exact conditional; w = 3 sharpens but keeps the component)."""
    d = ddpm.Diffusion(200)
    oracle = MixtureOracle(d, MEANS, STDS, WEIGHTS)
    y = torch.arange(400) % 2
    for w in (1.0, 3.0):
        x = d.ddim_sample(oracle, (400, 2), steps=50, y=y, guidance=w, generator=torch.Generator().manual_seed(3))
        nearest = ((x[:, None].double() - torch.tensor(MEANS)[None]) ** 2).sum(-1).argmin(1)
        assert (nearest == y).all()


def test_ddim_with_eta_1_and_all_steps_is_the_ancestral_sampler():
    """DDIM with η = 1 on all T steps has σ² = β̃ and the same mean as Eq. 11, and draws its noise in the same
    order: from the same generator seed it returns the ancestral sampler's samples (to float32 rounding)."""
    d = ddpm.Diffusion(100)
    oracle = MixtureOracle(d, MEANS, STDS, WEIGHTS)
    a = d.sample(oracle, (256, 2), generator=torch.Generator().manual_seed(4))
    b = d.ddim_sample(oracle, (256, 2), steps=100, eta=1.0, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(a, b, atol=1e-4)


def test_samplers_are_reproducible_and_return_trajectories():
    """The same generator seed gives the same samples; trajectories have T + 1 (or steps + 1) frames, starting
    from x_T and ending at the returned x_0."""
    d = ddpm.Diffusion(30)
    oracle = MixtureOracle(d, MEANS, STDS, WEIGHTS)
    x1 = d.sample(oracle, (5, 2), generator=torch.Generator().manual_seed(5))
    x2, traj = d.sample(oracle, (5, 2), generator=torch.Generator().manual_seed(5), return_trajectory=True)
    assert torch.equal(x1, x2) and traj.shape == (31, 5, 2) and torch.equal(traj[-1], x2)
    x3, traj3 = d.ddim_sample(oracle, (5, 2), steps=7, generator=torch.Generator().manual_seed(5),
                              return_trajectory=True)
    assert traj3.shape == (8, 5, 2) and torch.equal(traj3[0], traj[0])  # same x_T from the same seed
    with pytest.raises(ValueError, match="between 1 and T"):
        d.ddim_sample(oracle, (5, 2), steps=31)


# ----------------------------------------------------------------------------------------------------------------------
# Backbones and guidance
# ----------------------------------------------------------------------------------------------------------------------

def test_timestep_embedding():
    """Sinusoidal features: at t = 0 the sines are 0 and the cosines 1; distinct timesteps get distinct vectors;
    odd sizes are padded."""
    emb = ddpm.timestep_embedding(torch.tensor([0, 1, 999]), 33)
    assert emb.shape == (3, 33)
    assert torch.equal(emb[0, :16], torch.zeros(16)) and torch.equal(emb[0, 16:32], torch.ones(16))
    assert (emb[1] - emb[2]).abs().max() > 0.1


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_backbone_shapes_for_points_and_images(batch):
    """Both backbones keep the contract for odd batch sizes: the output has x_t's shape, with and without labels;
    the samplers run on both data ranks."""
    t, y = torch.randint(0, 10, (batch,)), torch.randint(0, 10, (batch,))
    mlp = ddpm.MLP(dim=2, hidden=16, depth=1, num_classes=10)
    assert mlp(torch.randn(batch, 2), t, y).shape == (batch, 2)
    for channels, side in [(1, 28), (3, 32)]:
        unet = ddpm.build_unet("tiny", channels, side, num_classes=10)
        x = torch.randn(batch, channels, side, side)
        assert unet(x, t, y).shape == x.shape and unet(x, t).shape == x.shape
    d = ddpm.Diffusion(5)
    assert d.sample(mlp.eval(), (batch, 2), y=y, guidance=2.0).shape == (batch, 2)
    out = d.ddim_sample(unet.eval(), (batch, 3, 32, 32), steps=3, y=y, guidance=0.5, clip_x0=True)
    assert out.shape == (batch, 3, 32, 32) and out.isfinite().all()


def test_unet_rejects_sizes_its_downsampling_cannot_take():
    """A 30×30 image cannot be halved three times: a clear ValueError, and an unconditional net refuses labels."""
    unet = ddpm.build_unet("base", 3, 32, num_classes=0)
    with pytest.raises(ValueError, match="divisible by 8"):
        unet(torch.randn(1, 3, 30, 30), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="without classes"):
        unet(torch.randn(1, 3, 32, 32), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))


def test_unet_preset_parameter_counts():
    """base is DDPM's CIFAR-10 network, 35.7M parameters [DDPM §4] within 3 % (without the class embedding); small
    is about 3M and large about 53M (within 5 %); the MNIST preset stays under 3M."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ddpm.build_unet("base", 3, 32, 0)) == pytest.approx(35.7e6, rel=0.03)
    assert count(ddpm.build_unet("small", 3, 32, 0)) == pytest.approx(3e6, rel=0.05)
    assert count(ddpm.build_unet("large", 3, 32, 0)) == pytest.approx(53e6, rel=0.05)
    assert count(ddpm.build_unet("mnist", 1, 28, 10)) < 3e6
    with_classes = count(ddpm.build_unet("base", 3, 32, 10)) - count(ddpm.build_unet("base", 3, 32, 0))
    assert with_classes == 11 * 512  # ten classes and ∅, each a vector of the embedding width 4·128


@pytest.mark.parametrize("make", [lambda: ddpm.MLP(2, 32, 2, num_classes=4),
                                  lambda: ddpm.build_unet("tiny", 3, 8, num_classes=4)])
def test_guidance_interpolates_between_unconditional_and_conditional(make):
    """ε̃ = ε_∅ + w·(ε_y − ε_∅): w = 1 is the conditional prediction, w = 0 the unconditional one, w = 3 the
    extrapolation 3·ε_y − 2·ε_∅ (one doubled batch against separate passes: float32 rounding only)."""
    torch.manual_seed(0)
    model, d = make().eval(), ddpm.Diffusion(10)
    for p in model.parameters():  # the zero-initialised output layers would make every prediction 0
        nn.init.normal_(p, std=0.2)
    shape = (5, 2) if isinstance(model, ddpm.MLP) else (5, 3, 8, 8)
    x, t, y = torch.randn(shape), torch.randint(0, 10, (5,)), torch.tensor([0, 1, 2, 3, 0])
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, None)
        assert not torch.allclose(cond, uncond)
        assert torch.allclose(d.guided_noise_pred(model, x, t, y, 1.0), cond, atol=1e-5)
        assert torch.allclose(d.guided_noise_pred(model, x, t, y, 0.0), uncond, atol=1e-5)
        assert torch.allclose(d.guided_noise_pred(model, x, t, y, 3.0), 3 * cond - 2 * uncond, atol=1e-4)


def test_small_corrections_refuse_what_would_silently_go_wrong():
    """T = 1 with the linear schedule (ᾱ_T = 0.9: x_T would not be noise) is refused; guidance ≠ 1 without labels
    is refused (it would silently return the unconditional model); a label equal to num_classes (it would silently
    mean ∅) or below −1 is refused where labels enter: the samplers, fit and Data."""
    with pytest.raises(ValueError, match="at least 2 for the linear schedule"):
        ddpm.Diffusion(1)
    assert ddpm.Diffusion(1, "cosine").alphas_cumprod[-1] < 0.01 and ddpm.Diffusion(2).alphas_cumprod[-1] < 0.01
    with pytest.raises(ddpm.UserError, match="--num-timesteps must be at least 2"):
        ddpm.TrainConfig(num_timesteps=1).check()
    d, model = ddpm.Diffusion(10), ddpm.MLP(2, 16, 1, num_classes=3)
    x, t = torch.randn(4, 2), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="guidance 2.0 needs labels"):
        d.guided_noise_pred(model, x, t, None, 2.0)
    assert torch.equal(d.guided_noise_pred(model, x, t, None, 1.0), model(x, t, None))
    for bad in (3, -2):
        y = torch.tensor([0, bad, ddpm.NULL_LABEL, 2])
        with pytest.raises(ValueError, match=f"label {bad} is not a class: labels run from 0 to 2"):
            d.sample(model, (4, 2), y=y)
        with pytest.raises(ValueError, match=f"label {bad} is not a class"):
            d.ddim_sample(model, (4, 2), steps=2, y=y)
        with pytest.raises(ValueError, match=f"label {bad} is not a class"):
            ddpm.fit(model, d, torch.randn(4, 2), y, steps=1)
        with pytest.raises(ddpm.UserError, match=f"label {bad} is not a class"):
            ddpm.Data(torch.randn(4, 2), y, ("a", "b", "c"))
    assert d.sample(model, (4, 2), y=torch.tensor([0, 1, 2, ddpm.NULL_LABEL])).shape == (4, 2)


def test_ddim_step_noise_has_float64_precision():
    """DDIM's σ_τ [DDIM Eq. 16] near t = 0 is √ of a difference of nearly equal numbers (1 − ᾱ_t/ᾱ_prev); computed
    in float32 it is off by ~2.5e-4 relative at paper t = 2. Recovered from the sampler's own steps (a denoiser that
    predicts ε = 0, so x_prev = √(ᾱ_prev/ᾱ_t)·x_t + σ·z with z from the same generator), every σ matches the float64
    formula within 2e-5 relative; the float32 rounding of x (~6e-8 of |x| ≈ 1, against σ ≥ 0.01) allows ~1e-5."""
    d, n, T = ddpm.Diffusion(1000), 4096, 1000
    seen = []

    class Zero(nn.Module):
        def forward(self, x_t, t, y=None):
            seen.append(x_t.double().clone())
            return torch.zeros_like(x_t)

    out = d.ddim_sample(Zero(), (n, 1), steps=T, eta=1.0, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    zs = [torch.randn((n, 1), generator=gen).double() for _ in range(T)][1:]  # the first draw is x_T
    abar = torch.cumprod(1 - ddpm.make_beta_schedule("linear", T), 0)
    xs = seen + [out.double()]
    for i in (T - 10, T - 3, T - 2):  # the steps into paper t = 10, 3, 2 (code 9, 2, 1)
        k, k_prev = T - 1 - i, T - 2 - i
        a_t, a_prev = abar[k], abar[k_prev]
        residual = xs[i + 1] - (a_prev / a_t).sqrt() * xs[i]
        sigma = (residual * zs[i]).sum() / (zs[i] ** 2).sum()
        expected = ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        assert abs(sigma / expected - 1) < 2e-5, (k, sigma.item(), expected.item())


# ----------------------------------------------------------------------------------------------------------------------
# The bound in bits per dimension, against closed forms
# ----------------------------------------------------------------------------------------------------------------------

def gaussian_bound_closed_form(schedule, T, mu, s, reverse_variances=None):
    """E[L_T + Σ_{t>1} L_{t−1} + L_0] per dimension, in nats, for data N(mu, s²·I) and the exact ε-predictor, derived
    here in float64 from the schedule alone. Given x_t, x_0 has variance v_t = s²(1 − ᾱ_t)/(ᾱ_t·s² + 1 − ᾱ_t) about
    E[x_0 | x_t] = x̂_0, so with μ̃ − μ_θ = coef1_t·(x_0 − x̂_0) [Eq. 7] each KL between N(μ̃, β̃_t) and N(μ_θ, σ_t²)
    averages ½(log(σ_t²/β̃_t) + β̃_t/σ_t² − 1 + coef1_t²·v_t/σ_t²), the Gaussian decoder ½(log 2πσ_1² + v_1/σ_1²), and
    L_T = ½((1 − ᾱ_T) + ᾱ_T(mu² + s²) − 1 − log(1 − ᾱ_T)). Default σ_t² = β̃_t with β̃_2 at t = 1."""
    betas = ddpm.make_beta_schedule(schedule, T)
    abar = torch.cumprod(1 - betas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    post_var, coef1 = betas * (1 - abar_prev) / (1 - abar), abar_prev.sqrt() * betas / (1 - abar)
    var = torch.cat([post_var[1:2], post_var[1:]]) if reverse_variances is None else reverse_variances
    v = s ** 2 * (1 - abar) / (abar * s ** 2 + 1 - abar)
    prior = 0.5 * ((1 - abar[-1]) + abar[-1] * (mu ** 2 + s ** 2) - 1 - torch.log(1 - abar[-1]))
    kls = 0.5 * (torch.log(var[1:] / post_var[1:]) + post_var[1:] / var[1:] - 1 + coef1[1:] ** 2 * v[1:] / var[1:])
    decoder = 0.5 * (math.log(2 * math.pi) + torch.log(var[0]) + v[0] / var[0])
    return (prior + kls.sum() + decoder).item()


@pytest.mark.parametrize("schedule, T", [("cosine", 100), ("linear", 300)])
def test_nll_bound_of_the_exact_model_of_gaussian_data_matches_its_closed_form(schedule, T):
    """For Gaussian data N(mu, s²·I) and its exact ε-predictor, the mean of nll_bound over 2,000 examples equals the
    expected bound derived independently in float64 (gaussian_bound_closed_form), within 5 standard errors of the
    mean (its Monte-Carlo error over x_0 and the one x_t per term, measured from the spread of the examples); and the
    bound lies above the true −log p(x_0) of the same examples by far more than that error (with σ_t² = β̃_t it is
    not tight, even for the exact model)."""
    mu, s, n, D = 0.5, 0.2, 2000, 16
    d = ddpm.Diffusion(T, schedule)
    oracle = MixtureOracle(d, [[mu] * D], [s], [1.0])
    torch.manual_seed(0)
    x0 = mu + s * torch.randn(n, D)
    bpd = d.nll_bound(oracle, x0)
    assert bpd.shape == (n,) and bpd.dtype == torch.float64
    nats = bpd * math.log(2)                                      # per dimension
    se = nats.std().item() / math.sqrt(n)
    expected = gaussian_bound_closed_form(schedule, T, mu, s)
    assert abs(nats.mean().item() - expected) < 5 * se, (nats.mean().item(), expected, se)
    true_nll = (0.5 * math.log(2 * math.pi * s ** 2) + (x0.double() - mu) ** 2 / (2 * s ** 2)).mean().item()
    assert nats.mean().item() - true_nll > 20 * se
    assert expected > 0.5 * math.log(2 * math.pi * math.e * s ** 2)  # the data's entropy per dimension


def test_gaussian_bound_is_the_true_nll_with_the_exact_reverse_variances():
    """The closed form of the test above is itself checked: for N(0, I) data the true reverse step q(x_{t−1} | x_t)
    is N(√α_t·x_t, β_t·I), so with σ_t² = β_t (and Var(x_0 | x_1) = β_1 at t = 1) the model is exact except for
    p(x_T) = N(0, I) against q(x_T) = N(0, I): the bound equals the entropy ½·log(2πe) to float64 rounding; with
    β̃_t it is larger."""
    for schedule, T in (("linear", 1000), ("cosine", 100)):
        exact = gaussian_bound_closed_form(schedule, T, 0.0, 1.0, ddpm.make_beta_schedule(schedule, T))
        assert abs(exact - 0.5 * math.log(2 * math.pi * math.e)) < 1e-9
        assert gaussian_bound_closed_form(schedule, T, 0.0, 1.0) > exact + 0.1


def test_discretized_decoder_is_a_distribution_over_the_256_levels():
    """DDPM's decoder [Eq. 13] for 8-bit data: for any mean (inside or outside [−1, 1]) and scale, the probabilities
    of the 256 levels 2k/255 − 1 sum to 1 (float64 rounding: 1e-12), also for a scale far below the bin width; and
    the discrete bound of a small U-Net on 8-bit images is finite and at least 0 per example (every term is a KL or
    −log of a probability)."""
    levels = torch.arange(256) * 2 / 255 - 1
    for mean in (-1.3, -1.0, 0.0, 0.37, 0.999):
        for scale in (1e-4, 1e-3, 0.05, 1.0, 5.0):
            p = ddpm.discretized_gaussian_log_likelihood(levels, torch.full((256,), mean),
                                                         torch.full((256,), math.log(scale))).exp()
            assert abs(p.sum().item() - 1) < 1e-12 and (p >= 0).all(), (mean, scale)
    torch.manual_seed(0)
    unet = ddpm.UNet(in_ch=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
                     image_size=8, num_classes=3).eval()
    images = torch.randint(0, 256, (6, 1, 8, 8)).float() / 127.5 - 1
    bpd = ddpm.Diffusion(20).nll_bound(unet, images, y=torch.arange(6) % 3, discrete=True)
    assert bpd.shape == (6,) and bpd.isfinite().all() and (bpd >= 0).all()


def test_ddim_refuses_eta_outside_0_to_1():
    """DDIM's step needs σ_τ² ≤ 1 − ᾱ_prev [DDIM Eq. 12], which η ≤ 1 guarantees: η = 1.2 (where, on the cosine
    schedule with 10 steps, several steps would break it) and η < 0 are refused with one line; η = 1 runs."""
    d, model = ddpm.Diffusion(100, "cosine"), ddpm.MLP(2, 16, 1)
    for eta in (1.2, -0.1):
        with pytest.raises(ValueError, match=r"eta must lie in \[0, 1\]"):
            d.ddim_sample(model, (4, 2), steps=10, eta=eta)
    assert d.ddim_sample(model, (4, 2), steps=10, eta=1.0).shape == (4, 2)


def test_resblock_starts_as_the_identity_where_its_width_stays():
    """ResBlock's last convolution starts with zero weight and zero bias (as DDPM's code), so a block whose width
    does not change returns its input exactly at initialisation, whatever the embedding."""
    torch.manual_seed(0)
    block = ddpm.ResBlock(16, 16, 32, dropout=0.0)
    x = torch.randn(2, 16, 8, 8)
    assert torch.equal(block(x, torch.randn(2, 32)), x)


def part_one_module():
    """ddpm.py from its first line to the '# PART II' banner, executed alone as a fresh module."""
    import types
    source = (HERE / "ddpm.py").read_text()
    cut = source.index("\n# PART II") + 1
    module = types.ModuleType("ddpm_part_one")
    exec(compile(source[:cut], "ddpm.py (Part I)", "exec"), module.__dict__)
    return module, source[:cut]


def test_part_one_alone_trains_and_samples_the_moons():
    """Part I pasted alone (it imports only math, copy and torch) trains a class-conditional MLP on the moons with
    its plain loop fit(), and both samplers draw moons: ancestral samples with guidance put each label on its own
    moon (> 90 %; an unconditional model: ~50 %), DDIM samples are within energy distance 0.01 of fresh moons (two
    real sets of 2,000: ~0.001; a Gaussian with the moons' mean and spread: ~0.03). After 800 steps seed 0 gave 0.96
    and 0.97 on their moon and distance 0.0025; after 700, seeds 0 and 1 gave 0.96 to 0.97 and 0.0036, 0.0063."""
    part1, source = part_one_module()
    imported = set(re.findall(r"^(?:import|from) (\w+)", source, flags=re.M))
    assert imported <= {"math", "copy", "torch", "typing", "__future__"}, imported
    assert "TrainConfig" not in part1.__dict__ and "fit" in part1.__dict__
    points, labels = train_moons.make_moons(4000, 0.05, torch.Generator().manual_seed(0))
    mean, std = points.mean(0), points.std(0)
    diffusion = part1.Diffusion(100)
    model = part1.MLP(dim=2, hidden=64, depth=2, num_classes=2)
    ema = part1.fit(model, diffusion, (points - mean) / std, labels, steps=800, batch_size=256, lr=2e-3,
                    ema_decay=0.99, seed=0)
    y = torch.arange(2000) % 2
    guided = part1.Diffusion.sample(diffusion, ema, (2000, 2), y=y, guidance=2.0,
                                    generator=torch.Generator().manual_seed(1)) * std + mean
    to_upper = (guided.norm(dim=1) - 1).abs()
    to_lower = ((guided - torch.tensor([1.0, 0.5])).norm(dim=1) - 1).abs()
    assert (to_upper[y == 0] < to_lower[y == 0]).double().mean() > 0.9
    assert (to_lower[y == 1] < to_upper[y == 1]).double().mean() > 0.9
    fast = diffusion.ddim_sample(ema, (2000, 2), steps=50, y=y, generator=torch.Generator().manual_seed(2))
    real, _ = train_moons.make_moons(2000, 0.05, torch.Generator().manual_seed(3))
    assert train_moons.energy_distance(fast * std + mean, real) < 0.01


# ----------------------------------------------------------------------------------------------------------------------
# Training, checkpoints and resume (in-process, a tiny MLP on tiny data)
# ----------------------------------------------------------------------------------------------------------------------

def tiny_run(out_dir, model=None, kind="points", **overrides):
    """Trains a tiny network for a few steps in out_dir; returns (ema model, config). Quiet, CPU, seconds.

    kind: "points" (a 2-D MLP, no labels), "labelled" (the MLP with 3 classes, so labels are dropped for guidance)
    or "images" (a U-Net with dropout and attention on 8×8 uint8 images with 3 classes, flipped at random).
    """
    cfg = ddpm.TrainConfig(**{**dict(out_dir=str(out_dir), steps=40, batch_size=16, lr=1e-3, warmup=5, log_every=5,
                                     ckpt_every=10, sample_every=0, num_timesteps=50, ema_decay=0.9, device="cpu"),
                              **overrides})
    gen = torch.Generator().manual_seed(0)
    labels, names = torch.arange(50) % 3, ("a", "b", "c")
    if kind == "images":
        data = ddpm.Data(torch.randint(0, 256, (50, 1, 8, 8), generator=gen, dtype=torch.uint8), labels, names,
                         hflip=True)
    else:
        data = ddpm.Data(torch.randn(50, 2, generator=gen), *((labels, names) if kind == "labelled" else ()))
    torch.manual_seed(cfg.seed)
    if model is None and kind == "images":
        model = ddpm.UNet(in_ch=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1,
                          image_size=8, num_classes=3)
    model = model or ddpm.MLP(dim=2, hidden=32, depth=1, num_classes=3 if kind == "labelled" else 0)
    return ddpm.train(model, ddpm.Diffusion(cfg.num_timesteps), data, cfg), cfg


def newest(out_dir) -> Path:
    """The newest checkpoint file of a run folder."""
    return ddpm.find_checkpoints(out_dir)[0]


def assert_same_weights(path_a, path_b):
    a, b = ddpm.load_checkpoint(path_a), ddpm.load_checkpoint(path_b)
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), f"{part}.{name} differs"


def assert_lock_released(out_dir):
    """The out-dir's lock is free again: a new OutDirLock takes it at once. (train.lock itself stays, by design;
    flock locks of one process on two open files exclude each other, so this fails while the run still holds it.)"""
    with ddpm.OutDirLock(out_dir) as lock:
        assert lock.file is not None


def metric_rows(out_dir):
    """(step, loss) of every metrics.csv row (the columns that do not depend on wall-clock time)."""
    lines = (Path(out_dir) / "metrics.csv").read_text().splitlines()
    assert lines[0] == ",".join(ddpm.MetricsLog.COLUMNS)
    return [tuple(line.split(",")[:2]) for line in lines[1:]]


@pytest.mark.parametrize("kind", ["points", "labelled", "images"])
def test_resume_is_bit_exact_on_cpu(tmp_path, kind):
    """40 steps in one go equal 20 steps, a stop, and --resume to 40 (batch order, flips, t, noise, label dropout,
    network dropout, Adam state, LR schedule and EMA all restored): model and EMA tensors torch.equal, the same
    metrics rows once each."""
    tiny_run(tmp_path / "a", kind=kind, steps=40)
    tiny_run(tmp_path / "b", kind=kind, steps=20)
    tiny_run(tmp_path / "b", kind=kind, steps=40, resume=True)
    assert_same_weights(newest(tmp_path / "a"), newest(tmp_path / "b"))
    assert metric_rows(tmp_path / "a") == metric_rows(tmp_path / "b")
    assert [int(s) for s, _ in metric_rows(tmp_path / "b")] == list(range(5, 41, 5))
    assert ddpm.load_checkpoint(newest(tmp_path / "b"))["step"] == 40


def test_keeps_the_last_k_checkpoints(tmp_path):
    """keep_ckpts = 3 keeps the three newest checkpoints, named by their step, newest first; nothing else. A folder
    of an earlier ddpm.py, whose checkpoints are named ckpt.pt (newest), ckpt.1.pt, …, resumes from its ckpt.pt, and
    its old files then go as the new ones come."""
    tiny_run(tmp_path, steps=50, keep_ckpts=3)
    found = ddpm.find_checkpoints(tmp_path)
    assert [p.name for p in found] == ["ckpt_000050.pt", "ckpt_000040.pt", "ckpt_000030.pt"]
    assert [ddpm.load_checkpoint(p)["step"] for p in found] == [50, 40, 30]
    assert not list(tmp_path.glob(".*tmp*"))
    assert_lock_released(tmp_path)
    legacy = tmp_path / "legacy"
    tiny_run(legacy, steps=20)
    for path, old_name in zip(ddpm.find_checkpoints(legacy), ("ckpt.pt", "ckpt.1.pt")):
        path.rename(legacy / old_name)
    assert [ddpm.load_checkpoint(p)["step"] for p in ddpm.find_checkpoints(legacy)] == [20, 10]
    tiny_run(legacy, steps=30, resume=True)
    assert [p.name for p in ddpm.find_checkpoints(legacy)] == ["ckpt_000030.pt", "ckpt.pt"]


def test_refuses_to_overwrite_a_run_and_resume_needs_a_checkpoint(tmp_path):
    """Starting without --resume where a checkpoint exists refuses and changes no file; --overwrite starts over;
    --resume where there is no checkpoint refuses and creates nothing."""
    tiny_run(tmp_path / "run", steps=10)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    with pytest.raises(ddpm.UserError, match="--resume to continue .* --overwrite"):
        tiny_run(tmp_path / "run", steps=10)
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before
    tiny_run(tmp_path / "run", steps=10, overwrite=True, lr=5e-4)
    assert ddpm.load_checkpoint(newest(tmp_path / "run"))["config"]["lr"] == 5e-4
    with pytest.raises(ddpm.UserError, match="no checkpoint"):
        tiny_run(tmp_path / "none", resume=True)
    assert not (tmp_path / "none").exists()


def test_resume_refuses_a_different_configuration(tmp_path):
    """A checkpoint made with other model/optimiser settings is refused with the differing fields listed; fields
    that may change on resume (steps, log interval) are accepted."""
    tiny_run(tmp_path, steps=10)
    with pytest.raises(ddpm.UserError, match=r"--batch-size \(checkpoint 16, now 8\); --lr \(checkpoint 0.001, now 0.002\)"):
        tiny_run(tmp_path, steps=20, resume=True, lr=2e-3, batch_size=8)
    tiny_run(tmp_path, steps=20, resume=True, log_every=2)
    assert ddpm.load_checkpoint(newest(tmp_path))["step"] == 20


def corrupt_middle(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensor data: torch.load itself would not notice
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncate", "flip a byte", "foreign", "malicious"])
def test_bad_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage, capsys):
    """A truncated, corrupted (checksum), foreign or code-carrying newest checkpoint is refused with a message that
    says which and why; --resume warns and continues from the older one; a malicious file's code never runs. With no
    older checkpoint the same problem is a one-line error."""
    tiny_run(tmp_path / "run", steps=20)
    damaged_path = newest(tmp_path / "run")
    marker = tmp_path / "pwned"
    if damage == "truncate":
        damaged_path.write_bytes(damaged_path.read_bytes()[:1000])
    elif damage == "flip a byte":
        corrupt_middle(damaged_path)
    elif damage == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, damaged_path)
    else:
        class Payload:
            def __reduce__(self):
                return (Path.touch, (marker,))
        torch.save({"format": ddpm.CKPT_FORMAT, "x": Payload()}, damaged_path)
    expected = {"truncate": "unreadable", "flip a byte": "checksum", "foreign": "not a DiffusionLab checkpoint",
                "malicious": "refusing to load"}[damage]
    with pytest.raises(ddpm.CheckpointError, match=expected):
        ddpm.load_checkpoint(damaged_path)
    damaged = damaged_path.read_bytes()
    tiny_run(tmp_path / "run", steps=30, resume=True)
    err = capsys.readouterr().err
    assert expected in err and "falling back to the older" in err and "ckpt_000010.pt" in err
    # The damaged file was moved aside, so it did not push a good checkpoint out of the kept two.
    assert (tmp_path / "run" / "ckpt_000020.pt.unusable").read_bytes() == damaged and "moved the unusable" in err
    assert [ddpm.load_checkpoint(p)["step"] for p in ddpm.find_checkpoints(tmp_path / "run")] == [30, 20]
    assert not marker.exists()
    last, *older = ddpm.find_checkpoints(tmp_path / "run")  # keep the newest only, then damage it: no fallback left
    for extra in older:
        extra.unlink()
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(ddpm.CheckpointError, match="unreadable"):
        tiny_run(tmp_path / "run", steps=40, resume=True)


class Crash(BaseException):
    """Stands in for SIGKILL or a power cut: nothing in ddpm.py catches a BaseException that is not its own."""


@pytest.mark.parametrize("fallback", [False, True])
def test_a_crash_at_any_moment_of_a_save_keeps_every_good_checkpoint(tmp_path, monkeypatch, fallback):
    """Crash the save of step 30 at its rename into place, then at its deletion of the oldest checkpoint: the good
    checkpoints of steps 10 and 20 both stay loadable, and resuming then ends with the weights of a run that never
    crashed. With fallback, the step-20 checkpoint first written was damaged, so the resume fell back to step 10 and
    wrote step 20 again before the save that crashes (the damaged file must not have taken a place among the kept
    ones)."""
    tiny_run(tmp_path / "reference", steps=30)
    for crash_in in ("replace", "unlink"):
        run = tmp_path / f"crash_{crash_in}"
        tiny_run(run, steps=20)
        if fallback:
            corrupt_middle(newest(run))
        real_replace, real_unlink = os.replace, Path.unlink

        def replace_or_crash(src, dst):
            if crash_in == "replace" and Path(dst).name == "ckpt_000030.pt":  # the save's one rename
                raise Crash
            real_replace(src, dst)

        def unlink_or_crash(path, *args, **kwargs):
            if crash_in == "unlink" and path.name == "ckpt_000010.pt":  # step 30 is in place; step 10 was to go
                raise Crash
            real_unlink(path, *args, **kwargs)

        monkeypatch.setattr(os, "replace", replace_or_crash)
        monkeypatch.setattr(Path, "unlink", unlink_or_crash)
        with pytest.raises(Crash):
            tiny_run(run, steps=30, resume=True)
        monkeypatch.undo()
        loadable = set()
        for path in ddpm.find_checkpoints(run):
            try:
                loadable.add(ddpm.load_checkpoint(path)["step"])
            except ddpm.CheckpointError:
                pass
        assert {10, 20} <= loadable, (crash_in, loadable)
        tiny_run(run, steps=30, resume=True)
        assert_same_weights(newest(tmp_path / "reference"), newest(run))
        # A crash before the oldest was deleted leaves it until the next save.
        assert [ddpm.load_checkpoint(p)["step"] for p in ddpm.find_checkpoints(run)][:2] == [30, 20]


class NaNOnCalls(nn.Module):
    """An MLP whose prediction is NaN on the given forward calls (1-based)."""

    def __init__(self, bad_calls):
        super().__init__()
        self.net, self.calls, self.bad_calls = ddpm.MLP(2, 32, 1), 0, set(bad_calls)

    def forward(self, x_t, t, y=None):
        self.calls += 1
        out = self.net(x_t, t, y)
        return out * float("nan") if self.calls in self.bad_calls else out


def test_nan_loss_is_skipped_and_too_many_stop_training(tmp_path, capsys):
    """A NaN loss skips its update (weights stay finite) and is counted in metrics.csv; max_bad_steps NaN steps in
    a row stop training with a clear error, keeping the last good checkpoint."""
    ema, _ = tiny_run(tmp_path / "one", model=NaNOnCalls({7}), steps=20)
    assert all(p.isfinite().all() for p in ema.parameters())
    assert (tmp_path / "one" / "metrics.csv").read_text().splitlines()[-1].endswith(",1")
    assert "loss nan, gradient norm nan; update skipped (1 in a row)" in capsys.readouterr().err
    with pytest.raises(ddpm.UserError, match="NaN or Inf for 3 steps in a row .* last good checkpoint, .*_000010.pt"):
        tiny_run(tmp_path / "many", model=NaNOnCalls({12, 13, 14}), steps=20, max_bad_steps=3)
    state = ddpm.load_checkpoint(newest(tmp_path / "many"))
    assert state["step"] == 10 and all(v.isfinite().all() for v in state["model"].values())
    with pytest.raises(ddpm.UserError, match="NaN or Inf for 2 steps in a row .* no checkpoint was written"):
        tiny_run(tmp_path / "early", model=NaNOnCalls({1, 2}), steps=20, max_bad_steps=2)


def test_empty_or_non_finite_training_data_is_refused_before_anything_is_written(tmp_path):
    """An empty training set, or one holding NaN, is a clear error before the out-dir is created."""
    cfg = ddpm.TrainConfig(out_dir=str(tmp_path / "run"), steps=5, device="cpu")
    for x, match in [(torch.zeros(0, 2), "training set is empty"), (torch.tensor([[0.0, math.nan]]), "NaN or Inf")]:
        with pytest.raises(ddpm.UserError, match=match):
            ddpm.train(ddpm.MLP(), ddpm.Diffusion(10), ddpm.Data(x), cfg)
    assert not (tmp_path / "run").exists()


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """If the disk fills up while a checkpoint is written, training stops with a clear error, the previous
    checkpoint is untouched and no partial file is left behind."""
    tiny_run(tmp_path, steps=10)
    before = (newest(tmp_path)).read_bytes()
    real_save = torch.save

    def save_then_disk_full(obj, f):
        real_save(obj, f)
        f.truncate(100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save_then_disk_full)
    with pytest.raises(ddpm.UserError, match="checkpoint into .*No space left on device.*intact"):
        tiny_run(tmp_path, steps=20, resume=True)
    assert (newest(tmp_path)).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_000010.pt", "metrics.csv", "train.lock"]  # no partial
    monkeypatch.undo()

    def open_but_metrics_full(path, mode="r", *args, **kwargs):  # the disk fills up when a log row is appended
        if Path(path).name == "metrics.csv" and mode == "a":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(ddpm, "open", open_but_metrics_full, raising=False)
    with pytest.raises(ddpm.UserError, match="could not write .*metrics.csv .*No space left on device"):
        tiny_run(tmp_path, steps=20, resume=True)
    assert (newest(tmp_path)).read_bytes() == before


def test_unwritable_out_dir_is_a_clear_error(tmp_path):
    """An --out-dir that cannot be created (here: below a regular file) is a one-line error."""
    (tmp_path / "file").write_text("")
    with pytest.raises(ddpm.UserError, match="cannot create --out-dir"):
        tiny_run(tmp_path / "file" / "run")


def test_out_dir_that_refuses_writes_is_a_clear_error(tmp_path, monkeypatch):
    """An existing --out-dir where files cannot be created (read-only or no permission; simulated, since root
    ignores permissions) is a one-line error before any training."""
    def refusing(real_open):
        def refuse(path, *args, **kwargs):
            if str(path).startswith(str(tmp_path)):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_open(path, *args, **kwargs)
        return refuse

    monkeypatch.setattr(os, "open", refusing(os.open))
    monkeypatch.setattr(ddpm, "open", refusing(open), raising=False)
    with pytest.raises(ddpm.UserError, match="cannot write into --out-dir .*Permission denied"):
        tiny_run(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_gpu_fast_path_runs_on_the_cpu(tmp_path, monkeypatch, capsys):
    """The path a GPU run takes (bf16 autocast, torch.compile, channels-last memory, fused AdamW), forced on the CPU:
    it trains a U-Net, saves the plain module's weights (no "_orig_mod." prefix) in NHWC order with the fused
    optimizer's state, resumes bit-exactly, samples finite images and benchmarks. torch.compile runs its graph
    capture of forward and backward (Dynamo and AOTAutograd, dropout's random numbers included) with the
    "aot_eager" backend: inductor's code generation would add about 3 minutes of C++ compilation on a cold cache."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: real_compile(model, backend="aot_eager"))
    gpu_like = ddpm.FastPath(amp=torch.bfloat16, channels_last=True, fused_adam=True)
    monkeypatch.setattr(ddpm.FastPath, "choose", classmethod(lambda cls, cfg, device, images: gpu_like))
    fast = dict(kind="images", compile=True, amp="bf16", num_timesteps=20, batch_size=8)
    tiny_run(tmp_path / "a", steps=6, **fast)
    tiny_run(tmp_path / "b", steps=3, **fast)
    ema, cfg = tiny_run(tmp_path / "b", steps=6, resume=True, **fast)
    assert_same_weights(newest(tmp_path / "a"), newest(tmp_path / "b"))
    state = ddpm.load_checkpoint(newest(tmp_path / "b"))
    weight = state["model"]["conv_in.weight"]
    assert not any(name.startswith("_orig_mod.") for name in state["model"])
    assert weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last)
    assert state["optimizer"]["param_groups"][0]["fused"] is True
    assert all(p.dtype == torch.float32 and p.isfinite().all() for p in ema.parameters())
    x = ddpm.Diffusion(20).ddim_sample(ema, (3, 1, 8, 8), steps=5, y=torch.arange(3), guidance=2.0,
                                       generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 1, 8, 8) and x.isfinite().all()
    data = ddpm.Data(torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8), torch.arange(16) % 3, ("a", "b", "c"))
    model = ddpm.UNet(in_ch=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), image_size=8,
                      num_classes=3)
    result = ddpm.benchmark(model, ddpm.Diffusion(20), data, cfg, steps=2, warmup=1)
    assert result["img_per_s"] > 0 and result["flops_per_image"] > 0
    assert "amp bf16 | channels-last True | fused AdamW True | compile True" in capsys.readouterr().out


def test_fast_path_is_chosen_by_the_hardware_and_the_data(monkeypatch):
    """--amp auto is bf16 for images exactly where the device computes bf16 natively, never for points; --amp
    none and bf16 are obeyed; NHWC goes with bf16 on a GPU but only with float32 on a CPU; AdamW is fused on both."""
    cpu, cfg = torch.device("cpu"), ddpm.TrainConfig()
    for native in (False, True):
        monkeypatch.setattr(ddpm, "native_bf16", lambda device: native)
        images = ddpm.FastPath.choose(cfg, cpu, images=True)
        assert images.amp == (torch.bfloat16 if native else None) and images.channels_last == (not native)
        assert ddpm.FastPath.choose(cfg, cpu, images=False) == ddpm.FastPath(None, False, True)
        none = ddpm.FastPath.choose(ddpm.TrainConfig(amp="none"), cpu, images=True)
        assert none.amp is None and none.channels_last
        assert ddpm.FastPath.choose(ddpm.TrainConfig(amp="bf16"), cpu, images=False).amp == torch.bfloat16
    assert ddpm.FastPath.choose(cfg, torch.device("cuda"), images=True) == ddpm.FastPath(torch.bfloat16, True, True)
    monkeypatch.undo()
    # The hardware test itself: compute capability 8.0 (Ampere) and later on CUDA; AMX or AVX-512 BF16 on a CPU.
    for capability, native in (((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert ddpm.native_bf16(torch.device("cuda")) == native
    for flags, native in (("fpu avx2 avx512f", False), ("fpu avx512_bf16", True), ("amx_tile amx_bf16", True)):
        monkeypatch.setattr(Path, "read_text", lambda self, *a, f=flags, **k: f"flags\t: {f}\n")
        assert ddpm.native_bf16(cpu) == native
    assert not ddpm.native_bf16(torch.device("mps"))


def test_lock_keeps_a_second_run_out_and_dies_with_its_owner(tmp_path):
    """While a live process holds the out-dir's lock, a second run refuses and names it; once that process is
    SIGKILLed (leaving train.lock behind), the kernel has released its lock and a new run proceeds."""
    code = ("import sys, time, ddpm\n"
            "with ddpm.OutDirLock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=HERE)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ddpm.UserError, match=f"in use by another training run \\(pid {holder.pid} on "):
            tiny_run(tmp_path, steps=5)
        assert not ddpm.find_checkpoints(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / "train.lock").exists()  # the file outlives SIGKILL; the lock does not
    tiny_run(tmp_path, steps=5)
    assert ddpm.load_checkpoint(newest(tmp_path))["step"] == 5
    assert_lock_released(tmp_path)


@pytest.mark.skipif(os.name == "nt", reason="flock is POSIX's")
def test_a_file_system_without_locks_warns_and_trains(tmp_path, monkeypatch, capsys):
    """Where flock fails for another reason than "held" (ENOLCK: some cluster file systems), the run says so and
    trains without the guard instead of refusing as if another run held the folder."""
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    tiny_run(tmp_path, steps=5)
    assert "training without the guard" in capsys.readouterr().err
    assert ddpm.load_checkpoint(newest(tmp_path))["step"] == 5


@pytest.mark.parametrize("script", [train_moons, train_mnist, train_cifar])
def test_every_script_prints_its_help(script, capsys):
    """--help works for each script (help texts may contain "%", which argparse would take for a format), shows
    every flag with its default, and lists the choices of a field that has them."""
    config = {train_moons: train_moons.MoonsConfig, train_mnist: train_mnist.MnistConfig,
              train_cifar: train_cifar.CifarConfig}[script]
    assert ddpm.cli(config, script.main, ["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert all(ddpm.flag(f.name) in text for f in ddpm.fields(config))
    assert f"(default: {config.steps})" in text and "{linear,cosine}" in text
    if script is not train_moons:
        assert "{tiny,mnist,small,base,large}" in text


def test_short_runs_warn_about_warmup_and_finished_runs_say_so(tmp_path, capsys):
    """A run shorter than its warm-up says the learning rate never reaches --lr; resuming a run that is already at
    --steps says there is nothing to train (and trains nothing)."""
    tiny_run(tmp_path, steps=4, warmup=10)
    assert "--warmup 10 is longer than the run (--steps 4)" in capsys.readouterr().err
    tiny_run(tmp_path, steps=3, warmup=10, resume=True)
    assert "nothing to train: the checkpoint is at step 4" in capsys.readouterr().out
    assert ddpm.load_checkpoint(newest(tmp_path))["step"] == 4


def test_config_checks_and_command_line(capsys):
    """Impossible settings are UserErrors naming the flag; the command line has every field with its default and
    help text, booleans as --flag/--no-flag, and a bad flag is one line with exit status 2."""
    for bad, match in [(dict(steps=0), "--steps must be at least 1"), (dict(batch_size=0), "--batch-size"),
                       (dict(schedule="quad"), "--schedule must be one of linear, cosine"),
                       (dict(p_uncond=1.5), "--p-uncond"), (dict(resume=True, overwrite=True), "contradict")]:
        with pytest.raises(ddpm.UserError, match=match):
            ddpm.TrainConfig(**bad).check()
    if not torch.cuda.is_available():
        with pytest.raises(ddpm.UserError, match="--device cuda: not available on this machine"):
            ddpm.choose_device("cuda")
    with pytest.raises(ddpm.UserError, match="is not a device"):
        ddpm.choose_device("gpu0")
    cfg = ddpm.parse_config(train_moons.MoonsConfig, ["--steps", "7", "--no-class-cond", "--lr", "3e-4"])
    assert (cfg.steps, cfg.class_cond, cfg.lr, cfg.out_dir) == (7, False, 3e-4, "runs/moons")
    assert ddpm.cli(train_moons.MoonsConfig, None, ["--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    for name in [f.name for f in ddpm.fields(train_moons.MoonsConfig)]:
        assert ddpm.flag(name) in help_text
    assert "--class-cond, --no-class-cond" in help_text and "(default: 1800)" in help_text
    assert "std of the Gaussian noise" in help_text or "standard deviation of the Gaussian noise" in help_text
    assert ddpm.cli(train_moons.MoonsConfig, None, ["--steps", "many"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid int value: 'many'" in err


# ----------------------------------------------------------------------------------------------------------------------
# Real processes: SIGKILL, SIGINT, SIGTERM, and the scripts' exit statuses
# ----------------------------------------------------------------------------------------------------------------------

def moons_args(out_dir, steps, *extra):
    """A tiny moons run: ~1 ms per step, a checkpoint every 20 steps, a log line every 10."""
    return [sys.executable, str(HERE / "train_moons.py"), "--out-dir", str(out_dir), "--steps", str(steps),
            "--batch-size", "32", "--num-points", "256", "--num-timesteps", "40", "--hidden", "32", "--depth", "1",
            "--ckpt-every", "20", "--log-every", "10", "--sample-every", "0", "--num-samples", "200",
            "--device", "cpu", *extra]


def start_and_wait_for_training(args, until_step=1):
    """Starts a script and returns it once it has logged a training step ≥ until_step."""
    return wait_for_training(subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                              cwd=HERE), until_step)


def wait_for_training(proc, until_step=1):
    """proc (a script started with its output in a text pipe), once it has logged a training step ≥ until_step."""
    for line in proc.stdout:
        if line.startswith("step ") and int(line.split()[1].split("/")[0].replace(",", "")) >= until_step:
            return proc
    raise AssertionError(f"the run ended before step {until_step}; exit status {proc.wait()}")


def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path):
    """SIGKILL a training process at 3 random moments (each after a random step, plus a random 0-20 ms, so some
    land inside checkpoint writes), resuming the run each time, then let it finish: the final model and EMA
    tensors equal an uninterrupted run's bit for bit, and metrics.csv holds every logged step exactly once, with
    the same losses."""
    steps = 600
    assert ddpm.cli(train_moons.MoonsConfig, train_moons.main, moons_args(tmp_path / "ref", steps)[2:]) == 0
    out, rng = tmp_path / "killed", random.Random(0)
    for target in sorted(rng.sample(range(10, steps - 200, 10), 3)):
        resume = ["--resume"] if ddpm.find_checkpoints(out) else []
        proc = start_and_wait_for_training(moons_args(out, steps, *resume), until_step=target)
        time.sleep(rng.uniform(0.0, 0.02))
        proc.kill()
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert ddpm.cli(train_moons.MoonsConfig, train_moons.main, moons_args(out, steps, "--resume")[2:]) == 0
    assert_same_weights(newest(tmp_path / "ref"), newest(out))
    assert metric_rows(out) == metric_rows(tmp_path / "ref")
    assert [int(s) for s, _ in metric_rows(out)] == list(range(10, steps + 1, 10))


def test_resume_alone_continues_a_moved_run_in_its_new_folder(tmp_path, monkeypatch):
    """A run started with custom settings elsewhere and then moved to the default runs/moons continues there with
    `--resume --steps N` alone: settings from its checkpoint, files written in the folder it now lives in."""
    assert ddpm.cli(train_moons.MoonsConfig, train_moons.main, moons_args(tmp_path / "first", 40)[2:]) == 0
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "first").rename(tmp_path / "runs" / "moons")
    assert ddpm.cli(train_moons.MoonsConfig, train_moons.main, ["--resume", "--steps", "60"]) == 0
    assert ddpm.load_checkpoint(newest(tmp_path / "runs" / "moons"))["step"] == 60
    assert not (tmp_path / "first").exists()


def test_sigint_and_sigterm_save_a_checkpoint_and_exit_128_plus_signal(tmp_path):
    """Ctrl-C or SIGTERM finishes the step, writes a checkpoint at the step reached, prints the resume command and
    exits with 128 + the signal number (130, 143); resuming from there finishes the run. One run for each signal,
    the two side by side."""
    procs = {sig: subprocess.Popen(moons_args(tmp_path / sig.name, 10**6), stdout=subprocess.PIPE, text=True,
                                   stderr=subprocess.STDOUT, cwd=HERE, env={**os.environ, "OMP_NUM_THREADS": "1"})
             for sig in (signal.SIGINT, signal.SIGTERM)}  # a thread each: they share the machine
    for sig, proc in procs.items():
        wait_for_training(proc).send_signal(sig)
    for sig, proc in procs.items():
        out = tmp_path / sig.name
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode == 128 + sig, output
        step = ddpm.load_checkpoint(newest(out))["step"]
        assert f"at step {step}/" in output and f"checkpoint saved to {out / f'ckpt_{step:06d}.pt'}" in output
        assert "resume with: python" in output and output.rstrip().endswith("--resume")
        assert 0 < step < 10**6 and int(metric_rows(out)[-1][0]) <= step
        only = ["--out-dir", str(out), "--steps", str(step + 30), "--resume"]  # the other settings from the run
        assert ddpm.cli(train_moons.MoonsConfig, train_moons.main, only) == 0
        assert ddpm.load_checkpoint(newest(out))["step"] == step + 30


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("repeats", [1, 2])
def test_more_signals_during_the_save_keep_the_steps_and_a_third_aborts(tmp_path, monkeypatch, capfd, sig, repeats):
    """Signals that arrive while the first one's checkpoint is being written: a second one is told to wait and the
    checkpoint of the step reached is written (no step a checkpoint could keep is discarded); a third one aborts at
    once: exit status 128 + signal, "aborted", no traceback, the half-written file removed and the checkpoint before
    it intact. (In-process, so that the signals land inside the save every time; capfd, since the handler writes to
    file descriptor 2 directly.)"""
    sent, real_append, real_save = [], ddpm.MetricsLog.append, torch.save

    def append_then_signal(self, step, *values):
        real_append(self, step, *values)
        if step == 30:  # the first signal: finish this step and save
            sent.append(step)
            os.kill(os.getpid(), sig)

    def signal_inside_save(obj, f):
        if sent:  # the others, while that checkpoint is being written
            for _ in range(repeats):
                os.kill(os.getpid(), sig)
        real_save(obj, f)

    monkeypatch.setattr(ddpm.MetricsLog, "append", append_then_signal)
    monkeypatch.setattr(torch, "save", signal_inside_save)
    status = ddpm.cli(train_moons.MoonsConfig, train_moons.main, moons_args(tmp_path, 100)[2:])
    err = capfd.readouterr().err
    assert status == 128 + sig and "finishing this step" in err and "Traceback" not in err
    assert "still saving the 10 step(s) since the last checkpoint" in err
    kept = [ddpm.load_checkpoint(p)["step"] for p in ddpm.find_checkpoints(tmp_path)]
    assert kept == ([30, 20] if repeats == 1 else [20]) and ("aborted" in err) == (repeats == 2), err
    assert not list(tmp_path.glob(".*tmp*"))
    assert_lock_released(tmp_path)


@pytest.mark.parametrize("args, status, message", [
    (["--no-such-flag"], 2, "unrecognized arguments: --no-such-flag"),
    (["--batch-size", "x"], 2, "invalid int value: 'x'"),
    (["--steps", "0"], 1, "--steps must be at least 1, got 0"),
    (["--schedule", "quadratic"], 2, "invalid choice: 'quadratic'"),
    (["--resume"], 1, "no checkpoint in"),
    (["--num-points", "0"], 1, "--num-points must be at least 2"),
    (["--guidance", "3"], 1, "--guidance 3.0 needs --class-cond"),
])
def test_bad_command_lines_exit_with_one_line_and_change_nothing(tmp_path, args, status, message, capsys):
    """Bad input: the documented exit status, one line on stderr naming the problem, no traceback, and no folder or
    file created; through cli as the script calls it, and the first case also in a real process."""
    if args == ["--no-such-flag"]:
        run = subprocess.run([sys.executable, str(HERE / "train_moons.py"), "--out-dir", str(tmp_path / "run"),
                              *args], capture_output=True, text=True, cwd=HERE)
        assert run.returncode == status and message in run.stderr and run.stderr.count("\n") == 1
    assert ddpm.cli(train_moons.MoonsConfig, train_moons.main, ["--out-dir", str(tmp_path / "run"), *args]) == status
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_corrupted_checkpoint_with_resume_is_a_one_line_error_and_changes_nothing(tmp_path, capsys):
    """--resume on a run whose only checkpoint is corrupted: exit status 1, one line, the file untouched."""
    assert ddpm.cli(train_moons.MoonsConfig, train_moons.main, moons_args(tmp_path, 20)[2:]) == 0
    corrupt_middle(newest(tmp_path))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    capsys.readouterr()
    status = ddpm.cli(train_moons.MoonsConfig, train_moons.main, ["--out-dir", str(tmp_path), "--resume"])
    err = capsys.readouterr().err
    assert status == 1 and err.count("\n") == 1 and "is corrupted" in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


# ----------------------------------------------------------------------------------------------------------------------
# The scripts end to end, tiny settings
# ----------------------------------------------------------------------------------------------------------------------

def test_moons_density_is_a_density_with_the_entropy_of_thin_arcs():
    """moons_log_density is the density make_moons draws from: it integrates to 1 over the plane (a 0.02 grid, a fifth
    of the noise 0.1, within 1e-3; it came within 1e-7 here, as on a 0.01 grid); a class's density likewise; and for
    thin moons (noise 0.01) the entropy −E log p is that of a uniform law along the two arcs' total length 2π times a
    1-D Gaussian across them, log 2π + ½·log(2πe·0.01²), within 4 standard errors of its Monte-Carlo mean over 20,000
    fresh points plus 0.005 for the arcs' ends and curvature (of order noise/π)."""
    xs, ys = torch.arange(-1.6, 2.6, 0.02), torch.arange(-1.2, 1.7, 0.02)
    grid = torch.cartesian_prod(xs, ys)
    for labels in (None, torch.zeros(len(grid), dtype=torch.long), torch.ones(len(grid), dtype=torch.long)):
        mass = train_moons.moons_log_density(grid, 0.1, labels, nodes=400).exp().sum().item() * 0.02 ** 2
        assert abs(mass - 1) < 1e-3, mass
    points, _ = train_moons.make_moons(20_000, 0.01, torch.Generator().manual_seed(0), balanced=False)
    log_p = train_moons.moons_log_density(points, 0.01)
    thin = math.log(2 * math.pi) + 0.5 * math.log(2 * math.pi * math.e * 0.01 ** 2)
    assert abs(-log_p.mean().item() - thin) < 4 * log_p.std().item() / math.sqrt(len(points)) + 0.005


def test_expected_energy_distance_is_the_mean_over_independent_real_sets():
    """expected_energy_distance gives 2δ/n, what energy_distance averages to over pairs of independent sets of n
    points: the mean over 300 pairs at n = 100 lies within 4 standard errors of it (the standard error measured from
    the same 300 values). With labels, 2δ_same/n, the same for pairs of exactly balanced sets (half on each arc),
    which are nearer each other. Independent draws are not balanced: their upper-arc count has the binomial spread."""
    n, pairs = 100, 300
    g = torch.Generator().manual_seed(0)
    sets = [train_moons.make_moons(n, 0.05, g, balanced=False)[0] for _ in range(2 * pairs)]
    values = torch.tensor([train_moons.energy_distance(sets[2 * i], sets[2 * i + 1]) for i in range(pairs)])
    expected = sum(train_moons.expected_energy_distance(s) for s in sets[:20]) / 20
    assert abs(values.mean() - expected) < 4 * values.std() / math.sqrt(pairs), (values.mean(), expected)
    balanced = [train_moons.make_moons(n, 0.05, g) for _ in range(2 * pairs)]
    nearer = torch.tensor([train_moons.energy_distance(balanced[2 * i][0], balanced[2 * i + 1][0])
                           for i in range(pairs)])
    expected_balanced = sum(train_moons.expected_energy_distance(*s) for s in balanced[:20]) / 20
    assert abs(nearer.mean() - expected_balanced) < 4 * nearer.std() / math.sqrt(pairs), (nearer, expected_balanced)
    assert expected_balanced < 0.85 * expected  # 0.75×: a balanced set has fewer pairs on the same arc
    counts = [(train_moons.make_moons(n, 0.05, g, balanced=False)[1] == 0).sum().item() for _ in range(50)]
    assert len(set(counts)) > 3 and abs(sum(counts) / 50 - n / 2) < 4 * math.sqrt(n / 4 / 50)
    assert (train_moons.make_moons(n, 0.05, g)[1] == 0).sum() == n // 2


def test_default_moons_run_writes_its_outputs_is_sharp_and_close_to_real_moons(tmp_path, capsys):
    """The default moons run (drawing 2,000 samples instead of 5,000, for speed) writes its checkpoint, samples.npy
    ((N, 2) float32, in data coordinates), samples.png, loss.png, reverse.gif and snapshots; it puts under 1 % of its
    points beyond 3σ of both arcs, 50 ± 3 % nearer the upper arc, and is as close to fresh moons as two real sets are
    to each other, within 1.2×. Each threshold is widened by its sampling error at 2,000 points: 2.33 standard errors
    of a proportion (a one-sided 1 % risk), and for the energy distance (averaged over 5 fresh sets) 2 standard
    deviations of the real-vs-real floor, both measured here over 10 pairs of independent real sets (a model's
    samples are independent draws, so not a set split exactly in half); a Gaussian with the moons' own mean and
    spread (what a model gets without learning the shape) is far (> 0.02). The end-of-run lines report the off-arc
    share and the distance next to fresh moons' own, and a bound on −log likelihood no lower than the entropy."""
    n, out = 2000, tmp_path / "moons"
    args = ["--out-dir", str(out), "--num-samples", str(n), "--sample-every", "900", "--device", "cpu"]
    assert ddpm.cli(train_moons.MoonsConfig, train_moons.main, args) == 0
    printed = capsys.readouterr().out
    assert "off the arcs (beyond 3σ of both): " in printed and "% of the samples (fresh moons: " in printed
    samples = np.load(out / "samples.npy")
    assert samples.shape == (n, 2) and samples.dtype == np.float32
    for name in ("ckpt_001800.pt", "samples.png", "loss.png", "reverse.gif", "snapshots/step_000900.png",
                 "metrics.csv"):
        assert (out / name).stat().st_size > 0
    from PIL import Image
    assert Image.open(out / "reverse.gif").n_frames == 40
    samples = torch.from_numpy(samples)

    def se(p):  # the standard error of a proportion p measured on n points
        return math.sqrt(p * (1 - p) / n)

    assert train_moons.off_arc_share(samples, 0.05) < 0.01 + 2.33 * se(0.01)
    assert abs(train_moons.upper_share(samples) - 0.5) < 0.03 + 2.33 * se(0.5)
    real = [train_moons.make_moons(n, 0.05, torch.Generator().manual_seed(100 + i), balanced=False)[0]
            for i in range(20)]
    floor = torch.tensor([train_moons.energy_distance(real[2 * i], real[2 * i + 1]) for i in range(10)])
    distance = sum(train_moons.energy_distance(samples, r) for r in real[:5]) / 5
    assert distance < 1.2 * floor.mean() + 2 * floor.std(), (distance, floor.mean().item(), floor.std().item())
    gaussian = real[0].mean(0) + real[0].std(0) * torch.randn(n, 2, generator=torch.Generator().manual_seed(10))
    assert train_moons.energy_distance(gaussian, real[1]) > 0.02
    # The bound of the model's −log likelihood cannot lie below the data's entropy (cross-entropy ≥ entropy): both
    # are means over the same 2,000 fresh points, so compare them within 4 of their combined standard errors.
    bound, bound_se, entropy, entropy_se = map(float, re.search(
        r"fresh moons: (\S+) ± (\S+) bits/dim \(the moons' own entropy, the floor: (\S+) ± (\S+)\)", printed).groups())
    assert bound > entropy - 4 * math.hypot(bound_se, entropy_se) and 0 < entropy_se < 0.05

    # --sample-only: new samples from the checkpoint (another sampler), no training, and every file the run wrote
    # untouched: the new ones go beside them under names that say what was drawn, and the output says where.
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    args = ["--out-dir", str(out), "--sample-only", "--sampler", "ddim", "--sample-steps", "20", "--num-samples", "300"]
    assert ddpm.cli(train_moons.MoonsConfig, train_moons.main, args) == 0
    assert all(p.read_bytes() == data for p, data in before.items())
    new = {"samples_ddim20_w1_n300_seed0.npy", "samples_ddim20_w1_n300_seed0.png", "reverse_ddim20_w1_n300_seed0.gif"}
    assert {p.name for p in out.iterdir()} - {p.name for p in out.iterdir() if p in before or p.is_dir()} == new
    assert np.load(out / "samples_ddim20_w1_n300_seed0.npy").shape == (300, 2)
    printed = capsys.readouterr().out
    assert "step " not in printed and all(str(out / name) in printed for name in new)
    # DDIM steps are checked against the checkpoint's T (100).
    args = ["--out-dir", str(out), "--sample-only", "--sampler", "ddim", "--sample-steps", "150"]
    assert ddpm.cli(train_moons.MoonsConfig, train_moons.main, args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--sample-steps 150 exceeds the 100 timesteps this model was trained with" in err



def test_class_conditional_moons_put_each_label_on_its_moon(tmp_path):
    """With --class-cond, guided samples of label 0 lie on the upper moon and of label 1 on the lower one: the
    fraction nearer its own arc than the other is above 0.9 for each label (an unconditional model: about 0.5). 400
    steps suffice: seeds 0, 1, 2 gave 0.95 to 0.99 here (and 0.97 to 0.99 after 200)."""
    out = tmp_path / "cond"
    args = ["--out-dir", str(out), "--steps", "400", "--num-samples", "1000", "--num-timesteps", "100",
            "--sample-every", "0", "--class-cond", "--guidance", "2"]
    assert ddpm.cli(train_moons.MoonsConfig, train_moons.main, args) == 0
    samples = torch.from_numpy(np.load(out / "samples.npy")).double()
    labels = torch.arange(1000) % 2  # the script draws label 0, 1, 0, 1, ...
    to_upper = ((samples - torch.tensor([0.0, 0.0])).norm(dim=1) - 1).abs()   # distance to the upper circle
    to_lower = ((samples - torch.tensor([1.0, 0.5])).norm(dim=1) - 1).abs()   # distance to the lower circle
    assert (to_upper[labels == 0] < to_lower[labels == 0]).double().mean() > 0.9
    assert (to_lower[labels == 1] < to_upper[labels == 1]).double().mean() > 0.9


def make_image_folder(root, classes=("circle", "square", "stripe"), per_class=5, size=16):
    """A small ImageFolder of synthetic RGB PNGs, one sub-folder per class."""
    from PIL import Image
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.full((size, size, 3), 30 * k, dtype=np.uint8)
            pixels[i:i + 4, :, k] = 255
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize("script", [train_mnist, train_cifar])
def test_image_script_trains_resumes_samples_and_dumps(tmp_path, script, monkeypatch, capsys):
    """Each image script on an ImageFolder: trains (class grids every N steps, final grid, reverse picture, loss
    plot); resumes and samples with only --out-dir given (data, model and T come from the checkpoint); samples one
    class with --sample-only and dumps single PNGs of the requested classes, class-balanced, into a new folder."""
    config = script.MnistConfig if script is train_mnist else script.CifarConfig
    folder, out, dump = make_image_folder(tmp_path / "images"), tmp_path / "run", tmp_path / "dump"
    common = ["--data", str(folder), "--out-dir", str(out), "--model", "tiny", "--image-size", "16",
              "--batch-size", "4", "--num-timesteps", "20", "--sampler", "ddim", "--sample-steps", "4",
              "--num-samples", "6", "--log-every", "2", "--ckpt-every", "3", "--sample-every", "3", "--device", "cpu"]
    assert ddpm.cli(config, script.main, common + ["--steps", "6"]) == 0
    for name in ("metrics.csv", "loss.png", "samples.png", "reverse.png",
                 "samples/step_000003.png", "samples/step_000006.png"):
        assert (out / name).stat().st_size > 0, name
    state = ddpm.load_checkpoint(newest(out))
    channels = 1 if script is train_mnist else 3
    assert state["data_info"]["shape"] == [channels, 16, 16]
    assert state["data_info"]["class_names"] == ["circle", "square", "stripe"]

    assert ddpm.cli(config, script.main, ["--out-dir", str(out), "--steps", "8", "--resume"]) == 0
    assert ddpm.load_checkpoint(newest(out))["step"] == 8
    assert ddpm.cli(config, script.main, ["--out-dir", str(out), "--resume", "--model", "small"]) == 1
    assert "different configuration: --model (checkpoint 'tiny', now 'small')" in capsys.readouterr().err

    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    timesteps_used, real_draw = [], ddpm.draw
    monkeypatch.setattr(ddpm, "draw", lambda d, *a, **k: timesteps_used.append(d.num_timesteps) or real_draw(d, *a, **k))
    args = ["--out-dir", str(out), "--sample-only", "--label", "all", "--dump-samples", "7", "--dump-dir", str(dump)]
    assert ddpm.cli(config, script.main, args) == 0
    assert set(timesteps_used) == {20}  # the checkpoint's T, not the script's default 1000
    # Sampling never replaces what the run wrote; asked for single files, it draws no grid first.
    assert all(p.read_bytes() == data for p, data in before.items())
    new = {p.name for p in out.iterdir()} - {p.name for p in out.iterdir() if p in before or p.is_dir()}
    assert new == set() and "drawing" not in capsys.readouterr().out
    names = sorted(p.name for p in dump.iterdir())
    assert len(names) == 7 and sum(n.endswith("_circle.png") for n in names) == 3
    assert sum(n.endswith("_square.png") for n in names) == 2 and sum(n.endswith("_stripe.png") for n in names) == 2
    from PIL import Image
    image = Image.open(dump / names[0])
    assert image.size == (16, 16)
    args = ["--out-dir", str(out), "--sample-only", "--label", "square", "--guidance", "3", "--dump-samples", "3",
            "--dump-dir", str(dump)]
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    calls = len(timesteps_used)
    assert ddpm.cli(config, script.main, args) == 1 and "is not empty" in capsys.readouterr().err
    # Refused before any sampling or writing: no draw, no file changed or added.
    assert len(timesteps_used) == calls and files == {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert ddpm.cli(config, script.main, args[:-1] + [str(tmp_path / "squares")]) == 0
    assert sorted(p.name for p in (tmp_path / "squares").iterdir()) == [f"00000{i}_square.png" for i in range(3)]
    # One class: a square grid with a readable title, not 100 images in one 7,600-pixel row.
    args = ["--out-dir", str(out), "--sample-only", "--label", "1", "--num-samples", "100", "--seed", "3"]
    assert ddpm.cli(config, script.main, args) == 0
    assert {p.name for p in out.iterdir()} >= {"samples_ddim4_w2_n100_1_seed3.png", "reverse_ddim4_w2_n100_1_seed3.png"}
    width, height = Image.open(out / "samples_ddim4_w2_n100_1_seed3.png").size
    assert 300 <= width <= 1500 and 0.7 <= width / height <= 1.4, (width, height)


def test_image_scripts_print_the_held_out_bound(tmp_path, capsys):
    """A run on --data DIR/train prints the bound of its EMA model on images of DIR/test in bits/dim after training;
    --sample-only --nll N prints it alone (no picture drawn), the same number for the same seed: the subset and the
    x_t of each term are seeded. For 8-bit images the discretized decoder gives probabilities ≤ 1, so −log p ≥ 0 and
    so is the bound. A --data folder without a test sibling says why no bound is printed."""
    make_image_folder(tmp_path / "set" / "train")
    make_image_folder(tmp_path / "set" / "test", per_class=3)
    out = tmp_path / "run"
    common = ["--out-dir", str(out), "--model", "tiny", "--image-size", "16", "--batch-size", "4",
              "--num-timesteps", "20", "--num-samples", "3", "--device", "cpu"]
    args = ["--data", str(tmp_path / "set" / "train"), "--steps", "3", "--nll", "4"] + common
    assert ddpm.cli(train_cifar.CifarConfig, train_cifar.main, args) == 0
    after_training = capsys.readouterr().out
    bound = lambda text: [float(x) for x in re.findall(r"^bits/dim: (\S+) ± (\S+)", text, flags=re.M)[0]]
    assert "held-out images" in after_training and bound(after_training)[0] > 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    only = ["--out-dir", str(out), "--sample-only", "--nll", "4"]
    assert ddpm.cli(train_cifar.CifarConfig, train_cifar.main, only) == 0
    first = capsys.readouterr().out
    assert ddpm.cli(train_cifar.CifarConfig, train_cifar.main, only) == 0
    assert bound(first) == bound(capsys.readouterr().out) == bound(after_training)
    assert "drawing" not in first and before == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    elsewhere = ["--data", str(make_image_folder(tmp_path / "flat")), "--steps", "2", "--overwrite"] + common
    assert ddpm.cli(train_cifar.CifarConfig, train_cifar.main, elsewhere) == 0
    assert "bits/dim: not computed (no held-out images" in capsys.readouterr().out


@pytest.mark.parametrize("script", [train_mnist, train_cifar])
def test_offline_download_is_a_one_line_error(tmp_path, script, monkeypatch, capsys):
    """Without network the built-in data set cannot download: one line saying which files to put where, status 1,
    no run folder created."""
    import socket

    def offline(*args, **kwargs):
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    monkeypatch.setattr(socket, "create_connection", offline)
    config = script.MnistConfig if script is train_mnist else script.CifarConfig
    args = ["--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "run"), "--device", "cpu"]
    assert ddpm.cli(config, script.main, args) == 1
    err = capsys.readouterr().err
    expected = "MNIST/raw/" if script is train_mnist else "cifar-10-python.tar.gz"
    assert err.count("\n") == 1 and "could not download" in err and expected in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()  # its empty folders removed


def test_image_folder_errors(tmp_path, capsys):
    """--data pointing at a missing folder, a folder without images, or a folder with a broken image: one line
    each, naming the broken file, status 1."""
    (tmp_path / "empty").mkdir()
    broken = make_image_folder(tmp_path / "broken")
    (broken / "square" / "2.png").write_bytes((broken / "square" / "2.png").read_bytes()[:60])
    for folder, message in [(tmp_path / "missing", "no such folder"), (tmp_path / "empty", "no images found"),
                            (broken, f"cannot read {broken / 'square' / '2.png'}")]:
        args = ["--data", str(folder), "--out-dir", str(tmp_path / "run"), "--device", "cpu"]
        assert ddpm.cli(train_cifar.CifarConfig, train_cifar.main, args) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "run").exists()


def test_image_script_checks_label_and_out_dir_before_loading_or_training(tmp_path, capsys, monkeypatch):
    """A --label that is not a class, --resume without a checkpoint, and an image size the U-Net cannot take are
    refused before any training (and, for --resume, before the data set is even loaded)."""
    folder = make_image_folder(tmp_path / "images")
    monkeypatch.setattr(ddpm, "train", lambda *a, **k: pytest.fail("training started"))
    common = ["--data", str(folder), "--out-dir", str(tmp_path / "run"), "--model", "tiny", "--device", "cpu"]
    for extra, message in [(["--label", "triangle", "--image-size", "16"], "--label 'triangle' is not a class"),
                           (["--image-size", "15"], "cannot pass the 'tiny' U-Net"),
                           (["--resume", "--data", str(tmp_path / "not-loaded")], "--resume: no checkpoint")]:
        assert ddpm.cli(train_cifar.CifarConfig, train_cifar.main, common + extra) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "run").exists()


def test_bench_prints_its_figures_and_counts_training_flops(tmp_path, capsys):
    """--bench prints img/s, FLOPs per image, TFLOP/s and peak memory, and writes nothing. The FLOPs it counts for a
    training step are those of the forward pass times 2.5 to 3 (the backward pass costs about twice the forward;
    the input layer needs no input gradient)."""
    from torch.utils.flop_counter import FlopCounterMode
    args = ["--bench", "--model", "tiny", "--batch-size", "4", "--image-size", "16", "--out-dir", str(tmp_path / "b"),
            "--device", "cpu"]
    assert ddpm.cli(train_cifar.CifarConfig, train_cifar.main, args) == 0
    printed = capsys.readouterr().out
    for figure in ("img/s", "GFLOP/img (fwd+bwd)", "TFLOP/s", "peak process memory"):
        assert figure in printed
    assert not (tmp_path / "b").exists()
    unet, d = ddpm.build_unet("tiny", 3, 16, 10), ddpm.Diffusion(1000)
    cfg = train_cifar.CifarConfig(batch_size=4, device="cpu")
    data = ddpm.Data(torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8), torch.zeros(8, dtype=torch.long))
    figures = ddpm.benchmark(unet, d, data, cfg, steps=2, warmup=1)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(torch.randn(1, 3, 16, 16), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    assert 2.5 <= figures["flops_per_image"] / counter.get_total_flops() <= 3.0


def test_readme_python_example_runs(tmp_path, monkeypatch):
    """The README's first Python example runs as printed against Part I of ddpm.py alone (imported as `ddpm`) and
    gives samples of the right shape; the second, Part II's train(), then runs in the same scope with the whole file
    and writes a checkpoint at the requested step."""
    text = (HERE / "README.md").read_text()
    lesson, engine = [block.split("```")[0] for block in text.split("```python\n")[1:3]]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "ddpm", part_one_module()[0])
    scope = {}
    exec(compile(lesson, "README.md", "exec"), scope)
    assert scope["samples"].shape == scope["fast"].shape == (1000, 2) and scope["samples"].isfinite().all()
    scope["ddpm"] = ddpm
    exec(compile(engine, "README.md", "exec"), scope)
    assert ddpm.load_checkpoint(newest(tmp_path / "runs" / "mine"))["step"] == 500


# ----------------------------------------------------------------------------------------------------------------------
# A new user's first hour: the stumbles, each reproduced
# ----------------------------------------------------------------------------------------------------------------------

def files_in(folder):
    """{path: bytes} of every file below folder: "nothing written" is this, equal before and after."""
    return {p: p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


def test_another_scripts_run_is_named_as_such(tmp_path, capsys):
    """--resume or --sample-only on a folder that holds another script's run says whose run it is and which
    script to use, in one line, instead of complaining about flags the user never gave; nothing is written."""
    folder, out = make_image_folder(tmp_path / "images"), tmp_path / "run"
    args = ["--data", str(folder), "--out-dir", str(out), "--model", "tiny", "--image-size", "16", "--batch-size", "4",
            "--num-timesteps", "20", "--sampler", "ddim", "--sample-steps", "2", "--num-samples", "3", "--steps", "2",
            "--sample-every", "0", "--device", "cpu"]
    assert ddpm.cli(train_mnist.MnistConfig, train_mnist.main, args) == 0
    capsys.readouterr()
    before = files_in(out)
    for extra in (["--resume"], ["--resume", "--guidance", "1"], ["--sample-only"]):
        assert ddpm.cli(train_moons.MoonsConfig, train_moons.main, ["--out-dir", str(out), *extra]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "holds a MnistConfig run (U-Net 'tiny' on 1×16×16 images, 3 classes)" in err
        assert f"use MnistConfig {extra[0]}" in err and "--class-cond" not in err
    assert files_in(out) == before


def test_a_file_that_is_no_checkpoint_is_called_that(tmp_path):
    """Random bytes named like a checkpoint are "not a checkpoint", not a security threat (that message stays for
    real pickles that carry code, tested above)."""
    path = tmp_path / "ckpt_000001.pt"
    path.write_bytes(os.urandom(5000))
    with pytest.raises(ddpm.CheckpointError, match="is not a checkpoint: not a file written by torch.save"):
        ddpm.load_checkpoint(path)


@pytest.mark.parametrize("script, args, message", [
    (train_moons, ["--class-cond", "--guidance", "-1"], "--guidance must be at least 0, got -1.0"),
    (train_mnist, ["--guidance", "-1"], "--guidance must be at least 0, got -1.0"),
    (train_moons, ["--grad-clip", "nan"], "--grad-clip must be a finite number, got nan"),
    (train_moons, ["--lr", "inf"], "--lr must be a finite number, got inf"),
    (train_mnist, ["--image-size", "30"], "--image-size 30: the built-in images are 28×28"),
    (train_moons, ["--schedule", "linear", "--num-timesteps", "1"], "--num-timesteps must be at least 2 for the linear"),
])
def test_impossible_values_are_refused_before_anything_is_written(tmp_path, script, args, message, capsys):
    """Values that used to be accepted without a check are a one-line error naming the fix; nothing is created."""
    config = {train_moons: train_moons.MoonsConfig, train_mnist: train_mnist.MnistConfig}[script]
    assert ddpm.cli(config, script.main, ["--out-dir", str(tmp_path / "run"), *args]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and not (tmp_path / "run").exists()


def test_train_from_python_checks_its_config_and_data(tmp_path):
    """ddpm.train() runs cfg.check() itself (steps=-3 is an error, and nothing is written), and Data with labels of
    the wrong length or out of range is a UserError, not an IndexError deep inside training."""
    cfg = ddpm.TrainConfig(out_dir=str(tmp_path / "run"), steps=-3, device="cpu")
    with pytest.raises(ddpm.UserError, match="--steps must be at least 1, got -3"):
        ddpm.train(ddpm.MLP(), ddpm.Diffusion(10), ddpm.Data(torch.randn(8, 2)), cfg)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ddpm.UserError, match=r"give one label per example, \(8,\)"):
        ddpm.Data(torch.randn(8, 2), torch.zeros(5, dtype=torch.long), ("a",))


def test_refusal_from_python_says_how_in_python(tmp_path):
    """Running a notebook cell twice (a second train() into the same folder) says how to go on in Python as well as
    on the command line: resume=True or overwrite=True."""
    tiny_run(tmp_path, steps=5)
    with pytest.raises(ddpm.UserError, match=r"from Python: resume=True or overwrite=True in the config"):
        tiny_run(tmp_path, steps=5)


@pytest.mark.parametrize("script", [train_moons, train_mnist, train_cifar])
def test_help_says_what_each_flag_does_with_examples_and_exit_codes(script, capsys):
    """--help: path flags show DIR or FOLDER (not STR), --sample-every says 0 means never, and an epilog gives the
    script's examples, its outputs and the exit codes."""
    config = {train_moons: train_moons.MoonsConfig, train_mnist: train_mnist.MnistConfig,
              train_cifar: train_cifar.CifarConfig}[script]
    assert ddpm.cli(config, script.main, ["--help"]) == 0
    text = capsys.readouterr().out
    assert "--out-dir DIR" in text and " STR" not in text and "(0: never)" in " ".join(text.split())
    assert f"python {script.__name__}.py --resume" in text and "examples and outputs:" in text
    assert "exit status: 0 done; 1 a problem" in text
    if script is not train_moons:
        assert "--data FOLDER" in text and "--data-dir DIR" in text


def test_loss_plot_and_grids_are_readable(tmp_path):
    """The loss axis is labelled with plain numbers (0.3, not 3×10⁻¹), and a long class name widens the grid picture
    instead of being cut off at its edge."""
    (tmp_path / "metrics.csv").write_text("step,loss,lr,img_per_s,skipped_steps\n1,0.9,1,1,0\n2,0.3,1,1,0\n3,0.05,1,1,0\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    made = []
    real_savefig = plt.Figure.savefig

    def keep(fig, *args, **kwargs):
        made.append(fig)
        return real_savefig(fig, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plt.Figure, "savefig", keep)
        ddpm.plot_loss(tmp_path)
    labels = [t.get_text() for t in made[0].axes[0].get_yticklabels(minor=True) + made[0].axes[0].get_yticklabels()]
    assert any(labels) and not any("times" in s or "^" in s or "×" in s for s in labels), labels
    from PIL import Image
    images = torch.zeros(8, 3, 16, 16)
    ddpm.save_image_grid(images, 4, tmp_path / "short.png", ["a", ""])
    ddpm.save_image_grid(images, 4, tmp_path / "long.png", ["automobile, a long class name", ""])
    short, long = Image.open(tmp_path / "short.png").size, Image.open(tmp_path / "long.png").size
    assert long[0] > short[0] + 100 and long[1] == short[1]


def test_fallback_keeps_the_good_checkpoints(tmp_path):
    """After a resume fell back past a damaged newest checkpoint (set aside), the kept two are the new one and the
    good one it resumed from."""
    tiny_run(tmp_path, steps=20)
    corrupt_middle(newest(tmp_path))
    tiny_run(tmp_path, steps=30, resume=True, ckpt_every=30)  # back to step 10, then one save, at step 30
    assert [p.name for p in ddpm.find_checkpoints(tmp_path)] == ["ckpt_000030.pt", "ckpt_000010.pt"]
    assert (tmp_path / "ckpt_000020.pt.unusable").exists()


def test_first_log_row_after_a_longer_resume_averages_the_same_steps(tmp_path):
    """A run that ended between two log steps (here at step 23, log_every 5) and is resumed to 40 logs step 25 as the
    mean of steps 21-25, like an unbroken run, not of steps 24-25 alone."""
    tiny_run(tmp_path / "a", steps=40)
    tiny_run(tmp_path / "b", steps=23)
    tiny_run(tmp_path / "b", steps=40, resume=True)
    rows = dict(metric_rows(tmp_path / "b"))
    assert rows.pop("23") and rows == dict(metric_rows(tmp_path / "a"))


def test_ctrl_c_after_training_says_the_run_is_complete(tmp_path, monkeypatch, capsys):
    """Ctrl-C while the final pictures are drawn, after training has finished: exit 130 and a message that offers
    --sample-only, not --resume."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_moons, "save_reverse_gif", interrupted)
    assert ddpm.cli(train_moons.MoonsConfig, train_moons.main, moons_args(tmp_path, 20)[2:]) == 130
    err = capsys.readouterr().err
    assert "training had finished; draw samples with --sample-only" in err and "--resume" not in err


def test_a_closed_stdout_does_not_stop_training(tmp_path, monkeypatch):
    """`python train_moons.py | head -1`: the reader goes away; the run still trains to the end, writes its
    checkpoint and outputs, and returns 0 (its output goes to /dev/null from then on)."""
    read, write = os.pipe()
    os.close(read)  # the reader has gone: every write to the pipe now fails with EPIPE (BrokenPipeError)
    monkeypatch.setattr(sys, "stdout", open(write, "w", buffering=1))
    assert ddpm.cli(train_moons.MoonsConfig, train_moons.main, moons_args(tmp_path, 60, "--log-every", "1")[2:]) == 0
    assert ddpm.load_checkpoint(newest(tmp_path))["step"] == 60 and (tmp_path / "samples.png").exists()


def test_sigterm_outside_training_stops_with_a_line(tmp_path, monkeypatch, capsys):
    """SIGTERM while the final pictures are drawn (after training, or with --sample-only) stops at once with status
    143 and a line saying what is left, as Ctrl-C does, instead of ending the process without a word."""
    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    monkeypatch.setattr(train_moons, "save_reverse_gif", terminated)
    tic = time.perf_counter()
    assert ddpm.cli(train_moons.MoonsConfig, train_moons.main, moons_args(tmp_path, 20)[2:]) == 143
    assert time.perf_counter() - tic < 4
    assert "training had finished; draw samples with --sample-only" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is not ddpm.abort_on_signal  # cli's handler is gone again


def test_ctrl_c_while_torch_loads_is_quiet(tmp_path):
    """Ctrl-C in the first second, while the script is still importing torch: no traceback, the status of an
    interrupted program (130, or death by SIGINT if it came before Python was ready)."""
    # SIGINT as a terminal sends it: restored to its default in the child, so that Python turns it into
    # KeyboardInterrupt even where this test runs with SIGINT ignored (a background job of a shell).
    proc = subprocess.Popen([sys.executable, str(HERE / "train_moons.py"), "--out-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=HERE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (130, -signal.SIGINT) and b"Traceback" not in err, err.decode()


def test_readme_shows_the_cpu_only_install():
    """The README gives the plain install and, as a second line, PyTorch's documented CPU-only install."""
    text = (HERE / "README.md").read_text()
    assert "pip install -r requirements.txt --extra-index-url https://download.pytorch.org/whl/cpu" in text


def test_readme_line_counts_are_true():
    """The README's table of files gives each file's line count, and ddpm.py's two parts (Part II from the line
    "# PART II …" on; the rule above it ends Part I), as they are."""
    text = (HERE / "README.md").read_text()
    rows = re.findall(r"^\| `([\w/.]+\.py)` \| ([\d,]+) \|", text, flags=re.M)
    assert {name for name, _ in rows} == {"ddpm.py", "train_moons.py", "train_mnist.py", "train_cifar.py", "test_ddpm.py"}
    for name, count in rows:
        assert int(count.replace(",", "")) == len((HERE / name).read_text().splitlines()), name
    lines = (HERE / "ddpm.py").read_text().splitlines()
    part_one = next(i for i, line in enumerate(lines) if line.startswith("# PART II"))
    assert f"Part I, the lesson ({part_one:,} lines)" in text
    assert f"Part II, the engine room ({len(lines) - part_one:,} lines)" in text


def test_thread_count_is_a_rule_of_the_machine_and_flags_and_a_resume_keeps_it(tmp_path, monkeypatch):
    """use_threads sets PyTorch's CPU threads by a rule, never a timing (so the same command computes the same
    numbers however busy the machine is): --threads N, else OMP_NUM_THREADS, else every core the process may use.
    With several threads and OpenMP's binding on, the main thread is bound to the first core like a worker (each
    thread on a core of its own), and set free again after. The count is saved with the config, and a resume, from
    the command line or from Python with threads=0, computes with it again."""
    before, cores = torch.get_num_threads(), len(ddpm.CPU_MASK)
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert ddpm.use_threads(ddpm.TrainConfig()).threads == 1 == torch.get_num_threads()
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert ddpm.use_threads(ddpm.TrainConfig()).threads == cores == torch.get_num_threads()
        assert ddpm.use_threads(ddpm.TrainConfig(threads=1)).threads == 1 == torch.get_num_threads()
        if cores > 1 and ddpm.BIND_THREADS:
            ddpm.use_threads(ddpm.TrainConfig(threads=2))
            assert os.sched_getaffinity(0) == {min(ddpm.CPU_MASK)}
            ddpm.free_main_thread()
            assert os.sched_getaffinity(0) == ddpm.CPU_MASK
        tiny_run(tmp_path, steps=10, threads=1)
        assert ddpm.load_checkpoint(newest(tmp_path))["config"]["threads"] == 1
        torch.set_num_threads(cores)
        tiny_run(tmp_path, steps=20, resume=True)  # from Python, threads=0: the saved count
        assert torch.get_num_threads() == 1 and ddpm.load_checkpoint(newest(tmp_path))["config"]["threads"] == 1
        moons = moons_args(tmp_path / "m", 20, "--threads", "1")[2:]
        assert ddpm.cli(train_moons.MoonsConfig, train_moons.main, moons) == 0
        seen = []
        assert ddpm.cli(train_moons.MoonsConfig, lambda cfg: seen.append(cfg.threads),
                        ["--out-dir", str(tmp_path / "m"), "--resume"]) == 0  # from the command line
        assert seen == [1]
    finally:
        torch.set_num_threads(before)
        ddpm.free_main_thread()


def test_flags_of_one_call_are_not_taken_from_the_saved_run(tmp_path, capsys):
    """--resume and --sample-only take a run's saved settings, but not those that asked something of the call that
    saved them: a run started with --overwrite resumes with the command it prints on Ctrl-C (no "contradict"), and a
    run trained with --dump-samples resumes and samples without dumping again (or refusing its full dump folder)."""
    started = moons_args(tmp_path / "moons", 20, "--overwrite")[2:]
    assert ddpm.cli(train_moons.MoonsConfig, train_moons.main, started) == 0
    assert ddpm.cli(train_moons.MoonsConfig, train_moons.main,
                    ["--out-dir", str(tmp_path / "moons"), "--resume", "--steps", "40"]) == 0
    assert ddpm.load_checkpoint(newest(tmp_path / "moons"))["step"] == 40
    folder, out = make_image_folder(tmp_path / "images", per_class=2), tmp_path / "run"
    args = ["--data", str(folder), "--out-dir", str(out), "--model", "tiny", "--image-size", "16", "--batch-size", "2",
            "--num-timesteps", "10", "--sampler", "ddim", "--sample-steps", "2", "--num-samples", "3", "--steps", "2",
            "--sample-every", "0", "--device", "cpu", "--dump-samples", "2"]
    assert ddpm.cli(train_cifar.CifarConfig, train_cifar.main, args) == 0
    dumped = {p.name: p.read_bytes() for p in (out / "dump").iterdir()}
    assert len(dumped) == 2
    for more in (["--sample-only", "--label", "circle"], ["--resume", "--steps", "3"]):
        assert ddpm.cli(train_cifar.CifarConfig, train_cifar.main, ["--out-dir", str(out), *more]) == 0, more
        assert {p.name: p.read_bytes() for p in (out / "dump").iterdir()} == dumped
    assert "error" not in capsys.readouterr().err


def test_devices_seeds_and_threads_are_checked_where_they_enter(tmp_path, monkeypatch):
    """A GPU index the machine lacks, and more torchrun processes on a machine than it has GPUs, are one-line
    UserErrors (not an AssertionError after the data has loaded); a seed outside [0, 2³²) is refused before training
    (offsets of k·2³² are added to it); train() from Python applies cfg.threads."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ddpm.UserError, match=r"--device cuda:5: this machine has 1 GPU\(s\)"):
        ddpm.choose_device("cuda:5")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(ddpm.UserError, match=r"torchrun started 4 processes .* 1 GPU\(s\); give --nproc_per_node=1"):
        ddpm.choose_device("cuda")
    assert not torch.distributed.is_initialized()
    monkeypatch.undo()
    for seed in (-1, 2**32):
        with pytest.raises(ddpm.UserError, match=f"--seed must be between 0 and 4294967295, got {seed}"):
            ddpm.TrainConfig(seed=seed).check()
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(2)
        tiny_run(tmp_path / "one", steps=2, threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)



# ----------------------------------------------------------------------------------------------------------------------
# The walkthrough in docs/: cited names, pictures and exercise checks
# ----------------------------------------------------------------------------------------------------------------------
# The rule for cited names. In docs/*.md, outside fenced code blocks, a backticked span is a code name when it is a
# dotted Python identifier, optionally followed by an argument list or "= value" (`fit`, `Diffusion.sample`,
# `ddpm.fit(...)`, `EMA.update(step)`, `.model`, `clip_x0=True`); a span in double quotes (`"cosine"`, `"ema"`) is a
# schedule name, a U-Net preset or a key of the checkpoint's state inventory; a .py or .md file name must exist in the
# repository. Anything else (shapes, flags, output files, expressions with spaces) is prose and is not checked.

DOC_FILES = sorted((HERE / "docs").glob("*.md"))
CODE_SPAN = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
CODE_NAME = re.compile(r"^\.?([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(?:\(.*\)|=\S+)?$")
# Names the docs use that are locals of ddpm.py rather than attributes or parameters (the notation table's x̂_0 and
# x_{t−1}, the sampler's loop index) and torch's own names.
DOC_LOCAL_NAMES = {"x0_pred", "x_prev", "k"}


def doc_prose(path: Path) -> str:
    """The Markdown of one page without its fenced code blocks and indented code lines."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    return "\n".join(line for line in text.splitlines() if not line.startswith("    ") or line.lstrip()[:1] in "-*|")


def known_ddpm_names() -> tuple[set, dict]:
    """(bare names the docs may cite, {class name: its attribute names}) for the rule above."""
    import dataclasses as dc
    import inspect
    instances = {"Diffusion": ddpm.Diffusion(10), "MLP": ddpm.MLP(), "UNet": ddpm.build_unet("tiny", 3, 16, 2),
                 "EMA": ddpm.EMA(ddpm.MLP(), 0.9)}
    members = {}
    names = set(vars(ddpm)) | DOC_LOCAL_NAMES | {"None", "True", "False"}
    for name, obj in vars(ddpm).items():
        if inspect.isclass(obj) and obj.__module__ == "ddpm":
            attrs = set(dir(obj)) | ({f.name for f in dc.fields(obj)} if dc.is_dataclass(obj) else set())
            if name in instances:
                instance = instances[name]
                attrs |= set(vars(instance)) | set(getattr(instance, "_modules", {}))     # .model, submodules
                if isinstance(instance, torch.nn.Module):
                    attrs |= {n for n, _ in instance.named_buffers()}                     # betas, alphas, …
            members[name] = attrs
            names |= attrs
            functions = [f for _, f in inspect.getmembers(obj, inspect.isfunction)]
        elif inspect.isfunction(obj) and obj.__module__ == "ddpm":
            functions = [obj]
        else:
            continue
        for function in functions:
            names |= set(inspect.signature(function).parameters) - {"self"}
    return names, members


def test_docs_cite_only_names_that_exist():
    """Every ddpm.py name the walkthrough cites in backticks exists (functions, classes, methods, buffers,
    parameters: the rule is above), so that a rename in ddpm.py cannot leave the docs pointing at nothing; and every
    chapter ends its text with an "In the code" list."""
    names, members = known_ddpm_names()
    quoted = set(ddpm.UNET_PRESETS) | set(ddpm.SCHEDULES) | set(getattr(ddpm, "STATE_KEYS", ()))
    missing = []
    for path in DOC_FILES:
        for span in CODE_SPAN.findall(doc_prose(path)):
            span = span.strip()
            if re.fullmatch(r'"\w+"', span):
                ok = span.strip('"') in quoted
            elif re.fullmatch(r"[\w/.-]+\.(py|md)", span):
                ok = (HERE / span).exists() or (HERE / "docs" / span).exists()
            elif re.fullmatch(r"[\w/.-]+\.(png|jpg|gif|pt|csv|npy|txt|json|lock)", span):
                continue  # a file that a run writes
            elif m := CODE_NAME.match(span):
                parts = m[1].split(".")
                if parts[0] == "ddpm":
                    parts = parts[1:]
                if parts[0] == "torch":
                    try:
                        obj = torch
                        for part in parts[1:]:
                            obj = getattr(obj, part)
                        ok = True
                    except AttributeError:
                        ok = False
                elif len(parts) == 1:
                    ok = parts[0] in names
                else:
                    ok = len(parts) == 2 and parts[1] in members.get(parts[0], set())
            else:
                continue  # prose: a shape, a flag, a path, an expression
            if not ok:
                missing.append(f"{path.name}: `{span}`")
    assert not missing, "the docs cite names that ddpm.py does not have: " + ", ".join(missing)
    for path in DOC_FILES:
        if re.fullmatch(r"0\d_.*\.md", path.name):
            assert "## In the code" in path.read_text(), f"{path.name} has no 'In the code' section"


def test_docs_pictures_and_links_exist():
    """Every picture that README.md and docs/*.md show, and every local page they link to, exists in the repository
    (a figure renamed in make_figures.py, or a chapter renamed, cannot leave a broken link)."""
    broken = []
    for path in [HERE / "README.md", *DOC_FILES]:
        text = path.read_text()
        targets = re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", text) + re.findall(r'<img[^>]*\bsrc="([^"]+)"', text)
        for target in targets:
            if re.match(r"[a-z]+://|#|mailto:", target):
                continue
            if not (path.parent / target.split("#")[0]).exists():
                broken.append(f"{path.relative_to(HERE)} -> {target}")
    assert not broken, "missing pictures or pages: " + ", ".join(broken)


def test_docs_exercise_checks_run():
    """Each exercise's `Check:` code in docs/ runs, pasted as it stands into a fresh namespace (it imports what it
    uses), and its assertions hold against this ddpm.py (chapters 1 to 5 have at least one each). The global random
    state is restored afterwards."""
    found = {}
    for path in DOC_FILES:
        for i, code in enumerate(re.findall(r"^Check:\n```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)):
            found[path.name] = found.get(path.name, 0) + 1
            with torch.random.fork_rng():
                exec(compile(code, f"{path.name}, check {i + 1}", "exec"), {})
    chapters = [p.name for p in DOC_FILES if re.match(r"0[1-5]_", p.name)]
    assert len(chapters) == 5 and all(found.get(name, 0) >= 1 for name in chapters), found


# ----------------------------------------------------------------------------------------------------------------------
# Many processes: torchrun and DistributedDataParallel, on the CPU (gloo), real processes
# ----------------------------------------------------------------------------------------------------------------------

def torchrun(args, nproc=2, *extra):
    """torchrun's command line (its module form) starting `nproc` processes of a script on this machine; args is a
    script's command line as moons_args gives it ([python, script, flags…])."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *extra,
            *args[1:]]


def run_torchrun(args, nproc=2, *extra):
    return subprocess.run(torchrun(args, nproc, *extra), capture_output=True, text=True, cwd=HERE,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def start_processes(args, logs: Path, nproc=2):
    """The `nproc` processes of a script that torchrun would start, started directly (torchrun's launcher, which
    costs a process of its own, is tested above): process r is told RANK r, WORLD_SIZE and LOCAL_RANK, and where
    process 0 listens (MASTER_ADDR, MASTER_PORT), as torchrun tells it. Its stdout and stderr go to
    logs/<r>.out and logs/<r>.err. Returns the processes, process 0 first."""
    import socket
    with socket.socket() as s:  # a free port for process 0 to listen on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in range(nproc):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        with open(logs / f"{rank}.out", "w") as out, open(logs / f"{rank}.err", "w") as err:
            procs.append(subprocess.Popen(args, stdout=out, stderr=err, cwd=HERE, env=env))
    return procs


def run_processes(args, logs: Path, nproc=2, timeout=120) -> list[tuple[int, str, str]]:
    """start_processes, waited for: (exit status, stdout, stderr) of each process, process 0 first."""
    procs = start_processes(args, logs, nproc)
    return [(p.wait(timeout=timeout), (logs / f"{r}.out").read_text(), (logs / f"{r}.err").read_text())
            for r, p in enumerate(procs)]


def test_torchrun_trains_stops_on_sigterm_resumes_bit_exact_and_one_process_samples(tmp_path):
    """Two processes under torchrun train the moons: process 0 alone prints (one device line, which says how many
    processes share each batch, and each log line once) and writes checkpoints of plain weights (no DDP `module.`
    prefix) with the RNG state of each process, the two different. SIGTERM sent to torchrun (which forwards it to
    both processes) stops both after the same step: process 0 writes the checkpoint of that step and says so once.
    Resumed with two processes, the run ends with the same model and EMA tensors, bit for bit, and the same metrics
    rows, as a two-process run that never stopped; then a single process samples from it."""
    steps, env = 100, {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = subprocess.Popen(torchrun(moons_args(tmp_path / "ref", steps)), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, cwd=HERE, env=env)  # beside the run stopped below
    out = tmp_path / "stopped"
    proc = subprocess.Popen(torchrun(moons_args(out, steps)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=HERE, env=env)
    for line in proc.stdout:
        if line.startswith("step 10/"):
            break
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    printed, errors = reference.communicate(timeout=120)
    assert reference.returncode == 0, printed + errors
    assert printed.count("device: cpu") == 1 and printed.count(f"step {steps}/{steps}") == 1
    assert "device: cpu; 2 processes under torchrun, each with 50% of every batch" in printed
    state = ddpm.load_checkpoint(newest(tmp_path / "ref"))
    assert state["step"] == steps and not any(k.startswith("module.") for k in state["model"])
    assert len(state["rng"]["other_ranks"]) == 1
    assert not torch.equal(state["rng"]["torch"], state["rng"]["other_ranks"][0]["torch"])
    stopped = ddpm.load_checkpoint(newest(out))["step"]
    assert 10 <= stopped < steps and output.count(f"stopped by SIGTERM at step {stopped}/{steps}") == 1, output
    assert not list(out.glob(".*tmp*"))
    final = run_torchrun(moons_args(out, steps, "--resume"))
    assert final.returncode == 0, final.stdout + final.stderr
    assert f"resuming from {out / f'ckpt_{stopped:06d}.pt'} at step {stopped}\n" in final.stdout
    assert_same_weights(newest(tmp_path / "ref"), newest(out))
    assert metric_rows(out) == metric_rows(tmp_path / "ref")
    assert ddpm.cli(train_moons.MoonsConfig, train_moons.main, ["--out-dir", str(out), "--sample-only"]) == 0
    assert [np.load(f).shape for f in out.glob("samples_*.npy")] == [(200, 2)]  # --sample-only's own file


def gradient_check_trainer():
    """The Trainer of test_ddp_gradient_…: a labelled MLP (no dropout: only t, ε and the label dropout are random),
    batch 32 of 64 points, no clipping, on the CPU. Under torchrun, choose_device joins the process group and
    Trainer wraps the model in DDP."""
    cfg = ddpm.TrainConfig(batch_size=32, p_uncond=0.5, num_timesteps=50, grad_clip=0, device="cpu")
    gen = torch.Generator().manual_seed(0)
    data = ddpm.Data(torch.randn(64, 2, generator=gen), torch.arange(64) % 3, ("a", "b", "c"))
    torch.manual_seed(0)
    model = ddpm.MLP(dim=2, hidden=32, depth=2, num_classes=3)
    nn.init.normal_(model.out.weight, std=0.1)  # not the zeros of a fresh MLP, which stop the gradient of all else
    return ddpm.Trainer(model, ddpm.Diffusion(50, p_uncond=0.5), data, cfg, ddpm.choose_device("cpu"))


GRADIENT_WORKER = """
import sys
sys.path.insert(0, {here!r})
import torch, ddpm, test_ddpm
trainer = test_ddpm.gradient_check_trainer()
seen = dict(rng=torch.get_rng_state())  # the generator this process draws t, ε and the label dropout from
batch = trainer.data.batch
trainer.data.batch = lambda idx, flip: seen.setdefault("batch", batch(idx, flip))  # the examples it trains on
grads = lambda: {{n: p.grad.clone() for n, p in trainer.model.named_parameters()}}
trainer.optimizer.step = lambda: seen.setdefault("grads", grads())
trainer.step()  # the gradient the update would use, DDP's average
torch.save(seen, {out!r} + f"/rank{{trainer.rank}}.pt")
"""


def test_ddp_gradient_of_two_half_batches_equals_the_whole_batch_gradient(tmp_path):
    """Under torchrun, each of 2 processes computes L_simple on its half of the batch in Trainer.step, and DDP
    averages their gradients: the update then uses the gradient one process computes on the whole batch with the same
    t, ε and label dropout per example (replayed here from each process's generator), since the mean over the batch
    is the mean of the two halves' means. Both processes hold the same average, and their halves make up the batch.
    Tolerance: the two computations add the same float32 per-example terms in another order (all 32 at once, or
    16 + 16 and then a sum), and a float32 sum of n terms moves by at most n·u·Σ|terms| when reordered (u = 2⁻²⁴);
    so each entry may differ by 2·32·u·Σ_i|term_i|, with the per-example terms computed here. The gradient of one half
    alone, what a process without the averaging would use, is far outside that."""
    script = tmp_path / "gradient_worker.py"
    script.write_text(GRADIENT_WORKER.format(here=str(HERE), out=str(tmp_path)))
    for status, printed, errors in run_processes([sys.executable, str(script)], tmp_path / "logs"):
        assert status == 0, printed + errors
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for name in ranks[0]["grads"]:
        assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name])
    assert not torch.equal(ranks[0]["rng"], ranks[1]["rng"])  # each process its own stream

    trainer = gradient_check_trainer()  # a single process: the whole batch
    x0, y = trainer.data.batch(*trainer.order.next())
    for i, r in enumerate(ranks):
        rows = slice(16 * i, 16 * (i + 1))
        assert torch.equal(r["batch"][0], x0[rows]) and torch.equal(r["batch"][1], y[rows])
    draws = []  # per process, t, ε and the dropout uniforms in the order Diffusion.loss draws them
    for r in ranks:
        torch.set_rng_state(r["rng"])
        draws.append((torch.randint(0, 50, (16,)), torch.randn(16, 2), torch.rand(16)))
    t, noise, uniform = (torch.cat(d) for d in zip(*draws))

    def gradient(rows, scale=1.0):
        """The gradient of L_simple over the examples `rows` of the batch, with their replayed draws, times scale."""
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch, "randint", lambda *a, **k: t[rows])
            mp.setattr(torch, "randn_like", lambda x: noise[rows])
            mp.setattr(torch, "rand", lambda *a, **k: uniform[rows])
            trainer.optimizer.zero_grad(set_to_none=True)
            (trainer.diffusion.loss(trainer.model, x0[rows], y[rows]) * scale).backward()
        return {name: p.grad.clone() for name, p in trainer.model.named_parameters()}

    whole, half = gradient(slice(0, 32)), gradient(slice(0, 16))
    per_example = [gradient(slice(i, i + 1), 1 / 32) for i in range(32)]  # term i of the batch mean
    u = 2.0 ** -24
    for name, g in whole.items():
        tol = 2 * 32 * u * sum(term[name].abs() for term in per_example)
        assert ((ranks[0]["grads"][name] - g).abs() <= tol).all(), name
        assert ((half[name] - g).abs() > 100 * tol).any(), name  # so the test can tell a missing average


def test_dump_samples_are_the_same_images_with_one_and_two_processes(tmp_path):
    """--dump-samples split between two processes under torchrun (chunks of --batch-size 2 dealt out in turn: samples
    0, 1, 4 from process 0, 2, 3 from process 1) writes the same PNG files, byte for byte, as one process: each
    chunk's noise comes from its own index, not from the chunks before it."""
    folder, out = make_image_folder(tmp_path / "images"), tmp_path / "run"
    train = ["--data", str(folder), "--out-dir", str(out), "--model", "tiny", "--image-size", "16", "--batch-size", "2",
             "--num-timesteps", "20", "--sampler", "ddim", "--sample-steps", "3", "--num-samples", "3", "--steps", "2",
             "--sample-every", "0", "--device", "cpu"]
    assert ddpm.cli(train_cifar.CifarConfig, train_cifar.main, train) == 0
    dump = ["--out-dir", str(out), "--sample-only", "--dump-samples", "5", "--dump-dir"]
    assert ddpm.cli(train_cifar.CifarConfig, train_cifar.main, dump + [str(tmp_path / "one")]) == 0
    two = run_processes([sys.executable, str(HERE / "train_cifar.py"), *dump, str(tmp_path / "two")],
                        tmp_path / "logs")
    assert [status for status, _, _ in two] == [0, 0], two
    assert two[0][1].count(f"wrote 5 samples to {tmp_path / 'two'}") == 1  # process 0's stdout alone
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert len(names) == 5 and names == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_a_killed_process_stops_the_other_at_once_with_one_line(tmp_path):
    """SIGKILL process 0 of a two-process run: process 1 exits within seconds (well inside 60 s, not after a
    collective timeout), its whole stderr one line that says what happened, no traceback; the last checkpoint
    is intact."""
    out, logs = tmp_path / "run", tmp_path / "logs"
    first, other = start_processes(moons_args(out, 10**6), logs)
    deadline = time.monotonic() + 120
    while not ddpm.find_checkpoints(out) and time.monotonic() < deadline:  # training, past its first checkpoint
        time.sleep(0.2)
    first.kill()
    killed = time.monotonic()
    assert other.wait(timeout=60) == 1 and time.monotonic() - killed < 60
    err = (logs / "1.err").read_text()
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("error: lost contact with another torchrun process, which stopped or crashed"), err
    assert f"the checkpoints in {out} are intact: resume with --resume" in err
    assert ddpm.load_checkpoint(ddpm.find_checkpoints(out)[0])["step"] % 20 == 0


def test_torchrun_refusals_reach_every_process(tmp_path, monkeypatch, capsys):
    """A --batch-size that does not split evenly between torchrun's processes (each checks it: here one, told
    WORLD_SIZE=2), and an out-dir that another run holds (process 0 finds it locked, and tells the other), end every
    process with status 1 and the same one-line error, before anything is written."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    odd = moons_args(tmp_path / "odd", 20, "--batch-size", "33")[2:]
    assert ddpm.cli(train_moons.MoonsConfig, train_moons.main, odd) == 1
    message = "--batch-size 33 is the global batch, shared by 2 processes: give a multiple of 2"
    assert capsys.readouterr().err == f"error: {message}\n" and not (tmp_path / "odd").exists()
    monkeypatch.undo()
    (tmp_path / "held").mkdir()
    with ddpm.OutDirLock(tmp_path / "held"):
        held = run_processes(moons_args(tmp_path / "held", 20), tmp_path / "logs")
    for status, _, err in held:
        assert status == 1 and err.count("\n") == 1 and "is in use by another training run" in err, err
    assert not ddpm.find_checkpoints(tmp_path / "held")


# ----------------------------------------------------------------------------------------------------------------------
# A new user's first hour: names that never collide, absurd values, stops and waits
# ----------------------------------------------------------------------------------------------------------------------

def test_sample_only_names_differ_in_every_setting_that_changes_the_samples(tmp_path):
    """--sample-only file names carry the number of samples and the guidance weight with its sign: calls that draw
    different things (4 images or 100, w = 1e+06 or 1e-06) never write to the same file."""
    base = dict(out_dir=str(tmp_path), sample_only=True, sampler="ddim", sample_steps=50, label="7")
    names = [ddpm.output_path(train_mnist.MnistConfig(**base, **extra), "samples.png").name
             for extra in ({"guidance": 3.0, "num_samples": 100}, {"guidance": 3.0, "num_samples": 4},
                           {"guidance": 1e6}, {"guidance": 1e-6})]
    assert len(set(names)) == 4, names
    assert names[2] == "samples_ddim50_w1e+06_n100_7_seed0.png" and "w1e-06" in names[3]


def test_absurd_values_and_abbreviated_flags_are_refused(tmp_path, capsys):
    """More threads than cores, more than a billion steps, and a flag abbreviated (--step for --steps, which
    argparse would otherwise accept) are each refused with one line, before anything is created."""
    out = tmp_path / "run"
    for args, status, message in [
            (["--threads", str((os.cpu_count() or 1) + 1)], 1, f"this machine has {os.cpu_count()} cores"),
            (["--steps", "99999999999999999999"], 1, "is more than a billion"),
            (["--step", "10"], 2, "unrecognized arguments: --step 10")]:
        assert ddpm.cli(train_moons.MoonsConfig, train_moons.main, ["--out-dir", str(out), *args]) == status
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not out.exists()


def start_script(args):
    """A script started with one thread and its output unbuffered, in one binary pipe."""
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=HERE,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})


def wait_for_text(proc, text):
    """The output of proc (started by start_script) so far, once it holds `text` (progress lines end in a carriage
    return, not a newline, so the output is read as it comes, not line by line)."""
    seen = b""
    while text.encode() not in seen:
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            raise AssertionError(f"the run ended before printing {text!r}: {seen.decode()}")
        seen += chunk
    return seen.decode()


def test_ctrl_c_while_a_grid_is_drawn_stops_within_a_sampling_step_and_saves(tmp_path):
    """SIGINT to a real process while it draws a class grid (ancestral sampling, T = 1000, tens of seconds here)
    abandons the picture within about one sampling step, writes the checkpoint of the step reached and exits 130
    within seconds; a second SIGINT right after the first does not discard those steps either (it is told to wait
    for the save). Two runs side by side, one sent one SIGINT, the other two."""
    folder = make_image_folder(tmp_path / "images")
    args = [sys.executable, str(HERE / "train_mnist.py"), "--data", str(folder), "--model", "tiny", "--image-size",
            "16", "--batch-size", "4", "--num-timesteps", "1000", "--sampler", "ddpm", "--num-samples", "60",
            "--steps", "100", "--sample-every", "2", "--ckpt-every", "1000", "--log-every", "1", "--device", "cpu"]
    procs = {signals: start_script([*args, "--out-dir", str(tmp_path / f"{signals}")]) for signals in (1, 2)}
    for proc in procs.values():
        wait_for_text(proc, "step 2: drawing")
    tic = time.perf_counter()
    for repeat in range(2):
        for signals, proc in procs.items():
            if repeat < signals:
                proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
    for signals, proc in procs.items():
        output = proc.communicate(timeout=120)[0].decode()
        assert proc.returncode == 130, output
        assert time.perf_counter() - tic < 10, output  # drawing the whole grid takes several times longer
        assert "picture abandoned" in output and "stopped by SIGINT at step 2/100" in output, output
        assert ddpm.load_checkpoint(newest(tmp_path / f"{signals}"))["step"] == 2
        assert not (tmp_path / f"{signals}" / "samples" / "step_000002.png").exists()


def test_a_signal_before_the_first_step_stops_at_once(tmp_path, monkeypatch, capsys):
    """SIGINT while a run is still being set up (the model built, threads measured: on a CPU a big U-Net's step
    takes many seconds) stops at once, with exit status 130 and a line saying nothing was trained or lost, instead
    of waiting for the setup to end and training a step first."""
    real_init = ddpm.Trainer.__init__

    def slow_setup(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the rest of a long setup

    monkeypatch.setattr(ddpm.Trainer, "__init__", slow_setup)
    tic = time.perf_counter()
    status = ddpm.cli(train_moons.MoonsConfig, train_moons.main, moons_args(tmp_path, 100)[2:])
    assert status == 130 and time.perf_counter() - tic < 4
    assert "before the first training step: nothing was trained" in capsys.readouterr().err
    assert not ddpm.find_checkpoints(tmp_path)
    assert_lock_released(tmp_path)
    # A resume stopped the same way leaves the run it was to continue as it was, and says so.
    monkeypatch.setattr(ddpm.Trainer, "__init__", real_init)
    tiny = tmp_path / "resumed"
    assert ddpm.cli(train_moons.MoonsConfig, train_moons.main, moons_args(tiny, 20)[2:]) == 0
    saved = ddpm.find_checkpoints(tiny)
    monkeypatch.setattr(ddpm.Trainer, "__init__", slow_setup)
    capsys.readouterr()
    assert ddpm.cli(train_moons.MoonsConfig, train_moons.main, moons_args(tiny, 40, "--resume")[2:]) == 130
    err = capsys.readouterr().err
    assert f"nothing was lost; the last checkpoint written, {saved[-1]}, is intact (resume with --resume)" in err
    assert ddpm.find_checkpoints(tiny) == saved and ddpm.load_checkpoint(saved[-1])["step"] == 20


def test_cli_knows_a_script_from_a_notebook(monkeypatch):
    """cli treats main as a script's (its process ends on return: freeze the heap, keep the ignored signals) only when
    main is defined in the file `python` runs; a function typed into a notebook is in module __main__ but no file."""
    main_module = sys.modules["__main__"]
    assert not ddpm.runs_as_script(train_moons.main)  # pytest's __main__ is not train_moons.py
    monkeypatch.setattr(main_module, "__file__", train_moons.__file__, raising=False)
    assert ddpm.runs_as_script(train_moons.main)
    typed = {"__name__": "__main__"}
    exec(compile("def main(cfg):\n    return cfg\n", "<ipython-input-1>", "exec"), typed)
    assert typed["main"].__module__ == "__main__" and not ddpm.runs_as_script(typed["main"])
    monkeypatch.delattr(main_module, "__file__")  # a REPL's __main__ has no file
    assert not ddpm.runs_as_script(typed["main"]) and not ddpm.runs_as_script(train_moons.main)


def test_auto_sampler_is_sized_to_the_run_on_a_cpu_and_explicit_flags_win():
    """--sampler auto (the image scripts' default) samples a short CPU run with DDIM at a tenth of the steps between
    pictures, 10 to 100 (so drawing stays a small part of the run), and a GPU run with the ancestral sampler; an
    explicit --sampler or --sample-steps is kept as given; draw() takes exactly the resolved number of steps."""
    def resolved(device, **given):
        cfg = ddpm.resolve_sampler(train_cifar.CifarConfig(**given), device)
        return cfg.sampler, ddpm.sampling_steps(cfg)

    assert resolved("cpu", steps=300, sample_every=50) == ("ddim", 10)
    assert resolved("cpu", steps=300, sample_every=0) == ("ddim", 30)
    assert resolved("cpu") == ("ddim", 100)                      # 200,000 steps, a grid every 10,000
    assert resolved("cuda") == ("ddpm", 1000)
    assert resolved("cpu", sampler="ddpm") == ("ddpm", 1000)
    assert resolved("cuda", sample_steps=30) == ("ddim", 30)
    assert resolved("cpu", sampler="ddim", sample_steps=7) == ("ddim", 7)
    calls = []
    model = lambda x_t, t, y=None: (calls.append(1), torch.zeros_like(x_t))[1]  # noqa: E731
    cfg = train_cifar.CifarConfig(steps=300, sample_every=0, guidance=1.0)
    ddpm.draw(ddpm.Diffusion(1000), model, cfg, (2, 2))
    assert len(calls) == 30


def test_a_cpu_run_of_a_gpu_sized_unet_says_so_first(tmp_path, monkeypatch, capsys):
    """A CPU run of a U-Net over 10M parameters (DDPM's 35.7M `base`) says before training that it is sized for a
    GPU, with the img/s one timed step shows and the days the run would take; the timing leaves the run's random
    streams alone; a CPU-sized preset gets no such line."""
    data = ddpm.Data(torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8), torch.zeros(1, dtype=torch.long),
                     ("a", "b"))  # one image: the timed step is then one image's (fast), and the rule the same
    for preset, warned in (("base", True), ("tiny", False)):
        cfg = train_cifar.CifarConfig(model=preset, device="cpu")
        model = ddpm.build_unet(preset, 3, 32, 2)
        state = torch.get_rng_state()
        ddpm.warn_if_gpu_sized(model, ddpm.Diffusion(1000), data, cfg)
        assert torch.equal(torch.get_rng_state(), state)
        err = capsys.readouterr().err
        assert ("is sized for a GPU: on this CPU expect about" in err) == warned, err
        if warned:
            assert re.search(r"[\d.]+ img/s, [\d,.]+ days for 200,000 steps of batch 128", err), err


def test_moons_help_suggests_no_ddim_on_the_cosine_default_and_ddim_there_warns(tmp_path, capsys):
    """train_moons.py --help suggests DDIM only with --schedule linear (on the default cosine, T = 100 model DDIM
    gives an energy distance 25× the floor), and DDIM asked for on a cosine-schedule run prints a warning that
    says why and what to use instead."""
    assert ddpm.cli(train_moons.MoonsConfig, train_moons.main, ["--help"]) == 0
    for line in capsys.readouterr().out.splitlines():
        assert "--sampler ddim" not in line or "--schedule linear" in line, line
    assert ddpm.cli(train_moons.MoonsConfig, train_moons.main, moons_args(tmp_path, 20)[2:]) == 0
    capsys.readouterr()
    args = ["--out-dir", str(tmp_path), "--sample-only", "--sampler", "ddim", "--sample-steps", "10"]
    assert ddpm.cli(train_moons.MoonsConfig, train_moons.main, args) == 0
    assert "warning: DDIM on this model's cosine schedule" in capsys.readouterr().err


def test_make_figures_ignores_the_readers_runs_unless_asked(tmp_path, monkeypatch, capsys):
    """docs/make_figures.py draws the figures the docs describe whatever lies in runs/: with a moons checkpoint of
    the right kind in runs/moons and one in runs/mnist, it trains its own moons model (here a stub of fit) and keeps
    the committed MNIST figure; only --from-runs (from_runs=True) uses the checkpoint."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_figures", HERE / "docs" / "make_figures.py")
    figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figures)
    cfg = dict(num_timesteps=100, schedule="cosine", hidden=32, depth=1, num_points=256, batch_size=32,
               ckpt_every=20, log_every=10, sample_every=0, num_samples=200, device="cpu")
    run = ["--out-dir", str(tmp_path / "runs" / "moons"), "--steps", "20"]
    run += [x for k, v in cfg.items() for x in (ddpm.flag(k), str(v))]
    assert ddpm.cli(train_moons.MoonsConfig, train_moons.main, run) == 0
    (tmp_path / "runs" / "mnist").mkdir()
    (tmp_path / "runs" / "mnist" / "ckpt_000100.pt").write_bytes(b"not read")
    monkeypatch.setattr(figures, "ROOT", tmp_path)
    fitted = []
    monkeypatch.setattr(ddpm, "fit", lambda model, *a, **k: fitted.append(1) or model.eval())
    capsys.readouterr()
    figures.moons_model(class_cond=False, from_runs=False)
    figures.figure_mnist(from_runs=False)
    printed = capsys.readouterr().out
    assert fitted == [1] and "trained here" in printed and "kept the committed MNIST figure" in printed
    _, model, _, _ = figures.moons_model(class_cond=False, from_runs=True)
    assert fitted == [1] and "the EMA weights of runs/moons/ckpt_000020.pt" in capsys.readouterr().out


def test_loss_plot_tick_labels_never_overlap(tmp_path, monkeypatch):
    """loss.png's log-scale loss axis has readable labels: for a loss falling as MNIST's does (0.6 to 0.025), every
    tick label drawn is separate from the others (the boxes of 0.09 and 0.1 overlapped), labels are plain decimals,
    and there are at least three, so the scale can still be read."""
    import matplotlib.pyplot as plt
    steps = np.arange(100, 2600, 100)
    loss = 0.025 + 0.6 * np.exp(-steps / 150)
    rows = "".join(f"{s},{v:.6g},0.001,100.0,0\n" for s, v in zip(steps, loss))
    (tmp_path / "metrics.csv").write_text("step,loss,lr,img_per_s,skipped_steps\n" + rows)
    kept = []
    monkeypatch.setattr(plt, "close", lambda fig: kept.append(fig))  # look at the figure before it is closed
    ddpm.plot_loss(tmp_path)
    fig = kept[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    labels = [t for t in ax.yaxis.get_majorticklabels() + ax.yaxis.get_minorticklabels()
              if t.get_text() and ax.get_ylim()[0] <= t.get_position()[1] <= ax.get_ylim()[1]]
    boxes = sorted((t.get_window_extent(renderer) for t in labels), key=lambda b: b.y0)
    assert len(boxes) >= 3 and all(re.fullmatch(r"[\d.]+", t.get_text()) for t in labels)
    assert all(a.y1 <= b.y0 for a, b in zip(boxes, boxes[1:])), [t.get_text() for t in labels]
    plt.close(fig)


def test_messages_say_what_to_do(tmp_path, capsys):
    """Each of these mistakes gets one line that names the cause and the next step: every checkpoint damaged
    (restore or --overwrite); the fallback warning once, not twice; --resume --seed N on moons (names --seed, which
    draws the data); a fresh start in a folder another run is using (says so first); another script's run folder
    (no --resume advice that would be refused); "2-D points", not "2 data"; image files without class sub-folders;
    --data or --data-dir that is a file; a download error whose reason is on a later line."""
    def run(config, main, args):
        status = ddpm.cli(config, main, args)
        err = capsys.readouterr().err
        return status, err

    out = tmp_path / "moons"
    assert ddpm.cli(train_moons.MoonsConfig, train_moons.main, moons_args(out, 40)[2:]) == 0  # ckpt 40 and 20
    corrupt_middle(newest(out))
    status, err = run(train_moons.MoonsConfig, train_moons.main, ["--out-dir", str(out), "--resume", "--steps", "60"])
    assert status == 0 and err.count("falling back to the older") == 1, err
    for path in ddpm.find_checkpoints(out):
        corrupt_middle(path)
    status, err = run(train_moons.MoonsConfig, train_moons.main, ["--out-dir", str(out), "--resume"])
    assert status == 1 and "no usable checkpoint is left" in err and "--overwrite" in err, err
    assert ddpm.cli(train_moons.MoonsConfig, train_moons.main, moons_args(out, 20, "--overwrite")[2:]) == 0
    status, err = run(train_moons.MoonsConfig, train_moons.main, ["--out-dir", str(out), "--resume", "--seed", "3"])
    assert status == 1 and "--seed (checkpoint 0, now 3: this data is drawn from the seed" in err, err

    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); f.truncate(0); f.write('pid 1 on elsewhere'); "
                               "f.flush(); print('locked', flush=True); time.sleep(60)", str(out / "train.lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        status, err = run(train_moons.MoonsConfig, train_moons.main, moons_args(out, 20)[2:])
        assert status == 1 and "is in use by another training run (pid 1 on elsewhere)" in err, err
    finally:
        holder.kill()
        holder.wait()

    images = make_image_folder(tmp_path / "images")
    common = ["--model", "tiny", "--image-size", "16", "--batch-size", "4", "--steps", "2", "--device", "cpu"]
    status, err = run(train_mnist.MnistConfig, train_mnist.main, ["--out-dir", str(out), "--data", str(images),
                                                                 *common])
    assert status == 1 and "holds a MoonsConfig run (MLP on 2-D points), not one of MnistConfig" in err, err
    assert "--resume" not in err, err
    status, err = run(train_mnist.MnistConfig, train_mnist.main, ["--out-dir", str(out), "--resume"])
    assert status == 1 and "(MLP on 2-D points)" in err, err
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in (images / "circle").iterdir():
        p.rename(flat / p.name)
    a_file = tmp_path / "afile.txt"
    a_file.write_text("x")
    for args, message in [(["--data", str(flat)], "it has no class sub-folders (it holds 5 file(s) directly)"),
                          (["--data", str(a_file)], "is a file, not a folder"),
                          (["--data-dir", str(a_file)], "is a file, not a folder")]:
        flags = common if "--data" in args else common[:2] + common[4:]  # the built-in data: no --image-size
        status, err = run(train_mnist.MnistConfig, train_mnist.main, ["--out-dir", str(tmp_path / "new"), *args,
                                                                     *flags])
        assert status == 1 and message in err and err.count("\n") == 1, err
    reason = RuntimeError("Error downloading x.gz:\nTried https://a/, got:\n<urlopen error [Errno -3] no name>\n")
    assert ddpm.one_line(reason) == "Error downloading x.gz: <urlopen error [Errno -3] no name>"


def test_progress_in_a_log_file_keeps_a_few_updates(capsys):
    """Written to a file or pipe (not a terminal), a progress line is not repeated at every step, where each update
    would stay in the log: 1,000 quick steps leave the announcement and the final count alone."""
    with ddpm.Progress("drawing x.png", 1000, " steps", every=0.0) as progress:
        for _ in range(1000):
            progress.advance()
    out = capsys.readouterr().out
    assert out.count("drawing x.png") == 2 and out.startswith("\rdrawing x.png: 0/1,000 steps")
    assert "1,000/1,000 steps (" in out and out.endswith(" s)\n")
