"""PPO-IS (DDPO-IS) on ``DiffusionDenoise-v0``, with HRF / HRF-D windows: the whole loop in one file.

Per epoch (= one HRF iteration):

1. **Collect** ``num_batches_per_epoch`` batches of episodes from the native vector env with the
   current UNet as the Gaussian policy (no grad); store every stochastic step
   ``(x_k, x_{k+1}, log π_old, k, c)`` on the device; rewards arrive at the last step.
2. **Advantages**: rewards standardised per group — per reference image for windowed episodes,
   per condition (tracked over epochs) from pure noise — and clipped to ``±adv_clip_max``.
3. **Update**: for each inner epoch, shuffle the (sample, step) pairs, split them into
   ``gradient_updates_per_epoch`` chunks; per chunk, accumulate the gradient of the clipped
   importance-sampling loss ``mean(max(−A·ρ, −A·clip(ρ, 1 ± ε)))`` (plus an optional KL penalty to
   the base model) over micro-batches, clip the gradient norm, take one AdamW step.
4. **Log** (TensorBoard): reward mean/std, loss, approx-KL, clip fraction, the first ratio's
   distance from 1, the start-step histogram, fixed-noise evaluation reward and image grid.
5. **Checkpoint** atomically (weights in diffusers format + optimizer, RNGs, env and window state),
   so ``resume`` continues bit-identically.

Under ``torchrun`` (``WORLD_SIZE > 1``) the same loop runs data-parallel, one process per GPU, and
computes what one process with the same config computes (to float rounding):

* every process holds the same RNG states and draws the randomness of the *global* batch (start
  step, references, initial and policy noise), keeping its block of ``num_envs / world_size``
  episodes (:class:`~diffusion_gym.envs.Shard`); HRF-D probes are split across processes and their
  results gathered, so every process picks the same start step;
* rewards, groups and conditions are gathered: advantages (and the per-condition tracker) see the
  whole batch, every process keeps its episodes' advantages;
* the update shuffles the global (sample, step) pairs with the same generator everywhere; per chunk
  each process back-propagates the pairs it collected, with the loss normalised by the *global*
  chunk size, the gradients are summed across processes (one bucketed all-reduce, the chunk loss
  riding along for the finiteness check), then clipped and applied identically everywhere;
* rank 0 evaluates, logs and writes checkpoints; checkpoints hold the global state, so a run
  resumes under any number of processes that divides ``sample.num_envs``.
"""

from __future__ import annotations

import copy
import functools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

from diffusion_gym import metrics, sampling
from diffusion_gym.envs import DiffusionDenoiseVectorEnv, Shard
from diffusion_gym.models import load_model

