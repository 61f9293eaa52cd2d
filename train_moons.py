"""DDPM on the two-moons toy data: 2-D points, trained and sampled in 20 to 50 seconds on a 2-core CPU.

    python train_moons.py                   # train, then write runs/moons/: samples.npy, samples.png, loss.png,
                                            #   reverse.gif, snapshots/, ckpt_<step>.pt, metrics.csv
    python train_moons.py --resume          # continue an interrupted run (bit-exact on a CPU)
    python train_moons.py --sample-only --seed 1   # new samples from the saved model, written beside the
                                            #   run's own as samples_ddpm100_w1_n5000_seed1.npy, .png, .gif
    python train_moons.py --schedule linear --overwrite; python train_moons.py --sample-only --sampler ddim
                                            #   DDIM wants the linear schedule here (the cosine one ends too noisy)
    python train_moons.py --class-cond --overwrite --guidance 2   # learn p(x | which moon), sample each by label
    python train_moons.py --help            # every setting, with its default

At the end it prints the share of samples off the arcs (the haze between the moons) and the energy distance between
the samples and fresh moons, each beside what fresh real moons give: the closer, the better the model. Then the
bound on the EMA model's −log likelihood [DDPM Eq. 5] of fresh moons, in bits per dimension, beside the entropy of the
moons distribution itself (from its known density), which no model's average −log likelihood can go below.
"""
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

# Before torch loads: one OpenMP place per core, so that each thread is bound to a core of its own (ddpm.use_threads
# says why); run as a program only, not for one thread (torchrun's OMP_NUM_THREADS=1), nor where places are set.
if __name__ == "__main__" and os.environ.get("OMP_NUM_THREADS") != "1" and hasattr(os, "sched_getaffinity"):
    os.environ.setdefault("OMP_PLACES", ",".join(f"{{{cpu}}}" for cpu in sorted(os.sched_getaffinity(0))))

try:  # Ctrl-C while torch is still loading (a few seconds) ends quietly, like a Ctrl-C at any other moment
    import ddpm
    import numpy as np
    import torch
except KeyboardInterrupt:
    sys.exit(130)


@dataclass
class MoonsConfig(ddpm.TrainConfig):
    """DDPM on the two-moons toy data (2-D points) with an MLP denoiser."""
    out_dir: str = "runs/moons"     # folder for the checkpoint, metrics.csv, samples and pictures
    num_timesteps: int = 100        # T, the number of noise levels; 100: 2-D points need far fewer than images
    schedule: str = "cosine"        # noise schedule; cosine trains twice as much at the low noise that sharpens arcs
    steps: int = 1800               # optimizer steps to train for; 1,800 draws both moons sharply in 20-50 s
    batch_size: int = 512           # points per step; large batches cost little here and steady the updates
    lr: float = 2e-3                # AdamW learning rate after the warm-up; a small MLP takes far more than a U-Net
    warmup: int = 100               # steps over which the learning rate rises to --lr; short, for a short run
    lr_decay: str = "cosine"        # then: none, or cosine down to 0 (at a constant rate the moons' shape warps)
    ema_decay: float = 0.995        # decay of the weights' moving average; 0.995 spans about the last 200 steps
    log_every: int = 250            # print a log line and append a row to metrics.csv every N steps
    sample_every: int = 500         # save a snapshot picture every N steps (0: never)
    ckpt_every: int = 500           # write a checkpoint every N steps (and at the end, and on Ctrl-C or SIGTERM)
    num_samples: int = 5000         # points written to samples.npy, plotted and compared with fresh moons
    noise: float = 0.05             # standard deviation of the Gaussian noise around the arcs
    num_points: int = 100_000       # training points (drawn once, with --seed); 100k: too many to copy their lumps
    hidden: int = 128               # MLP width
    depth: int = 3                  # MLP residual blocks
    fourier: int = 4                # Fourier features of the input, frequencies 1, 2, 4, 8 (0: the raw point only)
    class_cond: bool = False        # learn p(x | moon) (label 0 upper, 1 lower); samples are half of each

    def check(self) -> None:
        super().check()
        for name, low in (("num_points", 2), ("hidden", 1), ("depth", 0), ("noise", 0), ("fourier", 0)):  # 2: a std
            if getattr(self, name) < low:
                raise ddpm.UserError(f"{ddpm.flag(name)} must be at least {low}, got {getattr(self, name)}")
        if self.guidance != 1.0 and not self.class_cond:
            raise ddpm.UserError(f"--guidance {self.guidance} needs --class-cond: a model without labels has "
                                 f"nothing to be guided towards")


