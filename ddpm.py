"""DiffusionLab: Denoising Diffusion Probabilistic Models in one file.

A diffusion model learns to undo noise. The forward process q adds Gaussian noise to data x_0 in T small steps until
nothing but noise x_T ~ N(0, I) is left; a network ε_θ(x_t, t, y) learns to predict the noise in x_t, and the reverse
process p_θ walks back from fresh noise to a sample, one denoising step at a time. Here the network may also see a class
label y, and classifier-free guidance trades diversity for fidelity to that label at sampling time.

Two parts. PART I, THE LESSON, is all of DDPM in reading order: noise schedules → the diffusion process (forward,
loss, the two samplers, guidance) → embeddings → backbones (MLP, U-Net) → training, the whole idea (Alg. 1 and the
EMA in a plain loop). It imports only math, copy and torch, and runs on its own when pasted into a notebook.
PART II, THE ENGINE ROOM, starts at the banner "# PART II": config and command line, checkpoints and exact resume,
locks and signals, the resumable loop, benchmark, the image experiments. It builds on Part I, never re-implements it.

Run it (README.md has the details and measured times):
    python train_moons.py              # 2-D toy data, about 20 s on a 2-core CPU
    python train_mnist.py              # class-conditional digits, about 10 minutes on a 2-core CPU
    python train_cifar.py --resume     # class-conditional CIFAR-10, a GPU job; resumable at any time
    python -m pytest                   # the tests (test_ddpm.py), a few minutes on a CPU

References (arXiv ids):
    [DDPM]  Ho, Jain, Abbeel 2020, Denoising Diffusion Probabilistic Models, 2006.11239. Equation numbers below are its.
    [IDDPM] Nichol, Dhariwal 2021, Improved Denoising Diffusion Probabilistic Models, 2102.09672 (cosine schedule).
    [DDIM]  Song, Meng, Ermon 2021, Denoising Diffusion Implicit Models, 2010.02502.
    [CFG]   Ho, Salimans 2022, Classifier-Free Diffusion Guidance, 2207.12598.

Notation (paper → code → shape; B is the batch, "…" the data dimensions: (2,) for points, (C, H, W) for images):
    T                       num_timesteps                   int
    t                       t                               (B,) int64, 0-based: code t = k is paper t = k + 1
    β_t, α_t = 1 − β_t      betas, alphas                   (T,)
    ᾱ_t = ∏_{s≤t} α_s       alphas_cumprod                  (T,)
    ᾱ_{t−1} (ᾱ_0 = 1)       alphas_cumprod_prev             (T,)
    √ᾱ_t, √(1 − ᾱ_t)        sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod
    β̃_t, μ̃_t coefficients   posterior_variance, posterior_mean_coef1, posterior_mean_coef2
    x_0, x_t, x_{t−1}       x0, x_t, x_prev                 (B, …)
    ε, ε_θ(x_t, t, y)       noise, noise_pred               (B, …)
    x̂_0                     x0_pred                         (B, …)
    y, ∅ (no label)         y, NULL_LABEL = −1              (B,) int64

Deviations from the papers, each marked where it happens:
    1. The linear schedule's end points are scaled by 1000/T when T ≠ 1000 (as Improved DDPM's code does), so that
       x_T is close to pure noise for any T. At T = 1000 it is exactly DDPM's.
    2. Guidance weight: we write ε̃ = ε_∅ + w·(ε_y − ε_∅), so w = 1 is the plain conditional model and w = 0 the
       unconditional one; [CFG]'s w is our w − 1.
    3. U-Net attention uses 64-channel heads where the width allows (DDPM: one head); same parameters, faster kernels.
    4. The EMA decay warms up as min(decay, (1 + n)/(10 + n)): short runs are not dominated by the initial weights.
    5. The class embedding is added to the timestep embedding (DDPM has no labels; this is the usual way, as in [CFG]).
    6. GroupNorm keeps at least 4 channels per group (DDPM: 32 groups, which is 4 channels at its narrowest width);
       narrow networks such as the MNIST preset get fewer groups instead of per-channel normalisation.
    7. The ancestral sampler and the bound use the reverse variance σ_t² = β̃_t [DDPM §3.2: "fixedsmall"]; DDPM's
       released CIFAR-10 runs used σ_t² = β_t ("fixedlarge"), which the paper found about as good. β̃_t adds no noise
       on the last step. DDIM's σ_t(η) is β̃_t only at η = 1 (η = 0: no noise at all).
Left out on purpose: learned variances and the hybrid loss [IDDPM], v-prediction, latent diffusion, FID (use an external
tool on --dump-samples output). Computed: the bound in bits/dim, with DDPM's 8-bit decoder [§3.3] (Diffusion.nll_bound).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------------------
# 1. Noise schedules
# ----------------------------------------------------------------------------------------------------------------------
# The forward process q(x_t | x_{t−1}) = N(√(1 − β_t)·x_{t−1}, β_t·I) [DDPM Eq. 2] shrinks the signal a little and
# adds a little noise at each of T steps. The β_t are small (1e-4 to 0.02) so that each step back is nearly Gaussian,
# which is what lets a network learn it; over T = 1000 steps they compound to ᾱ_T = ∏(1 − β_t) ≈ 4e-5, so that x_T is
# noise whatever x_0 was. Everything else follows from the β_t: α_t = 1 − β_t, the running product ᾱ_t, and the
# signal-to-noise ratio of x_t, ᾱ_t/(1 − ᾱ_t). The schedule decides how fast that ratio falls:
#   linear [DDPM]   falls fast early; the last few hundred steps of small images are almost pure noise;
#   cosine [IDDPM]  ᾱ_t follows cos², spreading the loss of information more evenly over t.

SCHEDULES = ("linear", "cosine")


def make_beta_schedule(name: str, num_timesteps: int) -> torch.Tensor:
    """The variances β_1, …, β_T of the forward process.

    Args:
        name: "linear" [DDPM §4] or "cosine" [IDDPM Eq. 17].
        num_timesteps: T; at least 2 for "linear" (see below), at least 1 for "cosine".
    Returns:
        (T,) float64 tensor; entry k is β for paper step t = k + 1.
    The 0.999 cap: the cosine schedule's last β reaches it at every T (f(T) = 0 there); the linear schedule's
    β_T = 20/T (deviation 1) reaches it only for T ≤ 20, whose last steps then erase nearly everything.
    T = 1 would leave the linear schedule ᾱ_T = 0.9 (x_T not noise): refused."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of: {', '.join(SCHEDULES)}")
    if num_timesteps < (2 if name == "linear" else 1):
        raise ValueError(f"num_timesteps (T) must be at least {2 if name == 'linear' else 1} for the {name} "
                         f"schedule, got {num_timesteps}")
    T = num_timesteps
    # float64 throughout: ᾱ_t is a product of up to 1000 factors and float32 would lose its small values.
    if name == "linear":
        # [DDPM §4] β rises linearly from 1e-4 to 0.02 over T = 1000 steps.
        # Deviation 1: for T ≠ 1000 both ends are scaled by 1000/T so that ᾱ_T stays near 0.
        scale = 1000 / T
        betas = torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)
    else:
        # [IDDPM Eq. 17] ᾱ_t = f(t)/f(0) with f(t) = cos²(((t/T + s)/(1 + s))·π/2), s = 0.008,
        # and β_t = 1 − ᾱ_t/ᾱ_{t−1}; it destroys information more slowly than the linear schedule near t = 0.
        s = 0.008
        f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
        alphas_cumprod = f / f[0]
        betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    # [IDDPM §3.2] β ≤ 0.999 avoids the singularity at the end of the cosine schedule (and keeps tiny T sane).
    return betas.clamp(max=0.999)


# ----------------------------------------------------------------------------------------------------------------------
# 2. The diffusion process: forward noising, the loss, and the reverse samplers
# ----------------------------------------------------------------------------------------------------------------------
# DDPM in four facts, each implemented by one method of Diffusion:
#   1. q_sample     any x_t can be drawn from x_0 in one jump [Eq. 4]: x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε, so training
#                   never has to simulate the chain step by step;
#   2. loss         the variational bound on −log p_θ(x_0) [Eq. 5] is a sum of KL divergences between Gaussians and a
#                   decoder term L_0; a noise predictor ε_θ [Eq. 11] turns each KL into a weighted ‖ε − ε_θ(x_t, t)‖²,
#                   and dropping the weights gives L_simple [Eq. 14], which trains better [§3.4] (nll_bound: the bound);
#   3. q_posterior  given x_0, the step back q(x_{t−1} | x_t, x_0) is Gaussian with a known mean and variance
#                   [Eqs. 6–7]; the reverse process p_θ(x_{t−1} | x_t) is that step with x_0 replaced by the
#                   network's estimate x̂_0 [Eq. 15];
#   4. sample       start from x_T ~ N(0, I) and take T such steps [Alg. 2]; DDIM takes a shortcut through fewer.
# Classifier-free guidance [CFG] adds labels: one network learns both ε_θ(x_t, t, y) and, with the label dropped,
# ε_θ(x_t, t, ∅); at sampling time the difference between the two is amplified.
#
# Backbone contract: any denoiser is a callable  model(x_t, t, y=None) -> noise_pred  where x_t is (B, …), t is (B,)
# int64 in 0..T−1, y is (B,) int64 labels (NULL_LABEL = −1 meaning "no label") or None, and noise_pred has x_t's shape.
# Diffusion never looks inside the model, so the same code drives the MLP, the U-Net, or a formula (see the tests).

NULL_LABEL = -1  # the label ∅ of classifier-free guidance: "condition on nothing"


def check_labels(y: torch.Tensor | None, num_classes: int | None) -> torch.Tensor | None:
    """y (B,), checked where labels enter (data, samplers, fit), not in every forward pass: every label a class
    0 … num_classes − 1 or NULL_LABEL (y or num_classes None/0: no check). Unchecked, the label num_classes would
    silently mean ∅, and −2 would fail deep inside the embedding."""
    bad = y[(y != NULL_LABEL) & ((y < 0) | (y >= num_classes))] if y is not None and num_classes else []
    if len(bad):
        raise ValueError(f"label {bad[0].item()} is not a class: labels run from 0 to {num_classes - 1}, "
                         f"or NULL_LABEL ({NULL_LABEL}) for no label")
    return y


