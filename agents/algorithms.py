"""The algorithm registry: a config's ``algo`` names its schema and its algorithm class.

Built in: ``ppo-is`` (DDPO-IS with HRF / HRF-D windows and DRIFT's options), ``grpo`` (Flow-GRPO:
PPO-IS with per-prompt groups and a KL to the base) and ``vard``. A new
algorithm is a module with a config schema (a :class:`~agents.common.config.RunConfig` subclass)
and an :class:`~agents.common.runner.Algorithm` subclass, registered here with
:func:`register_algorithm`; the runner gives it seeding, logging, evaluation, checkpoints and
resume. Entries are imported lazily, so reading this registry does not import torch.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .common.config import ConfigError, RunConfig, read_config_data, validate_config

if TYPE_CHECKING:
    from .common.runner import Algorithm, TrainResult

__all__ = ["algorithm_names", "get_algorithm", "get_schema", "load_run_config", "register_algorithm", "train"]

_REGISTRY: dict[str, tuple[str, str]] = {
    "ppo-is": ("agents.ppo_is.config:Config", "agents.ppo_is.algorithm:PPOIS"),
    "vard": ("agents.vard.config:VardConfig", "agents.vard.algorithm:VARD"),
    "grpo": ("agents.grpo.config:GRPOConfig", "agents.grpo.algorithm:GRPO"),
}
DEFAULT_ALGO = "ppo-is"


def _import(target: str | type) -> Any:
    if not isinstance(target, str):
        return target
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def register_algorithm(name: str, schema: str | type[RunConfig], algorithm: str | type[Algorithm]) -> None:
    """Register an algorithm under ``name`` (its configs say ``algo: <name>``).

    Args:
        name: the value of a config's ``algo`` field and of ``diffusion-gym train --algo``.
        schema: the config class, or ``"module:Class"`` to import it lazily.
        algorithm: the :class:`~agents.common.runner.Algorithm` subclass, or ``"module:Class"``.

    Raises:
        ValueError: for an empty name.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"an algorithm name must be a non-empty string, got {name!r}")
    _REGISTRY[name] = (schema, algorithm)  # type: ignore[assignment]


def algorithm_names() -> list[str]:
    """The registered algorithm names."""
    return sorted(_REGISTRY)


def _entry(name: str) -> tuple[Any, Any]:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown algo {name!r}; valid choices: {algorithm_names()}")
    return _REGISTRY[name]


def get_schema(name: str) -> type[RunConfig]:
    """The config class of algorithm ``name``."""
    return _import(_entry(name)[0])


def get_algorithm(name: str) -> type[Algorithm]:
    """The algorithm class of ``name``."""
    return _import(_entry(name)[1])


def load_run_config(
    path: str | Path | None = None, overrides: list[str] | None = None, algo: str | None = None
) -> RunConfig:
    """Read a YAML config, apply ``key=value`` overrides and validate it with its algorithm's schema.

    The schema is the one of the config's own ``algo`` field; ``algo`` (e.g. from ``--algo``) must
    agree with it, or names the schema of a config without that field (default ``ppo-is``).

    Raises:
        ConfigError: for an unknown or contradicting algorithm, or naming every bad key; when the
            config would validate as another algorithm's, the message says which.
    """
    data, source = read_config_data(path, overrides)
    written = data.get("algo")
    if written is not None and algo is not None and written != algo:
        raise ConfigError(
            f"invalid config {source}:\n  algo: the config says {written!r} but {algo!r} was asked for "
            f"(--algo {algo}); drop --algo or use --algo {written}"
        )
    name = written if written is not None else (algo or DEFAULT_ALGO)
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ConfigError(
            f"invalid config {source}:\n  algo: unknown algo {name!r}; valid choices: {algorithm_names()}"
        )
    try:
        return validate_config(get_schema(name), {**data, "algo": name}, source)
    except ConfigError as error:
        if written is None:
            for other in algorithm_names():
                if other != name and _validates(other, data, source):
                    raise ConfigError(
                        f"{error}\n  ({source} is a {other} config: use --algo {other}, or write algo: {other} in it)"
                    ) from None
        raise


def _validates(name: str, data: dict[str, Any], source: str) -> bool:
    try:
        validate_config(get_schema(name), {**data, "algo": name}, source)
    except ConfigError:
        return False
    return True


def train(config: RunConfig, **kwargs: Any) -> TrainResult:
    """Train ``config`` with its algorithm (keyword arguments: :class:`~agents.common.runner.OnPolicyRunner`'s)."""
    from .common.runner import OnPolicyRunner

    return OnPolicyRunner(get_algorithm(config.algo), config, **kwargs).run()
