"""The PPO-IS training configuration: the shared run schema plus PPO-IS's own sections.

PPO-IS adds its ``train`` and ``drift`` sections and its speed options to
:class:`~agents.common.config.RunConfig`.

Every section is a pydantic model with unknown keys forbidden, so a typo or a wrong type is an
error that names the key (``train.learning_rat: Extra inputs are not permitted``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ..common.config import (
    ConfigError,
    EnvConfig,
    EvalConfig,
    RunConfig,
    SampleConfig,
    dump_config,
)
from ..common.config import Section as _Section

__all__ = [
    "Config",
    "ConfigError",
    "DriftConfig",
    "EnvConfig",
    "EvalConfig",
    "SampleConfig",
    "TrainConfig",
    "dump_config",
    "load_config",
]


class TrainConfig(_Section):
    """The PPO-IS update."""

    learning_rate: float = Field(3e-4, gt=0, description="AdamW learning rate")
    warmup_epochs: int = Field(0, ge=0, description="linear learning-rate warm-up, in epochs")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2")
    weight_decay: float = Field(1e-3, ge=0, description="AdamW weight decay (paper: 1e-3)")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon")
    max_grad_norm: float = Field(4.5, gt=0, description="gradient-norm clipping (paper: 4.5)")
    num_inner_epochs: int = Field(1, ge=1, description="passes over the collected data per epoch")
    batch_size: int = Field(
        64, ge=1, description="(sample, step) pairs per forward/backward micro-batch (halved on out-of-memory)"
    )
    gradient_updates_per_epoch: int = Field(1, ge=1, description="optimizer steps per inner epoch (paper: 1)")
    clip_range: float = Field(1e-4, gt=0, description="PPO ratio clip ε (paper: 1e-4)")
    adv_clip_max: float = Field(5.0, gt=0, description="advantages are clipped to ±this")
    advantage_mode: Literal["auto", "group", "condition", "global"] = Field(
        "auto", description="auto: per reference for windows, per condition (tracked) for full"
    )
    advantage_std: Literal["group", "group-sample", "batch"] = Field(
        "group",
        description="group mode: divide by each group's reward std (population; group-sample: n - 1, the HRF "
        "authors'), or by the whole batch's (Flow-GRPO's global_std)",
    )
    clip_scaling: Literal["none", "remaining"] = Field(
        "none",
        description="remaining: clip_range and adv_clip_max times (K - k0) / K of each trajectory's start step k0 "
        "(the HRF authors')",
    )
    loss_reduction: Literal["pairs", "trajectories"] = Field(
        "pairs",
        description="pairs: the mean over a chunk's (sample, step) pairs; trajectories: summed over steps, averaged "
        "over the trajectories of a chunk's share (the HRF authors')",
    )
    update_order: Literal["shuffled", "batches"] = Field(
        "shuffled",
        description="shuffled: pairs shuffled into gradient_updates_per_epoch chunks; batches: one optimizer step "
        "per collected batch, in collection order (the HRF authors'; needs gradient_updates_per_epoch = "
        "sample.num_batches_per_epoch)",
    )
    stat_buffer_size: int = Field(32, ge=1, description="per-condition tracker: rewards kept per condition")
    stat_min_count: int = Field(16, ge=1, description="per-condition tracker: rewards needed before own stats")
    kl_coef: float = Field(0.0, ge=0, description="KL(π_θ ‖ π_ref) penalty weight (0: off)")
    ema_decay: float = Field(
        0.0, ge=0, lt=1, description="keep an EMA of the weights, saved as ema.safetensors per checkpoint (0: off)"
    )
    lora_rank: int = Field(0, ge=0, description="LoRA rank via peft (0: full fine-tuning)")
    lora_alpha: float = Field(0.0, ge=0, description="LoRA alpha (0: = rank)")
    save_merged_unet: bool | None = Field(
        None,
        description="with LoRA, also write the merged UNet per checkpoint (default: pixel models yes, text models "
        "no: their checkpoint is the lora/ folder)",
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute UNet activations in the backward pass: less memory, ~1 more forward"
    )

    @model_validator(mode="after")
    def _min_count_fits(self) -> TrainConfig:
        if self.stat_min_count > self.stat_buffer_size:
            raise ValueError(f"stat_min_count ({self.stat_min_count}) must be <= stat_buffer_size")
        return self


class DriftConfig(_Section):
    """DRIFT's diversity mechanisms (:mod:`agents.common.drift`); each is off at its default."""

    subset_fraction: float = Field(
        1.0, gt=0, le=1, description="(i) train on this fraction of each group: the rewards closest together (1: all)"
    )
    condition_noise: float = Field(
        0.0, ge=0, description="(ii) noise on the class embedding, relative to its RMS, at full weight (0: off)"
    )
    condition_noise_tau: tuple[float, float] = Field(
        (0.0, 1.0), description="(τ1, τ2): no condition noise at t/T <= τ1, full weight at t/T >= τ2"
    )
    diversity_coef: float = Field(
        0.0, ge=0, description="(iii) λ of the intra-group diversity potential of x̂0 (0: off)"
    )

    @field_validator("condition_noise_tau")
    @classmethod
    def _tau_ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        lo, hi = value
        if not 0 <= lo < hi <= 1:
            raise ValueError(f"must be (τ1, τ2) with 0 <= τ1 < τ2 <= 1, got {list(value)}")
        return value

    @property
    def enabled(self) -> bool:
        """Whether any mechanism is on."""
        return self.subset_fraction < 1 or self.condition_noise > 0 or self.diversity_coef > 0