def broadcast(values: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """values (T,) looked up at each example's timestep t (B,), as (B, 1, …, 1) to scale a batch x of any rank:
    `broadcast(...) * x` is then one line for points (B, D) and images (B, C, H, W) alike."""
    return values[t].reshape(-1, *([1] * (x.dim() - 1)))


def randn_from(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """N(0, I) noise of `shape` on `device`, from `generator` (drawn on its own device, then moved: a CPU generator
    gives the same samples with the model on a CPU or a GPU) or, without one, from the global RNG."""
    return torch.randn(shape, generator=generator, device=device if generator is None else generator.device).to(device)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) in nats, elementwise (the arguments broadcast): each term of
    the bound [DDPM Eq. 5] is a sum of these over the dimensions."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1)


def discretized_gaussian_log_likelihood(x, means, log_scales) -> torch.Tensor:
    """log P(x), elementwise, for 8-bit data x in [−1, 1] (levels 2k/255 − 1) under N(means, e^(2·log_scales))
    integrated over x's bin [DDPM Eq. 13]: the edges lie 1/255 either side of each level, and the two end bins reach
    out to ±∞, so that the 256 probabilities sum to 1. In float64, since a bin's mass can be tiny."""
    level, means, inv_scale = torch.round((x.double() + 1) * 127.5), means.double(), torch.exp(-log_scales.double())
    # Edges from the integer level k, (2k ± 1)/255 − 1: neighbouring bins share an edge exactly, whatever x's rounding.
    upper = torch.where(level > 254.5, math.inf, ((2 * level + 1) / 255 - 1 - means) * inv_scale)
    lower = torch.where(level < 0.5, -math.inf, ((2 * level - 1) / 255 - 1 - means) * inv_scale)
    # log(Φ(b) − Φ(a)) through log Φ, mirrored (Φ(u) − Φ(l) = Φ(−l) − Φ(−u)) to keep Φ(b) from 1: exact in the tails.
    flip = lower > 0
    a, b = torch.where(flip, -upper, lower), torch.where(flip, -lower, upper)
    log_a, log_b = torch.special.log_ndtr(a), torch.special.log_ndtr(b)
    return log_b + torch.log(-torch.expm1(log_a - log_b))


class Diffusion(nn.Module):
    """The DDPM forward process q and reverse process p_θ for any backbone that keeps the contract above.

    It holds only the schedule (as buffers, recomputed from the arguments, never saved); the network is passed in.
    Args:
        num_timesteps: T, the number of noising steps.
        schedule: "linear" or "cosine" (see make_beta_schedule).
        p_uncond: the probability of training on the null label when labels are given (classifier-free guidance).
    """

    def __init__(self, num_timesteps: int = 1000, schedule: str = "linear", p_uncond: float = 0.1):
        super().__init__()
        self.num_timesteps, self.schedule, self.p_uncond = num_timesteps, schedule, p_uncond
        betas = make_beta_schedule(schedule, num_timesteps)  # float64
        alphas = 1 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = F.pad(alphas_cumprod[:-1], (1, 0), value=1.0)  # ᾱ_0 = 1: x_0 is not noised at all
        schedule_buffers = {
            "betas": betas,
            "alphas": alphas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
            # [DDPM Eq. 7] β̃_t = (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · β_t   (0 at t = 1: x_0 is then known exactly)
            "posterior_variance": betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod),
            # [DDPM Eq. 7] μ̃_t(x_t, x_0) = coef1·x_0 + coef2·x_t, coef1 = √ᾱ_{t−1}·β_t/(1 − ᾱ_t),
            #                                              coef2 = √α_t·(1 − ᾱ_{t−1})/(1 − ᾱ_t)
            "posterior_mean_coef1": alphas_cumprod_prev.sqrt() * betas / (1 - alphas_cumprod),
            "posterior_mean_coef2": alphas.sqrt() * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod),
        }
        # Buffers follow the module to the GPU with .to(device). They are not saved (persistent=False): the arguments
        # above recreate them exactly, so checkpoints hold only what was learned.
        for name, value in schedule_buffers.items():
            self.register_buffer(name, value.float(), persistent=False)

    # --- forward process and training -------------------------------------------------------------------------------

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Draws x_t ~ q(x_t | x_0) = N(√ᾱ_t·x_0, (1 − ᾱ_t)·I) [DDPM Eq. 4], with the given ε ~ N(0, I).
        Args: x0 (B, …), t (B,), noise (B, …).  Returns: x_t (B, …)."""
        # [DDPM Eq. 4] x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε : one jump instead of t small steps.
        return (broadcast(self.sqrt_alphas_cumprod, t, x0) * x0
                + broadcast(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

    def loss(self, model, x0: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The simple ε-prediction loss L_simple [DDPM Eq. 14, Alg. 1] on one batch, a scalar.

        Args:
            model: the backbone.  x0: (B, …) clean data.  y: (B,) labels, or None to train unconditionally.
        """
        B = x0.shape[0]
        t = torch.randint(0, self.num_timesteps, (B,), device=x0.device)  # [Alg. 1, line 3] t ~ Uniform({1, …, T})
        noise = torch.randn_like(x0)                                       # [Alg. 1, line 4] ε ~ N(0, I)
        if y is not None and self.p_uncond > 0:
            # [CFG Alg. 1] with probability p_uncond show the null label instead, so that one network learns both the
            # conditional ε_θ(x_t, t, y) and the unconditional ε_θ(x_t, t, ∅) that guidance needs.
            drop = torch.rand(B, device=x0.device) < self.p_uncond
            y = torch.where(drop, torch.full_like(y, NULL_LABEL), y)
        noise_pred = model(self.q_sample(x0, t, noise), t, y)
        # [Alg. 1, line 5] ‖ε − ε_θ(√ᾱ_t·x_0 + √(1 − ᾱ_t)·ε, t)‖², averaged over batch and dimensions.
        return F.mse_loss(noise_pred.float(), noise)

    # --- the reverse process ----------------------------------------------------------------------------------------

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, noise_pred: torch.Tensor) -> torch.Tensor:
        """x̂_0, the clean data a noise prediction implies: Eq. 4 solved for x_0 [DDPM Eq. 15].

        Args: x_t (B, …), t (B,), noise_pred (B, …).  Returns: x0_pred (B, …). At t = T it divides by √ᾱ_T (0.006 for
        linear, T = 1000; 5e-4 for the moons' cosine, T = 100): early in sampling x̂_0 is a rough guess; images clip it.
        """
        # [DDPM Eq. 15] x̂_0 = (x_t − √(1 − ᾱ_t)·ε_θ) / √ᾱ_t
        return ((x_t - broadcast(self.sqrt_one_minus_alphas_cumprod, t, x_t) * noise_pred)
                / broadcast(self.sqrt_alphas_cumprod, t, x_t))

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean and variance of q(x_{t−1} | x_t, x_0) = N(μ̃_t, β̃_t·I) [DDPM Eqs. 6–7].
        Args: x0, x_t (B, …), t (B,).  Returns: mean (B, …) and variance (B, 1, …, 1)."""
        # [DDPM Eq. 7] μ̃_t = √ᾱ_{t−1}·β_t/(1 − ᾱ_t)·x_0 + √α_t·(1 − ᾱ_{t−1})/(1 − ᾱ_t)·x_t
        mean = broadcast(self.posterior_mean_coef1, t, x_t) * x0 + broadcast(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, broadcast(self.posterior_variance, t, x_t)

    def guided_noise_pred(self, model, x_t, t, y=None, guidance: float = 1.0) -> torch.Tensor:
        """The ε the samplers use: ε_θ(x_t, t, y), steered by classifier-free guidance [CFG §3.2] when w ≠ 1.

        ε̃ = ε_∅ + w·(ε_y − ε_∅): w = 1 is the conditional model, w = 0 the unconditional one, w > 1 pushes samples
        towards what distinguishes class y from the rest (sharper, less diverse). Deviation 2: [CFG]'s w is our w − 1.
        Args: x_t (B, …), t (B,), y (B,) or None, guidance w.  Returns: (B, …).
        """
        if guidance == 1.0:
            return model(x_t, t, y)
        if y is None:  # the unconditional model would come back unchanged, silently ignoring the guidance asked for
            raise ValueError(f"guidance {guidance} needs labels y: without them there is nothing to be guided towards")
        # Both predictions from one forward pass over a doubled batch: first half with y, second half with ∅.
        null = torch.full_like(y, NULL_LABEL)
        noise_cond, noise_uncond = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
        # [CFG Eq. 6] ε̃ = (1 + w')·ε_y − w'·ε_∅ with w' = w − 1
        return noise_uncond + guidance * (noise_cond - noise_uncond)

    @torch.no_grad()
    def sample(self, model, shape, y=None, guidance: float = 1.0, generator: torch.Generator | None = None,
               clip_x0: bool = False, return_trajectory: bool = False):
        """Draws x_0 ~ p_θ(x_0 | y) by ancestral sampling [DDPM Alg. 2] with σ_t² = β̃_t, in T network calls.

        Put the model in eval mode first (dropout off). The samplers never touch the global RNG when given a generator.
        Args:
            model: the backbone.  shape: (B, …) of the output.  y: (B,) labels or None.  guidance: the weight w.
            generator: source of all the noise, for reproducible samples.
            clip_x0: clamp x̂_0 to [−1, 1] at every step (images live there; leave off for unbounded data).
            return_trajectory: also return every x_t.
        Returns: x_0 (B, …); with return_trajectory also a (T + 1, B, …) CPU tensor x_T, …, x_0.
        """
        device = self.betas.device
        y = None if y is None else check_labels(y, getattr(model, "num_classes", None)).to(device)
        x_t = randn_from(shape, generator, device)                     # [Alg. 2, line 1] x_T ~ N(0, I)
        trajectory = [x_t.cpu()]
        for k in reversed(range(self.num_timesteps)):                   # [Alg. 2, line 2] paper t = T, …, 1
            t = torch.full((shape[0],), k, device=device, dtype=torch.long)
            noise_pred = self.guided_noise_pred(model, x_t, t, y, guidance).float()
            # [Alg. 2, line 4] x_{t−1} = 1/√α_t·(x_t − β_t/√(1 − ᾱ_t)·ε_θ) + σ_t·z, computed in two stages that
            # give the same mean: x̂_0 from Eq. 15, then the posterior mean μ̃_t(x_t, x̂_0) of Eq. 7 (this is Eq. 11's
            # mean, and it lets us clip x̂_0 to the data range first, as DDPM's own code does for images).
            x0_pred = self.predict_x0(x_t, t, noise_pred)
            if clip_x0:
                x0_pred = x0_pred.clamp(-1, 1)
            mean, variance = self.q_posterior(x0_pred, x_t, t)
            # [Alg. 2, line 3] z ~ N(0, I) if t > 1, else z = 0: no noise on the last step. σ_t² = β̃_t [DDPM §3.2].
            z = randn_from(shape, generator, device) if k > 0 else torch.zeros_like(mean)
            x_prev = mean + variance.sqrt() * z
            if return_trajectory:
                trajectory.append(x_prev.cpu())
            x_t = x_prev
        return (x_t, torch.stack(trajectory)) if return_trajectory else x_t

    @torch.no_grad()
    def ddim_sample(self, model, shape, steps: int = 50, eta: float = 0.0, y=None, guidance: float = 1.0,
                    generator: torch.Generator | None = None, clip_x0: bool = False, return_trajectory: bool = False):
        """Draws x_0 ~ p_θ(x_0 | y) with DDIM [DDIM Eq. 12] on `steps` evenly spaced timesteps.

        The idea [DDIM §3]: the training loss depends only on the marginals q(x_t | x_0) of Eq. 4, and many processes
        share those marginals, some of them not Markovian. Their reverse steps can jump straight from one timestep to
        a much earlier one [DDIM §4.2], so the same trained network samples in 50 or 100 calls instead of T. Each
        jump predicts x̂_0, then re-noises it to the earlier level along the direction of the predicted ε, plus fresh
        noise of scale η. eta = 0 is deterministic given x_T; eta = 1 with steps = T is the ancestral sampler above.
        Args: as sample(), plus steps (1 ≤ steps ≤ T) and 0 ≤ eta ≤ 1: the step needs σ_τ² ≤ 1 − ᾱ_prev, which η ≤ 1
        guarantees at every step; beyond, steps break it and the marginals of Eq. 4 are lost, so it is refused.
        Returns: x_0 (B, …); with return_trajectory also a (steps + 1, B, …) CPU tensor.
        """
        if not 1 <= steps <= self.num_timesteps:
            raise ValueError(f"DDIM steps must be between 1 and T = {self.num_timesteps}, got {steps}")
        if not 0 <= eta <= 1:
            raise ValueError(f"DDIM eta must lie in [0, 1] (σ_τ² ≤ 1 − ᾱ_prev at every step), got {eta}")
        device = self.betas.device
        y = None if y is None else check_labels(y, getattr(model, "num_classes", None)).to(device)
        # The sub-sequence τ of timesteps, from T − 1 down to 0 (code indices).
        taus = torch.linspace(self.num_timesteps - 1, 0, steps, dtype=torch.float64).round().long().tolist()
        # DDIM's α is DDPM's ᾱ. Each step's coefficients in float64 (Python floats), cast when they meet the float32
        # data: near t = 0, 1 − ᾱ_t/ᾱ_prev is a difference of nearly equal numbers, and float32 loses σ² there.
        alphas_cumprod = torch.cumprod(1 - make_beta_schedule(self.schedule, self.num_timesteps), 0).tolist()
        x_t = randn_from(shape, generator, device)
        trajectory = [x_t.cpu()]
        for i, k in enumerate(taus):
            t = torch.full((shape[0],), k, device=device, dtype=torch.long)
            # After the last step "ᾱ_prev" is ᾱ_0 = 1: the output is x̂_0 itself.
            a_t, a_prev = alphas_cumprod[k], alphas_cumprod[taus[i + 1]] if i + 1 < len(taus) else 1.0
            noise_pred = self.guided_noise_pred(model, x_t, t, y, guidance).float()
            x0_pred = self.predict_x0(x_t, t, noise_pred)                      # [DDIM Eq. 12] "predicted x_0"
            if clip_x0:
                x0_pred = x0_pred.clamp(-1, 1)
                noise_pred = (x_t - math.sqrt(a_t) * x0_pred) / math.sqrt(1 - a_t)  # ε consistent with clipped x̂_0
            # [DDIM Eq. 16] σ_τ = η·√((1 − ᾱ_prev)/(1 − ᾱ_t))·√(1 − ᾱ_t/ᾱ_prev); η = 1 gives σ² = β̃ (DDPM)
            sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
            # [DDIM Eq. 12] x_prev = √ᾱ_prev·x̂_0 + √(1 − ᾱ_prev − σ²)·ε_θ + σ·z
            # 1 − ᾱ_prev − σ² = (1 − ᾱ_prev)·(1 − η²·(1 − ᾱ_t/ᾱ_prev)/(1 − ᾱ_t)) ≥ 0 for η ≤ 1; max(): rounding
            x_prev = math.sqrt(a_prev) * x0_pred + math.sqrt(max(0.0, 1 - a_prev - sigma ** 2)) * noise_pred
            if i + 1 < len(taus) and eta > 0:  # no noise on the last step, as in the ancestral sampler
                x_prev = x_prev + sigma * randn_from(shape, generator, device)
            if return_trajectory:
                trajectory.append(x_prev.cpu())
            x_t = x_prev
        return (x_t, torch.stack(trajectory)) if return_trajectory else x_t

    # --- the bound, computed ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def nll_bound(self, model, x0: torch.Tensor, y: torch.Tensor | None = None, discrete: bool = False):
        """The variational bound L_T + Σ_{t>1} L_{t−1} + L_0 ≥ −log p_θ(x_0) [DDPM Eqs. 5, 13] per example, in bits
        per dimension: the exact sum of all T + 1 terms, each at one draw of x_t ~ q(x_t | x_0).

        The reverse variances are the ancestral sampler's, σ_t² = β̃_t; at t = 1, where β̃_1 = 0, the decoder takes
        β̃_2, as DDPM's released code does ("posterior_log_variance_clipped"). Put the model in eval mode first.
        Args: model; x0 (B, …); y (B,) labels (the bound is then on −log p_θ(x_0 | y)) or None; discrete: x0 are 8-bit
        images in [−1, 1], L_0 is DDPM's discretized decoder [§3.3] and x̂_0 is clipped to [−1, 1] as clip_x0 does;
        else L_0 is a Gaussian density.  Returns: (B,) float64 bits/dim; their mean estimates the bound on the data.
        """
        B, T, D = x0.shape[0], self.num_timesteps, x0[0].numel()
        logvar = self.posterior_variance.double().log()
        logvar[0] = logvar[1] if T > 1 else math.log(self.betas[0].item())  # β̃_1 = 0 has no log: DDPM takes β̃_2
        # [DDPM Eq. 5] L_T = KL(q(x_T | x_0) ‖ N(0, I)) = KL(N(√ᾱ_T·x_0, (1 − ᾱ_T)·I) ‖ N(0, I)); no parameters.
        abar_T = self.alphas_cumprod[-1].double()
        total = normal_kl(abar_T.sqrt() * x0.double(), (1 - abar_T).log(), 0, abar_T * 0).flatten(1).sum(1)  # (B,)
        # All T timesteps, several per forward pass: `chunk` copies of the batch, copy j at timestep start + j. At most
        # 2^17 input values per pass on a CPU (167 MNIST digits; larger batches run slower there), 2^20 on a GPU.
        chunk = max(1, min(T, 2 ** (20 if x0.is_cuda else 17) // max(1, x0.numel())))
        for start in range(0, T, chunk):
            k = torch.arange(start, min(T, start + chunk), device=x0.device)
            t = k.repeat_interleave(B)                                           # (n·B,): n copies of the batch
            x0_n = x0.repeat(len(k), *[1] * (x0.dim() - 1))                      # (n·B, …)
            x_t = self.q_sample(x0_n, t, torch.randn_like(x0_n))                 # one x_t per term [Eq. 4]
            noise_pred = model(x_t, t, None if y is None else y.repeat(len(k))).float()
            x0_pred = self.predict_x0(x_t, t, noise_pred)
            x0_pred = x0_pred.clamp(-1, 1) if discrete else x0_pred
            mean_pred, _ = self.q_posterior(x0_pred, x_t, t)                     # μ_θ(x_t, t) [Eq. 11], as sampled
            mean_true, var_true = self.q_posterior(x0_n, x_t, t)                 # μ̃_t, β̃_t [Eq. 7]
            logvar_pred = broadcast(logvar, t, x_t)
            # [DDPM Eq. 5] L_{t−1} = KL(q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t)) for paper t ≥ 2 (code t ≥ 1) …
            terms = normal_kl(mean_true.double(), var_true.double().clamp(min=1e-30).log(), mean_pred.double(),
                              logvar_pred)
            if start == 0:  # … and the decoder L_0 = −log p_θ(x_0 | x_1) at code t = 0, where μ_θ = x̂_0 (Eq. 7, t = 1)
                mean_0, logvar_0, x = mean_pred[:B].double(), logvar_pred[:B], x0.double()
                terms[:B] = (-discretized_gaussian_log_likelihood(x, mean_0, 0.5 * logvar_0) if discrete  # [Eq. 13]
                             else 0.5 * (math.log(2 * math.pi) + logvar_0 + (x - mean_0) ** 2 / logvar_0.exp()))
            total += terms.flatten(1).sum(1).reshape(len(k), B).sum(0)
        # nats per example → bits per dimension: ÷ ln 2 for bits, ÷ D so that data of any size compare (DDPM's unit).
        return total / (D * math.log(2))


# ----------------------------------------------------------------------------------------------------------------------
# 3. Embeddings: how the network is told t and y
# ----------------------------------------------------------------------------------------------------------------------
# The network must know how noisy its input is (t) and, optionally, what to draw (y); both become vectors added inside
# every block. A raw integer t would be a poor input (one number spanning 0..999); sinusoids at geometrically spaced
# frequencies give each t a distinct, smoothly varying code, as positions get in a Transformer.

def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal features of the timestep, as the Transformer's position encoding [DDPM §4].

    Args: t (B,) int64, dim the feature size.  Returns: (B, dim) float32 [sin(t·f_i), cos(t·f_i)] with frequencies
    f_i = max_period^(−i/half), i = 0 … half − 1, spread geometrically from 1 down to just above 1/max_period.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]                   # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)   # (B, 2·half)
    return F.pad(emb, (0, dim - 2 * half))                       # odd dim: one zero column


class ClassEmbedding(nn.Module):
    """A learned vector per class plus one for the null label ∅ (row num_classes), used by guidance [CFG §3.2].

    ∅ is a class like any other to the network: training shows it p_uncond of the time, in place of the true label,
    so that its vector comes to mean "any class" and ε_θ(x_t, t, ∅) becomes the unconditional model.
    forward(y, batch_size): y (B,) int64 with NULL_LABEL for ∅, or None for an all-∅ batch → (B, dim).
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embed = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        if y is None:
            y = torch.full((batch_size,), NULL_LABEL, dtype=torch.long, device=self.embed.weight.device)
        return self.embed(torch.where(y == NULL_LABEL, self.num_classes, y))


def embed_conditions(t, y, dim: int, time_mlp: nn.Module, class_embed: nn.Module | None, batch_size: int):
    """The conditioning vector every block receives: time MLP of the sinusoid, plus the class vector (deviation 5)."""
    emb = time_mlp(timestep_embedding(t, dim))
    if class_embed is not None:
        emb = emb + class_embed(y, batch_size)
    elif y is not None:
        raise ValueError("this network was built without classes (num_classes=0) but was given labels y")
    return emb


# ----------------------------------------------------------------------------------------------------------------------
# 4. Backbones: ε_θ networks that keep the contract model(x_t, t, y=None) -> noise_pred
# ----------------------------------------------------------------------------------------------------------------------

class MLP(nn.Module):
    """ε_θ for low-dimensional points such as the 2-D moons: a residual MLP conditioned on t (and y).

    The point is lifted to `hidden` features; each block adds the embedding of t (and y) to the features and a small
    two-layer MLP of the sum back onto them (residual connections keep a deep stack easy to train).
    Args: dim data dimension, hidden width, depth residual blocks, num_classes (0: unconditional), fourier: also
    feed sin(2^k·x) and cos(2^k·x) for k < fourier, so that thin structures (the arcs of the moons) are easy to fit.
    forward(x_t (B, dim), t (B,), y (B,) or None) -> noise_pred (B, dim).
    """

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, num_classes: int = 0, fourier: int = 0):
        super().__init__()
        self.hidden, self.num_classes = hidden, num_classes
        self.register_buffer("freqs", 2.0 ** torch.arange(fourier, dtype=torch.float32), persistent=False)
        self.time_mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.class_embed = ClassEmbedding(num_classes, hidden) if num_classes > 0 else None
        self.inp = nn.Linear(dim * (1 + 2 * fourier), hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            for _ in range(depth))
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)  # start by predicting ε = 0: the loss begins at 1, training is calm
        nn.init.zeros_(self.out.bias)

    def forward(self, x_t, t, y=None):                 # x_t (B, dim), t (B,), y (B,) or None
        emb = embed_conditions(t, y, self.hidden, self.time_mlp, self.class_embed, x_t.shape[0])  # (B, hidden)
        angles = (x_t[:, :, None] * self.freqs).flatten(1)                    # (B, dim·fourier)
        h = self.inp(torch.cat([x_t, angles.sin(), angles.cos()], dim=1))      # (B, hidden)
        for block in self.blocks:
            h = h + block(h + emb)                      # every block sees t (and y)
        return self.out(F.silu(h))                      # (B, dim)


# --- U-Net [DDPM Appendix B]: a PixelCNN++-style U-Net of wide residual blocks, self-attention at low resolution ---
# The base preset on 32×32 images (widths 128·(1, 2, 2, 2), two residual blocks per level, attention at 16×16):
#
#   x_t 3×32² ─ conv_in ─ 128×32²: 2 ResBlocks ·························· 3 ResBlocks ─ norm, SiLU, conv_out ─ ε_θ
#                                      │ Downsample                  Upsample │
#                         256×16²: 2 (ResBlock → Attention) ········ 3 (ResBlock → Attention)
#                                      │ Downsample                  Upsample │
#                         256×8²:  2 ResBlocks ······················ 3 ResBlocks
#                                      │ Downsample                  Upsample │
#                         256×4²:  2 ResBlocks ─ middle: ResBlock, Attention, ResBlock ─ 3 ResBlocks
#
# Every activation of the down half (the dotted lines) is concatenated onto the input of one up-half block: these
# skip connections carry fine detail past the 4×4 bottleneck, which in turn sees the whole image at once. Every
# ResBlock receives the t (and y) embedding. Attention lets distant pixels interact; at 16×16 that is 256² pairs,
# affordable, where 32×32 would cost 16 times more.

