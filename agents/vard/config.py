"""The VARD training configuration: a typed schema read from YAML, overridable with ``key=value``.

The sampling, env and evaluation sections are PPO-IS's (:mod:`agents.ppo_is.config`); VARD adds a
``value`` section (the value network and its regression) and its own ``train`` section (the
value-gradient policy update with a KL penalty to the base model). Unknown keys are errors naming
the key, as for PPO-IS.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationError

from ..ppo_is.config import (
    ConfigError,
    EnvConfig,
    EvalConfig,
    SampleConfig,
    _format_errors,
    _Section,
    check_values,
    dump_config,
    read_config_data,
)

__all__ = ["VardConfig", "VardTrainConfig", "ValueConfig", "dump_vard_config", "load_vard_config"]


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
    kl_coef: float = Field(0.1, ge=0, description="weight of the per-step KL(π_θ ‖ π_base), 0: off")


class VardConfig(_Section):
    """A whole VARD run."""

    run_name: str = Field("", description="run directory name under logdir (default: vard + time)")
    logdir: str = Field("runs", description="where runs are written")
    seed: int = Field(0, description="seed of everything")
    device: str = Field("cpu", description="torch device")
    model: str = Field("embedded:digits", min_length=1, description="model spec (load_model)")
    num_epochs: int = Field(10, ge=1, description="epochs: collect, fit the value, update the policy")
    save_every: int = Field(1, ge=1, description="checkpoint every N epochs")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept on disk")
    sample: SampleConfig = Field(default_factory=SampleConfig)
    env: EnvConfig = Field(default_factory=EnvConfig)
    value: ValueConfig = Field(default_factory=ValueConfig)
    train: VardTrainConfig = Field(default_factory=VardTrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)


def load_vard_config(path: str | Path | None = None, overrides: list[str] | None = None) -> VardConfig:
    """Read a VARD YAML config, apply ``key=value`` overrides, validate.

    Args:
        path: a YAML file (``None``: the defaults).
        overrides: ``["train.kl_coef=0.05", "value.warmup_steps=100", …]``.

    Raises:
        ConfigError: naming each unknown key or wrong type, an unknown reward or a bad window.
    """
    data, source = read_config_data(path, overrides)
    try:
        config = VardConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_errors(error, source)) from None
    check_values(config, source)  # type: ignore[arg-type]  # reads only .env and .sample
    if config.sample.start_mode != "shared":
        raise ConfigError(f"invalid config {source}:\n  sample.start_mode: VARD collects whole batches: use 'shared'")
    return config


def dump_vard_config(config: VardConfig) -> str:
    """The config as YAML (written next to every run)."""
    return dump_config(config)
