"""One process of the data-parallel tests, started by ``torchrun`` or by tests/test_distributed.py.

It trains with :func:`agents.ppo_is.trainer.train` as ``diffusion-gym train`` would, then saves this
rank's final weights and epoch statistics to ``<out>/rank<RANK>.pt`` (only rank 0 writes checkpoints,
so the other ranks' weights are only visible this way). ``--die-rank R`` makes rank ``R`` send
itself ``--die-signal`` when its first PPO update starts, while the others wait in a collective.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
from pathlib import Path

import torch

import agents.ppo_is.trainer as trainer
from agents.ppo_is.config import load_config


def main() -> None:
    """Parse the arguments, train, save this rank's weights."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--stop-after", type=int, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--die-rank", type=int, default=None)
    parser.add_argument("--die-signal", default="SIGKILL", choices=["SIGKILL", "SIGSTOP"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))

    captured = {}
    real_update = trainer.update

    def update(policy, *rest, **kwargs):  # noqa: ANN001, ANN202 - a transparent spy
        captured["policy"] = policy
        if args.die_rank == rank:
            os.kill(os.getpid(), getattr(signal, args.die_signal))
        return real_update(policy, *rest, **kwargs)

    trainer.update = update
    result = trainer.train(
        load_config(None, args.overrides),
        run_dir=args.run_dir,
        resume=args.resume,
        progress=False,
        stop_after=args.stop_after,
    )
    weights = {k: v.detach().cpu().clone() for k, v in captured["policy"].unet.state_dict().items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"weights": weights, "epochs": [dataclasses.asdict(e) for e in result.epochs]}, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
