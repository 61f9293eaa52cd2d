"""Class-conditional DDPM on MNIST digits, with classifier-free guidance: ask for a "7" and get a 7.

    python train_mnist.py                      # download MNIST into ./data, train, write runs/mnist/
    python train_mnist.py --resume             # continue an interrupted run
    python train_mnist.py --sample-only --label 3 --guidance 3    # draw 3s from the saved model
    python train_mnist.py --data-dir /tmp      # MNIST already unpacked in /tmp/MNIST/raw (offline machines)
    python train_mnist.py --data FOLDER        # your own images, one sub-folder per class
    python train_mnist.py --help               # every setting, with its default

Writes runs/mnist/: ckpt.pt, metrics.csv, loss.png, samples/step_*.png (one row per digit, fixed noise),
samples.png (the final grid) and reverse.png (the reverse process of one image per digit). README.md gives the
measured time of the default run on a CPU.
"""
import sys
from dataclasses import dataclass

import ddpm


@dataclass
class MnistConfig(ddpm.ImageConfig):
    """Class-conditional DDPM on MNIST (28×28 greyscale digits) with a U-Net and classifier-free guidance."""
    out_dir: str = "runs/mnist"     # folder for the checkpoint, metrics.csv and the pictures
    model: str = "mnist"            # a 1.1M-parameter U-Net that trains in minutes on a CPU
    image_size: int = 28            # MNIST's side
    channels: int = 1               # greyscale
    hflip: bool = False             # a mirrored digit is not the same digit
    steps: int = 2500               # 2.7 epochs at batch 64: digits of every class are clear by then
    batch_size: int = 64            # small batches: more steps per minute on a CPU
    lr: float = 1e-3                # a small network trains well with a larger step than DDPM's 2e-4
    warmup: int = 200               # a short warm-up for a short run
    ema_decay: float = 0.999        # the average spans ~1,000 steps, the last 40 % of the run
    log_every: int = 100            # a log line every 100 steps
    sample_every: int = 1000        # a class grid every 1,000 steps
    ckpt_every: int = 500           # a checkpoint every 500 steps (a few minutes of CPU time)
    num_samples: int = 100          # 10 per digit in the final grid
    sampler: str = "ddim"           # 50 DDIM steps instead of 1,000 ancestral ones: a grid in seconds on a CPU
    sample_steps: int = 50          # DDIM steps
    guidance: float = 2.0           # w = 2: clearly the requested digit, still varied


def load_mnist(cfg: MnistConfig) -> ddpm.Data:
    """MNIST's 60,000 training digits as uint8 (N, 1, 28, 28), downloaded into cfg.data_dir if not there."""
    from torchvision import datasets
    mnist = ddpm.download_dataset(datasets.MNIST, cfg, f"the four files train-images-idx3-ubyte, "
                                                       f"train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
                                                       f"t10k-labels-idx1-ubyte into {cfg.data_dir}/MNIST/raw/")
    return ddpm.Data(mnist.data[:, None], mnist.targets, tuple(str(i) for i in range(10)), hflip=cfg.hflip)


def main(cfg: MnistConfig, ckpt: ddpm.Checkpoint | None = None) -> None:
    ddpm.run_images(cfg, load_mnist, ckpt)


if __name__ == "__main__":
    sys.exit(ddpm.cli(MnistConfig, main))
