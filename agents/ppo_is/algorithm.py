"""PPO-IS (DDPO-IS) on ``DiffusionDenoise-v0``, with HRF / HRF-D windows and DRIFT's options.

Per epoch (= one HRF iteration), run by :class:`~agents.common.runner.OnPolicyRunner`:

1. **Collect** ``sample.num_batches_per_epoch`` batches of episodes with the current UNet as the
   Gaussian policy (no grad); every stochastic step ``(x_k, x_{k+1}, log π_old, k, c)`` is stored on
   the device (:class:`~agents.common.collector.Collector`).
2. **Advantages**: rewards standardised per group — per reference image for windowed episodes,
   per condition (tracked over epochs) from pure noise — and clipped to ``±adv_clip_max``
   (DRIFT's subset and diversity shaping plug in here: :class:`~agents.common.drift.DriftAdvantages`).
3. **Update** (:meth:`ClippedUpdate.update`): for each inner epoch, shuffle the (sample, step) pairs, split
   them into ``gradient_updates_per_epoch`` chunks; per chunk, accumulate the gradient of the
   clipped importance-sampling loss (:meth:`ClippedUpdate.chunk_gradient`) over micro-batches, clip the
   gradient norm, take one AdamW step.

Data-parallel under ``torchrun``: every process draws the randomness of the *global* batch and
keeps its block; the update shuffles the global pairs with the same generator everywhere, each
process back-propagates the pairs it collected with the loss normalised by the global chunk size,
and the gradients are summed across processes before clipping and stepping. The result equals one
process's to float rounding, and checkpoints resume under any process count dividing ``num_envs``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from diffusion_gym import sampling

from ..common.advantages import PerConditionStatTracker, compute_advantages
from ..common.checkpoint import Checkpoint
from ..common.collector import Collector, make_env
from ..common.config import ConfigError
from ..common.distributed import Distributed, DistributedError
from ..common.drift import ConditionNoise, DriftAdvantages
from ..common.micro_batch import MicroBatchSize
from ..common.policy import (
    DiffusionPolicy,
    add_lora,
    load_lora_state_dict,
    lora_adapter_config,
    lora_state_dict,
    merged_copy,
)
from ..common.rollout import Rollout
from ..common.runner import Algorithm, EpochStats, RunContext, TrainingDivergedError
from .config import Config, TrainConfig

__all__ = ["PPOIS", "ClippedUpdate", "PPOEpochStats"]

_SUMS = ("loss", "approx_kl", "clipfrac", "kl_ref")
APPROX_KL_WARNING = 1.0
"""An update whose approx-KL to the collecting policy exceeds this gets a warning.

Measured on the embedded model: the shipped digits configs (lr 5e-4, clip 0.05) reach about 0.2 in the
epochs where they learn most; 1.0 means log-prob ratios of about e^±1.4 on average, far off-policy."""


@dataclass(kw_only=True)
class PPOEpochStats(EpochStats):
    """What one PPO-IS epoch logged."""

    start_steps: list[int]
    loss: float
    approx_kl: float
    clipfrac: float
    first_ratio_max_dev: float
    """``max |ratio − 1|`` of the first micro-batch of each chunk: 0 at the first step (exact recomputation)."""
    num_pairs: int
    learning_rate: float = 0.0
    """The learning rate the epoch's update used."""
    kl_to_reference: float = 0.0
    micro_batch_size: int = 0
    drift: dict[str, float] = field(default_factory=dict)
    """DRIFT's statistics when it is on: ``kept_fraction``, ``final_diversity`` (mean ``Φ`` of the final images)."""

    def scalars(self) -> dict[str, float]:
        """The TensorBoard scalars (``train/…`` as Stable-Baselines3 names them)."""
        out = super().scalars()
        for key in ("loss", "approx_kl", "clipfrac", "first_ratio_max_dev"):
            out[f"train/{key}"] = getattr(self, key)
        if self.kl_to_reference:
            out["train/kl_to_reference"] = self.kl_to_reference
        out["train/learning_rate"] = self.learning_rate
        out["train/micro_batch_size"] = float(self.micro_batch_size)
        out.update({f"drift/{key}": value for key, value in self.drift.items()})
        return out

    def postfix(self) -> dict[str, str]:
        """Reward, approx-KL and start step in the progress bar."""
        return {**super().postfix(), "kl": f"{self.approx_kl:.2e}", "start": str(self.start_steps[0])}