def make_moons(n: int, noise: float, generator: torch.Generator, balanced: bool = True):
    """n points on two interleaved half circles, the shape of scikit-learn's make_moons: the upper arc has radius 1
    and centre (0, 0), the lower arc radius 1 and centre (1, 0.5); plus Gaussian noise of std `noise`.
    balanced: exactly half the points on each arc (alternating, as scikit-learn does); False: each point picks its arc
    at random, so that the n points are independent draws of the moons distribution, as a model's samples are.
    Returns points (n, 2) float32 and labels (n,) int64 (0 upper, 1 lower)."""
    labels = torch.arange(n) % 2 if balanced else torch.randint(0, 2, (n,), generator=generator)
    theta = torch.rand(n, generator=generator) * math.pi
    upper = torch.stack([theta.cos(), theta.sin()], dim=1)
    lower = torch.stack([1 - theta.cos(), 0.5 - theta.sin()], dim=1)
    points = torch.where(labels[:, None] == 0, upper, lower)
    return points + noise * torch.randn(n, 2, generator=generator), labels


def distance_to_arcs(points: torch.Tensor) -> torch.Tensor:
    """(n, 2): each point's distance to the upper arc (centre (0, 0), radius 1, angles 0 to π) and to the lower arc
    (centre (1, 0.5), radius 1, angles π to 2π): |r − 1| where the point's angle lies within the arc, else the
    distance to the arc's nearer end."""
    points, columns = points.double(), []
    for centre, side in (((0.0, 0.0), 1), ((1.0, 0.5), -1)):
        d = points - torch.tensor(centre, dtype=torch.float64)
        ends = torch.tensor([[centre[0] - 1, centre[1]], [centre[0] + 1, centre[1]]], dtype=torch.float64)
        columns.append(torch.where(side * d[:, 1] >= 0, (d.norm(dim=1) - 1).abs(),
                                   torch.cdist(points, ends).min(dim=1).values))
    return torch.stack(columns, dim=1)


def off_arc_share(points: torch.Tensor, noise: float) -> float:
    """The fraction of points farther than 3 noise standard deviations from both arcs: the haze between the moons
    (0.3 % for real moons, whose noise is Gaussian)."""
    return (distance_to_arcs(points).min(dim=1).values > 3 * noise).double().mean().item()


def upper_share(points: torch.Tensor) -> float:
    """The fraction of points nearer the upper arc than the lower one (one half for real moons)."""
    return (distance_to_arcs(points).argmin(dim=1) == 0).double().mean().item()


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """2·E‖a − b‖ − E‖a − a'‖ − E‖b − b'‖ between two point sets (Székely's energy distance), each mean over all pairs:
    zero for two equal distributions, but not for two finite samples of one (see expected_energy_distance)."""
    a, b = a.double(), b.double()
    return (2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean()).item()


def expected_energy_distance(real: torch.Tensor, labels: torch.Tensor | None = None) -> float:
    """The energy distance between two independent sets of n = len(real) points of real's distribution, on average:
    2δ/n, with δ = E‖x − x'‖ over pairs of distinct points of real. Not zero, because each set's mean over its n²
    pairs counts the n zero distances of a point to itself: E‖a − a'‖ = (1 − 1/n)·δ, while E‖a − b‖ = δ.
    With labels, for two sets split exactly in half between the arcs (as make_moons' balanced sets and class-
    conditional samples are): 2δ_same/n, δ_same over pairs on the same arc, since a balanced set holds slightly
    fewer same-arc pairs than independent draws. It is an average: over 300 pairs of independent real sets, 90 %
    lay between 0.34 and 2.4 times it, and 1 % beyond 3.5 times (much of that spread is each set's random split
    between the arcs, which the line before the distance reports)."""
    n, real = len(real), real.double()
    pairs = ~torch.eye(n, dtype=torch.bool)
    if labels is not None:
        pairs &= labels[:, None] == labels[None, :]
    return 2 * (torch.cdist(real, real) * pairs).sum().item() / pairs.sum().item() / n