def group_norm(ch: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups of at least 4 channels each: DDPM's 32 groups of ≥ 4 at width ≥ 128.
    Narrow networks get fewer groups: a group of one channel would be instance norm, which erases each image's mean
    brightness from the features, and the network then cannot get backgrounds right.
    """
    groups = max(g for g in range(1, min(32, max(1, ch // 4)) + 1) if ch % g == 0)
    return nn.GroupNorm(groups, ch)


class ResBlock(nn.Module):
    """The U-Net's workhorse: two 3×3 convolutions on a residual branch, told t (and y) in between.

    GroupNorm → SiLU → conv, + a projection of the embedding (one value per channel, the same at every pixel),
    GroupNorm → SiLU → dropout → conv; the input comes round the branch unchanged, or through a 1×1 convolution
    when the width changes. forward(x (B, in_ch, H, W), emb (B, emb_dim)) -> (B, out_ch, H, W).
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = group_norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch)
        self.norm2, self.dropout = group_norm(out_ch), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # Zero weight and bias, as in DDPM's code: the residual branch starts at 0, so a block whose width does not
        # change starts as the identity (where it does, the 1×1 skip is a random projection).
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, emb):                                     # x (B, in_ch, H, W), emb (B, emb_dim)
        h = self.conv1(F.silu(self.norm1(x)))                      # (B, out_ch, H, W)
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]       # t and y enter every block
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over all H·W positions, with a residual connection. Deviation 3: heads of 64 channels.

    Each pixel's features give a query, a key and a value (1×1 convolutions); every pixel then receives the average
    of all values weighted by softmax(query·key/√d), so far-apart parts of the image can agree (both eyes of a face).
    forward(x (B, C, H, W)) -> (B, C, H, W).
    """

    def __init__(self, ch: int, head_dim: int = 64):
        super().__init__()
        self.heads = ch // head_dim if ch % head_dim == 0 else 1
        self.norm = group_norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)

    def forward(self, x):                                           # x (B, C, H, W)
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(1)                   # each (B, heads, H·W, C/heads)
        h = F.scaled_dot_product_attention(q, k, v)                 # softmax(q·kᵀ/√d)·v, a fused kernel
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class Downsample(nn.Module):
    """Halves H and W with a strided 3×3 convolution (learned, unlike pooling, as in DDPM)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    """Doubles H and W: nearest-neighbour upsampling, then a 3×3 convolution."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """ε_θ for images [DDPM Appendix B]: a U-Net with skip connections between its two halves.

    Args:
        in_ch: image channels.  ch: base width.  ch_mult: width multiplier per resolution level.
        num_res_blocks: residual blocks per level (the up path has one more, to take the extra skip).
        attn_resolutions: side lengths (e.g. 16) at which self-attention follows each block.
        dropout: inside the residual blocks.  image_size: the side the attention resolutions refer to.
        num_classes: 0 for an unconditional model, else labels 0..num_classes−1 plus ∅.
    forward(x_t (B, in_ch, H, W), t (B,), y (B,) or None) -> (B, in_ch, H, W), for H, W divisible by 2^(levels−1).
    """

    def __init__(self, in_ch=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                 dropout=0.1, image_size=32, num_classes=0):
        super().__init__()
        self.ch, self.factor, self.num_classes = ch, 2 ** (len(ch_mult) - 1), num_classes
        emb_dim = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_embed = ClassEmbedding(num_classes, emb_dim) if num_classes > 0 else None
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)

        def level(blocks, attn, resample):  # one resolution level: residual blocks, their attention, a resampler
            module = nn.Module()
            module.blocks, module.resample = nn.ModuleList(blocks), resample
            module.attns = nn.ModuleList(AttentionBlock(b.conv1.out_channels) if attn else nn.Identity()
                                         for b in blocks)
            return module

        # Down path: remember the width of every activation it will hand across as a skip connection.
        skip_chs, width, res = [ch], ch, image_size
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(width, ch * mult, emb_dim, dropout))
                width = ch * mult
                skip_chs.append(width)
            last = i == len(ch_mult) - 1
            self.down.append(level(blocks, res in attn_resolutions, None if last else Downsample(width)))
            if not last:
                skip_chs.append(width)
                res //= 2
        self.mid1 = ResBlock(width, width, emb_dim, dropout)
        self.mid_attn = AttentionBlock(width)
        self.mid2 = ResBlock(width, width, emb_dim, dropout)
        # Up path: each block takes the current features concatenated with one skip, in reverse order.
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(ch_mult))):
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(width + skip_chs.pop(), ch * mult, emb_dim, dropout))
                width = ch * mult
            self.up.append(level(blocks, res in attn_resolutions, Upsample(width) if i > 0 else None))
            res *= 2
        self.norm_out = group_norm(width)
        self.conv_out = nn.Conv2d(width, in_ch, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # start by predicting ε = 0
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x_t, t, y=None):
        H, W = x_t.shape[-2:]
        if H % self.factor or W % self.factor:
            raise ValueError(f"image size {H}×{W} must be divisible by {self.factor} for this U-Net's downsampling")
        emb = embed_conditions(t, y, self.ch, self.time_mlp, self.class_embed, x_t.shape[0])  # (B, 4·ch)
        hs = [self.conv_in(x_t)]                                     # (B, ch, H, W)
        for lvl in self.down:
            for block, attn in zip(lvl.blocks, lvl.attns):
                hs.append(attn(block(hs[-1], emb)))
            if lvl.resample is not None:
                hs.append(lvl.resample(hs[-1]))                      # (B, C, H/2, W/2)
        h = self.mid2(self.mid_attn(self.mid1(hs[-1], emb)), emb)
        for lvl in self.up:
            for block, attn in zip(lvl.blocks, lvl.attns):
                h = attn(block(torch.cat([h, hs.pop()], dim=1), emb))
            if lvl.resample is not None:
                h = lvl.resample(h)                                  # (B, C, 2H, 2W)
        return self.conv_out(F.silu(self.norm_out(h)))               # (B, in_ch, H, W)


# Presets (--model). Parameter counts (checked by test_ddpm.py) without the class embedding, at 32×32×3 (mnist 28×28×1).
UNET_PRESETS = {
    "tiny": dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0),       # tests, smoke runs
    "mnist": dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(7,), dropout=0.0),  # CPU-friendly
    "small": dict(ch=64, ch_mult=(1, 1, 2), num_res_blocks=1, attn_resolutions=(16,), dropout=0.1),
    "base": dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1),  # DDPM CIFAR-10
    "large": dict(ch=128, ch_mult=(1, 2, 2, 3), num_res_blocks=2, attn_resolutions=(16, 8, 4), dropout=0.1),
}


def build_unet(preset: str, in_ch: int, image_size: int, num_classes: int) -> UNet:
    """A UNet from a preset name (see UNET_PRESETS). Args: preset name, in_ch image channels, image_size the side
    the attention resolutions refer to, num_classes (0 for an unconditional model)."""
    if preset not in UNET_PRESETS:
        raise ValueError(f"unknown U-Net preset {preset!r}; choose one of: {', '.join(UNET_PRESETS)}")
    return UNet(in_ch=in_ch, image_size=image_size, num_classes=num_classes, **UNET_PRESETS[preset])


# ----------------------------------------------------------------------------------------------------------------------
# 5. Training, the whole idea
# ----------------------------------------------------------------------------------------------------------------------
# [DDPM Alg. 1] repeats: x_0 from the data, t ~ Uniform({1, …, T}), ε ~ N(0, I), a gradient step on
# ‖ε − ε_θ(√ᾱ_t·x_0 + √(1 − ᾱ_t)·ε, t)‖². Diffusion.loss is all but the step; here are the step, the weights' moving
# average that samples come from [DDPM App. B], and the loop. Part II's train() runs the same train_step and EMA.

class EMA:
    """An exponential moving average of a model's weights, θ_ema ← d·θ_ema + (1 − d)·θ after every step. Samples
    come from the average [DDPM App. B, d = 0.9999]: it jitters less than the weights and samples cleaner.
    Deviation 4: d = min(decay, (1 + n)/(10 + n)) at step n, so early on it forgets the random initial weights."""

    def __init__(self, model: nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)  # eval: no dropout when sampling from it
        self.decay = decay
        self.params = (list(self.model.parameters()), list(model.parameters()))
        self.buffers = (list(self.model.buffers()), list(model.buffers()))

    @torch.no_grad()
    def update(self, step: int) -> None:
        # 0.1 at step 0 (the average is nearly the model), 0.9 at step 80, 0.999 at step 9,000, then `decay`.
        d = min(self.decay, (1 + step) / (10 + step))
        # θ_ema += (1 − d)·(θ − θ_ema) in one fused kernel for the whole list (a loop: a GPU kernel per tensor).
        torch.optim.swa_utils.get_ema_multi_avg_fn(d)(*self.params, None)
        for ema_buffer, buffer in zip(*self.buffers):  # buffers (none in our networks) are copied, not averaged
            ema_buffer.copy_(buffer)


def train_step(model, diffusion: Diffusion, x0: torch.Tensor, y: torch.Tensor | None = None, grad_clip: float = 1.0,
               amp_dtype: torch.dtype | None = None):
    """The gradient of one batch's loss [DDPM Alg. 1, lines 2–5], clipped; the optimizer step is the caller's.
    Args: model (plain, compiled or wrapped for several GPUs), x0 (B, …), y (B,) or None, grad_clip the largest
    gradient norm (0: none), amp_dtype torch.bfloat16 for mixed precision.  Returns: the loss and the gradient norm
    before clipping, as 0-dim tensors (not read here, so no wait for a GPU).
    """
    with torch.autocast(x0.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        loss = diffusion.loss(model, x0, y)
    loss.backward()
    # Clipping the norm to 1, as DDPM's released code does, keeps a rare huge gradient from wrecking Adam's moments.
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    return loss, grad_norm


def fit(model: nn.Module, diffusion: Diffusion, x0: torch.Tensor, y: torch.Tensor | None = None, steps: int = 2000,
        batch_size: int = 256, lr: float = 1e-3, ema_decay: float = 0.995, grad_clip: float = 1.0, seed: int = 0,
        log_every: int = 0) -> nn.Module:
    """Trains `model` to predict the noise [DDPM Alg. 1] on data held in memory; returns the EMA model to sample from.
    Args: model the backbone, x0 (N, …) the data (points, or images in [−1, 1]), y (N,) labels or None; steps,
    batch_size and lr of AdamW; ema_decay (see EMA); grad_clip (see train_step); seed for the batches, t, ε and
    label dropout; log_every: print the loss every N steps (0: quiet).  Returns: the EMA model, in eval mode.
    """
    check_labels(y, getattr(model, "num_classes", None))
    torch.manual_seed(seed)
    model.to(x0.device).train()
    diffusion.to(x0.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)  # plain Adam, as DDPM
    ema = EMA(model, ema_decay)
    for step in range(steps):
        idx = torch.randint(0, len(x0), (batch_size,), device=x0.device)   # [Alg. 1, line 2] x_0 ~ q(x_0)
        loss, _ = train_step(model, diffusion, x0[idx], None if y is None else y[idx], grad_clip)
        optimizer.step()                                                    # [Alg. 1, line 5] the gradient step
        optimizer.zero_grad(set_to_none=True)
        ema.update(step)
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps} | loss {loss.item():.4f}")
    return ema.model


# ======================================================================================================================
# PART II: the engine room. Nothing below is DDPM; it is what makes long runs fast and safe.
# ======================================================================================================================
# Part I trains a model in one go. A real run takes hours or days and meets Ctrl-C, preemption, full disks, crashes
# and typos; these sections make the same training step survive them. The promises, each tested in test_ddpm.py:
#   * a run stopped at any instant (Ctrl-C, SIGTERM, SIGKILL, power cut) resumes to the same weights, bit for bit on
#     a CPU, losing at most the steps since the last checkpoint: checkpoints hold every piece of state the loop uses;
#   * a checkpoint on disk is never torn: files are written aside, fsynced, then renamed into place;
#   * bad input and bad files end in one clear line (UserError), with nothing on disk changed;
#   * the same command on the same machine computes the same numbers, however busy the machine is.
# The sections, in file order:
#   6  TrainConfig, the flags made from it, and torchrun's processes joined (choose_device)
#   7  Data, held whole on the device, and BatchOrder, the order of its batches (saved)
#   8  checkpoints: what they hold (STATE_KEYS), atomic writes, verified reads, the resume guard
#   9  the out-dir lock, the signal handler (StopOnSignal), metrics.csv
#   10 the loop: Trainer (the state and one step), train() and _train_loop, benchmark()
#   11 cli(), which runs a script's main() and turns every outcome into a short message and an exit status
#   12 drawing samples, during training and after: progress lines, the stop, the loss plot
#   13 the image experiments shared by train_mnist.py and train_cifar.py
# A first reading: Trainer.step, then _train_loop, then STATE_KEYS and load_checkpoint.
import argparse
import contextlib
import dataclasses
import errno
import functools
import gc
import hashlib
import inspect
import os
import re
import shlex
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Callable, ClassVar

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

# Threads bound to cores (why: use_threads). The scripts, before they import torch, give OpenMP one place per core the
# process may use: OMP_PLACES="{0},{1},…". OpenMP then binds each of its threads to a place, the main thread (its
# thread 0) to the first, as it loads. The places also say which cores the process had before that.
BIND_THREADS = re.fullmatch(r"\{\d+\}(,\{\d+\})*", os.environ.get("OMP_PLACES", "")) is not None
CPU_MASK = ({int(cpu) for cpu in re.findall(r"\d+", os.environ["OMP_PLACES"])} if BIND_THREADS else
            os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1)))


def free_main_thread() -> None:
    """Lets the main thread run on any core of the process's own: free, it may go wherever the machine is idle, and
    the processes it starts (data loaders, a notebook's commands) may use every core. use_threads binds it again
    for a run of several threads."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, CPU_MASK)


free_main_thread()  # before any OpenMP thread starts
if BIND_THREADS:  # a child process (torchrun's, a notebook's command) decides its own threads
    del os.environ["OMP_PLACES"]

# ----------------------------------------------------------------------------------------------------------------------
# 6. Configuration and the command line
# ----------------------------------------------------------------------------------------------------------------------
# A run's settings are one dataclass, the single source of truth. Its fields are the command line's flags (each
# field's trailing comment is its --help text), check() refuses an impossible value before anything is created, and
# the whole config goes into every checkpoint, so that `--resume` alone continues a run with the settings it started
# with. A problem the user can fix is a UserError: one line on stderr, exit status 1, no traceback. So is a failed
# write (OSError); a stop by a signal has exit statuses of its own (cli); any other exception is a bug, and keeps
# its traceback.


class UserError(Exception):
    """A problem the user can fix: bad settings, a missing or unreadable file, a full disk. The scripts print it as
    one line without a traceback and exit with status 1."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used: unreadable, corrupted, foreign, or carrying pickled code."""


class TrainingInterrupted(Exception):
    """Raised by train() after SIGINT or SIGTERM, once the checkpoint is written; exit_code is 128 + the signal."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def flag(name: str) -> str:
    """The command-line flag of a config field: out_dir -> --out-dir."""
    return "--" + name.replace("_", "-")


def one_line(error: BaseException) -> str:
    """The first line of an exception's message (library messages can run to paragraphs); a first line that only
    announces the reason ("Error downloading x.gz:") gets the last line, where the reason is, after it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return f"{lines[0]} {lines[-1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


@dataclass
class TrainConfig:
    """Settings of a training run. Scripts subclass it to change defaults and add fields. The command line is made
    from it (parse_config): each field becomes --field-name and the comment after it becomes its --help text.

    In a notebook, build it directly, TrainConfig(out_dir="runs/x", steps=500); train() checks it (cfg.check()).
    The whole config is saved in every checkpoint; guard_resume compares against it.
    """
    out_dir: str = "runs/default"   # folder for checkpoints, metrics.csv and pictures
    resume: bool = False            # continue the run in --out-dir with its saved settings (give only what changes)
    overwrite: bool = False         # start afresh over a checkpoint (deletes checkpoints and metrics.csv, not pictures)
    device: str = "auto"            # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps
    threads: int = 0                # CPU threads for PyTorch (0: the rule in use_threads; OMP_NUM_THREADS sets it too)
    seed: int = 0                   # seeds the weights, the noise and the data order (and the samples drawn)
    num_timesteps: int = 1000       # T, the number of noise levels [DDPM: 1000]; small T: see make_beta_schedule
    schedule: str = "linear"        # noise schedule: linear [DDPM] or cosine [IDDPM]
    p_uncond: float = 0.1           # probability of training on the null label, for guidance [CFG: 0.1 to 0.2]
    steps: int = 10_000             # optimizer steps to train for (not epochs)
    batch_size: int = 128           # examples per step [DDPM CIFAR-10: 128]
    lr: float = 2e-4                # AdamW learning rate after the warm-up [DDPM CIFAR-10: 2e-4]
    warmup: int = 1000              # steps over which the learning rate rises linearly to --lr [DDPM code: 5000]
    lr_decay: str = "none"          # then: none (constant, as DDPM) or cosine (down to 0 at --steps)
    weight_decay: float = 0.0       # AdamW weight decay (0 is plain Adam, as in DDPM)
    grad_clip: float = 1.0          # clip the gradient norm to this (0: no clipping) [DDPM: 1]
    ema_decay: float = 0.9999       # decay of the moving average of the weights that samples come from [DDPM: 0.9999]
    amp: str = "auto"               # mixed precision: auto (bf16 for images on hardware with native bf16), bf16, none
    compile: bool = False           # torch.compile the model for training (checkpoints keep the plain weights)
    max_bad_steps: int = 5          # stop after this many NaN/Inf losses in a row (each such step is skipped)
    log_every: int = 100            # print a log line and append a row to metrics.csv every N steps
    sample_every: int = 1000        # save pictures sampled from the EMA model every N steps (0: never)
    ckpt_every: int = 1000          # write a checkpoint every N steps, at the end, and on Ctrl-C or SIGTERM
    keep_ckpts: int = 2             # checkpoints kept, ckpt_<step>.pt, the newest ones (resume falls back to older)
    sample_only: bool = False       # no training: load the checkpoint in --out-dir, sample and plot
    sampler: str = "ddpm"           # ddpm (ancestral, T network calls) or ddim (--sample-steps calls)
    sample_steps: int = 100         # DDIM steps (the ddpm sampler always takes T)
    num_samples: int = 1000         # how many samples to draw at the end and with --sample-only
    guidance: float = 1.0           # classifier-free guidance weight w (1: plain conditional model, >1: sharper)

    # Fields a resumed run may change (when to stop, how often to log, how to sample, where to run). Any other
    # difference from the checkpoint's config is refused: it would silently train a different model.
    RESUMABLE: ClassVar[frozenset] = frozenset({
        "out_dir", "resume", "overwrite", "device", "threads", "steps", "amp", "compile", "max_bad_steps", "log_every",
        "sample_every", "ckpt_every", "keep_ckpts", "sample_only", "sampler", "sample_steps", "num_samples",
        "guidance", "seed"})  # seed: the weights, data order and RNGs come from the checkpoint; it sets the samples
    # Fields that ask something of one call, not of the run: never taken from a checkpoint's saved settings (a run
    # started with --overwrite must not resume with it, nor a --dump-samples run dump again at every resume).
    PER_CALL: ClassVar[frozenset] = frozenset({"resume", "overwrite", "sample_only"})
    CHOICES: ClassVar[dict] = {"schedule": SCHEDULES, "sampler": ("ddpm", "ddim"), "amp": ("auto", "bf16", "none"),
                               "lr_decay": ("none", "cosine")}
    AT_LEAST: ClassVar[dict] = {**dict.fromkeys(("steps", "batch_size", "num_timesteps", "log_every", "ckpt_every",
                                                 "keep_ckpts", "num_samples", "sample_steps", "max_bad_steps"), 1),
                                **dict.fromkeys(("warmup", "sample_every", "grad_clip", "weight_decay", "guidance",
                                                 "threads"), 0)}

    def check(self) -> None:
        """Raises UserError naming the first impossible setting and what to do instead."""
        # First the rules that the tables above state for many fields (finite, at least, one of), then those of
        # single settings and of combinations, each with its own message.
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):  # "nan" and "inf" parse as floats
                raise UserError(f"{flag(f.name)} must be a finite number, got {value}")
            if f.name in self.AT_LEAST and value < self.AT_LEAST[f.name]:
                raise UserError(f"{flag(f.name)} must be at least {self.AT_LEAST[f.name]}, got {value}")
            if f.name in self.CHOICES and value not in self.CHOICES[f.name]:
                raise UserError(f"{flag(f.name)} must be one of {', '.join(map(str, self.CHOICES[f.name]))}, "
                                f"got {value!r}")
        problems = [  # (impossible?, what to say), the first that holds is raised
            (not self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (not 0 <= self.p_uncond <= 1, f"--p-uncond is a probability between 0 and 1, got {self.p_uncond}"),
            (not 0 <= self.ema_decay < 1, f"--ema-decay must be in [0, 1), got {self.ema_decay}"),
            (self.schedule == "linear" and self.num_timesteps < 2,
             "--num-timesteps must be at least 2 for the linear schedule (T = 1 leaves x_T noiseless)"),
            # The one check of DDIM steps against T. With --resume and --sample-only, T is the checkpoint's (cli).
            (self.sampler in ("ddim", "auto") and self.sample_steps > self.num_timesteps,
             f"--sample-steps {self.sample_steps} exceeds the {self.num_timesteps} timesteps this model was trained "
             f"with; give at most {self.num_timesteps}"),
            (self.steps > 10**9,  # at thousands of steps a second, a billion is weeks: a typo, not a plan
             f"--steps {self.steps} is more than a billion; give the number of optimizer steps"),
            (self.threads > (os.cpu_count() or 1),  # more threads than cores only wait for each other
             f"--threads {self.threads}: this machine has {os.cpu_count()} cores; give at most that, or 0 to choose"),
            # Offsets of up to k·2³² are added to the seed for per-process and per-chunk streams.
            (not 0 <= self.seed < 2**32, f"--seed must be between 0 and {2**32 - 1}, got {self.seed}"),
            (self.resume and self.overwrite, "--resume and --overwrite contradict each other; pick one"),
            (not self.out_dir.strip(), "--out-dir is empty; name a folder for the run"),
            (self.batch_size % world_size() and not self.sample_only,
             f"--batch-size {self.batch_size} is the global batch, shared by {world_size()} processes: give a "
             f"multiple of {world_size()}")]
        for impossible, message in problems:
            if impossible:
                raise UserError(message)


@functools.cache  # finding a class's source parses its whole file: a tenth of a second or more, once per class
def config_help(cls) -> dict:
    """{field: help} read from the comment after each field in the class source (subclasses override)."""
    helps = {}
    for klass in reversed(cls.__mro__):  # base classes first: a subclass's text for a field it redefines wins
        try:
            source = inspect.getsource(klass) if dataclasses.is_dataclass(klass) else ""
        except (OSError, TypeError):  # no source (e.g. a class typed into a REPL): no help texts
            continue
        # A field's line, `name: type = default  # help`: the help is what follows the default's "#".
        helps.update(re.findall(r"^ +(\w+): [^=\n]+=[^#\n]+# (.+)$", source, flags=re.M))
    return helps


class _OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line gets one line (not the whole usage block) and exit status 2, and flags are
    never abbreviated (allow_abbrev=False, below): argparse would take --step 10 as --steps 10, and a later flag could
    change what it means."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_given(cls, argv=None, epilog: str | None = None) -> dict:
    """The settings given on the command line, as {field: value}; fields not given are left out (so that --resume
    and --sample-only can take them from the run's checkpoint).

    The dataclass is the single source of truth: each field becomes --field-name (booleans --flag/--no-flag), typed
    by its default, with the comment after it as --help text. Exits with status 2 and one line on a bad flag or value.
    """
    parser = _OneLineArgumentParser(description=(cls.__doc__ or "").split("\n\n")[0], epilog=epilog,
                                    formatter_class=argparse.RawDescriptionHelpFormatter,  # keep the epilog's lines
                                    argument_default=argparse.SUPPRESS, allow_abbrev=False)  # absent flags: absent
    helps = config_help(cls)
    for f in fields(cls):
        text = helps.get(f.name, f.name).replace("%", "%%")  # argparse %-formats help texts: "40 %" would break it
        if "(default" not in text:  # a text that states its default keeps its own words
            text += f" (default: {f.default if f.default != '' else 'none'})"
        if isinstance(f.default, bool):  # a bool is never parsed from text (bool("False") is True)
            parser.add_argument(flag(f.name), help=text, action=argparse.BooleanOptionalAction)
            continue
        # The default's type parses the text ("3e-4" → float); --help shows DIR for folders, else INT, FLOAT, …
        choices = cls.CHOICES.get(f.name)
        metavar = ("DIR" if f.name.endswith("dir") else "FOLDER" if f.name == "data" else f.name
                   if isinstance(f.default, str) else type(f.default).__name__)
        parser.add_argument(flag(f.name), help=text, type=type(f.default), choices=choices,
                            metavar=None if choices else metavar.upper())
    return vars(parser.parse_args(argv))


def parse_config(cls, argv=None):
    """cls(**settings given on the command line), the dataclass's defaults for the rest (see parse_given)."""
    return cls(**parse_given(cls, argv))


# --- Many GPUs: `torchrun --nproc_per_node=N script.py` runs N copies of a script, one per GPU ---
# torchrun tells each copy its RANK (0 … WORLD_SIZE − 1 over all machines) and LOCAL_RANK (its GPU on its machine).
# Each holds the whole model and trains on its share of every batch; DistributedDataParallel (DDP) averages their
# gradients in backward(), so all take the same step. Process 0 alone prints and writes. Without torchrun: unchanged.
# Where torchrun changes anything, in the order a run meets it:
#   choose_device    joins the processes (the one place); the others' stdout goes to /dev/null, their stderr stays
#   on_rank_0        process 0 claims the folder, reads, downloads; its UserError ends every process
#   Trainer          the model wrapped in DDP; process r's own t and ε (seed + r·2³²); slice r of every batch
#   Trainer.step     one all-reduce: the mean loss, the gradient norm, and who got a signal, so that all agree
#   GlobalRNG        every process's generators in the checkpoint, which process 0 alone writes
#   run_images       --dump-samples dealt out by chunks (ImageSampler.dump); pictures and the bound on process 0
#   cli              a barrier before leaving; a dead peer ends the others with one line

def world_size() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def process_rank() -> tuple[int, int]:
    """(this process's rank, the number of processes) once choose_device has joined them; (0, 1) before or without."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def on_rank_0(fn: Callable):
    """fn() on process 0 alone, while the others wait for its verdict (a barrier): its UserError, raised on every
    process, or its return value (None on the others)."""
    try:
        result, error = (fn() if process_rank()[0] == 0 else None), None
    except UserError as e:
        result, error = None, e
    if process_rank()[1] > 1:
        # The verdict travels as the error's text (None: no error), the one line cli prints: every process then
        # ends with the same message and status, and none waits for a result that is not coming.
        verdict = [error and str(error)]
        dist.broadcast_object_list(verdict, src=0)
        error = error or (verdict[0] and UserError(verdict[0]))
    if error:
        raise error
    return result


@functools.cache  # each script calls it first; later calls (train, the sampling code) get the same device, unsaid
def choose_device(name: str = "auto") -> torch.device:
    """"auto" → cuda, then mps, then cpu; any other name is checked. On CUDA it enables TF32 matmuls.

    Under torchrun this is the one place where the processes join each other: NCCL between GPUs (process r on
    cuda:LOCAL_RANK), gloo between CPU processes; the other processes' stdout goes to /dev/null.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, False):
        raise UserError(f"--device {name}: not available on this machine; use --device auto or --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), numbered from 0")
    if world_size() > 1 and not dist.is_initialized():  # once per process, whatever name a later call gives
        if device.type == "cuda":
            local, gpus = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
            if local >= gpus:  # one process per GPU
                raise UserError(f"torchrun started {os.environ.get('LOCAL_WORLD_SIZE')} processes on a machine with "
                                f"{gpus} GPU(s); give --nproc_per_node={gpus}")
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        # A process that dies closes its connections: the others fail at their next exchange, in seconds. The timeout
        # is for one hung alive; it must outlast the longest wait for process 0 alone (pictures, checkpoint, download).
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=10))
        if dist.get_rank() > 0:
            sys.stdout = open(os.devnull, "w")  # progress from process 0 alone; errors (stderr) from any process
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")     # TF32 tensor cores for float32 matmuls (cuDNN convolutions
        torch.backends.cudnn.benchmark = True          # use TF32 by default); pick the fastest kernels for our shapes
    world = process_rank()[1]
    print(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + (f"; {world} processes under torchrun, each with {1 / world:.0%} of every batch" if world > 1 else ""))
    return device


