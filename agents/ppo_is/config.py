"""The PPO-IS training configuration: a typed schema, read from YAML, overridable from the CLI.

Every section is a pydantic model with unknown keys forbidden, so a typo or a wrong type is an
error that names the key (``train.learning_rat: Extra inputs are not permitted``). The field
comments are the documentation; ``envs_configs/*.yaml`` repeat them next to each value, in the
style of ddpo-pytorch's ``config/base.py``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.1 safe loader that also reads ``1e-5`` (no dot) as a float, as YAML 1.2 does."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


class SampleConfig(_Section):
    """How trajectories are collected (the vector env)."""

    num_steps: int = Field(40, ge=1, description="K, denoising steps (paper: 40)")
    eta: float = Field(1.0, ge=0.0, description="DDIM eta: 1.0 = stochastic policy at every step but the last")
    scheduler: Literal["ddim", "ddpm"] = Field("ddim", description="sampling scheduler built from the model's config")
    num_envs: int = Field(16, ge=1, description="episodes per batch (the vector env's size)")
    num_batches_per_epoch: int = Field(2, ge=1, description="batches collected per epoch (= per HRF iteration)")
    samples_per_reference: int = Field(4, ge=1, description="episodes per reference image: one advantage group")
    start_mode: Literal["shared", "per_sample"] = Field("shared", description="one start step per batch or per sample")


class EnvConfig(_Section):
    """The task: reward, window and references."""

    reward: str = Field("jpeg_compressibility", description="registered reward name")
    reward_kwargs: dict[str, Any] = Field(default_factory=dict, description="options of the reward")
    window: str | list[tuple[int, int]] = Field(
        "full", description="full, hrf, hrf-early, hrf-later, hrf-d, or clusters"
    )
    window_kwargs: dict[str, Any] = Field(default_factory=dict, description="iterations, beta, stride, first, cycle")
    references: str | None = Field(None, description="digits, model, or an image folder (default: by model)")
    probe_size: int = Field(8, ge=1, description="references per HRF-D probe")


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
    stat_buffer_size: int = Field(32, ge=1, description="per-condition tracker: rewards kept per condition")
    stat_min_count: int = Field(16, ge=1, description="per-condition tracker: rewards needed before own stats")
    kl_coef: float = Field(0.0, ge=0, description="KL(π_θ ‖ π_ref) penalty weight (0: off)")
    ema_decay: float = Field(0.0, ge=0, lt=1, description="EMA of the weights for evaluation/saving (0: off)")
    lora_rank: int = Field(0, ge=0, description="LoRA rank via peft (0: full fine-tuning)")
    lora_alpha: float = Field(0.0, ge=0, description="LoRA alpha (0: = rank)")
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


class EvalConfig(_Section):
    """Fixed-noise evaluation during training."""

    num_samples: int = Field(64, ge=1, description="images in the logged grid / evaluation")
    seed: int = Field(1234, description="seed of the fixed evaluation noise")
    every: int = Field(1, ge=1, description="evaluate (reward + image grid) every N epochs")


class Config(_Section):
    """A whole PPO-IS run."""

    run_name: str = Field("", description="run directory name under logdir (default: config name + time)")
    logdir: str = Field("runs", description="where runs are written")
    seed: int = Field(0, description="seed of everything")
    device: str = Field("cpu", description="torch device")
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

    model: str = Field("embedded:digits", description="model spec (load_model)")
    num_epochs: int = Field(10, ge=1, description="training epochs (= HRF iterations)")
    save_every: int = Field(1, ge=1, description="checkpoint every N epochs")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept on disk")
    sample: SampleConfig = Field(default_factory=SampleConfig)
    env: EnvConfig = Field(default_factory=EnvConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @field_validator("model")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value:
            raise ValueError("model must not be empty")
        return value


class ConfigError(ValueError):
    """A configuration that does not validate; the message names every bad key."""


def _format_errors(error: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in error.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(
            f"  {key}: {e['msg']}" + (f" (got {e['input']!r})" if "input" in e and e["type"] != "missing" else "")
        )
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``key.sub=value`` (the value is YAML: ``3e-4``, ``true``, ``[[8, 12]]``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. train.learning_rate=1e-4)")
    key, value = text.split("=", 1)
    return key.strip().split("."), _yaml_load(value)


def read_config_data(path: str | Path | None, overrides: list[str] | None) -> tuple[dict[str, Any], str]:
    """The raw mapping of a YAML config with ``key=value`` overrides applied, and its source name.

    Shared by every agent's config loader (PPO-IS, VARD); validation is the caller's schema.

    Raises:
        ConfigError: for a missing file, a non-mapping document or an override into a non-section.
    """
    data: dict[str, Any] = {}
    source = str(path) if path is not None else "<defaults>"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = _yaml_load(path.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config {path} must be a mapping of keys to values, got {type(loaded).__name__}")
        data = loaded or {}
    for text in overrides or []:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {key!r} is not a section")
        node[keys[-1]] = value
    return data, source


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply ``key=value`` overrides, validate.

    Args:
        path: a YAML file (``None``: the defaults).
        overrides: ``["train.learning_rate=1e-4", "env.window=hrf-d", …]``.

    Raises:
        ConfigError: naming each unknown key or wrong type.
    """
    data, source = read_config_data(path, overrides)
    try:
        config = Config.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_errors(error, source)) from None
    check_values(config, source)
    return config


def check_values(config: Config, source: str = "<config>") -> None:
    """Check the values the schema cannot type: the window and the reward name.

    Raises:
        ConfigError: naming the key (``env.window``, ``env.reward``) and the valid choices.
    """
    from diffusion_gym.rewards import available_rewards
    from diffusion_gym.windows import make_window

    env = config.env
    try:
        window = env.window if isinstance(env.window, str) else [tuple(c) for c in env.window]
        make_window(window, **env.window_kwargs).bind(config.sample.num_steps)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"invalid config {source}:\n  env.window / env.window_kwargs: {error}") from None
    if env.reward not in available_rewards():
        raise ConfigError(
            f"invalid config {source}:\n  env.reward: unknown reward {env.reward!r}; "
            f"valid choices: {available_rewards()}"
        )


def dump_config(config: BaseModel) -> str:
    """The config as YAML (written next to every run)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
