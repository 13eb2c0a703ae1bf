"""The GRPO training configuration: PPO-IS's schema with Flow-GRPO's sampling, advantages and KL term.

GRPO is PPO-IS with three things set (:mod:`agents.grpo.algorithm` says why each is enough):

* ``sample.samples_per_condition`` (the *group size*): a batch is ``num_envs / group size``
  prompts, each sampled group-size times from its own noise (Flow-GRPO: 24 images per prompt);
* ``train.advantage_mode: group``: each reward is centred on its group's mean and divided by the
  group's std or, with ``train.advantage_std: batch``, the batch's (Flow-GRPO's ``global_std``);
* ``train.kl_coef`` (β): ``β·KL(π_θ ‖ π_ref)`` to the frozen base model in the loss (Flow-GRPO:
  0.04 on GenEval, 0.01 PickScore, 0 for its Fast variants).

Fewer sampling steps in training than in evaluation is ``sample.num_steps`` vs ``eval.num_steps``
(Flow-GRPO: 10 vs 40).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ..common.config import SampleConfig
from ..ppo_is.config import Config, TrainConfig

__all__ = ["GRPOConfig", "GRPOSampleConfig", "GRPOTrainConfig", "load_grpo_config"]


class GRPOSampleConfig(SampleConfig):
    """Sampling: groups of episodes per prompt."""

    samples_per_condition: int = Field(
        8, ge=2, description="GRPO's group size: episodes per prompt in a batch, one advantage group (Flow-GRPO: 24)"
    )


class GRPOTrainConfig(TrainConfig):
    """The clipped update with group-relative advantages and a KL penalty to the base model."""

    advantage_mode: Literal["group"] = Field("group", description="GRPO: advantages within each prompt's group")
    advantage_std: Literal["group", "group-sample", "batch"] = Field(
        "batch",
        description="divide by the group's reward std (group-sample: n - 1) or the batch's (Flow-GRPO: batch, its "
        "global_std)",
    )
    kl_coef: float = Field(0.04, ge=0, description="β of KL(π_θ ‖ π_ref) to the base model (Flow-GRPO GenEval: 0.04)")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay (Flow-GRPO: 1e-4)")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient-norm clipping (Flow-GRPO: 1.0)")


class GRPOConfig(Config):
    """A whole GRPO run."""

    algo: Literal["grpo"] = Field("grpo", description="the algorithm: GRPO (Flow-GRPO; windows as PPO-IS)")
    sample: GRPOSampleConfig = Field(default_factory=GRPOSampleConfig)
    train: GRPOTrainConfig = Field(default_factory=GRPOTrainConfig)

    @model_validator(mode="after")
    def _groups_fill_batches(self) -> GRPOConfig:
        s = self.sample
        if s.num_envs % s.samples_per_condition:
            raise ValueError(
                f"sample.num_envs ({s.num_envs}) must be a multiple of sample.samples_per_condition "
                f"({s.samples_per_condition}, the group size): every batch is whole groups of one prompt each"
            )
        return self


def load_grpo_config(path: str | Path | None = None, overrides: list[str] | None = None) -> GRPOConfig:
    """Read a GRPO YAML config, apply ``key=value`` overrides, validate (:func:`agents.algorithms.load_run_config`)."""
    from ..algorithms import load_run_config

    return load_run_config(path, overrides, algo="grpo")  # type: ignore[return-value]