# ----------------------------------------------------------------------------------------------------------------------
# 7. Data and the order of batches
# ----------------------------------------------------------------------------------------------------------------------
# No DataLoader: the data sets here fit in memory (CIFAR-10's 50,000 images are 150 MB as uint8), so the whole set
# sits on the training device and a batch is one indexing operation: no worker processes to start, seed or save, and
# no copy from host to device per step. What is left of the data's state is the order of the batches, which
# BatchOrder keeps in a form a checkpoint can hold.

@dataclass
class Data:
    """A training set held whole in memory, on the training device: batches are built there, with no loader workers.

    Images are kept as uint8 (4× smaller than float) and scaled to [−1, 1] one batch at a time.
    """
    x: torch.Tensor                  # (N, D) float points, or (N, C, H, W) uint8 images
    y: torch.Tensor | None = None    # (N,) int64 class labels, or None for unlabelled data
    class_names: tuple = ()          # a name per class; empty for unlabelled data
    hflip: bool = False              # flip images left-right at random (data augmentation)
    meta: dict = field(default_factory=dict)  # other facts a resumed run must agree on (e.g. normalisation)

    def __post_init__(self):
        """Checks the labels once, here, rather than in every forward pass."""
        if self.y is not None:
            if self.y.shape != (len(self.x),):
                raise UserError(f"the labels have shape {tuple(self.y.shape)}; give one label per example, "
                                f"({len(self.x)},)")
            try:
                check_labels(self.y, len(self.class_names) or None)
            except ValueError as e:
                raise UserError(f"{e}; fix the labels or the class names ({len(self.class_names)})") from None

    def to(self, device) -> "Data":
        return dataclasses.replace(self, x=self.x.to(device), y=None if self.y is None else self.y.to(device))

    def batch(self, idx: torch.Tensor, flip: torch.Tensor):
        """x0 (B, …) float and y (B,) or None, for example indices idx (B,) and flip decisions flip (B,) bool."""
        x0 = self.x[idx]                                                     # one gather on the device, no loader
        if x0.dtype == torch.uint8:
            x0 = x0.float() / 127.5 - 1                                      # pixels {0..255} → [−1, 1]
        if self.hflip:
            # Flip the whole batch and pick per image: one kernel, no Python loop. The decisions come from
            # BatchOrder's generator, not from here, so that they too are part of the saved state.
            x0 = torch.where(flip.view(-1, *[1] * (x0.dim() - 1)), x0.flip(-1), x0)
        return x0, None if self.y is None else self.y[idx]

    def info(self) -> dict:
        """What identifies this data set for the resume guard."""
        return {"size": len(self.x), "shape": list(self.x.shape[1:]), "dtype": str(self.x.dtype),
                "class_names": list(self.class_names), **self.meta}


class BatchOrder:
    """Which examples form each batch: a new random permutation every epoch, drawn from a generator of its own.

    Its whole state (generator, permutation, position) goes into the checkpoint, so a resumed run sees the same
    batches. A batch may run across the end of an epoch into the next, so any batch size works, even one larger than
    the data set.
    """

    def __init__(self, size: int, batch_size: int, seed: int):
        self.size, self.batch_size = size, batch_size
        # A CPU generator of its own: the batches are the same on any device, and drawing them does not move the
        # global generator that the loss draws t and ε from (so neither stream depends on the other).
        self.generator = torch.Generator().manual_seed(seed)
        self.perm, self.pos = torch.empty(0, dtype=torch.long), 0

    def next(self):
        """Indices (B,) and horizontal-flip decisions (B,) for the next batch, on the CPU."""
        parts, need = [], self.batch_size
        while need > 0:
            if self.pos == len(self.perm):  # epoch over: reshuffle
                self.perm, self.pos = torch.randperm(self.size, generator=self.generator), 0
            take = min(need, len(self.perm) - self.pos)
            parts.append(self.perm[self.pos:self.pos + take])
            self.pos, need = self.pos + take, need - take
        return torch.cat(parts), torch.rand(self.batch_size, generator=self.generator) < 0.5

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "perm": self.perm, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.perm, self.pos = state["perm"], state["pos"]


# ----------------------------------------------------------------------------------------------------------------------
# 8. Checkpoints: the state inventory, written atomically, verified on load, several kept
# ----------------------------------------------------------------------------------------------------------------------
# A checkpoint is one file, <out_dir>/ckpt_<step>.pt: a dict saved by torch.save holding HEADER_KEYS (what the run is)
# and STATE_KEYS (where it stands), plus a checksum. Exact resume rests on the state inventory: everything the loop
# reads that changes while it runs. Miss one piece and a resumed run drifts from an unbroken one. Each name below is
# saved, restored and required under that one name (Trainer.inventory).
# Writing: save_checkpoint → atomic_write (a temporary file, fsync, rename over, fsync of the folder). Reading:
# newest_checkpoint → load_checkpoint (a zip archive, read weights_only, then format, version, keys and checksum),
# falling back to an older file when the newest is damaged. A run reads its checkpoint's weights once (train() or
# load_for_sampling); saved_settings, for the flags a command line left out, maps the file and reads only its header.
# What can go wrong with the files, and what answers it:
#   a write killed halfway (SIGKILL, power cut)   atomic_write: the old file or the whole new one, never half of it
#   a file cut short, or a bit flipped inside     the unzip fails, or state_checksum differs: the file is unusable
#   a file that carries pickled code              weights_only=True refuses it before any of it runs
#   the newest file unusable                      newest_checkpoint falls back to an older one; a resume moves the
#                                                 bad one aside (set_aside_unusable)
#   a full disk, an unwritable folder             disk_errors: one line; the checkpoints already there are intact
#   another script's or another model's run       refuse_foreign and guard_resume: one line, nothing loaded
#   a file of another checkpoint version          load_checkpoint: one line that names both versions
STATE_KEYS = (
    "model",        # the weights θ
    "ema",          # the moving average that samples come from
    "optimizer",    # Adam's moments and step count (fresh moments would jolt the weights)
    "data_order",   # the epoch's permutation, the position in it, and its generator (also the flips)
    "rng",          # the global generators the loss draws t, ε and label dropout from
    "loop",         # the step (which also fixes the learning rate), the half-finished log window, the NaN counters
)
HEADER_KEYS = ("format", "version", "step", "config", "config_class", "script", "data_info")  # what the run is
CKPT_FORMAT, CKPT_VERSION = "diffusionlab-checkpoint", 2
# So a checkpoint is, as torch.load(path, weights_only=True) returns it (here a moons run's):
#   {"format": "diffusionlab-checkpoint", "version": 2, "step": 1800,
#    "config": {"out_dir": "runs/moons", "steps": 1800, …every field}, "config_class": "MoonsConfig",
#    "script": "train_moons.py", "data_info": {"size": 100000, "shape": [2], "dtype": "torch.float32", …},
#    "model": {"time_mlp.0.weight": tensor, …}, "ema": {…the same names}, "optimizer": {"state": …, "param_groups": …},
#    "data_order": {"generator": tensor, "perm": tensor, "pos": 21600}, "rng": {"torch": tensor, "cuda": None, …},
#    "loop": {"step": 1800, "loss_sum": 19.33, "loss_count": 50, "bad_streak": 0, "skipped": 0},
#    "checksum": "<64 hex digits>" (SHA-256 of all the rest)}


def fsync_dir(folder: Path) -> None:
    """Makes a rename inside `folder` durable (POSIX); Windows cannot open a folder for this."""
    if os.name != "nt":
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path, write: Callable) -> None:
    """Writes a file so that a crash at any instant leaves the old file or the complete new one, never a torn one.

    write(f) fills a temporary file in the same folder; it is flushed and fsynced, then os.replace renames it over
    `path` (atomic on POSIX and Windows) and the folder is fsynced so that the rename persists.
    """
    # A hidden name beside the target (the same file system, so the rename is atomic), with the writer's pid: the
    # leftover of a killed writer never meets the next one's file, and claim_out_dir deletes such leftovers.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            # The bytes on the disk first, then the name pointed at them: a rename that reaches the disk before the
            # data could leave an empty or half-written file under the final name after a power cut.
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:          # including a third Ctrl-C: never leave the half-written file behind
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def disk_errors(what, *also):
    """Turns a failed write of `what` (a full disk, a folder without permission) into a one-line UserError. `also`:
    the exception types a library raises for such a failure besides OSError (torch.save: RuntimeError)."""
    try:
        yield
    except (OSError, *also) as e:
        raise UserError(f"could not write {what} ({one_line(e)}); free some disk space or choose another "
                        f"--out-dir. The checkpoints already there are intact") from None


def state_checksum(state) -> str:
    """SHA-256 of every tensor's bytes and every other value in a nested dict. torch.load does not notice flipped
    bits inside tensor data; comparing this does."""
    h = hashlib.sha256()

    # Everything that could change what a load gives goes into the hash: a tensor's dtype and shape before its
    # bytes (the same bytes read as another dtype are another tensor), dict keys in a fixed order (so the sum does
    # not depend on insertion order), and brackets around lists (so [[a], b] and [[a, b]] differ).
    def visit(obj):
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(obj, dict):
            for key in sorted(obj, key=repr):
                h.update(repr(key).encode())
                visit(obj[key])
        elif isinstance(obj, (list, tuple)):
            h.update(b"[")
            for item in obj:
                visit(item)
            h.update(b"]")
        else:
            h.update(repr(obj).encode())

    visit(state)
    return h.hexdigest()