def moons_log_density(points: torch.Tensor, noise: float, labels: torch.Tensor | None = None,
                      nodes: int = 2000) -> torch.Tensor:
    """log p(x) of the distribution make_moons draws from, at each of points (n, 2), in nats: each arc has probability
    ½ and its angle θ is uniform on [0, π], so p(x) = ½·Σ_arcs (1/π)·∫_0^π N(x; arc(θ), noise²·I) dθ; the integral by
    the midpoint rule on `nodes` angles (spaced π/nodes along arcs of radius 1, far below the noise).
    labels (n,): log p(x | arc) instead, the density class-conditional samples are drawn from. Returns (n,) float64."""
    theta = (torch.arange(nodes, dtype=torch.float64) + 0.5) * math.pi / nodes
    arcs = torch.stack([torch.stack([theta.cos(), theta.sin()], 1),
                        torch.stack([1 - theta.cos(), 0.5 - theta.sin()], 1)])         # (2, nodes, 2): upper, lower
    out = []
    for chunk in points.double().split(256):  # (256, 2, nodes) squared distances at a time
        d2 = ((chunk[:, None, None] - arcs[None]) ** 2).sum(-1)
        log_arc = torch.logsumexp(-d2 / (2 * noise ** 2), dim=2) - math.log(nodes * 2 * math.pi * noise ** 2)
        out.append(log_arc)                                                            # (256, 2): log p(x | arc)
    log_arc = torch.cat(out)
    if labels is not None:
        return log_arc.gather(1, labels[:, None]).squeeze(1)
    return torch.logsumexp(log_arc, dim=1) - math.log(2)


def bits_per_dim_report(diffusion, model, cfg: "MoonsConfig", mean: torch.Tensor, std: torch.Tensor) -> str:
    """The bound [DDPM Eq. 5] of `model` on fresh moons (−log p_θ(x_0), or −log p_θ(x_0 | y) with --class-cond), in
    bits per dimension of the data's own coordinates, beside the moons' entropy per dimension H/(2·ln 2), both as
    mean ± standard error over cfg.num_samples fresh points. The model sees standardised points z = (x − mean)/std,
    so −log p(x) = −log p(z) + Σ_i log std_i."""
    n = cfg.num_samples
    real, labels = make_moons(n, cfg.noise, torch.Generator().manual_seed(cfg.seed + 2), balanced=cfg.class_cond)
    device = next(model.parameters()).device
    torch.manual_seed(cfg.seed)  # the x_t of each term of the bound
    bpd = diffusion.to(device).nll_bound(model, ((real - mean) / std).to(device),
                                         labels.to(device) if cfg.class_cond else None).cpu()
    bpd = bpd + std.double().log2().sum() / 2
    line = f"bound on −log likelihood of {n:,} fresh moons: {bpd.mean():.3f} ± {bpd.std() / math.sqrt(n):.3f} bits/dim"
    if cfg.noise == 0:
        return line + " (noise 0: the moons have no density, so no entropy to compare with)"
    h = -moons_log_density(real, cfg.noise, labels if cfg.class_cond else None) / (2 * math.log(2))
    return line + f" (the moons' own entropy, the floor: {h.mean():.3f} ± {h.std() / math.sqrt(n):.3f})"


def plot_points(panels, path: Path) -> None:
    """Scatter plots side by side: panels is a list of (title, points (n, 2))."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, points) in zip(axes[0], panels):
        ax.scatter(points[:, 0], points[:, 1], s=1, alpha=0.5)
        ax.set(title=title, xlim=(-1.6, 2.6), ylim=(-1.1, 1.6), aspect="equal")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_reverse_gif(trajectory: torch.Tensor, path: Path, frames: int = 40) -> None:
    """An animated GIF of the reverse process: trajectory (steps + 1, n, 2) in data coordinates, x_T to x_0."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image
    picks = torch.linspace(0, len(trajectory) - 1, frames).round().long().tolist()
    images = []
    fig, ax = plt.subplots(figsize=(4, 3.3))
    ax.set(xlim=(-3, 4), ylim=(-3, 3), aspect="equal")
    # The axes are drawn once; each frame pastes them back and draws only the dots and the title on top (the
    # "animated" artists, which the full draw leaves out): 5× faster than drawing every frame whole.
    dots = ax.scatter(trajectory[0, :, 0], trajectory[0, :, 1], s=2, alpha=0.6, animated=True)
    title = ax.set_title("", animated=True)
    fig.canvas.draw()
    background = fig.canvas.copy_from_bbox(fig.bbox)
    for i in picks:
        fig.canvas.restore_region(background)
        dots.set_offsets(trajectory[i].numpy())
        title.set_text(f"reverse process: step {i} of {len(trajectory) - 1}")
        for artist in (dots, *ax.spines.values(), title):  # the frame's lines over the dots, as in a full draw
            ax.draw_artist(artist)
        images.append(Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3]))
    plt.close(fig)
    # One palette of 32 colours for all frames (a plot has few), without dithering: 8× faster to encode than a
    # palette searched for each frame, and it does not flicker.
    palette = images[-1].quantize(colors=32)  # its white comes out as 251 to 253 of 255: not to be seen
    images = [image.quantize(palette=palette, dither=Image.Dither.NONE) for image in images]
    durations = [80] * (len(images) - 1) + [1500]  # hold the final frame
    images[0].save(path, save_all=True, append_images=images[1:], duration=durations, loop=0)