@dataclass
class _Sums:
    """Per-pair sums of an update's statistics and the pair count (device tensors until the end)."""

    device: torch.device
    sums: dict[str, Tensor] = field(init=False)
    count: Tensor = field(init=False)
    loss: Tensor = field(init=False)
    first_dev: Tensor | None = None

    def __post_init__(self) -> None:
        self.sums = {name: torch.zeros((), device=self.device) for name in _SUMS}
        self.count = torch.zeros((), device=self.device)
        self.loss = torch.zeros((), device=self.device)

    def add(self, part: _Sums) -> None:
        for name, value in part.sums.items():
            self.sums[name] += value
        self.count += part.count
        self.first_dev = part.first_dev if self.first_dev is None else self.first_dev

    def means(self, dist: Distributed) -> dict[str, float]:
        """Means over the pairs of every process."""
        totals = torch.stack([*self.sums.values(), self.count])
        first = (
            torch.full((1,), -1.0, device=self.device) if self.first_dev is None else self.first_dev.reshape(1).float()
        )
        dist.all_reduce_([totals])
        dist.all_reduce_([first], op="max")
        count = max(totals[-1].item(), 1.0)
        out = {name: value / count for name, value in zip(self.sums, totals[:-1].tolist(), strict=True)}
        out["first_ratio_max_dev"] = float("nan") if first.item() < 0 else first.item()
        return out


