"""Hacking monitors: what every trainer's fixed-noise evaluation measures besides the trained reward.

Reward hacking shows as a trained reward that keeps rising while everything it was meant to stand for
falls: digits turn to blobs under a JPEG reward, every face becomes the same face, an OCR reward blanks
the scene. :class:`EvaluationMonitors` measures on the evaluation images (the same noise at every
evaluation, so that each value is paired with the base model's):

* ``held_out/<name>``: rewards scored at evaluation only, never trained on (``eval.held_out_rewards``),
  e.g. ``digit_confidence`` while training on ``jpeg_compressibility``, or a quality score;
* ``vendi_pixels``: the Vendi score of the images within each condition (``eval.diversity``);
* ``inception_score``, ``vendi_pixel``, ``vendi_embedding``, ``class_agreement`` (``eval.metric_nets``): the
  evaluation stage's sample metrics (``agents.evaluation.score_images``), the Inception Score in one split
  over all the evaluation images; on the digits model, the class agreement is the share of images the
  shipped classifier assigns to their conditioned class;
* ``reward/<name>``: each component's raw value when the trained reward is a weighted sum;
* ``kl_to_base`` (``eval.kl_to_base``): each sample's KL from the policy to the base model along its
  evaluation chain: the sum over the stochastic steps of ``KL(N(μ_θ, σ²) ‖ N(μ_base, σ²))`` at the
  states the policy visits, each averaged over the image's dimensions (the log-probs' convention, so
  it is on the scale of ``train.kl_coef``'s penalty).

The monitor (``eval.monitor_margins``) *fires* at an evaluation where a watched metric lies more than
its margin below its value for the base model while the evaluation reward lies above the base's:
``monitor/fired`` is 1 in TensorBoard, ``eval.jsonl`` names the metrics, the run's log says so, and
with ``eval.early_stop`` the run stops there, after writing a checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffusion_gym import metrics, sampling
from diffusion_gym.rewards import make_reward, weighted_rewards_of

from ..evaluation import score_images
from .config import EvalConfig

__all__ = ["BaseKL", "EvaluationMonitors", "read_base_line"]


def read_base_line(path: Path) -> dict[str, Any] | None:
    """The base model's line (epoch 0) of an ``eval.jsonl``, or ``None`` when there is none."""
    if not path.is_file():
        return None
    for text in path.read_text().splitlines():
        if text.strip():
            line = json.loads(text)
            if line.get("epoch") == 0:
                return line
    return None


class BaseKL:
    """The KL from the policy to the base model along the evaluation chain (:func:`sampling.generate`'s hooks).

    :meth:`start` wraps the policy's denoiser so that the base model's runs at the same states;
    :meth:`on_step` adds each step's KL; :meth:`result` returns the per-sample sums of the last chain.

    Args:
        base: the base model's policy (a frozen copy of the weights before training).
    """

    def __init__(self, base: Any) -> None:
        self.base = base
        self._denoise_base: Any = None
        self._schedule: Any = None
        self._state: tuple[Tensor, Tensor] | None = None
        self._sums: list[Tensor] = []

    def start(self, denoiser: sampling.Denoiser, schedule: sampling.Schedule) -> sampling.Denoiser:
        """The policy's ``denoiser``, wrapped to record the base model's output at every state it is called at."""
        self._denoise_base, self._schedule, self._sums = self.base.denoiser(), schedule, []

        def both(x: Tensor, t: Tensor, c: Any) -> Tensor:
            self._state = (x, self._denoise_base(x, t, c))
            return denoiser(x, t, c)

        return both

    def on_step(self, k: int, step: sampling.StepOutput) -> None:
        """Add step ``k``'s KL to its batch's sums (a chain of a new batch starts at its first step)."""
        assert self._state is not None, "on_step before the wrapped denoiser ran"
        x, base_output = self._state
        reference = sampling.denoise_step(base_output, x, k, self._schedule, noise=torch.zeros_like(x))
        std = torch.broadcast_to(step.std, step.mean.shape)  # a whole batch's step shares one σ
        kl = sampling.kl_same_std(step.mean, reference.mean, std).float().cpu()
        if k == 0 or not self._sums or self._sums[-1].shape != kl.shape:
            self._sums.append(torch.zeros_like(kl))
        self._sums[-1] += kl

    def result(self) -> Tensor:
        """Each sample's KL summed over the steps of the last chain, ``(n,)``."""
        return torch.cat(self._sums) if self._sums else torch.zeros(0)