def to_cpu(obj):
    """A copy of a nested dict/list with every tensor moved to the CPU: files then load on any machine, and the
    checksum is computed from the same bytes that torch.save writes."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def find_checkpoints(out_dir) -> list[Path]:
    """The checkpoint files in out_dir, newest first: ckpt_<step>.pt by step, then those of an earlier ddpm.py
    (ckpt.pt, ckpt.1.pt, …, which it kept newest first, and which are older than any ckpt_<step>.pt)."""
    def age(path):  # a sort key, larger for newer; None for any other file
        m = re.fullmatch(r"ckpt_(\d+)\.pt|ckpt(?:\.([1-9]\d*))?\.pt", path.name)
        return None if m is None else (1, int(m[1])) if m[1] else (0, -int(m[2] or 0))
    found = [(age(path), path) for path in Path(out_dir).glob("ckpt*.pt")]
    return [path for key, path in sorted(((k, p) for k, p in found if k is not None), reverse=True)]


def save_checkpoint(state: dict, out_dir, keep: int = 2) -> Path:
    """Writes `state` to <out_dir>/ckpt_<step>.pt atomically, with a checksum, then deletes all but the `keep`
    newest. The new file is complete and durable before any old one goes, so a crash at any instant leaves every
    checkpoint that was there before. A full disk or an unwritable folder is a UserError."""
    path = Path(out_dir) / f"ckpt_{state['step']:06d}.pt"
    state = to_cpu(state)
    state["checksum"] = state_checksum(state)
    with disk_errors(f"a checkpoint into {out_dir}", RuntimeError):  # torch.save reports ENOSPC as RuntimeError
        atomic_write(path, lambda f: torch.save(state, f))
    for old in find_checkpoints(out_dir)[keep:]:
        old.unlink()
    return path


def load_checkpoint(path, header_only: bool = False) -> dict:
    """Loads and verifies one checkpoint. Raises CheckpointError saying why the file cannot be used.

    weights_only=True lets the unpickler build only tensors and plain containers, so a file carrying pickled code
    is refused before any of it runs. header_only: the tensors are mapped, not read (mmap), and not checksummed, for
    a quick look at the settings and the step.
    """
    try:
        with open(path, "rb") as f:  # torch.save writes a zip archive: anything else is no checkpoint at all
            if f.read(4) != b"PK\x03\x04":
                raise CheckpointError(f"{path} is not a checkpoint: not a file written by torch.save")
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=header_only)
    except CheckpointError:
        raise
    except Exception as e:  # any failure to read an untrusted file is the file's fault, so report it as such
        if "Weights only load failed" in str(e):
            raise CheckpointError(f"refusing to load {path}: it holds pickled Python objects, not only tensors, and "
                                  f"those could run code (nothing of it ran); use checkpoints written by "
                                  f"ddpm.py") from None
        raise CheckpointError(f"{path} is unreadable: truncated or corrupted ({one_line(e)})") from None
    if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{path} is not a DiffusionLab checkpoint (it lacks format={CKPT_FORMAT!r})")
    if state.get("version") != CKPT_VERSION:
        raise CheckpointError(f"{path} has checkpoint version {state.get('version')!r}; "
                              f"this ddpm.py reads version {CKPT_VERSION}")
    missing = set(HEADER_KEYS + STATE_KEYS) - state.keys()
    if missing:
        raise CheckpointError(f"{path} is incomplete: it lacks {', '.join(sorted(missing))}")
    # A flipped bit inside a tensor (a bad disk, a copy cut short at the right place) unpickles without complaint
    # and would train on silently from damaged weights; the checksum over every byte catches it here.
    if not header_only and state.pop("checksum", None) != state_checksum(state):
        raise CheckpointError(f"{path} is corrupted: its contents do not match the checksum saved with them")
    return state


def newest_checkpoint(cfg: TrainConfig, header_only: bool = False) -> tuple[dict, Path]:
    """The newest usable checkpoint in cfg.out_dir and its file: the one rule that --resume, --sample-only and the
    settings they take from the run all follow. A newer unusable file is skipped; the full read says so (the quick
    header_only look, which comes first, skips it silently, so the warning is printed once)."""
    candidates = find_checkpoints(cfg.out_dir)
    if not candidates:
        how = "train first, or point --out-dir at a run" if cfg.sample_only else "start without --resume (resume=False)"
        raise UserError(f"{'--sample-only' if cfg.sample_only else '--resume'}: no checkpoint in {cfg.out_dir}; {how}")
    for i, path in enumerate(candidates):
        try:
            return load_checkpoint(path, header_only), path
        except CheckpointError as e:
            if i + 1 == len(candidates):
                more = f" (and the {i} newer one(s) are unusable too)" if i else ""
                raise CheckpointError(f"{e}{more}; no usable checkpoint is left in {cfg.out_dir}: restore one from "
                                      f"a copy, or train afresh with --overwrite") from None
            if not header_only:
                print(f"warning: {e}; falling back to the older {candidates[i + 1]}", file=sys.stderr)


def set_aside_unusable(out_dir, used: Path) -> None:
    """Renames the checkpoints newer than `used` (those a resume skipped as unusable) to <name>.unusable: left in
    place they would count among the kept ones and push good older checkpoints out."""
    found = find_checkpoints(out_dir)
    for path in found[:found.index(used)]:
        os.replace(path, path.with_name(path.name + ".unusable"))  # an earlier one of that name is replaced
        print(f"warning: moved the unusable {path.name} aside to {path.name}.unusable", file=sys.stderr)


def script_name(cfg: TrainConfig) -> str:
    """What trained a run, for messages: the script's file name, or the config class's name from Python."""
    main = sys.argv[0] if sys.argv else ""
    return Path(main).name if main.endswith(".py") and Path(main).stem.startswith("train") else type(cfg).__name__


def refuse_foreign(state: dict, cfg: TrainConfig, where, advice: str = "") -> None:
    """Refuses another script's run (a moons run for train_mnist.py): its settings mean nothing to this one.
    The message says what the run is, "a train_moons.py run (MLP on 2-D points)", and what to do (advice; by
    default, to resume or sample it with its own script)."""
    if state["config_class"] == type(cfg).__name__:
        return
    advice = advice or f"use {state['script']} {flag('sample_only' if cfg.sample_only else 'resume')}"
    saved, data = state["config"], state["data_info"]
    shape, classes = data["shape"], f", {len(data['class_names'])} classes" if data["class_names"] else ""
    what = f"{shape[0]}-D points" if len(shape) == 1 else f"{'×'.join(map(str, shape))} images"
    net = f"U-Net {saved['model']!r}" if "model" in saved else "MLP"
    raise UserError(f"{where} holds a {state['script']} run ({net} on {what}{classes}), not one of "
                    f"{script_name(cfg)}; {advice}")


def guard_resume(state: dict, cfg: TrainConfig, path, data_info: dict | None = None) -> None:
    """Refuses to resume (or sample) a checkpoint made with a different model, diffusion, optimiser or data.

    Loading would often work (same tensor shapes) and then quietly train something else: a new learning rate, a
    different T, another data set under the same class names. So every difference is listed, and none is allowed
    but those in cfg.RESUMABLE, which change when and how the run stops, logs and samples, not what it learns.
    data_info: the data trained on now (None for --sample-only, which has none).
    """
    refuse_foreign(state, cfg, path)
    saved, now = state["config"], asdict(cfg)
    diffs = [f"{flag(k)} (checkpoint {saved.get(k)!r}, now {v!r})"
             for k, v in now.items() if k not in cfg.RESUMABLE and saved.get(k) != v]
    data_diffs = [f"data {k} (checkpoint {state['data_info'].get(k)!r}, now {v!r})"
                  for k, v in (data_info or {}).items() if state["data_info"].get(k) != v]
    if data_diffs and saved.get("seed") != now["seed"]:  # data drawn from the seed (the moons): name the flag
        diffs.append(f"--seed (checkpoint {saved.get('seed')!r}, now {now['seed']!r}: this data is drawn from the "
                     f"seed, so it differs too; for other samples use --seed with --sample-only)")
    if diffs + data_diffs:
        raise UserError(f"{path} was trained with a different configuration: {'; '.join(diffs + data_diffs)}. Leave "
                        f"those flags out to use the checkpoint's settings, or train afresh with a new --out-dir or "
                        f"--overwrite")


def saved_settings(cfg: TrainConfig, given: dict) -> TrainConfig:
    """For --resume and --sample-only: the settings the run in cfg.out_dir was trained with, with the flags given
    now on top, so that `--resume` alone continues a run however it was started (only the header is read here; the
    weights are read once, by train() or load_for_sampling). Without a checkpoint, cfg: the caller says what is
    missing. out_dir stays the folder given, wherever the run began; a thread count saved on a machine with more
    cores than this one is dropped (use_threads then chooses)."""
    if not find_checkpoints(cfg.out_dir):
        return cfg
    state, path = newest_checkpoint(cfg, header_only=True)
    refuse_foreign(state, cfg, cfg.out_dir)
    # Saved fields this config class lacks (a setting of an older ddpm.py) are left out, and PER_CALL ones too.
    names = {f.name for f in fields(cfg)} - cfg.PER_CALL
    saved = {k: v for k, v in state["config"].items() if k in names}
    if saved.get("threads", 0) > (os.cpu_count() or 1):
        saved["threads"] = 0
    return type(cfg)(**{**saved, **given, "out_dir": cfg.out_dir})


def load_for_sampling(cfg: TrainConfig) -> dict:
    """For --sample-only: the state of the newest usable checkpoint in cfg.out_dir, whose settings cfg must share
    but for those a resume may change (sampler, guidance, num_samples, device, …): a model setting given anew
    (another T, another width) is refused, not ignored."""
    state, path = newest_checkpoint(cfg)
    guard_resume(state, cfg, path)
    return state


# ----------------------------------------------------------------------------------------------------------------------
# 9. One run per out-dir, stopping on signals, and the metrics log
# ----------------------------------------------------------------------------------------------------------------------
# Three guards around a run, each against a way to lose work. OutDirLock: two runs in one folder would overwrite each
# other's checkpoints. StopOnSignal: Ctrl-C or a cluster's SIGTERM becomes "finish the step, save, exit 130 or 143"
# instead of an abort that loses every step since the last checkpoint. MetricsLog: the loss curve agrees with the
# checkpoints after any number of crashes and resumes.
# What SIGINT (Ctrl-C) or SIGTERM does, by when it comes:
#   while the run is set up (before the first step)   stops at once: nothing was trained, so nothing is lost
#   during training (a step, a log line, a picture)   the step ends (a picture being drawn is abandoned), the
#                                                     checkpoint of the step reached is written; exit 128 + N
#   a second one while that checkpoint is written     told to wait (it aborts at once if nothing is unsaved)
#   a third                                           aborts; the checkpoints written before are intact
#   outside train() (loading, final pictures)         stops at once (abort_on_signal for SIGTERM, in cli)

class OutDirLock:
    """Keeps a second training process out of an out-dir by holding an exclusive lock on <out_dir>/train.lock.

    The lock is the operating system's (flock, POSIX), not the file's existence: the kernel releases it when its
    process ends in any way, SIGKILL and power loss included, so a crashed run never leaves a lock to clear by hand.
    The file itself is never deleted (deleting it would let a newcomer lock a fresh file while a third process still
    holds the old one); its text, the owner's pid and host, is for messages only. Where there is no flock (Windows,
    some cluster file systems) the run trains without the guard, and says so.
    """

    def __init__(self, out_dir):
        self.path, self.file = Path(out_dir) / "train.lock", None

    @staticmethod
    def take(file) -> str | None:
        """Locks the open file; returns None, or the holder ("pid … on …") if another process has it. Raises
        ImportError or OSError where there is no locking."""
        import fcntl  # POSIX only
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return None
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):  # anything but "someone else has it"
                raise
            # flock belongs to an open file, not to a process: this process's own lock, met again through a
            # second open (check_out_dir runs once more under the lock), refuses too, and is not another run's.
            file.seek(0)
            holder = " ".join(file.read().split()) or "starting up"  # empty: taken, its text not yet written
            return None if holder == f"pid {os.getpid()} on {socket.gethostname()}" else holder

    def __enter__(self):
        """Takes the lock, or raises UserError naming the process that holds it, then writes this process's pid and
        host into the file, for the messages of the runs it keeps out. Where there is no locking: a warning, no
        guard."""
        try:
            file = open(self.path, "a+")  # created if missing, never truncated: a holder's text stays readable
        except OSError as e:
            raise UserError(f"cannot write into --out-dir {self.path.parent} ({one_line(e)}); "
                            f"choose a writable folder") from None
        try:
            holder = self.take(file)
        except (ImportError, OSError) as e:
            file.close()
            print(f"warning: cannot lock {self.path} ({one_line(e)}); training without the guard against "
                  f"a second run in this folder", file=sys.stderr)
            return self
        if holder:
            file.close()
            raise self.in_use(self.path.parent, holder)
        with disk_errors(self.path):  # a full disk: stop here, before any training
            file.seek(0)
            file.truncate()
            file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            file.flush()
        self.file = file
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()  # releases the lock; the file stays for the next run to lock

    @staticmethod
    def in_use(out_dir, holder: str) -> UserError:
        return UserError(f"{out_dir} is in use by another training run ({holder}); wait for it to finish or stop it, "
                         f"or use another --out-dir")

    @classmethod
    def holder(cls, out_dir) -> str | None:
        """Who holds out_dir's lock, or None if no other process does (or there is no locking)."""
        try:
            with open(Path(out_dir) / "train.lock") as file:  # the lock, if taken, goes with the file
                return cls.take(file)
        except (ImportError, OSError):
            return None


class AbortedBySignal(KeyboardInterrupt):
    """A signal that stops the run at once. A KeyboardInterrupt, so that no `except Exception` swallows it.
    before_training: it came before the first step (while the run was being set up), so nothing was lost."""

    def __init__(self, signum: int, before_training: bool = False):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.before_training = signum, before_training


class SamplingStopped(Exception):
    """Raised inside a sampler's loop (see draw) once a stop was asked for: the picture is abandoned, the run saves."""


class StopOnSignal:
    """SIGINT (Ctrl-C) and SIGTERM (a cluster's preemption notice) during train(): the one record of a stop asked for.

    Before the first step (building the model, restoring) the first signal stops at once: nothing is trained yet. In
    the loop it sets `signum`, which Trainer.step reads (under torchrun: all processes agree on it there), so the run
    stops after this step and saves; a picture being drawn is abandoned within one sampling step (draw polls it). A
    second signal aborts at once only when no step would be lost; while steps since the last checkpoint are still
    unsaved it is told to wait, and a third one aborts.
    """
    active: ClassVar["StopOnSignal | None"] = None  # the one in force, for the samplers' polling

    def __init__(self):
        self.signum, self.repeats, self._previous = None, 0, {}
        self.training, self.unsaved = False, 0  # set by the loop: stepping yet, and steps since the last checkpoint

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
            StopOnSignal.active = self
        return self

    def _say(self, text: str) -> None:
        if process_rank()[0] == 0:  # under torchrun every process gets the signal; process 0 speaks for all
            # os.write, not print: the signal may arrive while the main code is inside print, which is not reentrant.
            os.write(2, f"\n{text}\n".encode())

    def _handle(self, signum, frame):
        """The handler of both signals: what one means depends on how far the run is (see the class)."""
        if not self.training:
            raise AbortedBySignal(signum, before_training=True)
        # repeats counts the signals after the first. At 0 the stop is asked for; at 1 the run aborts only if no
        # step is unsaved, else it is told to wait for the checkpoint; at 2 it aborts.
        name, self.repeats = signal.Signals(signum).name, self.repeats + (self.signum is not None)
        if self.repeats == 0:
            self.signum = signum
            self._say(f"{name}: finishing this step and saving a checkpoint (a picture being drawn is abandoned)")
        elif self.unsaved == 0 or self.repeats >= 2:
            raise AbortedBySignal(signum)
        else:
            self._say(f"{name} again: still saving the {self.unsaved} step(s) since the last checkpoint, in about "
                      f"one step; send it once more to abort and lose them")

    def __exit__(self, *exc):
        # The handlers of before, back: after train() returns, Ctrl-C in a notebook interrupts its cell again.
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        if StopOnSignal.active is self:
            StopOnSignal.active = None


class MetricsLog:
    """metrics.csv, one row per logged step, appended as training goes.

    On (re)start every row after the step being resumed from is dropped, with any torn last line, and the file is
    rewritten atomically; those steps are trained, and logged, again. Before each checkpoint the rows are fsynced,
    so a power cut cannot take rows older than the checkpoint, which a resume would not write again. So after any
    number of interruptions and resumes each logged step appears exactly once.
    """
    COLUMNS = ("step", "loss", "lr", "img_per_s", "skipped_steps")

    def __init__(self, path: Path, start_step: int):
        # A row is kept if it is whole (all its columns, and its newline: a crash may have cut the last one) and
        # logs a step the checkpoint covers; the rows after it will be written again by the resumed steps.
        self.path, kept = path, []
        for line in path.read_text().splitlines(keepends=True)[1:] if path.exists() else []:
            values = line.rstrip("\n").split(",")
            if line.endswith("\n") and len(values) == len(self.COLUMNS) and values[0].isdigit() \
                    and int(values[0]) <= start_step:
                kept.append(line)
        header = ",".join(self.COLUMNS) + "\n"
        with disk_errors(path):
            atomic_write(path, lambda f: f.write((header + "".join(kept)).encode()))

    def append(self, *values) -> None:
        # Opened for each row and closed again: a crash leaves at most a torn last line, which the next start drops.
        with disk_errors(self.path), open(self.path, "a") as f:
            f.write(",".join(str(v) for v in values) + "\n")

    def sync(self) -> None:
        """Makes the rows written so far durable (called just before each checkpoint)."""
        with disk_errors(self.path), open(self.path, "rb+") as f:
            os.fsync(f.fileno())


def resume_command() -> str:
    """The command that continues this run: the same command line with --resume (and without --overwrite), quoted
    so that a user or a cluster's requeue script can paste it as it is. Under torchrun the launcher's own options
    (nodes, processes, rendezvous) are not known here: the command names them, for the user to fill in."""
    if not sys.argv or not sys.argv[0].endswith(".py"):
        return "call train() again with resume=True in the config"
    args = [a for a in sys.argv[1:] if a not in ("--resume", "--no-resume", "--overwrite", "--no-overwrite")]
    launcher = "python" if process_rank()[1] == 1 else "torchrun <the same torchrun options>"
    return " ".join([launcher, *(shlex.quote(a) for a in [sys.argv[0], *args, "--resume"])])


# ----------------------------------------------------------------------------------------------------------------------
# 10. The resumable training loop: Part I's train_step and EMA, with every piece of state in the inventory
# ----------------------------------------------------------------------------------------------------------------------
# train() sets a run up (checks, the lock, the checkpoint read once, the threads) and _train_loop runs it: a step,
# the log, a picture, a checkpoint, the stop, numbered there; Trainer.step's own stages are numbered too. Everything
# a step reads that changes from one step to the next is an entry of Trainer.inventory(), saved and restored under
# its name in STATE_KEYS: that is what makes a resume exact. FastPath decides once how the step computes (bf16,
# memory layout, fused AdamW), from the flags, the hardware and whether the data are images.
#
# `python train_moons.py --resume`, call by call:
#   cli: saved_settings reads the newest checkpoint's header (its tensors only mapped) for the flags not given;
#        cfg.check() and use_threads(cfg) follow, then the script's main(), which builds the data and the model
#   train: claim_out_dir on process 0 checks the folder, takes the lock and reads that checkpoint whole, checksum
#        included (newest_checkpoint); guard_resume compares its settings and data with this run's;
#        set_aside_unusable moves newer damaged files aside; use_threads(cfg, state) takes the run's thread count
#   Trainer(...) builds everything freshly seeded, and restore(state) overwrites each entry of the inventory
#   _train_loop carries on from the saved step: the next batch, noise and learning rate are an unbroken run's.
# A stop, call by call: SIGINT or SIGTERM reaches StopOnSignal._handle, which sets stop.signum; the step in progress
# finishes (under torchrun its all-reduce tells every process); _train_loop writes the checkpoint (its stage 4) and
# raises TrainingInterrupted (stage 5); cli prints where the checkpoint is and the resume command, and returns 128 + N.

def native_bf16(device: torch.device) -> bool:
    """Whether the device computes bfloat16 in hardware: a CUDA GPU of compute capability 8.0 or more (Ampere and
    later; older ones only emulate it), or an x86 CPU with AMX or AVX-512 BF16 (read from Linux's /proc/cpuinfo;
    other systems, MPS included: False, not measured here)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    flags = []
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text().split() if device.type == "cpu" else []
    return "amx_bf16" in flags or "avx512_bf16" in flags


@dataclass(frozen=True)
class FastPath:
    """How a run computes, chosen once from the flags, the device and the data: a function of these alone, so the
    same command on the same machine computes the same numbers, and a resume there computes as the run it continues
    (--amp auto is saved as "auto": resumed on other hardware, it decides again)."""
    amp: torch.dtype | None  # autocast dtype: torch.bfloat16, or None for plain float32
    channels_last: bool      # images in NHWC memory order
    fused_adam: bool         # AdamW's fused kernel: all parameters in a few passes instead of a loop per tensor

    @classmethod
    def choose(cls, cfg: TrainConfig, device: torch.device, images: bool) -> "FastPath":
        """--amp auto is bf16 for image models on hardware with native bf16, else float32. Under bf16 autocast,
        convolutions and matmuls run in bfloat16 while weights, optimizer state and the loss stay float32; bf16 has
        float32's exponent range, so unlike float16 it needs no loss scaling. Measured on a 2-core Xeon with AMX
        (one thread, the MNIST U-Net, batch 64, img/s): fp32 71, bf16 149; NHWC 82 in fp32 but 96 in bf16, so on a
        CPU NHWC goes with fp32 only (GPU tensor cores want it under bf16); fused AdamW 2-3 % faster. The MLP of
        the moons stays float32: its points need more than bf16's 8 bits of mantissa, and it is fast already."""
        bf16 = cfg.amp == "bf16" or (cfg.amp == "auto" and images and native_bf16(device))
        amp = torch.bfloat16 if bf16 else None
        return cls(amp=amp, channels_last=images and (device.type == "cuda" or amp is None),
                   fused_adam=device.type in ("cuda", "cpu"))


@dataclass
class LoopCounters:
    """The loop's own variables, saved with the weights ("loop" in STATE_KEYS)."""
    step: int = 0            # optimizer steps taken; a skipped NaN step counts (its data and noise were used)
    loss_sum: float = 0.0    # the log window so far: the sum and number of its finite losses (saved, so that the
    loss_count: int = 0      #   first row after a resume averages the same steps as an unbroken run's)
    bad_streak: int = 0      # NaN/Inf losses in a row
    skipped: int = 0         # NaN/Inf steps in all (a column of metrics.csv)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.__init__(**state)  # field by field: a name it does not know fails at once


class GlobalRNG:
    """The global generators that Diffusion.loss draws t, ε and label dropout from: the CPU's, and the training
    GPU's, as one state_dict / load_state_dict pair for the inventory. A checkpoint from another kind of device
    restores the CPU's only; on CUDA the state goes to the training device, whichever index it has now. Under
    torchrun each process has its own (seeded by Trainer); process 0's are saved as above, the others' in a list."""

    def __init__(self, device: torch.device):
        self.device = device
        self.rank, self.world = process_rank()

    def state_dict(self) -> dict:
        """The generators' states; under torchrun a collective, which every process calls and process 0 saves."""
        state = {"torch": torch.get_rng_state(),
                 "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
                 "mps": torch.mps.get_rng_state() if self.device.type == "mps" else None}
        if self.world > 1:  # a collective: process 0 gets every process's state
            states = [None] * self.world
            dist.all_gather_object(states, state)
            state = {**states[0], "other_ranks": states[1:]}
        return state

    def load_state_dict(self, states: dict) -> None:
        """Each process takes the states it saved itself; a CUDA or MPS state only onto a device of that kind."""
        states = [states, *states.get("other_ranks", [])]  # process r takes what process r saved
        if self.rank >= len(states):  # a process the saving run lacked keeps its fresh seed: valid, but not exact
            return
        states = states[self.rank]
        torch.set_rng_state(states["torch"])
        if self.device.type == "cuda" and states.get("cuda") is not None:
            torch.cuda.set_rng_state(states["cuda"], self.device)
        if self.device.type == "mps" and states.get("mps") is not None:
            torch.mps.set_rng_state(states["mps"])