class ClippedUpdate:
    """PPO-IS's update: the clipped importance-sampling loss over a rollout's (sample, step) pairs.

    Args:
        policy: the policy being trained.
        optimizer: its optimizer.
        train_config: the ``train`` section (clip range, KL weight, chunks, inner epochs, clipping).
        generator: the trainer's CPU generator (the pair shuffles).
        dist: the collectives (gradients are summed across processes).
        reference: the frozen reference policy of the KL penalty (``None``: no penalty).
        micro_batch: the pairs per forward/backward (default: ``train.batch_size``, halved on out-of-memory).
    """

    def __init__(
        self,
        policy: DiffusionPolicy,
        optimizer: torch.optim.Optimizer,
        train_config: TrainConfig,
        generator: torch.Generator,
        dist: Distributed | None = None,
        reference: DiffusionPolicy | None = None,
        micro_batch: MicroBatchSize | None = None,
    ) -> None:
        self.policy, self.optimizer, self.train_config, self.generator = policy, optimizer, train_config, generator
        self.dist = dist if dist is not None else Distributed()
        self.reference = reference
        self.micro_batch = micro_batch if micro_batch is not None else MicroBatchSize(train_config.batch_size)

    def update(self, rollout: Rollout, keep_pairs: Tensor | None = None) -> dict[str, float]:
        """The PPO-IS update over ``rollout``; returns the means of the logged statistics.

        ``keep_pairs``: a bool mask over the global pairs (DRIFT's subset); only those are shuffled
        into the chunks (the shuffle draws the same permutation either way). When a micro-batch runs
        out of memory, the size halves and the chunk is recomputed from a zero gradient: the update is
        then exactly that of the smaller configured size.
        """
        t = self.train_config
        params = list(self.policy.trainable_parameters())
        totals = _Sums(rollout.device)
        self.policy.train()
        for _ in range(t.num_inner_epochs):
            for chunk in self._chunks(rollout, keep_pairs):
                if chunk.numel() == 0:
                    continue
                self._zero_grad()
                mine, n = rollout.layout.owned(chunk), self._normaliser(rollout, chunk)
                part = self.micro_batch.run(
                    lambda size, mine=mine, n=n: self.chunk_gradient(rollout, mine, n, size), self._zero_grad
                )
                totals.add(part)
                self._step(params, part.loss)
        self.policy.eval()
        return {**totals.means(self.dist), "micro_batch_size": float(self.micro_batch.size)}

    def _chunks(self, rollout: Rollout, keep_pairs: Tensor | None) -> list[Tensor]:
        """The global pairs of each optimizer step: shuffled chunks, or each batch in collection order."""
        t = self.train_config
        if t.update_order == "batches":
            chunks = rollout.batch_chunks()
            return [c[keep_pairs[c].cpu()] for c in chunks] if keep_pairs is not None else chunks
        order = torch.randperm(rollout.num_global_pairs, generator=self.generator)
        if keep_pairs is not None:
            order = order[keep_pairs[order].cpu()]
        return list(order.tensor_split(t.gradient_updates_per_epoch))

    def _normaliser(self, rollout: Rollout, chunk: Tensor) -> float:
        """What a chunk's summed loss is divided by: its pairs, or its share of the trajectories.

        ``trajectories`` (the HRF authors' sum over steps, mean over samples): the epoch's trajectories
        over the optimizer steps (a batch's own trajectories with ``update_order: batches``).
        """
        t = self.train_config
        if t.loss_reduction == "pairs":
            return float(chunk.numel())
        return rollout.num_trajectories * rollout.layout.world_size / t.gradient_updates_per_epoch

    def _clip_scale(self, mb: Any) -> Tensor | float:
        """``(K − k0) / K`` per pair with ``clip_scaling: remaining``, else 1."""
        if self.train_config.clip_scaling != "remaining" or mb.start is None:
            return 1.0
        k = self.policy.schedule.num_steps
        return ((k - mb.start).float() / k).to(mb.advantages.dtype)

    def chunk_gradient(self, rollout: Rollout, mine: Tensor, chunk_size: float, micro_batch: int) -> _Sums:
        """Accumulate the gradient of the clipped PPO-IS loss over this process's pairs ``mine`` of a chunk.

        Per pair: ``ρ = exp(log π_θ − log π_old)``, loss ``max(−A·ρ, −A·clip(ρ, 1 ± ε))`` plus
        ``β · KL(π_θ ‖ π_ref)`` when a reference policy is kept; summed over the pairs and divided by
        ``chunk_size`` (the chunk's global pairs, or its share of the trajectories: ``train.loss_reduction``).
        ε is ``clip_range``, times ``(K − k0) / K`` of the pair's trajectory with ``train.clip_scaling:
        remaining``. The pairs go through the UNet ``micro_batch`` at a time.
        """
        t, policy, reference = self.train_config, self.policy, self.reference
        out = _Sums(rollout.device)
        for mb in rollout.minibatches(mine, micro_batch) if mine.numel() else []:
            step = policy.evaluate(mb.x, mb.k, mb.c if policy.conditional else None, mb.x_next, mb.cond_noise)
            log_ratio = step.log_prob - mb.log_prob
            ratio = torch.exp(log_ratio)
            if out.first_dev is None:  # the chunk's first micro-batch (after the rollout: the ratio should be 1)
                out.first_dev = (ratio.detach() - 1).abs().max()
            eps = t.clip_range * self._clip_scale(mb)
            unclipped = -mb.advantages * ratio
            clipped = -mb.advantages * torch.clamp(ratio, 1.0 - eps, 1.0 + eps)
            loss_per = torch.maximum(unclipped, clipped)
            if reference is not None and t.kl_coef > 0:
                with torch.no_grad():
                    ref = reference.evaluate(
                        mb.x, mb.k, mb.c if reference.conditional else None, mb.x_next, mb.cond_noise
                    )
                kl = sampling.kl_same_std(step.mean, ref.mean, step.std)
                loss_per = loss_per + t.kl_coef * kl
                out.sums["kl_ref"] += kl.detach().sum()
            loss = loss_per.sum() / chunk_size
            loss.backward()
            out.loss = out.loss + loss.detach()
            out.sums["loss"] += loss_per.detach().sum()
            out.sums["approx_kl"] += 0.5 * (log_ratio.detach() ** 2).sum()
            out.sums["clipfrac"] += ((ratio.detach() - 1).abs() > eps).float().sum()
            out.count += ratio.shape[0]
        return out

    def _zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def _step(self, params: list[nn.Parameter], chunk_loss: Tensor) -> None:
        """Sum the gradients across processes, clip, check they are finite, take the optimizer step."""
        if self.dist.enabled:  # sum the gradients (and the chunk loss) of all processes, in one bucketed pass
            for p in params:
                if p.grad is None:  # no pair of this chunk here: contribute zeros
                    p.grad = torch.zeros_like(p)
            chunk_loss = chunk_loss.reshape(1)
            self.dist.all_reduce_([chunk_loss, *(p.grad for p in params)])
            chunk_loss = chunk_loss[0]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.train_config.max_grad_norm)
        if not bool(torch.isfinite(chunk_loss) & torch.isfinite(grad_norm)):
            raise TrainingDivergedError(
                f"the PPO-IS loss is {chunk_loss.item()} and the gradient norm {grad_norm.item()} (NaN/Inf): "
                "stopping before this optimizer step; nothing of this epoch is saved (the last checkpoint is intact). "
                "Lower train.learning_rate or check the reward."
            )
        self.optimizer.step()


