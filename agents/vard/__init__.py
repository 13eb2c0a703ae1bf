"""VARD (value-based reinforced diffusion): a learned value as a dense, differentiable reward with a KL penalty."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..common.runner import TrainResult
    from .config import VardConfig

__all__ = ["train"]


def train(
    config: VardConfig,
    *,
    run_dir: str | Path | None = None,
    resume: str | Path | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> TrainResult:
    """Run VARD as configured (one process); see :class:`~agents.common.runner.OnPolicyRunner` for the arguments."""
    from ..common.runner import OnPolicyRunner
    from .algorithm import VARD

    return OnPolicyRunner(VARD, config, run_dir=run_dir, resume=resume, progress=progress, stop_after=stop_after).run()
