"""Draws every figure of the walkthrough in docs/ with the real code of ddpm.py.

    python docs/make_figures.py              # 2 to 3 minutes on a 2-core CPU; writes docs/fig_*.png
    python docs/make_figures.py --from-runs  # also use your checkpoints under runs/ (and redraw the MNIST figure)

No GPU, no network. The moons figures need three small MLPs with train_moons.py's settings: an unconditional one,
the same on the linear schedule (for the DDIM comparison of chapter 3) and one that knows which moon. Each is trained
here with Part I's `fit`, so the figures are the ones the docs describe whatever runs you made before. Only with
--from-runs is a model of that kind in runs/moons (its newest ckpt_<step>.pt, from train_moons.py, with or without
--class-cond) used instead, and the MNIST figure redrawn from runs/mnist (python train_mnist.py); without it the
committed MNIST figure stays. The script says which. Everything is seeded: the same inputs give the same pictures.
"""
import argparse
import io
import os
import sys
import time
from pathlib import Path

# Before torch loads: one OpenMP place per core, so that each thread is bound to a core of its own (ddpm.use_threads
# says why); run as a program only, not for one thread (torchrun's OMP_NUM_THREADS=1), nor where places are set.
if __name__ == "__main__" and os.environ.get("OMP_NUM_THREADS") != "1" and hasattr(os, "sched_getaffinity"):
    os.environ.setdefault("OMP_PLACES", ",".join(f"{{{cpu}}}" for cpu in sorted(os.sched_getaffinity(0))))

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
import ddpm  # noqa: E402  (after the path is set: the script runs from any folder)
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.cbook  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402  (installed with matplotlib)
from train_moons import MoonsConfig, energy_distance, make_moons  # noqa: E402

DPI = 100          # small PNGs: they are committed
MOONS = MoonsConfig()  # the moons settings of train_moons.py: T, schedule, MLP size, data noise and size
LIM = (-3.2, 3.2)  # plot range of the moons figures, in standardised coordinates: x_T ~ N(0, I) fits inside


def save(fig, name: str, title: str = "") -> None:
    """Writes docs/<name>, with `title` above all panels (tight_layout leaves it a strip of its own)."""
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.94) if title else (0, 0, 1, 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=DPI)
    plt.close(fig)
    # 256 colours are plenty for plots and for these small photographs, and make the committed PNGs 2-3 times smaller
    # (noise does not compress). dither=0: no dithering, which would speckle the plain areas of plots.
    Image.open(buffer).convert("RGB").quantize(256, dither=0).save(DOCS / name, optimize=True)
    print(f"wrote docs/{name}")


def moons_axes(ax, title: str) -> None:
    ax.set(xlim=LIM, ylim=LIM, aspect="equal", title=title, xlabel="$x_1$ (standardised)")
    ax.set_ylabel("$x_2$ (standardised)")


# ----------------------------------------------------------------------------------------------------------------------
# Figures that need no training: the forward process and the schedules
# ----------------------------------------------------------------------------------------------------------------------

