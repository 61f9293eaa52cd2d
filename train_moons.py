"""DDPM on the two-moons toy data: 2-D points, trained and sampled in about 20 seconds on a laptop CPU.

    python train_moons.py                   # train, then write runs/moons/: samples.npy, samples.png, loss.png,
                                            #   reverse.gif, snapshots/, ckpt.pt, metrics.csv
    python train_moons.py --resume          # continue an interrupted run (bit-exact on a CPU)
    python train_moons.py --sample-only     # sample and plot from the saved checkpoint, no training
    python train_moons.py --class-cond --overwrite --guidance 2   # learn p(x | which moon), sample each by label
    python train_moons.py --help            # every setting, with its default

At the end it prints the energy distance between the samples and fresh moons, beside the same distance between two
fresh real sets of the same size: the closer the first number is to the second, the better the model.
"""
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import ddpm


@dataclass
class MoonsConfig(ddpm.TrainConfig):
    """DDPM on the two-moons toy data (2-D points) with an MLP denoiser."""
    out_dir: str = "runs/moons"     # folder for the checkpoint, metrics.csv and the pictures
    num_timesteps: int = 200        # T: 2-D data needs fewer noise levels than images, and sampling is 5× faster
    steps: int = 1500               # enough for the MLP to draw both moons cleanly (the run takes ~20 s)
    batch_size: int = 512           # points per step: large batches cost little here and steady the updates
    lr: float = 2e-3                # a small MLP takes much larger steps than DDPM's U-Net (2e-4)
    warmup: int = 100               # a short warm-up for a short run
    ema_decay: float = 0.995        # the average spans ~200 steps, the last eighth of the run
    log_every: int = 250            # six log lines per default run
    sample_every: int = 500         # a snapshot picture every 500 steps
    ckpt_every: int = 500           # a checkpoint every 500 steps (a few ms each)
    num_samples: int = 5000         # points written to samples.npy, plotted and compared with fresh moons
    noise: float = 0.05             # standard deviation of the Gaussian noise around the arcs
    num_points: int = 10_000        # size of the training set (drawn once, with --seed)
    hidden: int = 128               # MLP width
    depth: int = 3                  # MLP residual blocks
    class_cond: bool = False        # learn p(x | moon) (label 0 upper, 1 lower); samples are half of each

    def check(self) -> None:
        super().check()
        for name, low in (("num_points", 2), ("hidden", 1), ("depth", 0), ("noise", 0)):  # 2 points: a std exists
            if getattr(self, name) < low:
                raise ddpm.UserError(f"{ddpm.flag(name)} must be at least {low}, got {getattr(self, name)}")
        if self.guidance != 1.0 and not self.class_cond:
            raise ddpm.UserError(f"--guidance {self.guidance} needs --class-cond: a model without labels has "
                                 f"nothing to be guided towards")


def make_moons(n: int, noise: float, generator: torch.Generator):
    """n points on two interleaved half circles, the shape of scikit-learn's make_moons: the upper arc has radius 1
    and centre (0, 0), the lower arc radius 1 and centre (1, 0.5); plus Gaussian noise of std `noise`.
    Returns points (n, 2) float32 and labels (n,) int64 (0 upper, 1 lower)."""
    labels = torch.arange(n) % 2
    theta = torch.rand(n, generator=generator) * math.pi
    upper = torch.stack([theta.cos(), theta.sin()], dim=1)
    lower = torch.stack([1 - theta.cos(), 0.5 - theta.sin()], dim=1)
    points = torch.where(labels[:, None] == 0, upper, lower)
    return points + noise * torch.randn(n, 2, generator=generator), labels


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """2·E‖a − b‖ − E‖a − a'‖ − E‖b − b'‖ between two point sets (Székely's energy distance): zero exactly when the
    distributions are equal, and about 1/n apart for two samples of n points of the same distribution."""
    a, b = a.double(), b.double()
    return (2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean()).item()


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
    dots = ax.scatter(trajectory[0, :, 0], trajectory[0, :, 1], s=2, alpha=0.6)
    for i in picks:  # move the same dots from frame to frame (much faster than drawing a new plot each time)
        dots.set_offsets(trajectory[i].numpy())
        ax.set_title(f"reverse process: step {i} of {len(trajectory) - 1}")
        fig.canvas.draw()
        images.append(Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3]))
    plt.close(fig)
    durations = [80] * (len(images) - 1) + [1500]  # hold the final frame
    images[0].save(path, save_all=True, append_images=images[1:], duration=durations, loop=0)


def build_model(cfg: MoonsConfig) -> ddpm.MLP:
    return ddpm.MLP(dim=2, hidden=cfg.hidden, depth=cfg.depth, num_classes=2 if cfg.class_cond else 0)


def main(cfg: MoonsConfig, ckpt: ddpm.Checkpoint | None = None) -> None:
    out_dir = Path(cfg.out_dir)
    diffusion = ddpm.Diffusion(cfg.num_timesteps, cfg.schedule, cfg.p_uncond)
    if cfg.sample_only:
        state = ddpm.load_for_sampling(cfg, ckpt)
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
        data = ddpm.Data((points - mean) / std, labels if cfg.class_cond else None,
                         ("upper", "lower") if cfg.class_cond else (), meta={"mean": mean.tolist(), "std": std.tolist()})
        torch.manual_seed(cfg.seed)
        model = build_model(cfg)

        def snapshot(ema_model, step):
            y = (torch.arange(1000) % 2) if cfg.class_cond else None
            x = ddpm.draw(diffusion, ema_model, cfg, (1000, 2), y=y, generator=torch.Generator().manual_seed(cfg.seed))
            plot_points([(f"EMA samples at step {step:,}", x.cpu() * std + mean)],
                        out_dir / "snapshots" / f"step_{step:06d}.png")

        model = ddpm.train(model, diffusion, data, cfg, on_snapshot=snapshot, ckpt=ckpt)
        ddpm.plot_loss(out_dir)

    # Final samples from the EMA model, with the whole trajectory for the animation.
    n = cfg.num_samples
    y = (torch.arange(n) % 2) if cfg.class_cond else None
    samples, trajectory = ddpm.draw(diffusion, model, cfg, (n, 2), y=y,
                                    generator=torch.Generator().manual_seed(cfg.seed), return_trajectory=True)
    samples = samples.cpu() * std + mean
    np.save(out_dir / "samples.npy", samples.numpy().astype(np.float32))
    real, _ = make_moons(n, cfg.noise, torch.Generator().manual_seed(cfg.seed + 1))
    real2, _ = make_moons(n, cfg.noise, torch.Generator().manual_seed(cfg.seed + 2))
    plot_points([("real (fresh moons)", real), (f"generated ({cfg.sampler})", samples)], out_dir / "samples.png")
    save_reverse_gif(trajectory[:, :1000] * std + mean, out_dir / "reverse.gif")
    print(f"wrote {out_dir}/samples.npy, samples.png, reverse.gif" + ("" if cfg.sample_only else ", loss.png"))
    print(f"energy distance to fresh moons: {energy_distance(samples, real):.4f} "
          f"(two fresh real sets of {n:,}: {energy_distance(real2, real):.4f})")


if __name__ == "__main__":
    sys.exit(ddpm.cli(MoonsConfig, main))
