"""One process of the data-parallel tests, started by ``torchrun`` or by tests/test_distributed.py.

It trains with :func:`agents.ppo_is.train` as ``diffusion-gym train`` would, then saves this
rank's final weights and epoch statistics to ``<out>/rank<RANK>.pt`` (only rank 0 writes checkpoints,
so the other ranks' weights are only visible this way). ``--die-rank R`` makes rank ``R`` send
itself ``--die-signal`` when it starts collecting its first batch, while the others wait in a collective.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
from pathlib import Path

import torch

from agents.common.collector import Collector
from agents.ppo_is import train
from agents.ppo_is.config import load_config
from diffusion_gym import rewards


def brightness(images: torch.Tensor, conditions: object = None) -> torch.Tensor:
    """Mean pixel value of each image in ``[0, 1]``."""
    return images.float().mean(dim=(1, 2, 3))


def register_reward() -> None:
    """Register :func:`brightness` as the reward ``test_brightness``."""
    rewards.register_reward("test_brightness", lambda **kwargs: brightness, overwrite=True)


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
    register_reward()
    rank = int(os.environ.get("RANK", "0"))

    captured = {}
    real_collect = Collector.collect

    def collect(self, *rest, **kwargs):  # noqa: ANN001, ANN202 - a transparent spy
        captured["policy"] = self.policy
        if args.die_rank == rank:
            os.kill(os.getpid(), getattr(signal, args.die_signal))
        return real_collect(self, *rest, **kwargs)

    Collector.collect = collect
    result = train(
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