def lr_factor(n: int, cfg: TrainConfig) -> float:
    """The learning rate at step n, as a fraction of cfg.lr. It rises linearly over cfg.warmup steps (as in DDPM's
    released code: Adam's first steps, taken with poor moment estimates, stay small), then stays, or with
    --lr-decay cosine falls along half a cosine to 0 at cfg.steps (a resume with more --steps stretches the fall).
    A function of the step alone, so the step in the checkpoint restores it."""
    if n < cfg.warmup or cfg.lr_decay == "none":
        return min(1.0, (n + 1) / max(1, cfg.warmup))
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (n - cfg.warmup) / max(1, cfg.steps - cfg.warmup))))


class Trainer:
    """Everything a run holds, built freshly seeded, and the loop's one step. train() drives it; benchmark() times
    the very same step."""

    def __init__(self, model: nn.Module, diffusion: Diffusion, data: Data, cfg: TrainConfig, device: torch.device):
        """Builds the run from fresh seeds: the model on the device in its memory layout (wrapped in DDP under
        torchrun), the EMA, AdamW, the batch order, the generators and the counters. On a resume, restore() then
        overwrites every piece of it from a checkpoint."""
        self.rank, self.world = process_rank()
        torch.manual_seed(cfg.seed + self.rank * 2**32)  # t and ε: process r's own stream; process 0's as ever
        self.cfg, self.device, self.lr = cfg, device, 0.0
        self.fast = FastPath.choose(cfg, device, images=data.x.dim() == 4)
        self.model = model.to(device, memory_format=torch.channels_last if self.fast.channels_last else
                              torch.preserve_format).train()
        # DDP copies process 0's weights to all (before the EMA copies them) and averages the W gradients in
        # backward(). Each process's L_simple is a mean over B/W examples, so their average is the gradient of the
        # mean over all B: what one process computes on the whole batch. Checkpoints hold the plain `model`.
        self.ddp = self.model if self.world == 1 else DistributedDataParallel(
            self.model, device_ids=[device] if device.type == "cuda" else None)
        self.data, self.diffusion = data.to(device), diffusion.to(device)
        self.ema = EMA(self.model, cfg.ema_decay)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           fused=self.fast.fused_adam)
        # One seed for the order on every process (unlike t and ε above): under torchrun all draw the same batches.
        self.order = BatchOrder(len(data.x), cfg.batch_size, cfg.seed)
        self.rng, self.counters = GlobalRNG(device), LoopCounters()
        self.model_fn = torch.compile(self.ddp) if cfg.compile else self.ddp  # `model` keeps the plain weights

    def inventory(self) -> dict:
        """STATE_KEYS → the object holding that piece of state; each has state_dict() and load_state_dict()."""
        return dict(zip(STATE_KEYS, (self.model, self.ema.model, self.optimizer, self.order, self.rng, self.counters)))

    def state(self) -> dict:
        """The checkpoint: what the run is (HEADER_KEYS), then every piece of state in the inventory."""
        header = dict(format=CKPT_FORMAT, version=CKPT_VERSION, step=self.counters.step, config=asdict(self.cfg),
                      config_class=type(self.cfg).__name__, script=script_name(self.cfg), data_info=self.data.info())
        return {**header, **{name: part.state_dict() for name, part in self.inventory().items()}}

    def restore(self, state: dict) -> None:
        """Loads every piece of the inventory from a checkpoint: the next step is then the one the saved run would
        have taken."""
        for name, part in self.inventory().items():
            part.load_state_dict(state[name])

    def step(self, stop: StopOnSignal | None = None) -> int | None:
        """One step of [DDPM Alg. 1] on the next batch: train_step, then the update and the EMA if the loss and the
        gradient are finite (else the update is skipped and counted). Returns the signal to stop on, if one came
        (stop.signum, read once the gradient is computed); under torchrun, one that any process got, so that all
        stop after the same step."""
        cfg, c = self.cfg, self.counters
        # 1. The learning rate of this step: a function of the step alone (lr_factor), so nothing to save for it.
        self.lr = cfg.lr * lr_factor(c.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        # 2. The batch. Under torchrun all processes draw the same batch of B from identical BatchOrders, and
        # process r trains on slice r of it (flips included): the examples a step sees do not depend on the number
        # of processes W.
        idx, flip = (t.view(self.world, -1)[self.rank] for t in self.order.next())
        x0, y = self.data.batch(idx.to(self.device), flip.to(self.device))
        x0 = x0.contiguous(memory_format=torch.channels_last) if self.fast.channels_last else x0
        # 3. The loss and its gradient, clipped: Part I's train_step [DDPM Alg. 1, lines 2–5].
        loss, grad_norm = train_step(self.model_fn, self.diffusion, x0, y, cfg.grad_clip, self.fast.amp)
        # 4. The one wait for the device per step: whether to update depends on the loss and gradient being finite.
        signum, values = stop and stop.signum, torch.stack([loss.detach().float(), grad_norm.float()])
        if self.world > 1:
            # The same wait carries one all-reduce (a sum) of what all must agree on: the loss (/ W: the mean), the
            # gradient norm (equal on all after DDP: a NaN anywhere skips the step everywhere), and per signal how
            # many processes got it.
            sent = [float(signum == s) for s in (signal.SIGINT, signal.SIGTERM)]
            values = torch.cat([values, torch.tensor(sent, device=values.device)])
            dist.all_reduce(values)
            values[:2] /= self.world
        loss_value, norm_value, *sent = values.tolist()
        if sent:
            signum = next((s for s, n in zip((signal.SIGINT, signal.SIGTERM), sent) if n), None)
        # 5. The update and the EMA, or for a NaN/Inf loss or gradient, no update (counted; max_bad_steps ends it).
        if math.isfinite(loss_value) and math.isfinite(norm_value):
            self.optimizer.step()
            self.ema.update(c.step)
            c.loss_sum, c.loss_count, c.bad_streak = c.loss_sum + loss_value, c.loss_count + 1, 0
        else:  # skip the update; the data and the RNGs move on as if it had happened, so resume stays exact
            c.bad_streak, c.skipped = c.bad_streak + 1, c.skipped + 1
            if self.rank == 0:
                print(f"warning: step {c.step + 1}: loss {loss_value}, gradient norm {norm_value}; update skipped "
                      f"({c.bad_streak} in a row)", file=sys.stderr)
        self.optimizer.zero_grad(set_to_none=True)  # None, not zeros: the next backward writes, not adds
        c.step += 1
        return signum


def use_threads(cfg: TrainConfig, state: dict | None = None) -> TrainConfig:
    """Sets PyTorch's CPU threads and returns cfg holding the count, which checkpoints then save: --threads, else
    the count saved in `state` (the checkpoint being resumed or sampled), else OMP_NUM_THREADS, else every core this
    process may use. A function of the machine and the flags, never of a timing: sums split over another number of
    threads round differently, and the same command must compute the same numbers however busy the machine was
    when it started. (A count saved on a machine with more cores than this one is not taken.)

    What keeps a machine that becomes busy from slowing a run several-fold is where the threads run: OpenMP waits
    for all threads at the end of every operation, so one thread that shares its core with another program holds
    up all of them, worse when the threads wander between cores. Bound each to a core of its own (OMP_PLACES, set by
    the scripts; here the main thread, OpenMP's thread 0), another busy program slows only the one it shares a core
    with. Measured on the 2-core VM with one busy process starting halfway through a default run: the
    moons 3.2× slower unbound, 2.4× bound; the MNIST U-Net (README, "Threads on a shared CPU").
    """
    saved = state["config"].get("threads", 0) if state else 0
    from_env = int((os.environ.get("OMP_NUM_THREADS") or "0").split(",")[0] or 0)  # "4,2": a count per nesting level
    threads = cfg.threads or (saved if saved <= len(CPU_MASK) else 0) or from_env or len(CPU_MASK)
    torch.set_num_threads(threads)
    if threads > 1 and BIND_THREADS and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(CPU_MASK)})  # OpenMP's thread 0 on its place, each thread on a core of its own
    return dataclasses.replace(cfg, threads=threads)


def check_out_dir(cfg: TrainConfig) -> None:
    """Refuses --resume without a checkpoint, and a fresh start over one without --overwrite (so no run is lost).
    A fresh start over a checkpoint hears first what matters most: that a run is going on there, then that the
    folder holds another script's run, and only then that it should add --resume or --overwrite."""
    found = find_checkpoints(cfg.out_dir)
    if cfg.resume and not found:
        newest_checkpoint(cfg)  # raises the one "no checkpoint" error
    if found and not cfg.resume and not cfg.overwrite:
        holder = OutDirLock.holder(cfg.out_dir)  # a run going on there is the first thing to know
        if holder:
            raise OutDirLock.in_use(cfg.out_dir, holder)
        with contextlib.suppress(CheckpointError):  # unreadable: --resume will say why
            refuse_foreign(load_checkpoint(found[0], header_only=True), cfg, cfg.out_dir,
                           "choose another --out-dir, or --overwrite to replace that run")
        raise UserError(f"{cfg.out_dir} already holds a checkpoint ({found[0]}); add --resume to continue that run "
                        f"or --overwrite to start over (from Python: resume=True or overwrite=True in the config)")


def claim_out_dir(cfg: TrainConfig, data: Data, stack: contextlib.ExitStack) -> tuple[dict, Path] | None:
    """Process 0's part of starting a run: what the run is, decided before touching the disk (a refused run changes
    nothing); then the folder, locked (the lock goes on `stack`, held until train() returns); and for a resume the
    checkpoint, read under the lock (so no other run can write a newer one meanwhile) and returned with its path."""
    out_dir = Path(cfg.out_dir)
    check_out_dir(cfg)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        problem = "it is a file" if out_dir.is_file() else one_line(e)
        raise UserError(f"cannot create --out-dir {out_dir} ({problem}); choose a writable folder") from None
    stack.enter_context(OutDirLock(out_dir))
    check_out_dir(cfg)  # again, now that no other run can change the folder: one may have finished meanwhile
    for leftover in out_dir.glob(".*.tmp-*"):  # halves of files whose writer was killed
        leftover.unlink()
    # --overwrite deletes the old run only now, under the lock and after every refusal: a refused command, or one
    # that another run keeps out, deletes nothing.
    if cfg.overwrite:
        for old in find_checkpoints(out_dir) + [out_dir / "metrics.csv"]:
            old.unlink(missing_ok=True)
    if not cfg.resume:
        return None
    state, path = newest_checkpoint(cfg)
    guard_resume(state, cfg, path, data.info())
    set_aside_unusable(out_dir, path)
    return state, path


def train(model: nn.Module, diffusion: Diffusion, data: Data, cfg: TrainConfig, on_snapshot: Callable | None = None):
    """Trains `model` to predict the noise [DDPM Alg. 1] as Part I's fit() does, with warm-up, checkpoints, exact
    resume, logs and guards.

    Args:
        model: the backbone (any nn.Module keeping the contract).  diffusion: the process and its loss.
        data: the training set.  cfg: a TrainConfig (cfg.resume continues the run in cfg.out_dir).
        on_snapshot: fn(ema_model, step), called every cfg.sample_every steps to save pictures.
    Returns:
        The EMA model, in eval mode on the training device: the one to sample from.
    Raises:
        UserError for a problem the user can fix; TrainingInterrupted after SIGINT/SIGTERM, its checkpoint written.
    """
    cfg.check()
    if len(data.x) == 0:
        raise UserError("the training set is empty; give it at least one example")
    if data.x.is_floating_point() and not data.x.isfinite().all():
        raise UserError("the training data holds NaN or Inf values; clean or drop those examples")
    device = choose_device(cfg.device)
    with contextlib.ExitStack() as stack, StopOnSignal() as stop:
        if hasattr(os, "sched_getaffinity"):  # the main thread bound for the run (use_threads), as it was after it
            stack.callback(os.sched_setaffinity, 0, os.sched_getaffinity(0))
        # Process 0 claims the folder and reads the checkpoint; the others wait, then read the one it chose.
        resumed = on_rank_0(lambda: claim_out_dir(cfg, data, stack))
        state, path = (resumed or newest_checkpoint(cfg)) if cfg.resume else (None, None)
        cfg = use_threads(cfg, state)  # a resume computes with the run's count
        trainer = Trainer(model, diffusion, data, cfg, device)
        if cfg.resume:
            trainer.restore(state)
            print(f"resuming from {path} at step {trainer.counters.step}")
        return _train_loop(trainer, on_snapshot, Path(cfg.out_dir), stop)


def _train_loop(trainer: Trainer, on_snapshot, out_dir: Path, stop: StopOnSignal):
    """The loop of train(): a step, then the bookkeeping (log, snapshot, checkpoint, stop), in an order that matters:
    the log row of step n is written before the checkpoint of step n, so a crash between the two re-logs step n after
    resuming, and MetricsLog drops the first copy."""
    cfg, c, main = trainer.cfg, trainer.counters, trainer.rank == 0  # under torchrun, process 0 alone writes
    if c.step >= cfg.steps:
        print(f"nothing to train: the checkpoint is at step {c.step}, and --steps is {cfg.steps}")
    elif cfg.warmup > cfg.steps and main:
        print(f"warning: --warmup {cfg.warmup} is longer than the run (--steps {cfg.steps}): the learning rate never "
              f"reaches --lr {cfg.lr}; lower --warmup for a short run", file=sys.stderr)
    metrics = MetricsLog(out_dir / "metrics.csv", c.step) if main else None
    tic, window = time.perf_counter(), 0  # the steps since the last log line, and their time (not sampling or saving)
    stop.training = True  # from here a signal asks to stop after the step, with a checkpoint
    while c.step < cfg.steps:
        # 1. A step; then the NaN guard: a run whose loss stays NaN stops, its last good checkpoint kept.
        agreed = trainer.step(stop)
        window, stop.unsaved = window + 1, stop.unsaved + 1
        if c.bad_streak >= cfg.max_bad_steps:
            saved = find_checkpoints(out_dir)
            kept = f"the last good checkpoint, {saved[0]}, is intact" if saved else "no checkpoint was written"
            raise UserError(f"the loss was NaN or Inf for {c.bad_streak} steps in a row (up to step {c.step}); "
                            f"training stopped and {kept}. Lower --lr, or try --amp none")
        # 2. The log line and its row in metrics.csv: the mean of the window's finite losses, and the speed.
        if c.step % cfg.log_every == 0 or c.step == cfg.steps:
            rate = window * cfg.batch_size / max(time.perf_counter() - tic, 1e-9)
            mean_loss = c.loss_sum / c.loss_count if c.loss_count else float("nan")
            eta = int((cfg.steps - c.step) * cfg.batch_size / max(rate, 1e-9))
            print(f"step {c.step}/{cfg.steps} ({100 * c.step // cfg.steps}%) | loss {mean_loss:.4f} | lr "
                  f"{trainer.lr:.1e} | {rate:,.0f} img/s | ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}",
                  flush=True)
            if main:
                metrics.append(c.step, f"{mean_loss:.6g}", f"{trainer.lr:.6g}", f"{rate:.1f}", c.skipped)
            if c.step % cfg.log_every == 0:  # a run's last row may end a window early; a longer resume then
                c.loss_sum, c.loss_count = 0.0, 0  # continues that window, so its next row matches an unbroken run
            tic, window = time.perf_counter(), 0
        # 3. A picture, from the EMA weights, the ones a user samples from at the end (in eval mode: no dropout).
        if on_snapshot is not None and cfg.sample_every and c.step % cfg.sample_every == 0 and main:
            try:
                on_snapshot(trainer.ema.model, c.step)
            except SamplingStopped:  # a signal came while drawing: go straight on to the checkpoint
                print(f"step {c.step}: picture abandoned for the stop", flush=True)
            tic, window = time.perf_counter(), 0
        # 4. A checkpoint, on schedule or for the stop. The stop: one process reads it now, as late as it can (a
        # signal during the log or a picture counts); under torchrun it is the one all processes agreed on in step(),
        # so that all stop after the same step.
        stopping = stop.signum if trainer.world == 1 else agreed
        if c.step % cfg.ckpt_every == 0 or c.step == cfg.steps or stopping:
            state = trainer.state()  # under torchrun a collective (GlobalRNG's)
            if main:
                metrics.sync()  # the rows up to this step are on disk before a checkpoint says they were logged
                path = save_checkpoint(state, out_dir, cfg.keep_ckpts)
            tic, window, stop.unsaved = time.perf_counter(), 0, 0
        # 5. The stop, once the checkpoint is written: TrainingInterrupted, which cli() turns into exit status 128 + N.
        if stopping:
            if trainer.world > 1:  # none exits before the checkpoint is written, or torchrun would stop process 0
                dist.barrier()
            raise TrainingInterrupted(f"stopped by {signal.Signals(stopping).name} at step {c.step}/{cfg.steps}; "
                                      f"checkpoint saved to {path if main else out_dir}\nresume with: "
                                      f"{resume_command()}", 128 + stopping)
    return trainer.ema.model


def benchmark(model: nn.Module, diffusion: Diffusion, data: Data, cfg: TrainConfig, steps: int = 50, warmup: int = 10):
    """Times `steps` training steps of the loop's own Trainer.step (EMA, LR schedule and the per-step sync included)
    after `warmup` ones; prints img/s, FLOPs per image, TFLOP/s and peak memory. Writes nothing; returns a dict.

    FLOPs are counted on one eager step by torch.utils.flop_counter (forward and backward; the matmuls and
    convolutions, which are nearly all of it).
    """
    from torch.utils.flop_counter import FlopCounterMode
    device = choose_device(cfg.device)
    trainer = Trainer(model, diffusion, data, cfg, device)
    # The FLOPs are those of the arithmetic, which torch.compile does not change: one eager step counts them.
    with FlopCounterMode(display=False) as counter:
        x0, y = trainer.data.batch(*(t.to(device) for t in trainer.order.next()))
        train_step(trainer.model, trainer.diffusion, x0, y, cfg.grad_clip, trainer.fast.amp)
        trainer.optimizer.zero_grad(set_to_none=True)  # the counted step took no update; the timed ones start clean
    flops_per_image = counter.get_total_flops() / cfg.batch_size
    # Warm-up steps are not timed: they include torch.compile's compilation and cuDNN's search for the fastest
    # convolution algorithms (cudnn.benchmark), both paid once per run.
    for _ in range(warmup):
        trainer.step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize()  # GPU kernels run asynchronously: the clock starts once they are done
    tic = time.perf_counter()
    for _ in range(steps):
        trainer.step()  # ends by reading the loss, which waits for the GPU: the clock stops on finished work
    seconds = time.perf_counter() - tic
    img_per_s = steps * cfg.batch_size / seconds  # under torchrun, of all processes: B is the global batch
    if device.type == "cuda":
        peak, where = torch.cuda.max_memory_allocated(device) / 2**30, "GPU"
    else:  # the peak resident memory of the whole process, which Linux gives in KiB (macOS: in bytes)
        import resource
        peak, where = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process"
    tflops, fast = flops_per_image * img_per_s / 1e12, trainer.fast
    params = sum(p.numel() for p in model.parameters())
    per = f" ({img_per_s / trainer.world:,.0f} per {where}, {trainer.world} processes)" if trainer.world > 1 else ""
    print(f"bench: {params / 1e6:.1f}M parameters | batch {cfg.batch_size} | amp {'bf16' if fast.amp else 'none'} | "
          f"channels-last {fast.channels_last} | fused AdamW {fast.fused_adam} | compile {cfg.compile} | "
          f"{steps} steps in {seconds:.2f} s | {img_per_s:,.0f} img/s{per} | "
          f"{flops_per_image / 1e9:.2f} GFLOP/img (fwd+bwd) | {tflops:.1f} TFLOP/s | "
          f"{peak:.2f} GiB peak {where} memory")
    return {"img_per_s": img_per_s, "flops_per_image": flops_per_image, "tflops": tflops, "peak_gib": peak}


