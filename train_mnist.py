"""Class-conditional DDPM on MNIST digits, with classifier-free guidance: ask for a "7" and get a 7.

    python train_mnist.py                      # download MNIST into ./data, train, write runs/mnist/
    python train_mnist.py --resume             # continue an interrupted run
    python train_mnist.py --sample-only --label 3 --guidance 3    # draw 3s from the saved model
    python train_mnist.py --data-dir /tmp      # MNIST already unpacked in /tmp/MNIST/raw (offline machines)
    python train_mnist.py --data FOLDER        # your own images, one sub-folder per class
    python train_mnist.py --help               # every setting, with its default

Writes runs/mnist/: ckpt_<step>.pt, metrics.csv, loss.png, samples/step_*.png (one row per digit, fixed noise),
samples.png (the final grid) and reverse.png (the reverse process of one image per digit). README.md gives the
measured time of the default run on a CPU.
"""
import os
import sys
from dataclasses import dataclass

# Before torch loads: one OpenMP place per core, so that each thread is bound to a core of its own (ddpm.use_threads
# says why); run as a program only, not for one thread (torchrun's OMP_NUM_THREADS=1), nor where places are set.
if __name__ == "__main__" and os.environ.get("OMP_NUM_THREADS") != "1" and hasattr(os, "sched_getaffinity"):
    os.environ.setdefault("OMP_PLACES", ",".join(f"{{{cpu}}}" for cpu in sorted(os.sched_getaffinity(0))))

try:  # Ctrl-C while torch is still loading (a few seconds) ends quietly, like a Ctrl-C at any other moment
    import ddpm
except KeyboardInterrupt:
    sys.exit(130)


@dataclass
class MnistConfig(ddpm.ImageConfig):
    """Class-conditional DDPM on MNIST (28×28 greyscale digits) with a U-Net and classifier-free guidance."""
    out_dir: str = "runs/mnist"     # folder for the checkpoint, metrics.csv and the pictures
    model: str = "mnist"            # U-Net preset; mnist: 1.1M parameters, trains in minutes on a CPU
    image_size: int = 28            # side of the images: MNIST's are 28×28; --data images are resized to it
    channels: int = 1               # image channels: 1, as MNIST is greyscale; --data images are converted to it
    hflip: bool = False             # flip training images left-right at random; off, as a mirrored digit is no digit
    steps: int = 1600               # optimizer steps to train for; 1,600 (1.7 epochs) makes every digit clear
    batch_size: int = 64            # examples per step; 64: small batches take more steps per minute on a CPU
    lr: float = 1e-3                # AdamW learning rate after the warm-up; a small net takes more than DDPM's 2e-4
    warmup: int = 200               # steps over which the learning rate rises to --lr; short, for a short run
    lr_decay: str = "cosine"        # then down to 0 at --steps: a short run ends on small, settling steps
    ema_decay: float = 0.999        # decay of the weights' moving average; 0.999 spans the last ~1,000 steps
    log_every: int = 100            # print a log line and append a row to metrics.csv every N steps
    sample_every: int = 1000        # save a class grid every N steps (0: never)
    ckpt_every: int = 500           # write a checkpoint every N steps (and at the end, and on Ctrl-C or SIGTERM)
    num_samples: int = 100          # images in the final grid; 100: 10 per digit
    sampler: str = "ddim"           # ddpm (ancestral, T network calls) or ddim (--sample-steps calls, far fewer)
    sample_steps: int = 50          # DDIM steps; 50 draws a grid in seconds on a CPU
    guidance: float = 2.0           # classifier-free guidance weight w; 2: clearly the digit asked for, still varied


def load_mnist(cfg: MnistConfig, train: bool = True) -> ddpm.Data:
    """MNIST's 60,000 training digits (train=False: the 10,000 test digits) as uint8 (N, 1, 28, 28), downloaded into
    cfg.data_dir if not there."""
    from torchvision import datasets
    mnist = ddpm.download_dataset(datasets.MNIST, cfg, f"the four files train-images-idx3-ubyte, "
                                                       f"train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
                                                       f"t10k-labels-idx1-ubyte into {cfg.data_dir}/MNIST/raw/", train)
    return ddpm.Data(mnist.data[:, None], mnist.targets, tuple(str(i) for i in range(10)), hflip=cfg.hflip)


def main(cfg: MnistConfig) -> None:
    ddpm.run_images(cfg, load_mnist)


if __name__ == "__main__":
    sys.exit(ddpm.cli(MnistConfig, main))
