"""The VARD training configuration: a typed schema read from YAML, overridable with ``key=value``.

The run fields and the sampling, env and evaluation sections are every run's (:mod:`agents.common.config`); VARD adds a
``value`` section (the value network and its regression) and its own ``train`` section (the
value-gradient policy update with a KL penalty to the base model). Unknown keys are errors naming
the key, as for PPO-IS.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ..common.config import ConfigError, RunConfig, dump_config
from ..common.config import Section as _Section

__all__ = ["ConfigError", "VardConfig", "VardTrainConfig", "ValueConfig", "dump_vard_config", "load_vard_config"]


class ValueConfig(_Section):
    """The value network ``V(c, t, x_t)`` and its regression on rollout states."""

    width: int = Field(32, ge=4, description="channels of the first conv stage (doubled per stage)")
    depth: int = Field(2, ge=1, description="down-sampling stages of the conv trunk")
    learning_rate: float = Field(1e-3, gt=0, description="Adam learning rate of the value")
    batch_size: int = Field(128, ge=1, description="states per regression step")
    warmup_steps: int = Field(300, ge=0, description="regression steps before the first policy update")
    steps_per_epoch: int = Field(50, ge=0, description="regression steps per epoch (on the newest rollouts)")
    buffer_epochs: int = Field(4, ge=1, description="epochs of rollout states kept for the regression")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient-norm clipping of the value")


class VardTrainConfig(_Section):
    """The policy update: maximise the value of the next states minus a KL penalty to the base model."""

    learning_rate: float = Field(1e-4, gt=0, description="AdamW learning rate of the UNet")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient-norm clipping of the UNet")
    updates_per_epoch: int = Field(4, ge=1, description="optimizer steps of the UNet per epoch")
    batch_size: int = Field(32, ge=1, description="rollout states (start points) per optimizer step")
    micro_batch_size: int = Field(32, ge=1, description="states per forward/backward (gradient accumulation)")
    backprop_steps: int = Field(
        1, ge=1, description="denoising steps unrolled with gradient from each start state (truncation)"
    )
    kl_coef: float = Field(0.1, ge=0, description="β, weight of the per-step KL(π_θ ‖ π_base), 0: off")
    kl_reduction: Literal["sum", "mean"] = Field(
        "sum",
        description="the KL of the whole sample (sum over its dimensions, on the per-sample value's scale) or its "
        "mean over the dimensions (D times weaker: 256x on 16x16 digits; the collapse study's setting)",
    )


class VardConfig(RunConfig):
    """A whole VARD run."""

    algo: Literal["vard"] = Field("vard", description="the algorithm: VARD")
    value: ValueConfig = Field(default_factory=ValueConfig)
    train: VardTrainConfig = Field(default_factory=VardTrainConfig)

    @model_validator(mode="after")
    def _whole_batches(self) -> VardConfig:
        if self.sample.start_mode != "shared":
            raise ValueError("sample.start_mode: VARD collects whole batches: use 'shared'")
        if self.sample.sde_window is not None:
            raise ValueError(
                "sample.sde_window: VARD follows the value's gradient through every step of the chain; SDE windows "
                "are for the clipped-ratio trainers (algo ppo-is or grpo): use null"
            )
        return self


def load_vard_config(path: str | Path | None = None, overrides: list[str] | None = None) -> VardConfig:
    """Read a VARD YAML config, apply ``key=value`` overrides, validate.

    Args:
        path: a YAML file (``None``: the defaults).
        overrides: ``["train.kl_coef=0.05", "value.warmup_steps=100", …]``.

    Raises:
        ConfigError: naming each unknown key or wrong type, an unknown reward or a bad window.
    """
    from ..algorithms import load_run_config

    return load_run_config(path, overrides, algo="vard")  # type: ignore[return-value]


def dump_vard_config(config: VardConfig) -> str:
    """The config as YAML (written next to every run)."""
    return dump_config(config)