class Config(RunConfig):
    """A whole PPO-IS run."""

    algo: Literal["ppo-is"] = Field("ppo-is", description="the algorithm: PPO-IS (DDPO-IS, HRF, HRF-D, DRIFT)")
    mixed_precision: Literal["no", "bf16"] = Field("no", description="bf16 autocast for the UNet")
    channels_last: bool = Field(False, description="UNet weights and inputs in the channels_last memory format")
    compile: Literal["no", "default", "reduce-overhead", "max-autotune"] = Field(
        "no", description="torch.compile mode of the UNet forward (no: eager)"
    )
    policy_noise: Literal["cpu", "device"] = Field(
        "cpu",
        description="rollout noise from the CPU generator (same on every device) or a generator on the device",
    )
    dist_timeout_s: float = Field(
        1800.0, gt=0, description="torchrun: seconds a process waits for the others before failing"
    )

    @field_validator("mixed_precision", "compile", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        return "no" if value is False else value  # YAML 1.1 reads a bare `no` as False

    train: TrainConfig = Field(default_factory=TrainConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)

    @model_validator(mode="after")
    def _batches_are_the_updates(self) -> Config:
        t, batches = self.train, self.sample.num_batches_per_epoch
        if t.update_order == "batches" and t.gradient_updates_per_epoch != batches:
            raise ValueError(
                f"train.update_order: batches takes one optimizer step per collected batch: set "
                f"train.gradient_updates_per_epoch to sample.num_batches_per_epoch ({batches}), got "
                f"{t.gradient_updates_per_epoch}"
            )
        if t.clip_scaling == "remaining" and (self.drift.subset_fraction < 1 or self.drift.diversity_coef > 0):
            raise ValueError(
                "train.clip_scaling: remaining scales each trajectory's advantage clip, which DRIFT's subsets and "
                "per-step advantages do not support: use clip_scaling: none with drift.subset_fraction < 1 or "
                "drift.diversity_coef > 0"
            )
        return self


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a PPO-IS YAML config, apply ``key=value`` overrides, validate.

    Args:
        path: a YAML file (``None``: the defaults).
        overrides: ``["train.learning_rate=1e-4", "env.window=hrf-d", …]``.

    Raises:
        ConfigError: naming each unknown key or wrong type (and the ``algo`` a config of another
            algorithm names).
    """
    from ..algorithms import load_run_config

    return load_run_config(path, overrides, algo="ppo-is")  # type: ignore[return-value]
