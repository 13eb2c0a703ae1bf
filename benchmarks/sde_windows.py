r"""SDE windows and HRF starts at equal episodes: trained steps per sample and wall time, GRPO on a flow model.

Every variant trains GRPO for the same epochs of the same batches (prompts, group size, reward, K
steps, seed); only the window differs:

* ``full`` — every step is an SDE step (Flow-GRPO);
* ``fast`` — a random window of 2 SDE steps in the first half of the chain per batch (Flow-GRPO-Fast);
* ``mix`` — a sliding window of 2 SDE steps moving one step per batch (MixGRPO);
* ``hrf`` — episodes start from the model's own samples noised to HRF's clusters (scaled to K, one
  epoch per cluster), every remaining step an SDE step;
* ``hrf+fast`` — the HRF start plus an SDE window of the 2 steps after it.

Per variant: trained (sample, step) pairs per episode (= backward passes per sample), network calls
per episode in the rollout (``K − k0``), seconds per epoch (rollout + update, the fastest of
``--repeats`` runs) and its ratio to ``full``. Run::

    python benchmarks/sde_windows.py                       # embedded:digits-t2i on the CPU
    python benchmarks/sde_windows.py --model black-forest-labs/FLUX.1-dev --device cuda --steps 6

Prints a Markdown table and writes it with the raw figures to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agents.algorithms import load_run_config, train  # noqa: E402

VARIANTS: dict[str, list[str]] = {
    "full": [],
    "fast": ["sample.sde_window=random", "sample.sde_window_kwargs={size: 2}"],
    "mix": ["sample.sde_window=sliding", "sample.sde_window_kwargs={size: 2, every: 1}"],
    "hrf": ["env.window=hrf", "env.references=model"],
    "hrf+fast": ["env.window=hrf", "env.references=model", "sample.sde_window=[0, 2]"],
}


def hrf_clusters(steps: int) -> str:
    """HRF's clusters ((8,12), (18,22), (28,32) of 40 steps) scaled to a ``steps``-step chain, as a YAML list."""
    scaled = [(round(a * steps / 40), round(b * steps / 40)) for a, b in ((8, 12), (18, 22), (28, 32))]
    return "[" + ", ".join(f"[{a}, {min(b, steps - 1)}]" for a, b in scaled) + "]"


def run_variant(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train one variant ``--repeats`` times; its per-episode counts and fastest seconds per epoch."""
    overrides = [
        f"model={args.model}",
        "env.reward=prompt_match_smooth",
        "env.prompts=digits",
        f"device={args.device}",
        f"sample.num_steps={args.steps}",
        f"sample.num_envs={args.groups * args.group_size}",
        f"sample.samples_per_condition={args.group_size}",
        "sample.samples_per_reference=" + str(args.group_size),
        f"sample.num_batches_per_epoch={args.batches}",
        f"num_epochs={args.epochs}",
        f"save_every={args.epochs}",
        f"eval.every={args.epochs}",
        "eval.num_samples=2",
        "eval.num_steps=1",
        *VARIANTS[name],
    ]
    if "env.window=hrf" in VARIANTS[name]:  # one epoch per cluster
        overrides += [
            f"env.window={hrf_clusters(args.steps)}",
            f"env.window_kwargs={{iterations: [1, 1, 1], batches_per_iteration: {args.batches}}}",
        ]
    config = load_run_config(ROOT / "envs_configs" / "sd3-tiny_grpo_prompt_color.yaml", overrides)
    epoch_seconds, runs = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            tic = time.perf_counter()
            result = train(config, run_dir=Path(tmp) / "run", progress=False)
            runs.append(time.perf_counter() - tic)
        epoch_seconds.append(sum(e.seconds for e in result.epochs) / len(result.epochs))
    epochs = result.epochs
    episodes = config.sample.num_envs * config.sample.num_batches_per_epoch
    starts = [k for e in epochs for k in e.start_steps]
    return {
        "pairs_per_episode": sum(e.num_pairs for e in epochs) / (episodes * len(epochs)),
        "network_calls_per_episode": sum(args.steps - k for k in starts) / len(starts),
        "epoch_seconds": min(epoch_seconds),
        "run_seconds": min(runs),
        "overrides": VARIANTS[name],
    }


def main() -> None:
    """Run every variant, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:digits-t2i")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10, help="K, the training chain's steps (Flow-GRPO: 10)")
    parser.add_argument("--groups", type=int, default=4, help="prompt draws per batch")
    parser.add_argument("--group-size", type=int, default=8, help="images per prompt draw")
    parser.add_argument("--batches", type=int, default=2, help="batches per epoch")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sde_windows_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = {name: run_variant(name, args) for name in VARIANTS}
    base = rows["full"]["epoch_seconds"]
    lines = [
        f"GRPO on {args.model}, K = {args.steps}, {args.groups} x {args.group_size} episodes x {args.batches} "
        f"batches per epoch, {args.epochs} epochs ({platform.processor() or platform.machine()}, "
        f"{args.threads} threads, torch {torch.__version__})",
        "",
        "| window | trained steps per sample | network calls per sample | s per epoch | time vs full |",
        "|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        row["time_vs_full"] = row["epoch_seconds"] / base
        lines.append(
            f"| {name} | {row['pairs_per_episode']:.2f} | {row['network_calls_per_episode']:.2f} | "
            f"{row['epoch_seconds']:.2f} | {row['time_vs_full']:.2f}x |"
        )
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"date": datetime.date.today().isoformat(), "args": vars(args), "rows": rows, "table": table}
    out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
