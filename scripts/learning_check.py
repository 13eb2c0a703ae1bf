"""Does PPO-IS learn on the embedded model? Base vs fine-tuned reward on fixed evaluation noise.

Runs the digits configs for DDPO and HRF-D on JPEG compressibility and incompressibility with a
small CPU budget and prints, for each, the fixed-noise evaluation reward (mean ± standard error
over ``eval.num_samples`` images, the same noise before and after) of the base model and of the
fine-tuned one, and the wall time. The README quotes its output::

    python scripts/learning_check.py [--epochs 12] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import torch

from agents.ppo_is import train
from agents.ppo_is.config import load_config

RUNS = [
    ("ddpo", "jpeg_compressibility"),
    ("hrf-d", "jpeg_compressibility"),
    ("ddpo", "jpeg_incompressibility"),
    ("hrf-d", "jpeg_incompressibility"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--only", default=None, help="run only methods/rewards containing this text")
    args = parser.parse_args()
    torch.set_num_threads(2)

    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"budget: {args.epochs} epochs; overrides: {args.overrides or 'none'}\n")
    print("| method | reward | base (fixed noise) | fine-tuned | gain / SE | wall time |")
    print("|---|---|---|---|---|---|")
    for method, reward in RUNS:
        if args.only and args.only not in f"{method} {reward}":
            continue
        config = load_config(
            f"envs_configs/digits_{method}_{reward}.yaml",
            [f"num_epochs={args.epochs}", f"eval.every={args.epochs}", f"save_every={args.epochs}", *args.overrides],
        )
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as run_dir:
            result = train(config, run_dir=run_dir, progress=False)
        seconds = time.perf_counter() - start
        base, final = result.base_eval, result.final_eval
        gain = final.mean - base.mean
        se = (base.std**2 + final.std**2) ** 0.5
        print(
            f"| {method} | {reward} | {base.mean:.4f} ± {base.std:.4f} | {final.mean:.4f} ± {final.std:.4f} "
            f"| {gain:+.4f} ({gain / se:+.1f} SE) | {seconds:.0f} s |",
            flush=True,
        )


if __name__ == "__main__":
    main()