# ----------------------------------------------------------------------------------------------------------------------
# 11. The command line's runner: one line per problem, an exit status per outcome
# ----------------------------------------------------------------------------------------------------------------------
# The scripts end with sys.exit(cli(Config, main)). cli turns every expected outcome into an exit status and a short
# message (one line; two for a stop: where the checkpoint is, and the command that resumes it), so that a shell or a
# cluster's requeue script can tell "done" (0) from "fix the command" (1, 2) from "stopped with a checkpoint: run me
# again with --resume" (130, 143). A bug keeps its traceback.

EXIT_STATUS = """exit status: 0 done; 1 a problem the printed line explains (nothing was changed); 2 a malformed
command line; 130 (Ctrl-C) or 143 (SIGTERM): stopped, with a checkpoint to resume from."""


class SurvivingStdout:
    """sys.stdout for a run whose reader may go away (`python train_moons.py | head`): once the pipe is closed, the
    rest of the output goes to /dev/null and the run goes on, instead of dying of BrokenPipeError mid-training."""

    def __init__(self, stream):
        self.stream = stream

    def _guard(self, method, *args):
        """method(*args); once the reader is gone (BrokenPipeError), the stream goes to /dev/null (returns None)."""
        try:
            return method(*args)
        except BrokenPipeError:  # point the file descriptor at /dev/null: later writes and the final flush succeed
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())

    def write(self, text: str) -> int:
        return self._guard(self.stream.write, text) or len(text)  # to a closed pipe: all of it, as if written

    def flush(self) -> None:
        self._guard(self.stream.flush)

    def __getattr__(self, name):  # isatty, fileno, … of the stream itself
        return getattr(self.stream, name)


def abort_on_signal(signum, frame):
    """SIGTERM outside train() (loading, the final pictures, --sample-only): stop at once, as Ctrl-C does, with
    the line that says what is left (train() has a handler of its own, which saves first). Python leaves SIGTERM
    to the operating system, which ends the process on the spot: no finally block runs and nothing is said.
    Raised as an exception, as Ctrl-C is, it unwinds like one and ends in one line."""
    raise AbortedBySignal(signum)


def cli(config_cls, main: Callable, argv=None) -> int:
    """Runs main(cfg) with cfg parsed from the command line (for --resume and --sample-only, on top of the run's
    saved settings) and returns the process exit status (EXIT_STATUS): 130 or 143 after the first signal with a
    checkpoint of the step reached (the printed command resumes it), after a third one at once (see StopOnSignal),
    with the last checkpoint written before intact."""
    doc = getattr(sys.modules.get(getattr(main, "__module__", "")), "__doc__", None) or ""  # the script's docstring
    epilog = "".join(f"examples and outputs:\n{text}\n" for text in doc.split("\n\n", 1)[1:]) + EXIT_STATUS  # not title
    try:
        given = parse_given(config_cls, argv, epilog)
    except SystemExit as e:  # argparse: --help (0) or a malformed command line (2), already printed
        return e.code if isinstance(e.code, int) else 2
    cfg = config_cls(**given)
    sys.stdout = sys.stdout if isinstance(sys.stdout, SurvivingStdout) else SurvivingStdout(sys.stdout)
    script = runs_as_script(main)
    main_thread = threading.current_thread() is threading.main_thread()  # only it may set signal handlers
    previous_term = signal.signal(signal.SIGTERM, abort_on_signal) if main_thread else None
    # Everything the user can fix arrives here as a UserError with one line; only a bug leaves a traceback.
    try:
        if cfg.resume or cfg.sample_only:
            cfg = saved_settings(cfg, given)
        cfg.check()
        main(use_threads(cfg))  # the threads of the whole call, drawing included (the main thread freed at the end)
        if dist.is_initialized():  # leave together: a process that tears down while process 0 still draws pictures
            dist.barrier()         # can take the group's background threads down with an abort
        return 0
    except (UserError, OSError) as e:  # OSError: a write outside the checkpoint code failed (a picture, a full disk)
        # One write: under torchrun, lines of several processes do not interleave.
        sys.stderr.write(f"error: {e if isinstance(e, UserError) else one_line(e)}\n")
        return 1
    except RuntimeError as e:  # under torchrun, an exchange with a process that died (gloo or NCCL says so)
        if process_rank()[1] == 1 or not (isinstance(e, dist.DistError) or "gloo" in str(e)):
            raise
        detail = re.sub(r"^\[.*?\] ", "", one_line(e)).split(". ")[0]  # gloo's words, without its source line
        sys.stderr.write(f"error: lost contact with another torchrun process, which stopped or crashed (see its "
                         f"messages): {detail}; the checkpoints in {cfg.out_dir} are intact: resume with --resume\n")
        # Leave at once: after a peer's death gloo can abort the interpreter's exit ("terminate called …"), even
        # with the group destroyed. Nothing is left to tidy: checkpoints are written whole, the lock dies with us.
        sys.stdout.flush()
        os._exit(1)
    except TrainingInterrupted as e:
        # Saved and stopping: another Ctrl-C changes nothing now, and must not turn a script's exit into a traceback
        # (a script's process ends on return; cli called from Python gets its handlers back).
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        if process_rank()[0] == 0:  # under torchrun all processes stopped together; process 0 speaks for all
            print(e, file=sys.stderr)
        for s, handler in previous.items() if not script else ():
            signal.signal(s, handler)
        return e.exit_code
    except KeyboardInterrupt as e:  # a signal before the first step, a third one during training, or Ctrl-C outside
        print(aborted(e, cfg), file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)
    finally:  # on every way out: a group left to the interpreter's exit can abort it ("terminate called …")
        if main_thread:
            signal.signal(signal.SIGTERM, previous_term)
        free_main_thread()
        if dist.is_initialized():
            dist.destroy_process_group()
        if script:  # the process ends next: its exit need not collect what it leaves (see runs_as_script)
            gc.freeze()


def runs_as_script(main: Callable) -> bool:
    """Whether main is defined in the file that `python` runs: its process then ends when cli returns, and cli
    freezes every object first (gc.freeze), so that the interpreter's exit does not walk all of torch's objects
    to collect them (a second or so; nothing here needs a finalizer then: the files are closed). A function typed
    into a notebook or a REPL is in the module __main__ too, but not in its file: there cli gives back the signal
    handlers it changed and leaves the garbage collector as it was."""
    code = getattr(main, "__code__", None)
    return code is not None and code.co_filename == getattr(sys.modules["__main__"], "__file__", None)


def aborted(e: KeyboardInterrupt, cfg: TrainConfig) -> str:
    """The line after a stop that could not save (see cli). Before the first step this call trained nothing; a run
    it was to resume keeps its checkpoints, which the line names. Otherwise the newest checkpoint is what is left,
    and the line says whether to resume it or, its training being over, to sample from it."""
    before = getattr(e, "before_training", False)
    what = f"stopped by {e} before the first training step: nothing was trained, so nothing was lost" if before \
        else "aborted"
    try:
        state, path = newest_checkpoint(cfg, header_only=True)
    except UserError:
        return what if before else f"{what}; no checkpoint was written"
    done = state["step"] >= cfg.steps
    return f"{what}; the last checkpoint written, {path}, is intact (" + (
        "training had finished; draw samples with --sample-only)" if done else "resume with --resume)")


# ----------------------------------------------------------------------------------------------------------------------
# 12. Drawing samples: progress, the stop, the sampler the flags name, the loss plot
# ----------------------------------------------------------------------------------------------------------------------
# A picture drawn during training must say how far it is and stop when asked: _WatchedModel wraps the network so that
# each sampler step advances a Progress line and notices a pending stop, while Part I's samplers know of neither.
# resolve_sampler turns --sampler auto into a sampler and a step count before any file is named after them.

class Progress:
    """A wait that says what it does and how far it is, on the line that announces it, updated in place:
    `step 50: drawing samples/step_000050.png (100 images, ddim 10 steps, guidance 2): 4/10`. As a context
    manager it ends the line, with the time taken, or with "stopped" when an exception leaves it."""

    def __init__(self, what: str, total: int, unit: str = "", every: float = 1.0):
        # In a terminal the line updates in place; in a log file every update is kept, so there a few a minute.
        every = every if getattr(sys.stdout, "isatty", lambda: False)() else max(every, 20.0)
        self.what, self.total, self.unit, self.every, self.done = what, total, unit, every, 0
        self.start = self.shown = time.perf_counter()

    def _show(self, end: str = "") -> None:
        print(f"\r{self.what}: {self.done:,}/{self.total:,}{self.unit}{end}", end="\n" if end else "", flush=True)

    def __enter__(self):
        self._show()
        return self

    def advance(self, n: int = 1) -> None:
        """Counts n more done; the line is redrawn at most once every `every` seconds."""
        self.done += n
        if time.perf_counter() > self.shown + self.every:  # a few a second in a terminal, one per 20 s in a log
            self.shown = time.perf_counter()
            self._show()

    def __exit__(self, kind, *exc):
        self._show(f" ({time.perf_counter() - self.start:.0f} s)" if kind is None else " stopped")


class _WatchedModel:
    """The network as a sampler sees it: each call is one sampling step. It counts the step on a Progress line and,
    once a signal asked train() to stop, raises SamplingStopped at the next step instead of drawing on for minutes.
    Part I's samplers stay unaware of it; attribute reads (num_classes, conv_in) pass through to the network."""

    def __init__(self, model, progress: Progress | None):
        self.model, self.progress = model, progress

    def __call__(self, *args, **kwargs):
        """One sampling step: the network's output, or SamplingStopped once a stop was asked for."""
        stop = StopOnSignal.active  # set while train() runs; None for a drawing outside it
        if stop is not None and stop.signum is not None:
            raise SamplingStopped
        out = self.model(*args, **kwargs)
        if self.progress is not None:
            self.progress.advance()
        return out

    def __getattr__(self, name):  # only for names not found on the wrapper itself
        return getattr(self.__dict__["model"], name)  # through __dict__: no recursion before `model` is set


