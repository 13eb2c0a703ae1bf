"""What every run's configuration shares: the schema base, YAML reading, ``key=value`` overrides.

Every section is a pydantic model with unknown keys forbidden, so a typo or a wrong type is an
error that names the key (``train.learning_rat: Extra inputs are not permitted``). A run config is
:class:`RunConfig` plus the sections of one algorithm; its ``algo`` field names the algorithm
(:mod:`agents.algorithms` maps the name to the algorithm class and its schema). The field
comments are the documentation; ``envs_configs/*.yaml`` repeat them next to each value, in the
style of ddpo-pytorch's ``config/base.py``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "ConfigError",
    "EnvConfig",
    "EvalConfig",
    "RunConfig",
    "SampleConfig",
    "Section",
    "check_values",
    "dump_config",
    "parse_override",
    "read_config_data",
    "validate_config",
    "yaml_load",
]


class Section(BaseModel):
    """A config section: unknown keys, NaN/Inf numbers and booleans given for numbers are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_numbers(cls, data: Any) -> Any:
        """``batch_size: true`` is a mistake, not 1: a boolean is refused where a number is expected."""
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(name)
                if isinstance(value, bool) and field is not None and field.annotation in (int, float):
                    raise ValueError(f"{name}: expected a number, got the boolean {value!r}")
        return data


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.1 safe loader that also reads ``1e-5`` (no dot) as a float, as YAML 1.2 does."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def yaml_load(text: str) -> Any:
    """Parse YAML with the safe loader (floats as YAML 1.2 reads them)."""
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


class SampleConfig(Section):
    """How trajectories are collected (the vector env)."""

    num_steps: int = Field(40, ge=1, description="K, denoising steps (paper: 40)")
    eta: float = Field(
        1.0,
        ge=0.0,
        description="DDIM eta: 1.0 = stochastic policy at every step but the last; flow models (SD3): the SDE's "
        "noise level a (Flow-GRPO: 0.7)",
    )
    scheduler: Literal["ddim", "ddpm"] = Field("ddim", description="sampling scheduler built from the model's config")
    num_envs: int = Field(16, ge=1, description="episodes per batch (the vector env's size)")
    num_batches_per_epoch: int = Field(2, ge=1, description="batches collected per epoch (= per HRF iteration)")
    samples_per_reference: int = Field(4, ge=1, description="episodes per reference image: one advantage group")
    samples_per_condition: int = Field(
        1,
        ge=1,
        description="episodes from pure noise per drawn condition (prompt): GRPO's group size, one advantage group "
        "(1: each episode draws its own)",
    )
    start_mode: Literal["shared", "per_sample"] = Field("shared", description="one start step per batch or per sample")
    guidance_scale: float | None = Field(
        None, ge=0, description="classifier-free guidance of text models (default: the model's; pixel models: 1)"
    )
    sde_window: tuple[int, int] | Literal["random", "sliding"] | None = Field(
        None,
        description="flow models: the SDE steps of each batch, counted from its start step: [a, b) (Flow-GRPO-Fast), "
        "random (Flow-GRPO-Fast's random window), sliding (MixGRPO); null: every step",
    )
    resolution: tuple[int, int] | None = Field(
        None, description="text-to-image models: (height, width) of the images (null: the model's; Flow-GRPO: 512)"
    )
    sde_window_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="random: size, low, high; sliding: size, stride, every, low, high"
    )


class EnvConfig(Section):
    """The task: reward, window and references."""

    reward: str | dict[str, float] = Field(
        "jpeg_compressibility",
        description="registered reward name, or names to weights for their weighted sum ({pickscore: 1.0, ocr: 0.5})",
    )
    reward_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="options of the reward; of a weighted sum: normalize (none, running, rank), eps, and per reward "
        "name its options",
    )
    window: str | list[tuple[int, int]] = Field(
        "full", description="full, hrf, hrf-early, hrf-later, hrf-d, or clusters"
    )
    window_kwargs: dict[str, Any] = Field(default_factory=dict, description="iterations, beta, stride, first, cycle")
    references: str | None = Field(None, description="digits, model, or an image folder (default: by model)")
    probe_size: int = Field(8, ge=1, description="references per HRF-D probe")
    references_after_update: bool = Field(
        False,
        description="references: model: an epoch's first batch draws its references from the model after the "
        "epoch's update (the HRF authors' order), not when the previous batch ended",
    )
    prompts: str | list[str] | None = Field(
        None, description="text models: a built-in set (animals), a prompt file, or a list (default: animals)"
    )
    negative_prompt: str | None = Field(None, description="text models: the negative prompt (default: the model's)")

    @model_validator(mode="after")
    def _redrawn_references_are_model_samples(self) -> EnvConfig:
        if self.references_after_update and self.references != "model":
            raise ValueError(
                f"references_after_update redraws the model's samples after each update; it needs references: model, "
                f"got references: {self.references!r}"
            )
        return self


