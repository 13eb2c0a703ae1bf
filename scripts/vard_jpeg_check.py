"""Does VARD learn a non-differentiable reward on the embedded model? Base vs fine-tuned JPEG reward.

Runs ``envs_configs/digits_vard_jpeg_{compressibility,incompressibility}.yaml`` with a small CPU budget
and prints, for each, the fixed-noise evaluation reward (mean ± standard error over
``eval.num_samples`` images, the same noise before and after) of the base model and of the
fine-tuned one, the value's explained variance per epoch, and the wall time. The JPEG reward has no
gradient: the UNet follows only the learned value's::

    python scripts/vard_jpeg_check.py [--epochs 12] [--only incompress] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from agents.vard import train
from agents.vard.config import load_vard_config

CONFIGS = Path(__file__).resolve().parents[1] / "envs_configs"
REWARDS = ["jpeg_compressibility", "jpeg_incompressibility"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--only", default=None, help="run only rewards containing this text")
    parser.add_argument("--keep", default=None, metavar="DIR", help="keep the runs (samples, TensorBoard) under DIR")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (1 is faster on a busy machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"budget: {args.epochs} epochs; overrides: {args.overrides or 'none'}\n")
    for reward in REWARDS:
        if args.only and args.only not in reward:
            continue
        path = CONFIGS / f"digits_vard_{reward}.yaml"
        config = load_vard_config(path, [f"num_epochs={args.epochs}", f"eval.every={args.epochs}", *args.overrides])
        tic = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = Path(args.keep) / f"vard_{reward}" if args.keep else Path(tmp)
            result = train(config, run_dir=run_dir, progress=False)
        seconds = time.perf_counter() - tic
        base, final = result.base_eval, result.final_eval
        ev = " ".join(f"{e.value_heldout_explained_variance:.2f}" for e in result.epochs[1:])
        print(
            f"VARD {reward}: base {base.mean:.4f} ± {base.std:.4f}  ->  fine-tuned {final.mean:.4f} ± {final.std:.4f}"
        )
        print(f"  value explained variance on each epoch's fresh rollouts (before fitting them): {ev}")
        print(f"  mean KL to base per step (last epoch): {result.epochs[-1].kl_to_reference:.4f}; {seconds:.0f} s\n")


if __name__ == "__main__":
    main()
