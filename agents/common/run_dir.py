"""A run directory belongs to one run: what a fresh start, an overwrite and a resume may do to it.

* A fresh run refuses a directory that already holds a run (its ``config.yaml`` or
  ``checkpoints/``), naming ``--resume`` and ``--overwrite``; nothing of the old run is touched.
* ``--overwrite`` deletes the old run's files first.
* A resume continues the run as it was configured: the checkpoint's config, in its run directory.
  Only the fields in :data:`MUTABLE_ON_RESUME` may differ from the checkpoint's config (more epochs,
  another evaluation or checkpoint cadence, another device or log location); any other difference
  is an error naming the fields, because the run would no longer be the one the checkpoint
  continues.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from .checkpoint import CHECKPOINTS_DIR, Checkpoint
from .config import ConfigError, RunConfig, parse_override

__all__ = [
    "MUTABLE_ON_RESUME",
    "RUN_MARKERS",
    "check_resume_config",
    "check_run_dir",
    "checkpoint_run_dir",
    "config_for_resume",
    "holds_a_run",
    "prepare_run_dir",
]

MUTABLE_ON_RESUME = (
    "num_epochs",
    "save_every",
    "keep_checkpoints",
    "eval.every",
    "logdir",
    "run_name",
    "device",
    "dist_timeout_s",
)
"""Config keys a resumed run may change: epochs, evaluation / checkpoint cadence, where it runs and logs."""
RUN_MARKERS = ("config.yaml", CHECKPOINTS_DIR)
"""What makes a directory a run's: its config and its checkpoints."""


def holds_a_run(path: Path) -> bool:
    """Whether ``path`` already holds a run (a ``config.yaml`` or a ``checkpoints/`` directory)."""
    return any((path / marker).exists() for marker in RUN_MARKERS)


def checkpoint_run_dir(checkpoint: Checkpoint) -> Path:
    """The run directory a checkpoint belongs to (``<run>/checkpoints/epoch-…``)."""
    return checkpoint.path.parent.parent if checkpoint.path.parent.name == CHECKPOINTS_DIR else checkpoint.path.parent


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def check_resume_config(saved: dict[str, Any], config: RunConfig, where: str) -> None:
    """Raise unless ``config`` continues the run whose config ``saved`` a checkpoint holds.

    Raises:
        ConfigError: naming every field that differs and may not change on resume.
    """
    old, new = _flatten(saved), _flatten(config.model_dump(mode="json"))
    changed = [key for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
    frozen = [key for key in changed if key not in MUTABLE_ON_RESUME]
    if frozen:
        details = "; ".join(f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in frozen)
        raise ConfigError(
            f"cannot resume {where} with another config: {details}. A resumed run keeps its config; only "
            f"{list(MUTABLE_ON_RESUME)} may change (start a new run to change the others)"
        )


def config_for_resume(saved: dict[str, Any], overrides: list[str], schema: type[RunConfig]) -> RunConfig:
    """The checkpoint's config with ``key=value`` overrides of the fields that may change on resume.

    Args:
        saved: the config a checkpoint holds (``state["config"]``).
        overrides: ``key=value`` overrides.
        schema: the config class of the checkpoint's algorithm (``agents.algorithms.get_schema``).

    Raises:
        ConfigError: for an override of another field (naming it and the allowed ones).
    """
    from .config import validate_config

    data = {key: (dict(value) if isinstance(value, dict) else value) for key, value in saved.items()}
    for text in overrides:
        keys, value = parse_override(text)
        key = ".".join(keys)
        if key not in MUTABLE_ON_RESUME:
            raise ConfigError(
                f"--set {text}: {key} cannot change when a run is resumed (it would no longer be the same run); "
                f"fields that may: {list(MUTABLE_ON_RESUME)}"
            )
        node = data
        for part in keys[:-1]:
            node = node.setdefault(part, {})
        node[keys[-1]] = value
    return validate_config(schema, data, "<checkpoint config>")


def _another_run(run_dir: Path, resuming: Path | None) -> bool:
    same_run = resuming is not None and run_dir.exists() and os.path.samefile(run_dir, resuming)
    return run_dir.exists() and holds_a_run(run_dir) and not same_run


def check_run_dir(run_dir: Path, *, resuming: Path | None, overwrite: bool) -> None:
    """Refuse ``run_dir`` when it holds another run and ``overwrite`` is off (nothing is written).

    Args:
        run_dir: the run directory.
        resuming: the run directory of the checkpoint being resumed (``None`` for a fresh run).
        overwrite: whether another run found there may be replaced.

    Raises:
        ConfigError: naming ``--resume`` and ``--overwrite``.
    """
    if _another_run(run_dir, resuming) and not overwrite:
        found = [marker for marker in RUN_MARKERS if (run_dir / marker).exists()]
        raise ConfigError(
            f"run directory {run_dir} already holds a run ({', '.join(found)}): "
            f"continue it with --resume {run_dir}, replace it with --overwrite, or choose another --run-dir "
            "(or run_name)"
        )


def prepare_run_dir(run_dir: Path, *, resuming: Path | None, overwrite: bool) -> None:
    """Make ``run_dir`` ready for a run: :func:`check_run_dir`, then delete the replaced run's files.

    Raises:
        ConfigError: when ``run_dir`` holds another run and ``overwrite`` is off.
    """
    check_run_dir(run_dir, resuming=resuming, overwrite=overwrite)
    if _another_run(run_dir, resuming):
        for marker in (*RUN_MARKERS, "tb", "samples"):
            target = run_dir / marker
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