class EvalConfig(Section):
    """Fixed-noise evaluation during training, and the hacking monitors."""

    num_samples: int = Field(64, ge=1, description="images in the logged grid / evaluation")
    seed: int = Field(1234, description="seed of the fixed evaluation noise")
    every: int = Field(1, ge=1, description="evaluate (reward + image grid) every N epochs")
    num_steps: int | None = Field(
        None, ge=1, description="sampling steps of the evaluation chain (null: sample.num_steps; Flow-GRPO: 40 vs 10)"
    )
    eta: float | None = Field(
        None, ge=0, description="eta / flow noise level of the evaluation chain (null: sample.eta; 0: deterministic)"
    )
    prompts: str | list[str] | None = Field(
        None,
        description="text models: the evaluation's prompts, a built-in set (digits-heldout), a prompt file or a list "
        "(null: env.prompts); other models must leave it null",
    )
    held_out_rewards: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="rewards scored on the evaluation images only, never trained on: name -> its options ({} for none)",
    )
    diversity: bool = Field(False, description="log the Vendi score of the evaluation images within each condition")
    metric_nets: str | None = Field(
        None,
        description="log the evaluation's sample metrics along training: Inception Score (one split), Vendi of pixels "
        "and embeddings, class agreement (digits); digits, inception or auto picks the networks (null: none)",
    )
    kl_to_base: bool = Field(
        False,
        description="log each evaluation's KL from the policy to the base model along its chain (a frozen copy of the "
        "base weights: twice the evaluation's denoiser calls)",
    )
    monitor_margins: dict[str, float] = Field(
        default_factory=dict,
        description="the hacking monitor: metric (a held-out reward, vendi_pixels, a metric_nets metric) -> the drop "
        "below its base value "
        "that fires it while the eval reward is above the base's",
    )
    early_stop: bool = Field(False, description="stop the run (after a checkpoint) at the evaluation the monitor fires")

    @field_validator("held_out_rewards", mode="before")
    @classmethod
    def _names_to_mapping(cls, value: Any) -> Any:
        """A list of names is a mapping of each to no options."""
        return dict.fromkeys(value, {}) if isinstance(value, list) else value

    @field_validator("monitor_margins")
    @classmethod
    def _positive(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {name: margin for name, margin in value.items() if not margin > 0}
        if bad:
            raise ValueError(f"margins must be positive numbers, got {bad}")
        return value

    @field_validator("metric_nets")
    @classmethod
    def _known_metric_nets(cls, value: str | None) -> str | None:
        from diffusion_gym.nets import METRIC_NET_KINDS

        if value is not None and value not in METRIC_NET_KINDS:
            raise ValueError(f"unknown metric networks {value!r}; valid choices: {list(METRIC_NET_KINDS)} or null")
        return value

    @model_validator(mode="after")
    def _monitored_metrics_exist(self) -> EvalConfig:
        sample_metrics = ["inception_score", "vendi_pixel", "vendi_embedding", "class_agreement"]
        metrics = [
            *self.held_out_rewards,
            *(["vendi_pixels"] if self.diversity else []),
            *(sample_metrics if self.metric_nets is not None else []),
        ]
        unknown = sorted(set(self.monitor_margins) - set(metrics))
        if unknown:
            raise ValueError(
                f"monitor_margins names {unknown}, which the evaluation does not measure; measured: {metrics} "
                "(add the reward to held_out_rewards, set diversity: true for vendi_pixels, or metric_nets for the "
                "sample metrics)"
            )
        return self


class RunConfig(Section):
    """The fields of every run, whatever the algorithm; an algorithm's schema adds its sections."""

    algo: str = Field("ppo-is", description="the algorithm (agents.algorithms): picks the schema and the trainer")
    run_name: str = Field("", description="run directory name under logdir (default: algo + time)")
    logdir: str = Field("runs", description="where runs are written")
    seed: int = Field(0, ge=0, description="seed of everything")
    device: str = Field("cpu", description="torch device")
    model: str = Field(
        "embedded:digits", description="model spec (load_family): embedded/random name, diffusers folder or hub id"
    )
    num_epochs: int = Field(10, ge=1, description="training epochs")
    save_every: int = Field(1, ge=1, description="checkpoint every N epochs")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept on disk")
    sample: SampleConfig = Field(default_factory=SampleConfig)
    env: EnvConfig = Field(default_factory=EnvConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @field_validator("model")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value:
            raise ValueError("model must not be empty")
        return value


class ConfigError(ValueError):
    """A configuration that does not validate; the message names every bad key."""


def format_errors(error: ValidationError, source: str) -> str:
    """One line per validation error, each naming its key (and the value given)."""
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
    return key.strip().split("."), yaml_load(value)


def read_config_data(path: str | Path | None, overrides: list[str] | None) -> tuple[dict[str, Any], str]:
    """The raw mapping of a YAML config with ``key=value`` overrides applied, and its source name.

    Raises:
        ConfigError: for a missing file, a non-mapping document or an override into a non-section.
    """
    data: dict[str, Any] = {}
    source = str(path) if path is not None else "<defaults>"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml_load(path.read_text())
        except yaml.YAMLError as error:
            raise ConfigError(f"config {path} is not valid YAML: {' '.join(str(error).split())}") from None
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


def validate_config(schema: type[RunConfig], data: dict[str, Any], source: str) -> RunConfig:
    """Validate ``data`` against ``schema`` and check the values the schema cannot type.

    Raises:
        ConfigError: naming each unknown key, wrong type, unknown reward or bad window.
    """
    try:
        config = schema.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_errors(error, source)) from None
    check_values(config, source)
    return config


def check_values(config: RunConfig, source: str = "<config>") -> None:
    """Check the values the schema cannot type: the window and the reward name.

    Raises:
        ConfigError: naming the key (``env.window``, ``env.reward``) and the valid choices.
    """
    from diffusion_gym.windows import make_window

    env = config.env
    try:
        window = env.window if isinstance(env.window, str) else [tuple(c) for c in env.window]
        make_window(window, **env.window_kwargs).bind(config.sample.num_steps)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"invalid config {source}:\n  env.window / env.window_kwargs: {error}") from None
    problem = reward_problem(env.reward, env.reward_kwargs)
    if problem:
        key, message = problem
        raise ConfigError(f"invalid config {source}:\n  {key}: {message}")
    for name, options in config.eval.held_out_rewards.items():
        problem = reward_problem(name, options, "eval.held_out_rewards", f"eval.held_out_rewards.{name}")
        if problem:
            key, message = problem
            raise ConfigError(f"invalid config {source}:\n  {key}: {message}")