class PPOIS(Algorithm):
    """PPO-IS: the clipped importance-sampling update of DDPO on the denoising MDP."""

    name = "ppo-is"
    supports_distributed = True

    def __init__(self, config: Config, run: RunContext) -> None:
        super().__init__(config, run)
        t, d = config.train, config.drift
        self.policy, self.reference = _build_policies(config, run)
        self.envs = make_env(config, self.policy, run.family, run.dist)
        self.drift = DriftAdvantages(d.subset_fraction, d.diversity_coef, run.dist) if d.enabled else None
        observers = self.drift.observers if self.drift is not None else []
        self.collector = Collector(
            self.envs,
            self.policy,
            run.generator,
            run.dist,
            config.policy_noise,
            observers,
            phase=run.phase,
            redraw_references=config.env.references_after_update,
        )
        self.optimizer = torch.optim.AdamW(
            self.policy.trainable_parameters(),
            lr=t.learning_rate,
            betas=(t.adam_beta1, t.adam_beta2),
            weight_decay=t.weight_decay,
            eps=t.adam_epsilon,
        )
        warmup = max(1, t.warmup_epochs)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda e: min(1.0, (e + 1) / warmup))
        self.updater = ClippedUpdate(self.policy, self.optimizer, t, run.generator, run.dist, self.reference)
        self.tracker = PerConditionStatTracker(t.stat_buffer_size, t.stat_min_count)
        self.ema = copy.deepcopy(self.policy.unet).requires_grad_(False) if t.ema_decay > 0 else None

    @classmethod
    def check_world_size(cls, config: Config, dist: Distributed) -> None:
        """``sample.num_envs`` must split evenly across the processes."""
        n = config.sample.num_envs
        if n % dist.world_size:
            valid = [d for d in range(1, n + 1) if n % d == 0]
            raise ConfigError(
                f"sample.num_envs ({n}) must be divisible by the number of processes (WORLD_SIZE={dist.world_size}): "
                f"each process collects num_envs / WORLD_SIZE episodes of every batch; valid process counts for "
                f"num_envs={n}: {valid} (or change sample.num_envs)"
            )

    # ------------------------------------------------------------------------------------ the epoch
    def train_epoch(self, epoch: int) -> PPOEpochStats:
        """Collect, compute the advantages, update; one learning-rate schedule step."""
        self.policy.eval()
        rollout = self.collector.collect(self.config.sample.num_batches_per_epoch)
        traj = rollout.trajectories()
        t = self.config.train
        keep, drift_stats = None, {}
        if self.drift is not None:
            keep, drift_stats = self.drift.set_advantages(
                rollout, traj, self.tracker, t.advantage_mode, t.adv_clip_max, t.advantage_std
            )
        else:
            clip: Tensor | float = t.adv_clip_max
            if t.clip_scaling == "remaining":  # the HRF authors' clip_advantages · (K − k0) / K
                k = self.policy.schedule.num_steps
                clip = t.adv_clip_max * (k - traj.starts).float() / k
            rollout.set_advantages(
                compute_advantages(
                    traj.rewards,
                    traj.groups,
                    traj.conditions,
                    t.advantage_mode,
                    self.tracker,
                    clip=clip,
                    std=t.advantage_std,
                )
            )
        keep_pairs = keep[rollout.pair_trajectories()] if keep is not None else None
        _warn_if_nothing_to_learn(rollout, epoch)
        learning_rate = self.optimizer.param_groups[0]["lr"]
        self.run.phase("update")
        logged = self.updater.update(rollout, keep_pairs)
        if logged["approx_kl"] > APPROX_KL_WARNING:
            warnings.warn(
                f"epoch {epoch + 1}: the update moved the policy far from the one that collected the data "
                f"(approx-KL {logged['approx_kl']:.3g}, clip fraction {logged['clipfrac']:.2f}): the importance "
                "ratios are unreliable and the reward may fall; lower train.learning_rate",
                RuntimeWarning,
                stacklevel=2,
            )
        self.lr_schedule.step()
        self._update_ema()
        rewards = traj.rewards
        return PPOEpochStats(
            epoch=epoch,
            reward_mean=rewards.mean().item(),
            reward_std=rewards.std().item() if rewards.numel() > 1 else 0.0,
            start_steps=traj.starts.tolist(),
            loss=logged["loss"],
            approx_kl=logged["approx_kl"],
            clipfrac=logged["clipfrac"],
            first_ratio_max_dev=logged["first_ratio_max_dev"],
            num_pairs=rollout.num_global_pairs,
            learning_rate=learning_rate,
            kl_to_reference=logged["kl_ref"],
            micro_batch_size=self.updater.micro_batch.size,
            drift=drift_stats,
        )

    def _update_ema(self) -> None:
        if self.ema is None:
            return
        with torch.no_grad():
            for p_ema, p in zip(self.ema.parameters(), self.policy.unet.parameters(), strict=True):
                p_ema.lerp_(p, 1 - self.config.train.ema_decay)

    # ------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Optimizer, learning-rate schedule and per-condition tracker."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "tracker": self.tracker.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any], extra_weights: dict[str, dict[str, Tensor]]) -> None:
        """Restore :meth:`state_dict` and the EMA weights."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.tracker.load_state_dict(state["tracker"])
        if self.ema is not None and "ema" in extra_weights:
            self.ema.load_state_dict(extra_weights["ema"])

    def extra_weights(self) -> dict[str, dict[str, Tensor]]:
        """The EMA weights and the LoRA adapters, when on."""
        extra = {"ema": self.ema.state_dict()} if self.ema is not None else {}
        if self.config.train.lora_rank > 0:
            extra["lora"] = lora_state_dict(self.policy.unet)
        return extra

    def _lora_for_text(self) -> bool:
        return self.config.train.lora_rank > 0 and self.policy.family.text_conditioned

    def export_unet(self) -> nn.Module | None:
        """The UNet with any LoRA adapters merged (diffusers format); none for a text model's LoRA unless asked."""
        t = self.config.train
        if t.lora_rank == 0:
            return self.policy.unet
        merged = t.save_merged_unet if t.save_merged_unet is not None else not self.policy.family.text_conditioned
        return merged_copy(self.policy.unet) if merged else None

    def exports(self) -> dict[str, Callable[[Path], None]]:
        """Text models' LoRA: ``lora/`` in diffusers' format (``pipe.load_lora_weights(ckpt / 'lora')``)."""
        if not self._lora_for_text():
            return {}
        unet, family = self.policy.unet, self.policy.family

        def write(folder: Path) -> None:
            family.save_lora_weights(folder, lora_state_dict(unet), lora_adapter_config(unet))

        return {"lora": write}

    def load_policy_weights(self, checkpoint: Checkpoint) -> None:
        """The UNet; with LoRA, the base weights come from ``config.model`` and the adapters from the checkpoint."""
        if self.config.train.lora_rank == 0:
            return super().load_policy_weights(checkpoint)
        if "lora" not in checkpoint.extra_weights:
            raise ConfigError(
                f"checkpoint {checkpoint.path} holds full weights, not LoRA adapters: resume it with train.lora_rank=0"
            )
        load_lora_state_dict(self.policy.unet, checkpoint.extra_weights["lora"])

    def check_consistent(self, epoch: int) -> None:
        """Raise if the processes' weights differ (they must be identical after every step)."""
        if not self.dist.enabled:
            return
        params = list(self.policy.unet.parameters())
        fingerprint = torch.stack(
            [torch.stack([p.detach().double().sum(), p.detach().double().abs().sum()]) for p in params]
        )
        everyone = self.dist.all_gather_cat(fingerprint.reshape(1, -1))
        if not bool((everyone == everyone[:1]).all()):
            raise DistributedError(f"rank {self.dist.rank}: the weights differ across processes after epoch {epoch}")

    def log_extra(self, writer: Any, stats: EpochStats, step: int) -> None:
        """The histogram of the epoch's start steps."""
        if isinstance(stats, PPOEpochStats):
            writer.add_histogram("window/start_step", np.asarray(stats.start_steps), step)


