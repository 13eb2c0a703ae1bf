"""The on-policy runner under every agent (the role of Stable-Baselines3's ``OnPolicyAlgorithm``).

:class:`OnPolicyRunner` owns what every algorithm needs and none should write again:

* joining the ``torchrun`` job (a do-nothing :class:`~agents.common.distributed.Distributed` in one
  process), seeding, loading the model and its sampling schedule;
* the run directory (``config.yaml``, TensorBoard logs under ``tb/``, sample grids under
  ``samples/``, checkpoints under ``checkpoints/``), written by rank 0 only;
* the fixed-noise evaluation (reward mean and standard error, image grid) before training and every
  ``eval.every`` epochs, on the same noise for every model and epoch;
* the epoch loop with a progress bar, the divergence check (no non-finite weights are ever evaluated
  or saved), and checkpoints through one typed :class:`TrainerState`, so that ``resume`` continues a
  run bit for bit.

An algorithm (:class:`Algorithm`) says only what is its own: the policy and env it builds, one
epoch of collection and update, its statistics and its state. PPO-IS (:mod:`agents.ppo_is`) and
VARD (:mod:`agents.vard`) are two; :mod:`agents.algorithms` maps a config's ``algo`` to its class.
"""

from __future__ import annotations

import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from diffusion_gym import metrics, sampling
from diffusion_gym.envs import DiffusionDenoiseVectorEnv
from diffusion_gym.models import LoadedModel, load_model

from .checkpoint import Checkpoint, CheckpointError, capture_rng_state, load_checkpoint, restore_rng_state
from .checkpoint import save_checkpoint as _save_checkpoint
from .config import ConfigError, RunConfig, dump_config
from .distributed import DEFAULT_TIMEOUT_S, Distributed, init_distributed
from .policy import DiffusionPolicy

__all__ = [
    "Algorithm",
    "EpochStats",
    "OnPolicyRunner",
    "RunContext",
    "TrainResult",
    "TrainerState",
    "TrainingDivergedError",
    "evaluate_policy",
    "save_grid",
    "seed_everything",
]


class TrainingDivergedError(RuntimeError):
    """The loss, a gradient or the weights became NaN/Inf: training stops before anything is saved."""


@dataclass(kw_only=True)
class EpochStats:
    """What every epoch logs; an algorithm's statistics add their own fields."""

    epoch: int
    reward_mean: float
    reward_std: float
    seconds: float = 0.0
    eval_reward_mean: float | None = None

    def scalars(self) -> dict[str, float]:
        """TensorBoard tag -> value of this epoch's statistics (the runner adds time and evaluation)."""
        return {"reward/mean": self.reward_mean, "reward/std": self.reward_std}

    def postfix(self) -> dict[str, str]:
        """What the progress bar shows."""
        return {"reward": f"{self.reward_mean:.3f}"}


@dataclass
class TrainResult:
    """The outcome of a run: per-epoch statistics and the fixed-noise evaluation before and after."""

    run_dir: Path
    epochs: list[Any] = field(default_factory=list)
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


@dataclass
class TrainerState:
    """Everything a checkpoint holds besides weights, to continue a run exactly.

    The runner's part is typed here; :attr:`algorithm` is the algorithm's own
    (:meth:`Algorithm.state_dict`: optimizer, learning-rate schedule, trackers...).
    """

    epoch: int
    """The last finished epoch (0-based)."""
    algo: str
    """The algorithm that wrote it."""
    config: dict[str, Any]
    """The run's config (JSON form)."""
    env: dict[str, Any]
    """The vector env's RNG, window and open episodes."""
    generator: Tensor
    """State of the trainer's CPU generator (rollout noise, shuffles)."""
    rng: dict[str, Any]
    """Python, NumPy, torch and CUDA global generators (:func:`~agents.common.checkpoint.capture_rng_state`)."""
    base_eval: tuple[float, float] | None
    """The base model's fixed-noise evaluation (mean, standard error)."""
    algorithm: dict[str, Any]
    """The algorithm's own state."""

    def to_dict(self) -> dict[str, Any]:
        """Plain nested containers, for :func:`~agents.common.checkpoint.save_checkpoint`."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, state: dict[str, Any], where: str) -> TrainerState:
        """Read a checkpoint's state; ``where`` names the checkpoint in errors.

        Raises:
            CheckpointError: when a field is missing.
        """
        missing = [name for name in cls.__dataclass_fields__ if name not in state]
        if missing:
            raise CheckpointError(f"checkpoint {where}: the trainer state lacks {missing}; it was not written by this version")
        return cls(**{name: state[name] for name in cls.__dataclass_fields__})


@dataclass
class RunContext:
    """What the runner hands an algorithm when it builds it."""

    config: RunConfig
    loaded: LoadedModel
    """The model (UNet and scheduler) on the run's device."""
    schedule: sampling.DenoisingSchedule
    """The ``sample.num_steps``-step sampling schedule at ``sample.eta``."""
    dist: Distributed
    """This process's place in the job and the collectives (no-ops in one process)."""
    generator: torch.Generator
    """The trainer's CPU generator (rollout noise, shuffles): part of every checkpoint."""