def reward_problem(
    reward: str | dict[str, float],
    kwargs: dict[str, Any],
    reward_key: str = "env.reward",
    kwargs_key: str = "env.reward_kwargs",
) -> tuple[str, str] | None:
    """What is wrong with a reward and its options (the key at fault and why), or ``None``.

    ``reward`` is a registered name or a mapping of names to weights (whose ``kwargs`` hold
    ``normalize``, ``eps`` and per name its options). Nothing is built: no weights are loaded.
    """
    from diffusion_gym.rewards import NORMALIZATIONS, available_rewards

    names = [reward] if isinstance(reward, str) else list(reward)
    if not names:
        return reward_key, "a weighted reward needs at least one reward name, got an empty mapping"
    for name in names:
        if name not in available_rewards():
            return reward_key, f"unknown reward {name!r}; valid choices: {available_rewards()}"
    if isinstance(reward, str):
        problem = reward_kwargs_problem(reward, kwargs)
        return (f"{kwargs_key}", problem) if problem else None
    options = dict(kwargs)
    normalize = options.pop("normalize", "none")
    options.pop("eps", None)
    if normalize not in NORMALIZATIONS:
        return f"{kwargs_key}.normalize", f"unknown {normalize!r}; valid choices: {list(NORMALIZATIONS)}"
    for name, value in options.items():
        if name not in names:
            return (
                f"{kwargs_key}",
                f"{name!r} names no reward of the weighted sum; valid keys: normalize, eps, or one of {names}",
            )
        if not isinstance(value, dict):
            return f"{kwargs_key}.{name}", f"expected a mapping of the reward's options, got {value!r}"
        problem = reward_kwargs_problem(name, value)
        if problem:
            return f"{kwargs_key}.{name}", problem
    return None


def reward_kwargs_problem(reward: str, kwargs: dict[str, Any]) -> str | None:
    """Why ``kwargs`` do not fit the factory of the registered reward ``reward`` (``None`` if they do)."""
    import inspect

    from diffusion_gym.rewards import _REGISTRY

    factory = _REGISTRY.get(reward)
    try:
        signature = inspect.signature(factory) if factory is not None else None
    except (TypeError, ValueError):  # a builtin or C factory: nothing to check here
        return None
    if signature is None:
        return None
    try:
        signature.bind(**kwargs)
    except TypeError as error:
        accepted = [p.name for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        return f"{error} (reward {reward!r} accepts {accepted})"
    return None


def dump_config(config: BaseModel) -> str:
    """The config as YAML (written next to every run)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