from ..common.advantages import PerConditionStatTracker, compute_advantages
from ..common.buffer import RolloutBuffer
from ..common.checkpoint import (
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from ..common.distributed import Distributed, DistributedError, init_distributed
from ..common.drift import (
    ConditionNoise,
    concentrated_subset,
    diversity_features,
    group_cosine_diversity,
    group_keys,
    shaped_step_advantages,
)
from ..common.micro_batch import MicroBatchSize
from ..common.policy import DiffusionPolicy, add_lora, load_lora_state_dict, lora_state_dict, merged_copy
from .config import Config, ConfigError, TrainConfig, dump_config


class TrainingDivergedError(RuntimeError):
    """The loss became NaN/Inf: training stops before any weight or checkpoint is touched."""


@dataclass
class EpochStats:
    """What one epoch logged (also returned to callers and tests)."""

    epoch: int
    reward_mean: float
    reward_std: float
    start_steps: list[int]
    loss: float
    approx_kl: float
    clipfrac: float
    first_ratio_max_dev: float
    num_pairs: int
    seconds: float
    eval_reward_mean: float | None = None
    drift: dict[str, float] = field(default_factory=dict)
    """DRIFT's statistics when it is on: ``kept_fraction``, ``final_diversity`` (mean ``Φ`` of the final images)."""


@dataclass
class TrainResult:
    """The outcome of :func:`train`."""

    run_dir: Path
    epochs: list[EpochStats] = field(default_factory=list)
    base_eval: metrics.MeanStd | None = None
    """Fixed-noise evaluation reward of the base model: mean and standard error."""
    final_eval: metrics.MeanStd | None = None
    """The same after the last evaluated epoch."""

    @property
    def base_eval_reward(self) -> float | None:
        """Mean of :attr:`base_eval`."""
        return None if self.base_eval is None else self.base_eval.mean

    @property
    def final_eval_reward(self) -> float | None:
        """Mean of :attr:`final_eval`."""
        return None if self.final_eval is None else self.final_eval.mean


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_env(
    config: Any,
    policy: DiffusionPolicy,
    loaded: Any,
    dist: Distributed | None = None,
    defer_rewards: bool = False,
) -> DiffusionDenoiseVectorEnv:
    """The trainers' native vector env from a config's ``sample`` and ``env`` sections (PPO-IS and VARD).

    Args:
        config: a PPO-IS or VARD config (its ``sample``, ``env`` and ``device``).
        policy: the policy whose current weights the env's probes and model references use.
        loaded: the loaded model (scheduler and UNet).
        dist: under ``torchrun``, this process's share of the global batch (a :class:`Shard`).
        defer_rewards: start the terminal rewards in the background (see
            :class:`~diffusion_gym.envs.DiffusionDenoiseVectorEnv`); for :func:`collect`.

    Raises:
        ValueError: for ``sample.start_mode`` other than ``shared`` (the trainers collect whole batches).
    """
    s, e = config.sample, config.env
    if s.start_mode != "shared":
        raise ValueError("the trainers collect whole batches: sample.start_mode must be 'shared' for now")
    shard = None
    if dist is not None and dist.enabled:
        shard = Shard(dist.rank, dist.world_size, dist.all_gather_cat)
    return DiffusionDenoiseVectorEnv(
        num_envs=s.num_envs // (shard.world_size if shard is not None else 1),
        shard=shard,
        model=loaded,
        reward=e.reward,
        reward_kwargs=e.reward_kwargs,
        window=e.window if isinstance(e.window, str) else [tuple(c) for c in e.window],
        window_kwargs=e.window_kwargs,
        num_steps=s.num_steps,
        eta=s.eta,
        references=e.references,
        denoiser=policy.denoiser(),
        samples_per_reference=s.samples_per_reference,
        probe_size=e.probe_size,
        device=config.device,
        check_actions=False,
        defer_rewards=defer_rewards,
    )


def policy_noise_sampler(
    envs: DiffusionDenoiseVectorEnv, generator: torch.Generator, where: str = "cpu"
) -> Callable[[], torch.Tensor]:
    """A callable drawing one rollout step's standard-normal policy noise ``(num_envs, C, H, W)`` on the env's device.

    A sharded env's process draws the noise of the whole global batch and keeps its block, so the
    batch is the same under any number of processes.

    Args:
        envs: the vector env (its device, batch and sample shape).
        generator: the trainer's CPU generator.
        where: ``"cpu"`` draws from ``generator`` itself: the same numbers on every device (a run on a
            GPU repeats a CPU run's trajectories up to float rounding); on a CUDA env the draw goes to
            pinned memory and is copied without blocking, so the host never waits for the GPU, but
            the host still spends the time of one ``randn`` of the batch per step. ``"device"`` draws
            on the env's device from a generator seeded once per call from ``generator`` (which keeps
            resumed runs exact): no host work and no copy per step, but the numbers depend on the
            device's RNG (CUDA's Philox is not the CPU's Mersenne Twister), so runs repeat only on the
            same kind of device.

    Raises:
        ValueError: for an unknown ``where``.
    """
    if where not in ("cpu", "device"):
        raise ValueError(f"unknown policy noise source {where!r}; valid choices: ['cpu', 'device']")
    core = envs.core
    shape = (core.global_num_envs, *core.sample_shape)
    rows = core.shard.block(shape[0]) if core.shard is not None else slice(None)
    if where == "device":
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        device_generator = torch.Generator(device=envs.device).manual_seed(seed)
        return lambda: torch.randn(shape, generator=device_generator, device=envs.device)[rows]
    pinned = envs.device.type == "cuda"
    return lambda: torch.randn(shape, generator=generator, pin_memory=pinned)[rows].to(envs.device, non_blocking=pinned)


def condition_embedding_dim(policy: DiffusionPolicy) -> int:
    """Width of the UNet's class embedding (the time-embedding width of a diffusers ``UNet2DModel``)."""
    embedding = policy.unet.class_embedding
    dim = getattr(embedding, "embedding_dim", None)
    return int(dim) if dim is not None else int(policy.unet.config.block_out_channels[0] * 4)


def collect(
    envs: DiffusionDenoiseVectorEnv,
    policy: DiffusionPolicy,
    buffer: RolloutBuffer,
    num_batches: int,
    generator: torch.Generator,
    noise: str = "cpu",
    diversity: bool = False,
) -> None:
    """Roll out ``num_batches`` batches of whole episodes into ``buffer`` (no grad).

    Between resets the step loop never waits for the device: step indices are mirrored on the host,
    actions and log-probs stay on the device, the env copies nothing to it on plain steps, and the
    policy noise comes from :func:`policy_noise_sampler` (``noise``: ``"cpu"`` or ``"device"``, see
    there). The autoreset at the end of a batch synchronises. The reward does too, unless the env
    defers it (``defer_rewards=True``, as :func:`make_env` builds it): then a host reward (JPEG) is
    scored on a background thread (GPU envs) while the next batch is rolled out, and ``buffer.rewards`` waits
    for the last one.

    DRIFT: with the policy's ``condition_noise`` on, each episode draws one condition-noise
    direction at the start of its batch (from ``generator``, for the global batch); with
    ``diversity``, the group-diversity potential of every stored step's x̂0 and of the final images
    is recorded for the whole batch (features gathered across processes) in ``buffer.potentials``
    and ``buffer.final_potentials``.
    """
    deterministic = policy.schedule.deterministic.cpu().numpy()  # host copy: no device sync per step
    draw_noise = policy_noise_sampler(envs, generator, noise)
    core = envs.core
    rows = core.shard.block(core.global_num_envs) if core.shard is not None else slice(None)
    gather = core.shard.all_gather if core.shard is not None else (lambda t: t)
    cond_dim = condition_embedding_dim(policy) if policy.condition_noise is not None else 0
    obs, info = envs.observation()
    for _ in range(num_batches):
        cond_noise = None
        if cond_dim:
            cond_noise = torch.randn((core.global_num_envs, cond_dim), generator=generator)[rows].to(envs.device)
        traj = buffer.start_batch(obs["c"], info["group"], info["start_step"], cond_noise)
        keys = gather(group_keys(info["group"], obs["c"])) if diversity else None
        potentials = []
        rewards = step = None
        for _ in range(int(envs.steps_remaining().max())):
            k = info["step_index"]
            c = obs["c"] if policy.conditional else None
            step = policy.act(obs["x_t"], k, c, noise=draw_noise(), cond_noise=cond_noise)
            k_host = int(envs.core.num_steps - envs.steps_remaining()[0])  # shared start: one step for all
            if not deterministic[k_host]:
                buffer.add(obs["x_t"], step.x_prev, k, obs["c"], step.log_prob, traj)
                if keys is not None:
                    potentials.append(group_cosine_diversity(gather(diversity_features(step.x0)), keys))
            obs, rewards, terminated, _, info = envs.step(step.x_prev)
        buffer.end_batch(info.get("pending_reward", rewards))  # with defer_rewards: possibly still being scored
        if keys is not None and step is not None:
            phi = torch.stack(potentials) if potentials else torch.zeros((0, keys.numel()), device=keys.device)
            buffer.potentials.append(phi)
            buffer.final_potentials.append(group_cosine_diversity(gather(diversity_features(step.x_prev)), keys))


def _owned_pairs(chunk: torch.Tensor, batch_envs: int, shard: Shard | None) -> torch.Tensor:
    """Buffer positions of the pairs of ``chunk`` (global pair indices) that this process collected.

    One process's buffer stores each (batch, step) as one block of ``batch_envs`` pairs; with a
    :class:`Shard` the global buffer stores ``batch_envs × world_size`` pairs per block, of which this
    process holds the ``shard.block``. Global pair ``g`` is row ``g % B`` of block ``g // B``.
    """
    if shard is None:
        return chunk
    width = batch_envs * shard.world_size
    row = chunk % width
    mine = chunk[row // batch_envs == shard.rank]
    return (mine // width) * batch_envs + (mine % width) % batch_envs


@dataclass
class _ChunkGradient:
    """What one chunk's gradient accumulation logged: sums over its pairs (device tensors)."""

    sums: dict[str, torch.Tensor]
    count: torch.Tensor
    loss: torch.Tensor
    first_dev: torch.Tensor | None


def _chunk_gradient(
    policy: DiffusionPolicy,
    buffer: RolloutBuffer,
    mine: torch.Tensor,
    chunk_size: int,
    t: TrainConfig,
    reference: DiffusionPolicy | None,
    micro_batch: int,
) -> _ChunkGradient:
    """Accumulate the clipped PPO-IS loss's gradient of this process's pairs ``mine`` of a chunk.

    The loss is summed over pairs and divided by the (global) ``chunk_size``; the pairs go through
    the UNet ``micro_batch`` at a time.
    """
    sums = {name: torch.zeros((), device=buffer.device) for name in ("loss", "approx_kl", "clipfrac", "kl_ref")}
    count = torch.zeros((), device=buffer.device)
    chunk_loss = torch.zeros((), device=buffer.device)
    first_dev = None
    for mb in buffer.minibatches(mine, micro_batch) if mine.numel() else []:
        out = policy.evaluate(mb.x, mb.k, mb.c if policy.conditional else None, mb.x_next, mb.cond_noise)
        log_ratio = out.log_prob - mb.log_prob
        ratio = torch.exp(log_ratio)
        if first_dev is None:  # the chunk's first micro-batch (after the rollout: the ratio should be 1)
            first_dev = (ratio.detach() - 1).abs().max()
        adv = mb.advantages
        unclipped = -adv * ratio
        clipped = -adv * torch.clamp(ratio, 1.0 - t.clip_range, 1.0 + t.clip_range)
        loss_per = torch.maximum(unclipped, clipped)
        if reference is not None and t.kl_coef > 0:
            with torch.no_grad():
                ref_c = mb.c if reference.conditional else None
                ref = reference.evaluate(mb.x, mb.k, ref_c, mb.x_next, mb.cond_noise)
            kl = sampling.kl_same_std(out.mean, ref.mean, out.std)
            loss_per = loss_per + t.kl_coef * kl
            sums["kl_ref"] += kl.detach().sum()
        loss = loss_per.sum() / chunk_size
        loss.backward()
        chunk_loss = chunk_loss + loss.detach()
        sums["loss"] += loss_per.detach().sum()
        sums["approx_kl"] += 0.5 * (log_ratio.detach() ** 2).sum()
        sums["clipfrac"] += ((ratio.detach() - 1).abs() > t.clip_range).float().sum()
        count += ratio.shape[0]
    return _ChunkGradient(sums, count, chunk_loss, first_dev)


def update(
    policy: DiffusionPolicy,
    buffer: RolloutBuffer,
    optimizer: torch.optim.Optimizer,
    config: Config,
    generator: torch.Generator,
    reference: DiffusionPolicy | None = None,
    dist: Distributed | None = None,
    shard: Shard | None = None,
    keep_pairs: torch.Tensor | None = None,
    micro_batch: MicroBatchSize | None = None,
) -> dict[str, float]:
    """The PPO-IS update over the buffer; returns the logged statistics.

    ``keep_pairs``: a bool mask over the global (sample, step) pairs (DRIFT's reward-concentrated
    subset); only those are shuffled into the chunks (the shuffle draws the same permutation either way).

    ``micro_batch``: the pairs per forward/backward, kept across updates (default: a new
    :class:`~agents.common.micro_batch.MicroBatchSize` of ``train.batch_size``). When a micro-batch
    runs out of memory, the size halves and the chunk is recomputed from a zero gradient: the update
    is then exactly that of the smaller configured size.

    Statistics stay on the device until the end; the only host sync per optimizer step is the
    finiteness check of the chunk's loss and gradient norm, made before the step.

    Data-parallel (``shard`` given): the pairs are shuffled in the global order, each process
    back-propagates its own pairs of each chunk (loss divided by the global chunk size), and the
    gradients (with the chunk loss) are summed across processes before clipping and stepping.
    """
    t = config.train
    dist = dist if dist is not None else Distributed()
    micro_batch = micro_batch if micro_batch is not None else MicroBatchSize(t.batch_size)
    params = list(policy.trainable_parameters())
    world = shard.world_size if shard is not None else 1
    batch_envs = config.sample.num_envs // world
    n = len(buffer) * world
    # Sums over pairs (and the pair count), reduced across processes at the end.
    sums = {name: torch.zeros((), device=buffer.device) for name in ("loss", "approx_kl", "clipfrac", "kl_ref")}
    count = torch.zeros((), device=buffer.device)
    first_dev: torch.Tensor | None = None
    reset = functools.partial(optimizer.zero_grad, set_to_none=True)
    policy.train()
    for _ in range(t.num_inner_epochs):
        order = torch.randperm(n, generator=generator)
        if keep_pairs is not None:
            order = order[keep_pairs[order].cpu()]
        for chunk in order.tensor_split(t.gradient_updates_per_epoch):
            if chunk.numel() == 0:
                continue
            reset()
            mine = _owned_pairs(chunk, batch_envs, shard)
            part = micro_batch.run(
                functools.partial(_chunk_gradient, policy, buffer, mine, chunk.numel(), t, reference), reset
            )
            for name, value in part.sums.items():
                sums[name] += value
            count += part.count
            first_dev = part.first_dev if first_dev is None else first_dev
            chunk_loss = part.loss
            if dist.enabled:  # sum the gradients (and the chunk loss) of all processes, in one bucketed pass
                for p in params:
                    if p.grad is None:  # no pair of this chunk here: contribute zeros
                        p.grad = torch.zeros_like(p)
                chunk_loss = chunk_loss.reshape(1)
                dist.all_reduce_([chunk_loss, *(p.grad for p in params)])
                chunk_loss = chunk_loss[0]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
            if not bool(torch.isfinite(chunk_loss) & torch.isfinite(grad_norm)):
                raise TrainingDivergedError(
                    f"the PPO-IS loss is {chunk_loss.item()} and the gradient norm {grad_norm.item()} (NaN/Inf): "
                    "stopping before the optimizer step; no weights or checkpoints were changed. "
                    "Lower train.learning_rate or check the reward."
                )
            optimizer.step()
    policy.eval()
    totals = torch.stack([*sums.values(), count])
    first = torch.full((1,), -1.0, device=buffer.device) if first_dev is None else first_dev.reshape(1).float()
    dist.all_reduce_([totals])
    dist.all_reduce_([first], op="max")
    total_count = max(totals[-1].item(), 1.0)
    out = {name: value / total_count for name, value in zip(sums, totals[:-1].tolist(), strict=True)}
    out["first_ratio_max_dev"] = float("nan") if first.item() < 0 else first.item()
    out["micro_batch_size"] = float(micro_batch.size)
    return out


@torch.no_grad()
def evaluate_reward(
    policy: DiffusionPolicy,
    reward_fn: Callable,
    config: Config,
    sample_shape: tuple[int, ...],
    num_classes: int | None,
) -> tuple[metrics.MeanStd, torch.Tensor]:
    """Reward (mean, standard error) of ``eval.num_samples`` images from fixed noise, and the images.

    The noise is the same for every model and epoch (``eval.seed``), so evaluations are paired.
    """
    n = config.eval.num_samples
    conditions = torch.arange(n) % num_classes if num_classes else None
    images = sampling.generate(
        policy.denoiser(), policy.schedule, n, sample_shape, conditions, seed=config.eval.seed, device=config.device
    )
    images = sampling.to_unit_range(images)
    c = conditions.to(config.device) if conditions is not None else None
    rewards = reward_fn(images, c)
    return metrics.mean_and_standard_error(rewards.float().cpu()), images


def _save_grid(images: torch.Tensor, path: Path, num_classes: int | None) -> None:
    from torchvision.utils import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    save_image(images, tmp, nrow=num_classes or int(len(images) ** 0.5), padding=1, pad_value=0.5)
    tmp.replace(path)


class _NoWriter:
    """Stands in for the TensorBoard writer on ranks other than 0 (only rank 0 logs)."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def _check_world_size(config: Config, dist: Distributed) -> None:
    n = config.sample.num_envs
    if n % dist.world_size:
        valid = [d for d in range(1, n + 1) if n % d == 0]
        raise ConfigError(
            f"sample.num_envs ({n}) must be divisible by the number of processes (WORLD_SIZE={dist.world_size}): "
            f"each process collects num_envs / WORLD_SIZE episodes of every batch; valid process counts for "
            f"num_envs={n}: {valid} (or change sample.num_envs)"
        )


def _gather_trajectories(buffer: RolloutBuffer, dist: Distributed, num_batches: int) -> dict[str, torch.Tensor]:
    """The whole batch's rewards, groups, conditions and start steps, in the single-process order.

    Each process holds ``num_batches`` blocks of its ``b`` episodes; gathered rank by rank, they are
    reordered batch by batch, as one process with all the envs would have stored them.
    """
    local = {
        "rewards": buffer.rewards,
        "groups": buffer.groups,
        "conditions": buffer.conditions,
        "starts": buffer.start_steps,
    }
    if not dist.enabled:
        return local
    packed = torch.stack([v.double() for v in local.values()], dim=1)  # exact for float32 and ids < 2**53
    rows = dist.all_gather_cat(packed)  # (world · batches · b, 4): rank-major
    rows = rows.view(dist.world_size, num_batches, -1, len(local)).transpose(0, 1)
    starts = rows[..., 3]
    if not bool((starts == starts[:, :1, :1]).all()):
        raise DistributedError(
            f"rank {dist.rank}: the processes started a batch from different steps "
            f"({starts[:, :, 0].tolist()} per batch and rank): the env RNG or HRF-D choice diverged"
        )
    flat = rows.reshape(-1, len(local))
    return {
        "rewards": flat[:, 0].float(),
        "groups": flat[:, 1].long(),
        "conditions": flat[:, 2].long(),
        "starts": flat[:, 3].long(),
    }


def _local_rows(values: torch.Tensor, dist: Distributed, num_batches: int) -> torch.Tensor:
    """This process's episodes of a whole-batch tensor in single-process order (inverse of the gather)."""
    if not dist.enabled:
        return values
    return values.view(num_batches, dist.world_size, -1)[:, dist.rank].reshape(-1)


def _set_advantages(
    buffer: RolloutBuffer,
    batch: dict[str, torch.Tensor],
    config: Config,
    tracker: PerConditionStatTracker,
    dist: Distributed,
    num_batches: int,
) -> tuple[torch.Tensor | None, dict[str, float]]:
    """Compute the epoch's advantages into ``buffer``; returns DRIFT's kept-episode mask and statistics.

    Without DRIFT: one advantage per trajectory (:func:`compute_advantages`). With DRIFT's subset
    the advantages are computed over the kept trajectories only (the others get 0 and are left out
    of the update); with its diversity shaping they are per (trajectory, step)
    (:func:`shaped_step_advantages`).
    """
    t, d = config.train, config.drift
    rewards, groups, conditions = batch["rewards"], batch["groups"], batch["conditions"]
    keys = group_keys(groups, conditions)
    keep = concentrated_subset(rewards, keys, d.subset_fraction) if d.subset_fraction < 1 else None
    kept = keep if keep is not None else torch.ones_like(rewards, dtype=torch.bool)
    stats: dict[str, float] = {}
    if d.enabled:
        stats["kept_fraction"] = kept.float().mean().item()
    if d.diversity_coef > 0:
        final = torch.cat(buffer.final_potentials)
        per_batch = shaped_step_advantages(
            rewards, final, buffer.potentials, keys, kept, d.diversity_coef, t.adv_clip_max
        )
        width = final.numel() // num_batches // dist.world_size  # this process's envs per batch
        cols = slice(dist.rank * width, (dist.rank + 1) * width)
        local = [adv[:, cols] for adv in per_batch]
        buffer.set_pair_advantages(torch.cat([a.reshape(-1) for a in local]))
        stats["final_diversity"] = final.mean().item()
    else:
        advantages = torch.zeros_like(rewards)
        advantages[kept] = compute_advantages(
            rewards[kept], groups[kept], conditions[kept], t.advantage_mode, tracker, clip=t.adv_clip_max
        )
        buffer.set_advantages(_local_rows(advantages, dist, num_batches))
    return keep, stats


def _check_same_weights(params: list[torch.Tensor], dist: Distributed, epoch: int) -> None:
    """Raise if the processes' weights differ (they must be identical after every step)."""
    if not dist.enabled:
        return
    fingerprint = torch.stack(
        [torch.stack([p.detach().double().sum(), p.detach().double().abs().sum()]) for p in params]
    )
    everyone = dist.all_gather_cat(fingerprint.reshape(1, -1))
    if not bool((everyone == everyone[:1]).all()):
        raise DistributedError(f"rank {dist.rank}: the weights differ across processes after epoch {epoch}")


def train(
    config: Config,
    *,
    run_dir: str | Path | None = None,
    resume: str | Path | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> TrainResult:
    """Run PPO-IS as configured, in this process or data-parallel under ``torchrun``.

    Under ``torchrun`` (``WORLD_SIZE > 1`` in the environment) every process calls this function with
    the same arguments; it joins the process group (gloo on CPU, NCCL on CUDA, one GPU per process,
    timeout ``config.dist_timeout_s``) and leaves it at the end. Only rank 0 writes; every rank
    returns the same statistics.

    Args:
        config: the validated configuration.
        run_dir: where logs, samples and checkpoints go (default: ``logdir/run_name``).
        resume: a checkpoint (or run dir) to continue from, bit-identically (under any number of
            processes that divides ``sample.num_envs``).
        progress: show a progress bar (rank 0).
        stop_after: stop after this many epochs *of this call* (tests, and "train 2, resume, train 2").

    Returns:
        The per-epoch statistics and the fixed-noise evaluation rewards before and after.

    Raises:
        ConfigError: when ``sample.num_envs`` is not divisible by the number of processes.
        DistributedError: when another process dies or does not answer within ``dist_timeout_s``.
    """
    dist, device = init_distributed(config.device, config.dist_timeout_s)
    try:
        _check_world_size(config, dist)
        return _train(config, dist, device, run_dir=run_dir, resume=resume, progress=progress, stop_after=stop_after)
    finally:
        dist.shutdown()


def _train(
    config: Config,
    dist: Distributed,
    device: str,
    *,
    run_dir: str | Path | None,
    resume: str | Path | None,
    progress: bool,
    stop_after: int | None,
) -> TrainResult:
    from tqdm.auto import tqdm

    name = config.run_name or time.strftime("ppo_is-%Y%m%d-%H%M%S")
    run_dir = dist.broadcast_object(Path(run_dir) if run_dir is not None else Path(config.logdir) / name)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(config))
    if device != config.device:  # under torchrun each process drives cuda:<LOCAL_RANK>
        config = config.model_copy(update={"device": device})
    _seed_everything(config.seed)

    loaded = load_model(config.model, scheduler=config.sample.scheduler, device=config.device)
    schedule = sampling.make_schedule(
        loaded.scheduler, config.sample.num_steps, eta=config.sample.eta, device=config.device
    )
    autocast = torch.bfloat16 if config.mixed_precision == "bf16" else None
    d = config.drift
    condition_noise = ConditionNoise(d.condition_noise, d.condition_noise_tau) if d.condition_noise > 0 else None
    fast = {"channels_last": config.channels_last, "compile": config.compile, "condition_noise": condition_noise}
    policy = DiffusionPolicy(
        loaded.unet, schedule, autocast, gradient_checkpointing=config.train.gradient_checkpointing, **fast
    )
    reference = None
    if config.train.kl_coef > 0:
        reference = DiffusionPolicy(copy.deepcopy(loaded.unet).requires_grad_(False), schedule, autocast, **fast)
    if config.train.lora_rank > 0:
        add_lora(policy.unet, config.train.lora_rank, config.train.lora_alpha or None)
        policy.ensure_memory_format()
    envs = make_env(config, policy, loaded, dist, defer_rewards=True)
    micro_batch = MicroBatchSize(config.train.batch_size)  # halves (for the run) if a micro-batch runs out of memory
    shard = envs.core.shard
    num_batches = config.sample.num_batches_per_epoch
    t = config.train
    optimizer = torch.optim.AdamW(
        policy.trainable_parameters(),
        lr=t.learning_rate,
        betas=(t.adam_beta1, t.adam_beta2),
        weight_decay=t.weight_decay,
        eps=t.adam_epsilon,
    )
    warmup = max(1, t.warmup_epochs)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: min(1.0, (e + 1) / warmup))
    tracker = PerConditionStatTracker(t.stat_buffer_size, t.stat_min_count)
    generator = torch.Generator().manual_seed(config.seed)
    ema = copy.deepcopy(policy.unet).requires_grad_(False) if t.ema_decay > 0 else None
    result = TrainResult(run_dir=run_dir)
    writer: Any = SummaryWriter(str(run_dir / "tb")) if dist.is_main else _NoWriter()
    sample_shape = envs.core.sample_shape
    num_classes = envs.core.num_classes

    def evaluate() -> tuple[metrics.MeanStd, torch.Tensor | None]:
        """Fixed-noise evaluation on rank 0 (the whole set: same numbers as one process), shared with all."""
        images = None
        if dist.is_main:
            mean_std, images = evaluate_reward(policy, envs.core.reward_fn, config, sample_shape, num_classes)
        return metrics.MeanStd(*dist.broadcast_object(tuple(mean_std) if dist.is_main else None)), images

    start_epoch = 0
    if resume is not None:
        ckpt = load_checkpoint(latest_checkpoint(resume) or resume)
        from diffusers import UNet2DModel

        if config.train.lora_rank > 0:  # the base weights come from config.model, the adapters from here
            load_lora_state_dict(policy.unet, ckpt.extra_weights["lora"])
        else:
            policy.unet.load_state_dict(UNet2DModel.from_pretrained(ckpt.unet_dir).state_dict())
        state = ckpt.state
        optimizer.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["lr_schedule"])
        tracker.load_state_dict(state["tracker"])
        envs.load_state_dict(state["env"])
        generator.set_state(state["generator"])
        restore_rng_state(state["rng"])
        if ema is not None and "ema" in ckpt.extra_weights:
            ema.load_state_dict(ckpt.extra_weights["ema"])
        result.base_eval = metrics.MeanStd(*state["base_eval"]) if state.get("base_eval") else None
        start_epoch = ckpt.epoch + 1
    else:
        envs.reset(seed=config.seed)
        result.base_eval, images = evaluate()
        if images is not None:
            writer.add_images("eval/samples", images, 0)
            writer.add_scalar("eval/reward_mean", result.base_eval.mean, 0)
            _save_grid(images, run_dir / "samples" / "epoch-0000.png", num_classes)

    last = config.num_epochs if stop_after is None else min(config.num_epochs, start_epoch + stop_after)
    bar = tqdm(range(start_epoch, last), disable=not progress or not dist.is_main, desc="PPO-IS", unit="epoch")
    for epoch in bar:
        tic = time.perf_counter()
        buffer = RolloutBuffer(config.device)
        policy.eval()
        collect(envs, policy, buffer, num_batches, generator, config.policy_noise, diversity=d.diversity_coef > 0)
        batch = _gather_trajectories(buffer, dist, num_batches)
        rewards = batch["rewards"]
        keep, drift_stats = _set_advantages(buffer, batch, config, tracker, dist, num_batches)
        keep_pairs = keep[buffer.global_pair_trajectories(dist.world_size)] if keep is not None else None
        logged = update(policy, buffer, optimizer, config, generator, reference, dist, shard, keep_pairs, micro_batch)
        lr_schedule.step()
        if ema is not None:
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), policy.unet.parameters(), strict=True):
                    p_ema.lerp_(p, 1 - t.ema_decay)

        stats = EpochStats(
            epoch=epoch,
            reward_mean=rewards.mean().item(),
            reward_std=rewards.std().item() if rewards.numel() > 1 else 0.0,
            start_steps=batch["starts"].tolist(),
            loss=logged["loss"],
            approx_kl=logged["approx_kl"],
            clipfrac=logged["clipfrac"],
            first_ratio_max_dev=logged["first_ratio_max_dev"],
            num_pairs=len(buffer) * dist.world_size,
            seconds=time.perf_counter() - tic,
            drift=drift_stats,
        )
        step = epoch + 1
        for key in ("reward_mean", "reward_std"):
            writer.add_scalar(f"reward/{key.split('_')[1]}", getattr(stats, key), step)
        for key in ("loss", "approx_kl", "clipfrac", "first_ratio_max_dev"):
            writer.add_scalar(f"train/{key}", getattr(stats, key), step)
        if logged["kl_ref"]:
            writer.add_scalar("train/kl_to_reference", logged["kl_ref"], step)
        writer.add_scalar("train/learning_rate", optimizer.param_groups[0]["lr"], step)
        writer.add_scalar("train/micro_batch_size", logged["micro_batch_size"], step)
        for key, value in stats.drift.items():
            writer.add_scalar(f"drift/{key}", value, step)
        writer.add_histogram("window/start_step", np.asarray(stats.start_steps), step)
        writer.add_scalar("time/epoch_seconds", stats.seconds, step)
        if step % config.eval.every == 0 or step == config.num_epochs:
            result.final_eval, images = evaluate()
            stats.eval_reward_mean = result.final_eval.mean
            writer.add_scalar("eval/reward_mean", stats.eval_reward_mean, step)
            if images is not None:
                writer.add_images("eval/samples", images, step)
                _save_grid(images, run_dir / "samples" / f"epoch-{step:04d}.png", num_classes)
        result.epochs.append(stats)
        bar.set_postfix(reward=f"{stats.reward_mean:.3f}", kl=f"{stats.approx_kl:.2e}", start=stats.start_steps[0])

        if step % config.save_every == 0 or step == last:
            _check_same_weights(list(policy.unet.parameters()), dist, epoch)
            env_state = envs.state_dict()  # collective under torchrun: the whole batch's episodes
            if dist.is_main:
                state = {
                    "epoch": epoch,
                    "optimizer": optimizer.state_dict(),
                    "lr_schedule": lr_schedule.state_dict(),
                    "tracker": tracker.state_dict(),
                    "env": env_state,
                    "generator": generator.get_state(),
                    "rng": capture_rng_state(),
                    "config": config.model_dump(mode="json"),
                    "base_eval": tuple(result.base_eval) if result.base_eval is not None else None,
                }
                extra = {"ema": ema.state_dict()} if ema is not None else {}
                if config.train.lora_rank > 0:
                    extra["lora"] = lora_state_dict(policy.unet)
                save_checkpoint(
                    run_dir,
                    epoch,
                    merged_copy(policy.unet) if config.train.lora_rank > 0 else policy.unet,
                    state,
                    keep=config.keep_checkpoints,
                    extra_weights=extra,
                    scheduler=loaded.scheduler,
                )
            dist.barrier()  # a checkpoint is complete on disk before any rank goes on (or returns)
    writer.close()
    return result