class EvaluationMonitors:
    """Held-out rewards, diversity within a condition and the hacking monitor of one run's evaluations.

    Args:
        config: the run's ``eval`` section.
        eval_log: the run's ``eval.jsonl``; when it already holds the base model's line (a resumed run),
            the monitor compares with that line's values.
    """

    def __init__(self, config: EvalConfig, eval_log: Path | None = None) -> None:
        self.config = config
        self.held_out = {name: make_reward(name, **options) for name, options in config.held_out_rewards.items()}
        self.base = read_base_line(eval_log) if eval_log is not None else None
        self.nets: Any = None
        """The metric networks of ``eval.metric_nets``, loaded at the first evaluation (they need its image shape)."""
        self.fired: list[str] = []
        """The watched metrics that fired the monitor at the last evaluation (empty: it did not fire)."""

    def measure(self, images: Tensor, reward_input: Any, keys: Sequence[Any], reward_fn: Any) -> dict[str, float]:
        """The monitored metrics of evaluation images.

        Args:
            images: the evaluation images in ``[0, 1]``.
            reward_input: their conditions as rewards take them (class ids, prompts or ``None``).
            keys: one hashable condition key per image (for the diversity within a condition).
            reward_fn: the trained reward, just called on these images (its components are read).
        """
        out: dict[str, float] = {}
        combined = weighted_rewards_of(reward_fn)
        if combined is not None:
            for name, values in combined.last.items():
                out[f"reward/{name}"] = float(values.float().mean())
        for name, reward in self.held_out.items():
            mean, se = metrics.mean_and_standard_error(reward(images, reward_input).float().cpu())
            out[f"held_out/{name}"], out[f"held_out/{name}_se"] = mean, se
        if self.config.diversity:
            out["vendi_pixels"] = metrics.grouped_vendi(metrics.pixel_features(images), list(keys))
        if self.config.metric_nets is not None:
            out.update(self.sample_metrics(images, reward_input))
        return out

    def sample_metrics(self, images: Tensor, reward_input: Any) -> dict[str, float]:
        """The evaluation stage's sample metrics of ``images`` (``eval.metric_nets``), the IS in one split."""
        from diffusion_gym.nets import load_metric_nets

        if self.nets is None:
            self.nets = load_metric_nets(self.config.metric_nets, image_shape=tuple(images.shape[1:]))
        class_ids = reward_input if isinstance(reward_input, Tensor) else None
        values = score_images(images.float().cpu(), class_ids, self.nets, is_splits=1).values
        values.pop("inception_score_std")  # one split: no spread
        return values

    def watched_value(self, line: dict[str, Any], name: str) -> float | None:
        """The value of a watched metric (``held_out/<name>``, ``vendi_pixels``) in an evaluation line."""
        value = line.get(name if name in line else f"held_out/{name}")
        return None if value is None else float(value)

    def check(self, step: int, line: dict[str, Any]) -> dict[str, float]:
        """Update the monitor with an evaluation's line (``reward_mean`` and :meth:`measure`'s metrics).

        The first line (step 0) is the base model's. Returns the drop of every watched metric below its
        base value (``monitor/<name>_drop``) and ``monitor/fired``; :attr:`fired` names the metrics that fired.
        """
        if step == 0 or self.base is None:
            self.base = dict(line)
        self.fired = []
        margins = self.config.monitor_margins
        if not margins:
            return {}
        out: dict[str, float] = {}
        rose = step > 0 and float(line["reward_mean"]) > float(self.base["reward_mean"])
        for name, margin in margins.items():
            now, base = self.watched_value(line, name), self.watched_value(self.base, name)
            if now is None or base is None or now != now or base != base:  # not measured, or NaN
                continue
            out[f"monitor/{name}_drop"] = base - now
            if rose and base - now > margin:
                self.fired.append(name)
        out["monitor/fired"] = float(bool(self.fired))
        return out

    def describe(self, step: int) -> str:
        """One line on what fired (after :meth:`check` fired)."""
        margins = self.config.monitor_margins
        parts = ", ".join(f"{name} fell more than {margins[name]:g} below the base model's" for name in self.fired)
        return f"hacking monitor fired at epoch {step}: {parts} while the trained reward rose"
