"""PPO-IS (DDPO-IS with importance sampling and clipping), with HRF / HRF-D windows and DRIFT's options."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..common.runner import TrainResult
    from .config import Config

__all__ = ["train"]


def train(
    config: Config,
    *,
    run_dir: str | Path | None = None,
    resume: str | Path | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> TrainResult:
    """Run PPO-IS as configured, in this process or data-parallel under ``torchrun``.

    See :class:`~agents.common.runner.OnPolicyRunner` for the arguments.
    """
    from ..common.runner import OnPolicyRunner
    from .algorithm import PPOIS

    return OnPolicyRunner(PPOIS, config, run_dir=run_dir, resume=resume, progress=progress, stop_after=stop_after).run()