def _build_policies(config: Config, run: RunContext) -> tuple[DiffusionPolicy, DiffusionPolicy | None]:
    """The policy (speed options, DRIFT's condition noise, LoRA) and the frozen reference for the KL penalty."""
    t, d = config.train, config.drift
    autocast = torch.bfloat16 if config.mixed_precision == "bf16" else None
    condition_noise = ConditionNoise(d.condition_noise, d.condition_noise_tau) if d.condition_noise > 0 else None
    fast: dict[str, Any] = {
        "channels_last": config.channels_last,
        "compile": config.compile,
        "condition_noise": condition_noise,
    }
    unet = run.family.denoiser
    policy = run.make_policy(autocast_dtype=autocast, gradient_checkpointing=t.gradient_checkpointing, **fast)
    reference = None
    if t.kl_coef > 0:
        reference = run.make_policy(copy.deepcopy(unet).requires_grad_(False), autocast_dtype=autocast, **fast)
    if t.lora_rank > 0:
        add_lora(policy.unet, t.lora_rank, t.lora_alpha or None)
        policy.ensure_memory_format()
    return policy, reference


def _warn_if_nothing_to_learn(rollout: Rollout, epoch: int) -> None:
    """Warn when every advantage is 0: equal rewards within every group teach the policy nothing."""
    advantages = rollout.pair_advantages if rollout.pair_advantages is not None else rollout.advantages
    if advantages is not None and advantages.numel() and not bool(advantages.any()):
        warnings.warn(
            f"epoch {epoch + 1}: every advantage is 0 (the rewards within each group are equal; is the reward "
            "constant?): this epoch's update changes nothing",
            RuntimeWarning,
            stacklevel=3,
        )