class Algorithm(ABC):
    """One training algorithm run by :class:`OnPolicyRunner`.

    A subclass builds, in ``__init__``, its :attr:`policy` (a :class:`DiffusionPolicy` over the loaded
    UNet) and :attr:`envs` (the vector env, e.g. with :func:`~agents.common.collector.make_env`), and
    implements :meth:`train_epoch`. It overrides :meth:`state_dict` / :meth:`load_state_dict` and
    :meth:`extra_weights` for what it must checkpoint.
    """

    name: ClassVar[str] = ""
    supports_distributed: ClassVar[bool] = False
    """Whether it runs data-parallel under ``torchrun``."""

    policy: DiffusionPolicy
    envs: DiffusionDenoiseVectorEnv

    def __init__(self, config: Any, run: RunContext) -> None:
        self.config = config
        self.run = run

    @property
    def dist(self) -> Distributed:
        """This process's place in the job."""
        return self.run.dist

    @property
    def generator(self) -> torch.Generator:
        """The trainer's CPU generator."""
        return self.run.generator

    @classmethod
    def check_world_size(cls, config: Any, dist: Distributed) -> None:
        """Raise :class:`ConfigError` when the algorithm cannot run on ``dist.world_size`` processes."""
        if dist.enabled and not cls.supports_distributed:
            raise ConfigError(f"algo {cls.name!r} runs in one process; launch it without torchrun (WORLD_SIZE=1)")

    @abstractmethod
    def train_epoch(self, epoch: int) -> EpochStats:
        """Collect this epoch's rollouts and update the policy; return the epoch's statistics."""

    def state_dict(self) -> dict[str, Any]:
        """The algorithm's own state for checkpoints (optimizers, schedules, trackers)."""
        return {}

    def load_state_dict(self, state: dict[str, Any], extra_weights: dict[str, dict[str, Tensor]]) -> None:
        """Restore :meth:`state_dict` and :meth:`extra_weights`."""

    def extra_weights(self) -> dict[str, dict[str, Tensor]]:
        """Named tensor dicts saved next to the UNet as safetensors (EMA, LoRA adapters, a value net)."""
        return {}

    def export_unet(self) -> nn.Module:
        """The UNet to write in diffusers format (adapters merged, if any)."""
        return self.policy.unet

    def load_policy_weights(self, checkpoint: Checkpoint) -> None:
        """Load the checkpoint's UNet into :attr:`policy`."""
        from diffusers import UNet2DModel

        self.policy.unet.load_state_dict(UNet2DModel.from_pretrained(checkpoint.unet_dir).state_dict())

    def check_consistent(self, epoch: int) -> None:
        """Before a checkpoint: raise if the processes disagree (collective; nothing to do in one process)."""

    def log_extra(self, writer: Any, stats: EpochStats, step: int) -> None:
        """Log what is not a scalar (histograms...)."""


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate_policy(
    policy: DiffusionPolicy,
    reward_fn: Callable[[Tensor, Tensor | None], Tensor],
    num_samples: int,
    seed: int,
    sample_shape: tuple[int, ...],
    num_classes: int | None,
    device: str | torch.device = "cpu",
) -> tuple[metrics.MeanStd, Tensor]:
    """Reward (mean, standard error) of ``num_samples`` images from fixed noise, and the images in ``[0, 1]``.

    The initial and policy noise come from ``seed`` (:func:`diffusion_gym.sampling.generate`), so
    the base model and every fine-tuned one are evaluated on the same noise, sample for sample.
    Conditions cycle over the classes (``i % num_classes``).
    """
    conditions = torch.arange(num_samples) % num_classes if num_classes else None
    images = sampling.generate(
        policy.denoiser(), policy.schedule, num_samples, sample_shape, conditions, seed=seed, device=device
    )
    images = sampling.to_unit_range(images)
    rewards = reward_fn(images, conditions.to(device) if conditions is not None else None)
    return metrics.mean_and_standard_error(rewards.float().cpu()), images