def resolve_sampler(cfg: TrainConfig, device) -> TrainConfig:
    """cfg with --sampler auto and --sample-steps 0 decided for the device: a sampler and a step count that an
    explicit flag would name. On a GPU, auto is the ancestral sampler (T steps: seconds there). Elsewhere it is
    DDIM with a tenth of the run's length between pictures, 10 to 100 steps: a picture of B images then costs about
    what a twentieth of those training steps of batch B do (a sampling step is one forward pass, a training step a
    forward and a backward one, about three), so drawing stays a small part of a short CPU run."""
    sampler, steps = cfg.sampler, cfg.sample_steps
    if sampler == "auto":
        sampler = "ddim" if steps or torch.device(device).type != "cuda" else "ddpm"
    if sampler == "ddim" and not steps:
        between = min(cfg.steps, cfg.sample_every or cfg.steps)
        steps = min(cfg.num_timesteps, max(10, min(100, between // 10)))
    return dataclasses.replace(cfg, sampler=sampler, sample_steps=steps or cfg.sample_steps)


def sampling_steps(cfg: TrainConfig) -> int:
    """The network calls one sample takes with cfg's (resolved) sampler."""
    return cfg.sample_steps if cfg.sampler == "ddim" else cfg.num_timesteps


def draw(diffusion: Diffusion, model, cfg: TrainConfig, shape, y=None, generator=None, clip_x0=False,
         return_trajectory=False, progress: Progress | None = None):
    """Samples with the sampler cfg names: ancestral ("ddpm", T steps) or DDIM ("ddim", cfg.sample_steps, η = 0),
    with guidance weight cfg.guidance. Arguments and return value as Diffusion.sample; progress counts the steps.
    Raises SamplingStopped within one step of a stop asked for by a signal during train()."""
    cfg = resolve_sampler(cfg, diffusion.betas.device)
    kwargs = dict(y=y, guidance=cfg.guidance, generator=generator, clip_x0=clip_x0, return_trajectory=return_trajectory)
    model = _WatchedModel(model, progress)  # every network call passes it: the step is counted, the stop noticed
    if cfg.sampler == "ddim":
        return diffusion.ddim_sample(model, shape, steps=cfg.sample_steps, **kwargs)
    return diffusion.sample(model, shape, **kwargs)


def plot_loss(out_dir) -> None:
    """loss.png from metrics.csv: the training loss (mean over each log interval) against the step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [line.split(",") for line in (Path(out_dir) / "metrics.csv").read_text().splitlines()[1:]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([int(r[0]) for r in rows], [float(r[1]) for r in rows])
    ax.set(xlabel="step", ylabel="loss (MSE of ε)", yscale="log", title="training loss")
    # Plain decimals (0.3, not 3×10⁻¹). Over more than a factor of 3, of the minor ticks only 2, 3 and 5 times a
    # power of ten: labelled all, 0.09 and 0.1 would overlap, as the ticks crowd towards each decade.
    losses = [float(r[1]) for r in rows if math.isfinite(float(r[1])) and float(r[1]) > 0]
    wide = bool(losses) and max(losses) > 3 * min(losses)

    def label(value, _):
        mantissa = round(value / 10 ** math.floor(math.log10(value) + 1e-9), 6)
        return f"{value:g}" if mantissa in (1, 2, 3, 5) or not wide else ""
    for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis(matplotlib.ticker.FuncFormatter(label))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(Path(out_dir) / "loss.png", dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------------
# 13. Image experiments: the shared body of train_mnist.py and train_cifar.py
# ----------------------------------------------------------------------------------------------------------------------
# MNIST and CIFAR-10 differ only in their loader and defaults; run_images is the main() of both. Its order: the
# refusals that need no data first (a --dump-dir that is not empty, a bad --resume or --overwrite), then the data and
# the refusals that need it (a --label not among its classes, an --image-size the U-Net cannot take), then training,
# then the pictures, the bound and the dump, so that a mistake in a command line never costs a training run.

@dataclass
class ImageConfig(TrainConfig):
    """Class-conditional image diffusion with a U-Net and classifier-free guidance."""
    model: str = "small"            # U-Net preset: tiny, mnist, small, base or large (see UNET_PRESETS)
    data_dir: str = "./data"        # where the built-in data set is downloaded to, or found (not for --data)
    data: str = ""                  # train on your own images instead: a folder with one sub-folder of images per class
    image_size: int = 32            # side of the images; --data images are resized and centre-cropped to it
    channels: int = 3               # image channels: 3 (RGB) or 1 (greyscale); --data images are converted to it
    hflip: bool = True              # flip training images left-right at random (augmentation)
    guidance: float = 2.0           # classifier-free guidance weight w for samples (1: plain conditional model)
    sampler: str = "auto"           # auto (ddpm on a GPU, else ddim), ddpm (T network calls) or ddim (--sample-steps)
    sample_steps: int = 0           # DDIM steps (0: a tenth of the steps between pictures, 10 to 100)
    label: str = "all"              # class to draw: all, a class name or a class index
    dump_samples: int = 0           # write this many class-balanced single PNGs (for FID tools) into --dump-dir
    dump_dir: str = ""              # an empty or new folder for --dump-samples (default: <out-dir>/dump)
    bench: bool = False             # time ~50 training steps on random data: img/s, FLOPs, TFLOP/s, peak memory
    nll: int = -1                   # held-out images whose bound in bits/dim is printed (-1: 100 on a GPU, 10 on a CPU
    #                                 after training, none with --sample-only; 0: none); each costs T network calls

    RESUMABLE: ClassVar[frozenset] = TrainConfig.RESUMABLE | {"data_dir", "data", "label", "dump_samples", "dump_dir",
                                                              "bench", "nll"}
    PER_CALL: ClassVar[frozenset] = TrainConfig.PER_CALL | {"dump_samples", "dump_dir", "bench", "nll"}
    CHOICES: ClassVar[dict] = {**TrainConfig.CHOICES, "model": tuple(UNET_PRESETS), "channels": (1, 3),
                               "sampler": ("auto", "ddpm", "ddim")}
    AT_LEAST: ClassVar[dict] = {**TrainConfig.AT_LEAST, "image_size": 1, "dump_samples": 0, "sample_steps": 0,
                                "nll": -1}

    def check(self) -> None:
        """TrainConfig's checks, and that --image-size is given only where it changes something."""
        super().check()
        builtin = type(self).image_size  # a script's default is its built-in data set's side
        if not self.data and not self.bench and self.image_size != builtin:
            raise UserError(f"--image-size {self.image_size}: the built-in images are {builtin}×{builtin}; "
                            f"--image-size resizes --data images only")


def load_image_folder(cfg: ImageConfig) -> Data:
    """Reads an ImageFolder (cfg.data/<class name>/<image file>) into memory.

    Images are converted to cfg.channels channels, resized so the short side is cfg.image_size and centre-cropped.
    Returns: Data with x (N, C, S, S) uint8, y (N,) and the class names (the sub-folder names, sorted).
    Raises UserError for a missing folder, a folder without images, or a file that is not an image.
    """
    from PIL import Image
    from torchvision import datasets, transforms
    root = Path(cfg.data)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "no such folder"
        raise UserError(f"--data {root}: {what}; give a folder with one sub-folder of images per class")
    if not any(p.is_dir() for p in root.iterdir()):
        files = sum(p.is_file() for p in root.iterdir())
        raise UserError(f"--data {root}: no images found: it has no class sub-folders (it holds {files} file(s) "
                        f"directly); put the images into one sub-folder per class, such as {root / 'cats'}, even if "
                        f"there is one class")
    # Every file becomes the same shape: any mode (palette, RGBA, greyscale) converted to the channels asked for;
    # the short side scaled to the target and the middle cut out, so no image is stretched.
    to_tensor = transforms.Compose([transforms.Resize(cfg.image_size), transforms.CenterCrop(cfg.image_size),
                                    transforms.PILToTensor()])

    def load(path):  # PIL's message does not always name the file (a truncated one): this one does
        try:
            with Image.open(path) as image:
                return image.convert("L" if cfg.channels == 1 else "RGB")
        except OSError as e:
            raise OSError(f"cannot read {path} ({one_line(e)})") from None

    try:
        folder = datasets.ImageFolder(root, transform=to_tensor, loader=load)
    except (FileNotFoundError, RuntimeError) as e:
        raise UserError(f"--data {root}: no images found ({one_line(e)}); put .png or .jpg files into one "
                        f"sub-folder per class") from None
    # Decoding many files is the slow part: worker processes do it once here (never in the training loop).
    workers = min(8, os.cpu_count() or 1) if len(folder) > 5000 else 0
    try:
        batches = list(torch.utils.data.DataLoader(folder, batch_size=500, num_workers=workers))
    except OSError as e:  # PIL raises OSError subclasses for files that are not images
        raise UserError(f"--data {root}: {one_line(e)}; remove or fix that file") from None
    print(f"data: {len(folder):,} images of {len(folder.classes)} classes from {root}")
    return Data(x=torch.cat([b[0] for b in batches]), y=torch.cat([b[1] for b in batches]),
                class_names=tuple(folder.classes), hflip=cfg.hflip)


def download_dataset(dataset_cls, cfg: ImageConfig, offline_files: str, train: bool = True):
    """The training split (or with train=False the test split) of a torchvision data set (MNIST, CIFAR10, ...),
    downloaded into cfg.data_dir unless it is there already. Offline, a UserError says which files to put where
    (offline_files) instead of a traceback, and the empty folders the attempt created are removed again."""
    root = Path(cfg.data_dir)
    if root.exists() and not root.is_dir():
        raise UserError(f"--data-dir {root} is a file, not a folder; give the folder to download the data set into "
                        f"(or that already holds it)")
    # The folders there before: an attempt that fails removes only the empty ones it made itself.
    folders_before = {root, *(p for p in root.rglob("*") if p.is_dir())} if root.exists() else set()

    def fetch():
        """The data set, downloaded or found; offline, a UserError, with the folders the attempt made removed."""
        try:
            return dataset_cls(cfg.data_dir, train=train, download=True)
        except (OSError, RuntimeError) as e:  # offline: URLError (an OSError) or torchvision's RuntimeError
            created = [p for p in [root, *root.rglob("*")] if p.is_dir() and p not in folders_before]
            for folder in sorted(created, key=lambda p: len(p.parts), reverse=True):  # deepest first
                if not any(folder.iterdir()):
                    folder.rmdir()
            raise UserError(f"could not download {dataset_cls.__name__} into {cfg.data_dir} ({one_line(e)}); without "
                            f"network, put {offline_files} and rerun, or train on your own images with --data "
                            f"FOLDER") from None

    dataset = on_rank_0(fetch)  # under torchrun, process 0 downloads while the others wait; they then find the files
    dataset = fetch() if dataset is None else dataset
    print(f"data: {len(dataset):,} {dataset_cls.__name__} {'training' if train else 'test'} images from {cfg.data_dir}")
    return dataset


def labels_to_draw(label: str, class_names) -> list[int]:
    """The class indices --label asks for: "all", a class name ("horse") or a class index ("7").

    Raises UserError listing the valid names for anything else.
    """
    if label == "all":
        return list(range(len(class_names)))
    if label in class_names:
        return [list(class_names).index(label)]
    if label.isdigit() and int(label) < len(class_names):
        return [int(label)]
    raise UserError(f"--label {label!r} is not a class; use all, an index below {len(class_names)}, or one of: "
                    f"{', '.join(class_names)}")


def save_image_grid(images, ncol: int, path: Path, row_names=(), title: str = "") -> None:
    """Saves a PNG grid of images (N, C, H, W) in [−1, 1], ncol per row; row_names label the rows from the top
    ("" for none). Row labels and title are never cut off, whatever the width of the grid."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid
    grid = make_grid((images.clamp(-1, 1) + 1) / 2, nrow=ncol, padding=2, pad_value=1.0)  # (3, H', W')
    side = images.shape[-1] + 2
    # 2.5 screen pixels per image pixel, and at least 4 inches wide so that a 10-point title fits on a narrow grid.
    fig, ax = plt.subplots(figsize=(max(4, grid.shape[2] / 40), max(2, grid.shape[1] / 40)))
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([side * (i + 0.5) for i in range(len(row_names))], list(row_names))
    ax.tick_params(length=0)
    ax.set_title(title, fontsize=10)
    for spine in ax.spines.values():
        spine.set_visible(False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")  # "tight": the figure grows to hold long class names
    plt.close(fig)


def output_path(cfg: TrainConfig, name: str) -> Path:
    """Where a run's picture or sample file goes: <out_dir>/<name> for training; for --sample-only, beside it under
    a name that says what was drawn (sampler and steps, guidance, label, seed), so that sampling from a run never
    replaces what the run itself wrote."""
    path = Path(cfg.out_dir) / name
    if not cfg.sample_only:
        return path
    label = getattr(cfg, "label", "all")
    # Every setting that changes what is drawn is in the name, so that no two --sample-only calls share a file;
    # "+" is kept: 1e+06 and 1e-06 are different weights.
    tag = (f"{cfg.sampler}{sampling_steps(cfg)}_w{cfg.guidance:g}_n{cfg.num_samples}"
           + ("" if label == "all" else f"_{label}") + f"_seed{cfg.seed}")
    return path.with_name(path.stem + "_" + re.sub(r"[^\w.+-]+", "-", tag) + path.suffix)


class ImageSampler:
    """A trained class-conditional U-Net and what drawing from it takes (the diffusion, the config with its sampler
    resolved for the device, the class names), with the three things drawn from it: a class grid, the reverse
    process, and single files for FID. Images come cfg.batch_size at a time: a batch that trained fits in memory
    (guidance doubles it inside the sampler, but sampling keeps no activations for a backward pass)."""

    def __init__(self, diffusion: Diffusion, model: nn.Module, cfg: ImageConfig, class_names):
        self.diffusion, self.model, self.class_names = diffusion, model, class_names
        self.cfg = resolve_sampler(cfg, diffusion.betas.device)
        # (C, H, W): C from the U-Net's first convolution, the side from the config (the one training saw, saved).
        self.shape = (model.conv_in.in_channels, cfg.image_size, cfg.image_size)

    def generate(self, y, generator, progress: Progress, return_trajectory=False):
        """Images (N, C, H, W) on the CPU in [−1, 1] for the labels y (N,); also the trajectory, if asked."""
        # One chunk of at most cfg.batch_size images at a time, all from the one generator, in turn. clip_x0: each
        # step's estimate x̂_0 is clamped to [−1, 1], where pixels live, as DDPM's sampler does; the final clamp
        # makes sure of the range of what is saved.
        results = [draw(self.diffusion, self.model, self.cfg, (len(chunk), *self.shape), generator=generator,
                        y=chunk.to(self.diffusion.betas.device), clip_x0=True, return_trajectory=return_trajectory,
                        progress=progress) for chunk in y.split(self.cfg.batch_size)]
        if return_trajectory:
            return torch.cat([r[0] for r in results]).cpu(), torch.cat([r[1] for r in results], dim=1)
        return torch.cat(results).cpu().clamp(-1, 1)

    def progress(self, what: str, images: int) -> Progress:
        """The line that announces a drawing: what, how many images, which sampler and steps, which guidance."""
        cfg, chunks = self.cfg, math.ceil(images / self.cfg.batch_size)
        return Progress(f"{what} ({images:,} images, {cfg.sampler} {sampling_steps(cfg)} steps, guidance "
                        f"{cfg.guidance:g})", sampling_steps(cfg) * chunks,
                        " steps" if chunks == 1 else f" steps of {chunks} batches")

    def grid(self, labels: list, path: Path, title: str = "", prefix: str = "") -> None:
        """About cfg.num_samples images of the classes `labels`, from fixed noise (seeded by cfg.seed), so that grids
        saved during training compare like for like. Several classes: rows of at most 10 per class, each class's
        first row labelled; one class: a square grid. prefix begins the progress line."""
        per_class = max(1, self.cfg.num_samples // len(labels))
        ncol = min(per_class, 10) if len(labels) > 1 else math.ceil(math.sqrt(per_class))
        per_class = per_class // ncol * ncol if len(labels) > 1 else per_class  # whole rows: classes never share one
        y = torch.tensor(labels).repeat_interleave(per_class)  # one class after another: a block of rows each
        with self.progress(f"{prefix}drawing {path}", len(y)) as progress:
            images = self.generate(y, torch.Generator().manual_seed(self.cfg.seed), progress)
        # Several classes: each class's name on the first of its rows; one class: its name goes into the title.
        rows = per_class // ncol if len(labels) > 1 else 0
        names = [self.class_names[i] if r == 0 else "" for i in labels for r in range(rows)]
        title = f"{self.class_names[labels[0]]}: {title}" if len(labels) == 1 else title
        save_image_grid(images, ncol, path, names, title)

    def reverse(self, labels: list, path: Path, frames: int = 10) -> None:
        """The reverse process of one image per class in `labels` (up to ten rows), `frames` evenly spaced moments
        from x_T (left) to x_0 (right): noise becomes a blurry guess, then detail."""
        y = torch.tensor(labels[:10])
        with self.progress(f"drawing {path}", len(y)) as progress:
            _, trajectory = self.generate(y, torch.Generator().manual_seed(self.cfg.seed + 1), progress,
                                          return_trajectory=True)  # (steps + 1, N, C, H, W)
        picks = torch.linspace(0, len(trajectory) - 1, frames).round().long()
        images = trajectory[picks].transpose(0, 1).reshape(-1, *trajectory.shape[2:])  # row i: image i over time
        save_image_grid(images, frames, path, [self.class_names[i] for i in y.tolist()], "reverse process: x_T → x_0")

    def dump(self, labels: list, folder: Path) -> None:
        """Writes cfg.dump_samples single PNGs into folder, named <index>_<class>.png, for FID tools.

        Labels go round the classes in turn, so each gets the same share (±1) of the images. They come in chunks of
        cfg.batch_size, chunk k's noise from a generator seeded by cfg.seed + 2 + k·2³², so that sample i is the same
        image however many processes share the work (under torchrun, chunk k goes to process k mod W). Each chunk is
        written as it comes: 50,000 samples never sit in memory together, and a stopped dump keeps its files.
        """
        from torchvision.utils import save_image
        check_dump_dir(folder)
        folder.mkdir(parents=True, exist_ok=True)
        rank, world = process_rank()
        if world > 1:
            dist.barrier()  # every process has found the folder empty before any writes into it
        cfg, y = self.cfg, torch.tensor(labels)[torch.arange(self.cfg.dump_samples) % len(labels)]
        mine = [(k, chunk) for k, chunk in enumerate(y.split(cfg.batch_size)) if k % world == rank]
        what = (f"writing {len(y):,} samples into {folder} ({cfg.sampler} {sampling_steps(cfg)} steps, guidance "
                f"{cfg.guidance:g}" + (f", {world} processes" if world > 1 else "") + "), sampling steps")
        with Progress(what, len(mine) * sampling_steps(cfg)) as progress:  # this process's share
            for k, chunk in mine:
                images = self.generate(chunk, torch.Generator().manual_seed(cfg.seed + 2 + k * 2**32), progress)
                for i, (image, label) in enumerate(zip(images, chunk.tolist()), start=k * cfg.batch_size):
                    # <index>_<class>.png: the index orders the files as one process would; a class name of an
                    # image folder may hold any character, so what a file name cannot hold becomes "_".
                    name = re.sub(r"[^\w.-]+", "_", self.class_names[label])
                    save_image((image + 1) / 2, folder / f"{i:06d}_{name}.png")
        if world > 1:
            dist.barrier()  # every process has written its share
        print(f"wrote {len(y):,} samples to {folder}")


def check_dump_dir(folder: Path) -> None:
    """--dump-dir must be new or empty: samples of two runs mixed in one folder would give a meaningless FID."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UserError(f"--dump-dir {folder} is not empty (or not a folder); give a new folder, or empty this one")


def build_image_model(cfg: ImageConfig, channels: int, num_classes: int) -> UNet:
    """The U-Net cfg.model for images of cfg.image_size; UserError if its downsampling cannot take that size."""
    model = build_unet(cfg.model, channels, cfg.image_size, num_classes)
    if cfg.image_size % model.factor:  # factor: 2 to the number of halvings of the side
        raise UserError(f"images of side {cfg.image_size} cannot pass the {cfg.model!r} U-Net, which needs a "
                        f"multiple of {model.factor}; choose another --image-size or --model")
    return model


def warn_if_gpu_sized(model: nn.Module, diffusion: Diffusion, data: Data, cfg: ImageConfig) -> None:
    """Before a CPU run of a U-Net sized for a GPU (over 10M parameters: base, large), times one training step of
    4 images on a copy and says what the whole run means here: img/s and the days it would take."""
    params = sum(p.numel() for p in model.parameters())
    if params < 10_000_000 or choose_device(cfg.device).type != "cpu" or process_rank()[0] > 0:
        return
    n = min(4, len(data.x))
    print(f"timing one training step of {n} images of U-Net {cfg.model!r} on this CPU ...", flush=True)
    with torch.random.fork_rng(devices=[]):  # the run's random streams stay where they were
        x0, y = data.batch(torch.arange(n), torch.zeros(n, dtype=torch.bool))
        tic = time.perf_counter()
        train_step(copy.deepcopy(model).train(), diffusion, x0, y)  # a copy: the run's model keeps no gradient
        img_per_s = n / (time.perf_counter() - tic)
    days = cfg.steps * cfg.batch_size / img_per_s / 86400
    print(f"warning: U-Net {cfg.model!r} ({params / 1e6:.1f}M parameters) is sized for a GPU: on this CPU expect "
          f"about {img_per_s:.1f} img/s, {days:,.1f} days for {cfg.steps:,} steps of batch {cfg.batch_size}; "
          f"on a CPU try --model mnist (1.1M parameters) or fewer --steps", file=sys.stderr)


def held_out_bound(diffusion: Diffusion, model, cfg: ImageConfig, load_builtin: Callable) -> float | None:
    """Prints the variational bound on −log p_θ(x_0) [DDPM Eqs. 5, 13] of the EMA model in bits/dim, the mean over
    cfg.nll held-out images (a fixed random subset, seeded by cfg.seed) with its standard error: the number of DDPM's
    Table 2 (≤ 3.70 on CIFAR-10's test set). The labels are left out (y = ∅, the unconditional model that guidance
    trains along), as DDPM's model had none. The held-out images: the built-in test split, or for --data .../train
    a sibling folder named test. Returns the mean, or None when there is no held-out split."""
    device = diffusion.betas.device
    # --nll -1: a count sized to the device, since each image costs T network calls
    n = cfg.nll if cfg.nll >= 0 else 100 if device.type == "cuda" else 10
    if not cfg.data:
        test = load_builtin(cfg, train=False)
    elif Path(cfg.data).name == "train" and (Path(cfg.data).parent / "test").is_dir():
        test = load_image_folder(dataclasses.replace(cfg, data=str(Path(cfg.data).parent / "test")))
    else:
        print("bits/dim: not computed (no held-out images; for --data DIR/train, a folder DIR/test gives them)")
        return None
    if process_rank()[0] != 0:  # under torchrun, process 0 alone computes it; the others go on to the last barrier
        return None
    idx = torch.randperm(len(test.x), generator=torch.Generator().manual_seed(cfg.seed))[:n]
    x0, _ = test.batch(idx, flip=torch.zeros(len(idx), dtype=torch.bool))  # (N, C, H, W) in [−1, 1], no flips
    size = max(1, min(len(x0), 2**14 // x0[0].numel()))  # images per call of nll_bound: progress every few seconds
    what = f"bits/dim of the EMA model on {len(x0)} held-out images (T = {diffusion.num_timesteps} terms each)"
    # The run's own random streams are left as they were: computing the bound changes nothing drawn after it.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad(), \
            Progress(what, len(x0), " images") as progress:
        torch.manual_seed(cfg.seed)  # the x_t of each term: the same number from the same command
        bits = []
        for chunk in x0.split(size):
            bits.append(diffusion.nll_bound(model, chunk.to(device), discrete=True).cpu())
            progress.advance(len(chunk))
    bits = torch.cat(bits)
    error = bits.std().item() / math.sqrt(len(bits)) if len(bits) > 1 else float("nan")
    print(f"bits/dim: {bits.mean().item():.3f} ± {error:.3f} (bound on −log p(x), no labels; DDPM on CIFAR-10 "
          f"after 800k steps: ≤ 3.70)")
    return bits.mean().item()


def train_images(cfg: ImageConfig, diffusion: Diffusion, load_builtin: Callable) -> tuple[nn.Module, ImageConfig,
                                                                                           tuple]:
    """run_images' training: the data, the U-Net, train() with a class grid every cfg.sample_every steps. Returns
    the EMA model, cfg with the image side trained on, and the class names."""
    check_out_dir(cfg)  # refuse a wrong --resume or --overwrite now, not after loading the data
    data = load_image_folder(cfg) if cfg.data else load_builtin(cfg)
    # The config records the side the model was trained on (a built-in data set fixes it whatever --image-size
    # said), so that --sample-only later draws images of that size.
    cfg = dataclasses.replace(cfg, image_size=data.x.shape[-1])
    labels_to_draw(cfg.label, data.class_names)  # a wrong --label is refused before training, not after
    torch.manual_seed(cfg.seed)  # the initial weights: the same from the same --seed
    model = build_image_model(cfg, data.x.shape[1], len(data.class_names))
    print(f"model: U-Net {cfg.model!r}, {sum(p.numel() for p in model.parameters()):,} parameters")
    if not cfg.resume:  # a resumed run has been told already
        warn_if_gpu_sized(model, diffusion, data, cfg)

    def snapshot(ema_model, step):
        ImageSampler(diffusion, ema_model, cfg, data.class_names).grid(
            list(range(len(data.class_names))), Path(cfg.out_dir) / "samples" / f"step_{step:06d}.png",
            f"step {step:,}, guidance {cfg.guidance}", prefix=f"step {step}: ")

    return train(model, diffusion, data, cfg, on_snapshot=snapshot), cfg, data.class_names


def run_images(cfg: ImageConfig, load_builtin: Callable) -> None:
    """main() of train_mnist.py and train_cifar.py. load_builtin(cfg, train=True) -> Data loads the torchvision data
    set (train=False: its test split).

    --bench times training on random data; --sample-only samples a saved run; otherwise train (or resume), then
    write samples.png (one row per class), reverse.png, loss.png and, with --dump-samples, single PNGs.
    """
    dump_dir = Path(cfg.dump_dir or Path(cfg.out_dir) / "dump")
    if cfg.dump_samples:
        check_dump_dir(dump_dir)  # refuse before any training or sampling, not after
    device = choose_device(cfg.device)  # first: under torchrun it joins the processes, which loading data needs
    # With --resume and --sample-only, cfg already holds the checkpoint's T and schedule (saved_settings).
    diffusion = Diffusion(cfg.num_timesteps, cfg.schedule, cfg.p_uncond).to(device)
    if cfg.bench:  # random pixels: the speed of a step does not depend on what the images show
        x = torch.randint(0, 256, (max(4 * cfg.batch_size, 256), cfg.channels, cfg.image_size, cfg.image_size),
                          dtype=torch.uint8)
        data = Data(x, torch.randint(0, 10, (len(x),)), tuple(str(i) for i in range(10)), cfg.hflip)
        benchmark(build_image_model(cfg, cfg.channels, num_classes=10), diffusion, data, cfg)
        return
    if cfg.sample_only:
        # No data set is loaded: the class names and the channels are in the checkpoint's data_info, the side in
        # its config, and the weights drawn from are the EMA's, as at the end of training.
        state = load_for_sampling(cfg)
        class_names = state["data_info"]["class_names"]
        model = build_image_model(cfg, state["data_info"]["shape"][0], len(class_names))
        model.load_state_dict(state["ema"])
        model.to(device).eval()
    else:
        model, cfg, class_names = train_images(cfg, diffusion, load_builtin)
    labels, sampler = labels_to_draw(cfg.label, class_names), ImageSampler(diffusion, model, cfg, class_names)
    cfg = sampler.cfg  # the sampler resolved: the names of the files say what was drawn
    # --sample-only --dump-samples or --nll N asks for the files or the number alone: no grid first (minutes on a
    # CPU for a 100-image one). Under torchrun process 0 alone draws pictures.
    if process_rank()[0] == 0 and not (cfg.sample_only and (cfg.dump_samples or cfg.nll > 0)):
        if not cfg.sample_only:
            plot_loss(cfg.out_dir)
        sampler.grid(labels, output_path(cfg, "samples.png"), f"{cfg.sampler}, guidance {cfg.guidance:g}")
        sampler.reverse(labels, output_path(cfg, "reverse.png"))
    if cfg.nll > 0 or (cfg.nll < 0 and not cfg.sample_only):  # every process: loading may download (on_rank_0)
        held_out_bound(diffusion, model, cfg, load_builtin)
    if cfg.dump_samples:
        sampler.dump(labels, dump_dir)