def grace_hopper(side: int = 128) -> torch.Tensor:
    """matplotlib's sample photograph as a (1, 3, side, side) tensor in [−1, 1], where ddpm.py's images live."""
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        pixels = torch.from_numpy(plt.imread(f, format="jpg").copy())             # (H, W, 3) uint8
    image = pixels.permute(2, 0, 1)[None].float() / 127.5 - 1                      # (1, 3, H, W) in [−1, 1]
    h, w = image.shape[-2:]
    s = min(h, w)
    image = image[..., (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]  # centre square
    return F.interpolate(image, size=(side, side), mode="bilinear", antialias=True, align_corners=False)


def figure_noised_image() -> None:
    """x_t = q_sample(x_0, t, ε) for one photograph, at several t, with the same ε throughout, for both schedules."""
    x0 = grace_hopper()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    paper_ts = [0, 50, 100, 250, 500, 750, 1000]
    fig, axes = plt.subplots(2, len(paper_ts), figsize=(1.6 * len(paper_ts), 4.5))
    for row, schedule in enumerate(ddpm.SCHEDULES):
        d = ddpm.Diffusion(1000, schedule)
        for col, t_paper in enumerate(paper_ts):
            if t_paper == 0:
                x_t, abar = x0, 1.0                                          # x_0 itself: not noised
            else:
                t = torch.tensor([t_paper - 1])                              # code t = k is paper t = k + 1
                x_t, abar = d.q_sample(x0, t, noise), d.alphas_cumprod[t_paper - 1].item()
            ax = axes[row, col]
            ax.imshow(((x_t[0].clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(f"$\\bar\\alpha_t$ = {abar:.2g}", fontsize=8)
            if row == 0:
                ax.set_title(f"t = {t_paper}", fontsize=9)
            if col == 0:
                ax.set_ylabel(schedule, fontsize=10)
    save(fig, "fig_noised_image.png",
         "$x_t = \\sqrt{\\bar\\alpha_t}\\,x_0 + \\sqrt{1 - \\bar\\alpha_t}\\,\\epsilon$, the same $\\epsilon$ "
         "in every picture (shown clipped to [−1, 1])")


def figure_schedules() -> None:
    """ᾱ_t and log SNR(t) = log(ᾱ_t / (1 − ᾱ_t)) against t for the linear and cosine schedules, T = 1000."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    t = torch.arange(1, 1001)  # paper t
    for schedule in ddpm.SCHEDULES:
        abar = ddpm.Diffusion(1000, schedule).alphas_cumprod.double()
        ax1.plot(t, abar, label=schedule)
        ax2.plot(t, torch.log(abar / (1 - abar)), label=schedule)
    ax1.set(xlabel="t", ylabel="$\\bar\\alpha_t$", title="signal kept: $\\bar\\alpha_t$")
    ax2.axhline(0, color="grey", lw=0.8, ls="--")
    ax2.text(20, 0.6, "SNR = 1", color="grey", fontsize=8)
    ax2.set(xlabel="t", ylabel="log SNR(t)", title="log signal-to-noise ratio")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    save(fig, "fig_schedules.png")


def figure_posterior_variance() -> None:
    """β_t and β̃_t, the two natural choices of σ_t², and their ratio, for the linear schedule at T = 1000 and for the
    moons' schedule (cosine, T = 100), where far more steps have a ratio above 1.1 (chapter 3.2)."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    for (schedule, T), colour in zip((("linear", 1000), (MOONS.schedule, MOONS.num_timesteps)), ("C0", "C1")):
        d, t = ddpm.Diffusion(T, schedule), torch.arange(1, T + 1)
        ax1.plot(t, d.betas, color=colour, label=f"$\\beta_t$, {schedule} T = {T}")
        ax1.plot(t, d.posterior_variance, color=colour, ls="--", label=f"$\\tilde\\beta_t$, {schedule} T = {T}")
        ratio = d.betas[1:] / d.posterior_variance[1:]  # β̃_1 = 0: the ratio starts at t = 2
        ax2.plot(t[1:], ratio, color=colour, label=f"{schedule} T = {T}: {int((ratio > 1.1).sum())} steps above 1.1")
    ax1.set(xlabel="t", ylabel="variance", xscale="log", yscale="log", title="the two choices of $\\sigma_t^2$")
    ax2.axhline(1.1, color="grey", lw=0.8, ls=":")
    ax2.set(xlabel="t", ylabel="$\\beta_t / \\tilde\\beta_t$", xscale="log", title="their ratio")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save(fig, "fig_posterior_variance.png")


def moons_t_grid(T: int) -> list:
    """The paper t at which both moons figures, forward and reverse, show x_t: one grid, so that they compare."""
    return [0, T // 20, T // 10, T // 5, 2 * T // 5, 3 * T // 5, T]


def figure_moons_forward(points: torch.Tensor) -> None:
    """Histograms of q(x_t) for the standardised moons at several t: the data dissolve into N(0, I)."""
    d, T = ddpm.Diffusion(MOONS.num_timesteps, MOONS.schedule), MOONS.num_timesteps
    paper_ts = moons_t_grid(T)
    g = torch.Generator().manual_seed(1)
    fig, axes = plt.subplots(1, len(paper_ts), figsize=(2.1 * len(paper_ts), 2.9))
    for ax, t_paper in zip(axes, paper_ts):
        if t_paper == 0:
            x_t = points
        else:
            t = torch.full((len(points),), t_paper - 1)
            x_t = d.q_sample(points, t, torch.randn(points.shape, generator=g))
        ax.hist2d(x_t[:, 0].numpy(), x_t[:, 1].numpy(), bins=80, range=[LIM, LIM], cmap="Blues")
        abar = 1.0 if t_paper == 0 else d.alphas_cumprod[t_paper - 1].item()
        moons_axes(ax, f"t = {t_paper}, $\\bar\\alpha_t$ = {abar:.2g}")
        ax.title.set_fontsize(9)
        if t_paper:
            ax.set_ylabel("")
    save(fig, "fig_moons_forward.png",
         f"the forward process on the moons (T = {T}, {MOONS.schedule} schedule): histograms of $x_t$")


# ----------------------------------------------------------------------------------------------------------------------
# The moons models: a checkpoint of train_moons.py if there is one of the right kind, else trained here with fit
# ----------------------------------------------------------------------------------------------------------------------

def moons_model(class_cond: bool, from_runs: bool, schedule: str = MOONS.schedule):
    """(diffusion, EMA model in eval mode, mean, std): a moons denoiser, unconditional or conditioned on the moon,
    for the given noise schedule (train_moons.py's by default); from runs/moons/ckpt_<step>.pt only if from_runs."""
    kind = f"{'class-conditional' if class_cond else 'unconditional'} moons model ({schedule} schedule)"
    path = (ddpm.find_checkpoints(ROOT / "runs" / "moons") or [ROOT / "runs" / "moons" / "ckpt_<step>.pt"])[0]
    if from_runs and path.exists():
        try:
            state = ddpm.load_checkpoint(path)
        except ddpm.UserError as e:
            print(f"not using {path}: {e}")
        else:
            cfg = state["config"]
            if cfg.get("class_cond", False) == class_cond and cfg["schedule"] == schedule:
                model = ddpm.MLP(dim=2, hidden=cfg["hidden"], depth=cfg["depth"], num_classes=2 if class_cond else 0,
                                 fourier=cfg.get("fourier", 0))
                model.load_state_dict(state["ema"])
                diffusion = ddpm.Diffusion(cfg["num_timesteps"], cfg["schedule"], cfg["p_uncond"])
                info = state["data_info"]
                print(f"{kind}: the EMA weights of {path.relative_to(ROOT)} (step {state['step']:,})")
                return diffusion, model.eval(), torch.tensor(info["mean"]), torch.tensor(info["std"])
    # Train one with Part I alone: the moons as train_moons.py makes them, standardised, then fit [DDPM Alg. 1] with a
    # constant learning rate (train_moons.py adds warm-up and decay; fit is the plain loop).
    points, labels = make_moons(MOONS.num_points, MOONS.noise, torch.Generator().manual_seed(0))
    mean, std = points.mean(0), points.std(0)
    torch.manual_seed(0)
    model = ddpm.MLP(dim=2, hidden=MOONS.hidden, depth=MOONS.depth, num_classes=2 if class_cond else 0,
                     fourier=MOONS.fourier)
    diffusion = ddpm.Diffusion(MOONS.num_timesteps, schedule, MOONS.p_uncond)
    tic = time.perf_counter()
    ema_model = ddpm.fit(model, diffusion, (points - mean) / std, labels if class_cond else None,
                         steps=2000, batch_size=MOONS.batch_size, lr=MOONS.lr, ema_decay=MOONS.ema_decay, seed=0)
    print(f"{kind}: trained here with ddpm.fit, 2,000 steps ({time.perf_counter() - tic:.0f} s)")
    return diffusion, ema_model, mean, std


def figure_moons_reverse(diffusion, model) -> None:
    """The reverse process [DDPM Alg. 2] for 2,000 points: snapshots of x_t from x_T to x_0."""
    T = diffusion.num_timesteps
    _, trajectory = diffusion.sample(model, (2000, 2), generator=torch.Generator().manual_seed(0),
                                     return_trajectory=True)          # (T + 1, 2000, 2): x_T, x_{T−1}, …, x_0
    paper_ts = moons_t_grid(T)[::-1]                                  # the forward figure's t, from T down
    fig, axes = plt.subplots(1, len(paper_ts), figsize=(2.1 * len(paper_ts), 2.9))
    for ax, t_paper in zip(axes, paper_ts):
        x_t = trajectory[T - t_paper]                                 # trajectory[i] is x_t at paper t = T − i
        ax.scatter(x_t[:, 0], x_t[:, 1], s=1, alpha=0.4)
        moons_axes(ax, f"$x_{{{t_paper}}}$")
        if t_paper != T:
            ax.set_ylabel("")
    save(fig, "fig_moons_reverse.png",
         f"the reverse process: ancestral sampling (Alg. 2) with the trained MLP, T = {T}")


def figure_samplers(models) -> None:
    """Each model (a row) sampled by the ancestral sampler and by DDIM with fewer steps, with the energy distance of
    each set to fresh moons (in the data's own coordinates, as train_moons.py prints it).
    models: a list of (row name, diffusion, model, mean, std)."""
    n = 4000
    real, _ = make_moons(n, MOONS.noise, torch.Generator().manual_seed(1))
    fig, axes = plt.subplots(len(models), 5, figsize=(2.6 * 5, 3.0 * len(models)), squeeze=False)
    for row, (name, diffusion, model, mean, std) in enumerate(models):
        ddim = lambda steps, eta=0.0: lambda g: diffusion.ddim_sample(model, (n, 2), steps=steps, eta=eta, generator=g)
        runs = [(f"ancestral, {diffusion.num_timesteps} calls", lambda g: diffusion.sample(model, (n, 2), generator=g)),
                ("DDIM η = 0, 20 calls", ddim(20)), ("DDIM η = 0, 10 calls", ddim(10)),
                ("DDIM η = 1, 10 calls", ddim(10, eta=1.0)), ("DDIM η = 0, 3 calls", ddim(3))]
        for col, (title, draw) in enumerate(runs):
            ax = axes[row, col]
            x0 = draw(torch.Generator().manual_seed(0))
            dist = energy_distance(x0 * std + mean, real)
            ax.scatter(x0[:, 0], x0[:, 1], s=1, alpha=0.4)
            moons_axes(ax, f"{title}\nenergy distance {dist:.4f}")
            ax.title.set_fontsize(9)
            if col:
                ax.set_ylabel("")
            else:
                ax.set_ylabel(f"{name}\n$x_2$ (standardised)")
    save(fig, "fig_moons_samplers.png")


def figure_guidance(diffusion, model) -> None:
    """Classifier-free guidance on the class-conditional moons: the same noise, labels half 0 (upper moon) and half 1
    (lower), sampled with w = 0, 1, 3, 5."""
    n = 2000
    y = torch.arange(n) % 2
    weights = [0.0, 1.0, 3.0, 5.0]
    notes = {0.0: " (unconditional)", 1.0: " (conditional)"}
    fig, axes = plt.subplots(1, len(weights), figsize=(3.0 * len(weights), 3.8))
    for i, (ax, w) in enumerate(zip(axes, weights)):
        x0 = diffusion.sample(model, (n, 2), y=y, guidance=w, generator=torch.Generator().manual_seed(0))
        for label, colour, name in ((0, "tab:blue", "asked: upper"), (1, "tab:orange", "asked: lower")):
            pts = x0[y == label]
            ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.4, color=colour, label=name)
        moons_axes(ax, f"w = {w:g}{notes.get(w, '')}")
        if i:
            ax.set_ylabel("")
    axes[0].legend(loc="lower left", fontsize=7, markerscale=6)
    save(fig, "fig_guidance.png",
         "classifier-free guidance, "
         "$\\tilde\\epsilon = \\epsilon_\\varnothing + w\\,(\\epsilon_y - \\epsilon_\\varnothing)$"
         ": the same starting noise in each panel")


# ----------------------------------------------------------------------------------------------------------------------
# MNIST: from the checkpoint of train_mnist.py, if there is one
# ----------------------------------------------------------------------------------------------------------------------

def figure_mnist(from_runs: bool) -> None:
    """Class grids from runs/mnist's checkpoint at w = 0, 1 and 3: one row per digit, the same noise in each grid; only
    if from_runs (a reader's own MNIST run is not what the docs describe unless asked for)."""
    path = (ddpm.find_checkpoints(ROOT / "runs" / "mnist") or [ROOT / "runs" / "mnist" / "ckpt_<step>.pt"])[0]
    if not from_runs:
        print("kept the committed MNIST figure (--from-runs redraws it from the checkpoint in runs/mnist)")
        return
    if not path.exists():
        kept = " (the figure committed earlier stays)" if (DOCS / "fig_mnist_guidance.png").exists() else ""
        print(f"skipped the MNIST figure: no {path.relative_to(ROOT)} (make one with python train_mnist.py){kept}")
        return
    try:
        state = ddpm.load_checkpoint(path)
    except ddpm.CheckpointError as e:  # e.g. written by an older ddpm.py
        print(f"skipped the MNIST figure: {e}")
        return
    cfg, info = state["config"], state["data_info"]
    channels, side, names = info["shape"][0], info["shape"][-1], info["class_names"]
    model = ddpm.build_unet(cfg["model"], channels, side, len(names))
    model.load_state_dict(state["ema"])
    model.eval()
    diffusion = ddpm.Diffusion(cfg["num_timesteps"], cfg["schedule"], cfg["p_uncond"])
    print(f"MNIST: the EMA weights of {path.relative_to(ROOT)} (step {state['step']:,})")
    per_class, weights = 6, [0.0, 1.0, 3.0]
    y = torch.arange(len(names)).repeat_interleave(per_class)
    fig, axes = plt.subplots(1, len(weights), figsize=(3.2 * len(weights), 5.2))
    for ax, w in zip(axes, weights):
        x0 = diffusion.ddim_sample(model, (len(y), channels, side, side), steps=50, y=y, guidance=w,
                                   generator=torch.Generator().manual_seed(0), clip_x0=True)  # (N, C, H, W)
        grid = (x0.reshape(len(names), per_class, channels, side, side).permute(0, 3, 1, 4, 2)
                .reshape(len(names) * side, per_class * side, channels) + 1) / 2  # rows: digits
        ax.imshow(grid.squeeze(-1).clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([side * (i + 0.5) for i in range(len(names))], names)
        ax.set_ylabel("label y asked for")
        ax.set_title(f"w = {w:g}", fontsize=10)
    save(fig, "fig_mnist_guidance.png",
         f"MNIST, DDIM 50 steps, step {state['step']:,} of training: guidance weight w")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from-runs", action="store_true", help="use the checkpoint in runs/moons where it fits, and "
                        "redraw the MNIST figure from runs/mnist (default: train the moons models here, keep MNIST's)")
    args = parser.parse_args()
    tic = time.perf_counter()
    figure_noised_image()
    figure_schedules()
    figure_posterior_variance()
    points, _ = make_moons(10_000, MOONS.noise, torch.Generator().manual_seed(0))  # the 10,000 points chapter 1.6 names
    figure_moons_forward((points - points.mean(0)) / points.std(0))
    diffusion, model, mean, std = moons_model(class_cond=False, from_runs=args.from_runs)
    figure_moons_reverse(diffusion, model)
    # DDIM's first step from t = T divides by √ᾱ_T; a second model, with the linear schedule, shows how much that
    # matters (chapter 3.4).
    linear = moons_model(class_cond=False, from_runs=args.from_runs, schedule="linear")
    figure_samplers([(f"{MOONS.schedule} schedule", diffusion, model, mean, std), ("linear schedule", *linear)])
    diffusion, model, _, _ = moons_model(class_cond=True, from_runs=args.from_runs)
    figure_guidance(diffusion, model)
    figure_mnist(args.from_runs)
    print(f"done in {time.perf_counter() - tic:.0f} s")


if __name__ == "__main__":
    main()
