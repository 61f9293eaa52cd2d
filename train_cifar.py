"""Class-conditional DDPM on CIFAR-10 with classifier-free guidance: ask for "a horse" or "a ship". A GPU job.

    python train_cifar.py                      # download CIFAR-10 into ./data, train DDPM's 35.7M U-Net
    python train_cifar.py --resume             # continue the run in runs/cifar (after Ctrl-C, preemption, a crash)
    python train_cifar.py --bench              # measure this GPU: img/s, FLOPs per image, TFLOP/s, peak memory
    python train_cifar.py --sample-only --label horse --guidance 3
    python train_cifar.py --sample-only --sampler ddim --sample-steps 100 --dump-samples 50000   # for FID
    python train_cifar.py --data FOLDER        # your own images, one sub-folder per class
    python train_cifar.py --help               # every setting, with its default

On a CPU, README.md ("CIFAR-10 on a CPU") gives a recipe with a 1.1M-parameter U-Net and what 90 minutes of it drew.

Writes runs/cifar/: ckpt_<step>.pt, metrics.csv, loss.png, samples/step_*.png (one row per class, fixed noise),
samples.png and reverse.png.
"""
import os
import sys
from dataclasses import dataclass

# Before torch loads: one OpenMP place per core, so that each thread is bound to a core of its own (ddpm.use_threads
# says why); run as a program only, not for one thread (torchrun's OMP_NUM_THREADS=1), nor where places are set.
if __name__ == "__main__" and os.environ.get("OMP_NUM_THREADS") != "1" and hasattr(os, "sched_getaffinity"):
    os.environ.setdefault("OMP_PLACES", ",".join(f"{{{cpu}}}" for cpu in sorted(os.sched_getaffinity(0))))

try:  # Ctrl-C while torch is still loading (a few seconds) ends quietly, like a Ctrl-C at any other moment
    import torch

    import ddpm
except KeyboardInterrupt:
    sys.exit(130)


@dataclass
class CifarConfig(ddpm.ImageConfig):
    """Class-conditional DDPM on CIFAR-10 (32×32 colour images) with a U-Net and classifier-free guidance."""
    out_dir: str = "runs/cifar"     # folder for the checkpoint, metrics.csv and the pictures
    model: str = "base"             # U-Net preset; base: DDPM's CIFAR-10 network, 35.7M parameters
    steps: int = 200_000            # optimizer steps to train for; DDPM took 800k, 200k already samples well
    batch_size: int = 128           # examples per step (all processes together); 128 as DDPM
    lr: float = 2e-4                # AdamW learning rate after the warm-up; 2e-4 as DDPM
    warmup: int = 5000              # steps over which the learning rate rises to --lr; 5,000 as DDPM
    ema_decay: float = 0.9999       # decay of the weights' moving average that samples come from; as DDPM
    log_every: int = 500            # print a log line and append a row to metrics.csv every N steps
    sample_every: int = 10_000      # save a class grid every N steps (0: never)
    ckpt_every: int = 5000          # write a checkpoint every N steps (and at the end, and on Ctrl-C or SIGTERM)
    num_samples: int = 100          # images in the final grid; 100: 10 per class
    guidance: float = 2.0           # classifier-free guidance weight w; 2: recognisable classes (~1.3 for best FID)


def load_cifar(cfg: CifarConfig, train: bool = True) -> ddpm.Data:
    """CIFAR-10's 50,000 training images (train=False: the 10,000 test images) as uint8 (N, 3, 32, 32), downloaded
    into cfg.data_dir if not there."""
    from torchvision import datasets
    offline = f"cifar-10-python.tar.gz (from https://www.cs.toronto.edu/~kriz/) into {cfg.data_dir}/"
    cifar = ddpm.download_dataset(datasets.CIFAR10, cfg, offline, train)
    images = torch.from_numpy(cifar.data).permute(0, 3, 1, 2).contiguous()  # (N, 32, 32, 3) → (N, 3, 32, 32)
    return ddpm.Data(images, torch.tensor(cifar.targets), tuple(cifar.classes), hflip=cfg.hflip)


def main(cfg: CifarConfig) -> None:
    ddpm.run_images(cfg, load_cifar)


if __name__ == "__main__":
    sys.exit(ddpm.cli(CifarConfig, main))