def save_grid(images: Tensor, path: Path, num_classes: int | None) -> None:
    """Write ``images`` as a PNG grid, one column per class (atomically: a temporary file, then a rename)."""
    from torchvision.utils import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    save_image(images, tmp, nrow=num_classes or max(1, int(len(images) ** 0.5)), padding=1, pad_value=0.5)
    tmp.replace(path)


class _NoWriter:
    """Stands in for the TensorBoard writer on ranks other than 0 (only rank 0 logs)."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


class OnPolicyRunner:
    """Run an :class:`Algorithm` on a config: in this process, or data-parallel under ``torchrun``.

    Under ``torchrun`` (``WORLD_SIZE > 1``) every process builds the runner with the same arguments;
    it joins the process group (gloo on CPU, NCCL on CUDA, one GPU per process, timeout
    ``config.dist_timeout_s``) and leaves it at the end. Only rank 0 writes; every rank returns the
    same statistics.

    Args:
        algorithm: the algorithm class.
        config: its validated config.
        run_dir: where logs, samples and checkpoints go (default: ``logdir/run_name``).
        resume: a checkpoint (or run dir) to continue from, bit-identically.
        progress: show a progress bar (rank 0).
        stop_after: stop after this many epochs *of this call* ("train 2, resume, train 2").
    """

    def __init__(
        self,
        algorithm: type[Algorithm],
        config: RunConfig,
        *,
        run_dir: str | Path | None = None,
        resume: str | Path | None = None,
        progress: bool = True,
        stop_after: int | None = None,
    ) -> None:
        self.algorithm_class = algorithm
        self.config = config
        self.run_dir = run_dir
        self.resume = resume
        self.progress = progress
        self.stop_after = stop_after

    def run(self) -> TrainResult:
        """Train; returns the per-epoch statistics and the fixed-noise evaluations before and after.

        Raises:
            ConfigError: when the algorithm cannot run on this many processes.
            TrainingDivergedError: when the loss, a gradient or the weights become NaN/Inf.
            DistributedError: when another process dies or does not answer within the timeout.
        """
        timeout = getattr(self.config, "dist_timeout_s", DEFAULT_TIMEOUT_S)
        dist, device = init_distributed(self.config.device, timeout)
        try:
            self.algorithm_class.check_world_size(self.config, dist)
            return self._run(dist, device)
        finally:
            dist.shutdown()

    def _prepare_run_dir(self, dist: Distributed) -> Path:
        config = self.config
        name = config.run_name or time.strftime(f"{config.algo.replace('-', '_')}-%Y%m%d-%H%M%S")
        chosen = Path(self.run_dir) if self.run_dir is not None else Path(config.logdir) / name
        run_dir = dist.broadcast_object(chosen)
        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(dump_config(config))
        return run_dir

    def _run(self, dist: Distributed, device: str) -> TrainResult:
        from tqdm.auto import tqdm

        config = self.config
        run_dir = self._prepare_run_dir(dist)
        if device != config.device:  # under torchrun each process drives cuda:<LOCAL_RANK>
            config = config.model_copy(update={"device": device})
        seed_everything(config.seed)
        loaded = load_model(config.model, scheduler=config.sample.scheduler, device=config.device)
        s = config.sample
        schedule = sampling.make_schedule(loaded.scheduler, s.num_steps, eta=s.eta, device=config.device)
        generator = torch.Generator().manual_seed(config.seed)
        algo = self.algorithm_class(config, RunContext(config, loaded, schedule, dist, generator))
        self._session = _Session(config, run_dir, algo, dist, loaded)
        result = TrainResult(run_dir=run_dir)
        start = self._restore(result) if self.resume is not None else self._begin(result)
        last = config.num_epochs if self.stop_after is None else min(config.num_epochs, start + self.stop_after)
        desc = algo.name.upper()
        bar = tqdm(range(start, last), disable=not self.progress or not dist.is_main, desc=desc, unit="epoch")
        for epoch in bar:
            stats = self._epoch(epoch, result)
            bar.set_postfix(**stats.postfix())
            if (epoch + 1) % config.save_every == 0 or epoch + 1 == last:
                self._session.save(epoch, result)
        self._session.writer.close()
        return result

    def _begin(self, result: TrainResult) -> int:
        session = self._session
        session.algo.envs.reset(seed=session.config.seed)
        result.base_eval = session.evaluate(step=0)
        return 0

    def _restore(self, result: TrainResult) -> int:
        session = self._session
        ckpt = load_checkpoint(self.resume)
        state = TrainerState.from_dict(ckpt.state, str(ckpt.path))
        if state.algo != session.config.algo:
            raise CheckpointError(
                f"checkpoint {ckpt.path} was written by algo {state.algo!r}, this run is {session.config.algo!r}: "
                f"resume it with --algo {state.algo}"
            )
        algo = session.algo
        algo.load_policy_weights(ckpt)
        algo.load_state_dict(state.algorithm, ckpt.extra_weights)
        algo.envs.load_state_dict(state.env)
        algo.generator.set_state(state.generator)
        restore_rng_state(state.rng)
        result.base_eval = metrics.MeanStd(*state.base_eval) if state.base_eval else None
        return ckpt.epoch + 1

    def _epoch(self, epoch: int, result: TrainResult) -> EpochStats:
        session, config = self._session, self._session.config
        tic = time.perf_counter()
        stats = session.algo.train_epoch(epoch)
        stats.seconds = time.perf_counter() - tic
        session.check_finite(epoch)
        step = epoch + 1
        writer = session.writer
        for tag, value in stats.scalars().items():
            writer.add_scalar(tag, value, step)
        session.algo.log_extra(writer, stats, step)
        writer.add_scalar("time/epoch_seconds", stats.seconds, step)
        if step % config.eval.every == 0 or step == config.num_epochs:
            result.final_eval = session.evaluate(step)
            stats.eval_reward_mean = result.final_eval.mean
        result.epochs.append(stats)
        return stats


class _Session:
    """The parts of one run the runner's steps share: config, directory, algorithm, writer."""

    def __init__(self, config: Any, run_dir: Path, algo: Algorithm, dist: Distributed, loaded: LoadedModel) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.config, self.run_dir, self.algo, self.dist, self.loaded = config, run_dir, algo, dist, loaded
        self.writer: Any = SummaryWriter(str(run_dir / "tb")) if dist.is_main else _NoWriter()
        self.base_eval: metrics.MeanStd | None = None

    def evaluate(self, step: int) -> metrics.MeanStd:
        """Fixed-noise evaluation on rank 0 (logged, grid written), shared with every rank."""
        e, core = self.config.eval, self.algo.envs.core
        mean_std = None
        if self.dist.is_main:
            mean_std, images = evaluate_policy(
                self.algo.policy, core.reward_fn, e.num_samples, e.seed, core.sample_shape, core.num_classes,
                self.config.device,
            )  # fmt: skip
            self.writer.add_images("eval/samples", images, step)
            self.writer.add_scalar("eval/reward_mean", mean_std.mean, step)
            save_grid(images, self.run_dir / "samples" / f"epoch-{step:04d}.png", core.num_classes)
        shared = metrics.MeanStd(*self.dist.broadcast_object(tuple(mean_std) if mean_std is not None else None))
        if step == 0:
            self.base_eval = shared
        return shared

    def check_finite(self, epoch: int) -> None:
        """Raise :class:`TrainingDivergedError` if a trainable weight is NaN/Inf (before evaluating or saving)."""
        params = list(self.algo.policy.trainable_parameters())
        if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            raise TrainingDivergedError(
                f"epoch {epoch}: the weights are NaN/Inf after the optimizer step; nothing of this epoch was saved "
                "(the last checkpoint is intact). Lower train.learning_rate or check the reward."
            )

    def save(self, epoch: int, result: TrainResult) -> None:
        """Write the epoch's checkpoint (rank 0), after every process has checked it agrees."""
        algo, dist = self.algo, self.dist
        algo.check_consistent(epoch)
        env_state = algo.envs.state_dict()  # collective under torchrun: the whole batch's episodes
        if dist.is_main:
            base = result.base_eval
            state = TrainerState(
                epoch=epoch,
                algo=self.config.algo,
                config=self.config.model_dump(mode="json"),
                env=env_state,
                generator=algo.generator.get_state(),
                rng=capture_rng_state(),
                base_eval=tuple(base) if base is not None else None,
                algorithm=algo.state_dict(),
            )
            _save_checkpoint(
                self.run_dir,
                epoch,
                algo.export_unet(),
                state.to_dict(),
                keep=self.config.keep_checkpoints,
                extra_weights=algo.extra_weights(),
                scheduler=self.loaded.scheduler,
            )
        dist.barrier()  # a checkpoint is complete on disk before any rank goes on (or returns)