def build_model(cfg: MoonsConfig) -> ddpm.MLP:
    return ddpm.MLP(dim=2, hidden=cfg.hidden, depth=cfg.depth, num_classes=2 if cfg.class_cond else 0,
                    fourier=cfg.fourier)


def main(cfg: MoonsConfig) -> None:
    out_dir = Path(cfg.out_dir)
    diffusion = ddpm.Diffusion(cfg.num_timesteps, cfg.schedule, cfg.p_uncond)
    if cfg.sampler == "ddim" and cfg.schedule == "cosine":  # on the defaults: 25× the real-vs-real energy distance
        abar_T = diffusion.alphas_cumprod[-1].item()
        print(f"warning: DDIM on this model's cosine schedule (ᾱ_T = {abar_T:.1e}) draws hazy moons: its "
              f"first step divides the network's error by √ᾱ_T; use the ancestral sampler (--sampler ddpm), or train "
              f"with --schedule linear for DDIM", file=sys.stderr)
    if cfg.sample_only:
        state = ddpm.load_for_sampling(cfg)
        mean, std = torch.tensor(state["data_info"]["mean"]), torch.tensor(state["data_info"]["std"])
        model = build_model(cfg)
        model.load_state_dict(state["ema"])
        device = ddpm.choose_device(cfg.device)
        model.to(device).eval()
        diffusion.to(device)
    else:
        points, labels = make_moons(cfg.num_points, cfg.noise, torch.Generator().manual_seed(cfg.seed))
        mean, std = points.mean(0), points.std(0)
        # The network trains on standardised points (mean 0, std 1 per axis: the scale N(0, I) noise is made for);
        # everything written to disk is mapped back to the original coordinates.
        data = ddpm.Data((points - mean) / std, labels if cfg.class_cond else None, ("upper", "lower")
                         if cfg.class_cond else (), meta={"mean": mean.tolist(), "std": std.tolist()})
        torch.manual_seed(cfg.seed)
        model = build_model(cfg)

        def snapshot(ema_model, step):
            y = (torch.arange(1000) % 2) if cfg.class_cond else None
            x = ddpm.draw(diffusion, ema_model, cfg, (1000, 2), y=y, generator=torch.Generator().manual_seed(cfg.seed))
            plot_points([(f"EMA samples at step {step:,}", x.cpu() * std + mean)],
                        out_dir / "snapshots" / f"step_{step:06d}.png")

        model = ddpm.train(model, diffusion, data, cfg, on_snapshot=snapshot)
    if ddpm.process_rank()[0] != 0:  # under torchrun, process 0 alone samples and writes the pictures
        return
    if not cfg.sample_only:
        ddpm.plot_loss(out_dir)

    # Final samples from the EMA model, with the whole trajectory for the animation.
    n = cfg.num_samples
    y = (torch.arange(n) % 2) if cfg.class_cond else None
    samples, trajectory = ddpm.draw(diffusion, model, cfg, (n, 2), y=y,
                                    generator=torch.Generator().manual_seed(cfg.seed), return_trajectory=True)
    samples = samples.cpu() * std + mean
    paths = [ddpm.output_path(cfg, name) for name in ("samples.npy", "samples.png", "reverse.gif")]
    np.save(paths[0], samples.numpy().astype(np.float32))
    # Fresh moons drawn the way the samples were: independently, or half of each label with --class-cond.
    real, labels = make_moons(n, cfg.noise, torch.Generator().manual_seed(cfg.seed + 1), balanced=cfg.class_cond)
    plot_points([("real (fresh moons)", real), (f"generated ({cfg.sampler})", samples)], paths[1])
    save_reverse_gif(trajectory[:, :1000] * std + mean, paths[2])
    print(f"wrote {', '.join(map(str, paths))}" + ("" if cfg.sample_only else f", {out_dir / 'loss.png'}"))
    # The verdict, each figure next to what real data gives, so that "close" means close.
    print(f"off the arcs (beyond 3σ of both): {off_arc_share(samples, cfg.noise):.1%} of the samples "
          f"(fresh moons: {off_arc_share(real, cfg.noise):.1%}); nearer the upper arc: {upper_share(samples):.1%} "
          f"(fresh: {upper_share(real):.1%})")
    print(f"energy distance to fresh moons: {energy_distance(samples, real):.5f} "
          f"(two such real sets of {n:,}: {expected_energy_distance(real, labels if cfg.class_cond else None):.5f} "
          f"on average)")
    print(bits_per_dim_report(diffusion, model, cfg, mean, std))


if __name__ == "__main__":
    sys.exit(ddpm.cli(MoonsConfig, main))
