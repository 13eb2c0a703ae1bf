"""GRPO on ``DiffusionDenoise-v0``: Flow-GRPO's algorithm as the runner's PPO-IS with group sampling.

Flow-GRPO (arXiv 2505.05470) trains a flow model's SDE policy with GRPO: for each prompt, a group of
``G`` images; the advantage of image ``i`` is ``(r_i − mean(r_group)) / std``; the loss is PPO's
clipped ratio at every stored step plus ``β·KL(π_θ ‖ π_ref)``. Each piece already exists in the
project, so this class only names the combination:

* the env draws each prompt ``G`` times (``sample.samples_per_condition``; every group shares a
  group id, ``info["group"]``);
* :func:`~agents.common.advantages.compute_advantages` in ``group`` mode standardises within those
  groups (``train.advantage_std``: the group's std or the batch's);
* :class:`~agents.ppo_is.algorithm.ClippedUpdate` takes the clipped ratio and the closed-form
  Gaussian KL of the two policies' means at the stored state (the same σ), ``β = train.kl_coef``.

Windows compose as for PPO-IS: an HRF start (groups are then the episodes of one reference, which
carries its prompt) and, on flow models, an SDE window (only its steps are stored and trained).
"""

from __future__ import annotations

from ..ppo_is.algorithm import PPOIS

__all__ = ["GRPO"]


class GRPO(PPOIS):
    """GRPO: PPO-IS's clipped update, per-prompt group advantages and a KL penalty (:mod:`agents.grpo.config`)."""

    name = "grpo"
