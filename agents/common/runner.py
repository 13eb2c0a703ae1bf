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

import copy
import json
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
from diffusion_gym.conditions import ConditionSet, make_conditions
from diffusion_gym.envs import DenoiseCore, DiffusionDenoiseVectorEnv
from diffusion_gym.families import ModelFamily, load_family
from diffusion_gym.rewards import evaluation_mode, weighted_rewards_of

from ..prompt_following import prompt_following_metrics
from .checkpoint import Checkpoint, CheckpointError, capture_rng_state, load_checkpoint, restore_rng_state
from .checkpoint import save_checkpoint as _save_checkpoint
from .config import ConfigError, RunConfig, dump_config
from .distributed import DEFAULT_TIMEOUT_S, Distributed, init_distributed
from .monitors import BaseKL, EvaluationMonitors
from .policy import DiffusionPolicy
from .run_dir import check_resume_config, check_run_dir, checkpoint_run_dir, prepare_run_dir

__all__ = [
    "Algorithm",
    "EpochStats",
    "OnPolicyRunner",
    "RunContext",
    "TrainResult",
    "TrainerState",
    "TrainingDivergedError",
    "evaluate_policy",
    "evaluation_conditions",
    "evaluation_schedule",
    "fixed_noise_rewards",
    "prompt_metrics",
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
    stopped_early: str | None = None
    """Why the run stopped before ``num_epochs`` (the hacking monitor fired with ``eval.early_stop``)."""

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
    """Epochs finished (the checkpoint ``epoch-000003`` is written after the third epoch)."""
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
            raise CheckpointError(
                f"checkpoint {where}: the trainer state lacks {missing}; it was not written by this version"
            )
        return cls(**{name: state[name] for name in cls.__dataclass_fields__})


@dataclass
class RunContext:
    """What the runner hands an algorithm when it builds it."""

    config: RunConfig
    family: ModelFamily
    """The model (its trainable UNet, scheduler and frozen parts) on the run's device."""
    conditions: ConditionSet
    """What the env's condition ids mean (class ids, or the prompts of ``env.prompts``): shared by the
    policy and the env."""
    schedule: sampling.Schedule
    """The ``sample.num_steps``-step sampling schedule at ``sample.eta``, every step stochastic (a flow
    env's SDE window picks each batch's stochastic steps: ``envs.core.schedule``)."""
    dist: Distributed
    """This process's place in the job and the collectives (no-ops in one process)."""
    generator: torch.Generator
    """The trainer's CPU generator (rollout noise, shuffles): part of every checkpoint."""
    phase: Callable[[str], None] = lambda name: None
    """Tell the person watching what the epoch is doing now (``"rollout"``, ``"update"``, ...)."""

    def make_policy(self, network: nn.Module | None = None, **options: Any) -> DiffusionPolicy:
        """A :class:`DiffusionPolicy` over the run's model, conditions, schedule and guidance scale.

        Args:
            network: another copy of the denoiser to read as the policy (e.g. a frozen reference for
                a KL penalty); default: the family's own denoiser (the one that is trained).
            **options: the policy's speed options and DRIFT's condition noise.
        """
        family = self.family if network is None else self.family.with_denoiser(network)
        guidance = self.config.sample.guidance_scale
        return DiffusionPolicy(family, self.schedule, conditions=self.conditions, guidance_scale=guidance, **options)


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

    def load_state_dict(self, state: dict[str, Any], extra_weights: dict[str, dict[str, Tensor]]) -> None:  # noqa: B027
        """Restore :meth:`state_dict` and :meth:`extra_weights` (nothing to restore by default)."""

    def extra_weights(self) -> dict[str, dict[str, Tensor]]:
        """Named tensor dicts saved next to the UNet as safetensors (EMA, LoRA adapters, a value net)."""
        return {}

    def export_unet(self) -> nn.Module | None:
        """The UNet to write in diffusers format (adapters merged, if any); ``None``: no ``unet/`` folder."""
        return self.policy.unet

    def exports(self) -> dict[str, Callable[[Path], None]]:
        """``{folder: write}`` written into each checkpoint (e.g. a LoRA folder in diffusers' format)."""
        return {}

    def load_policy_weights(self, checkpoint: Checkpoint) -> None:
        """Load the checkpoint's network (saved in diffusers format, whatever its class) into :attr:`policy`."""
        saved = type(self.policy.unet).from_pretrained(checkpoint.unet_dir)
        self.policy.unet.load_state_dict(saved.state_dict())

    def check_consistent(self, epoch: int) -> None:  # noqa: B027 - a hook with nothing to do by default
        """Before a checkpoint: raise if the processes disagree (collective; nothing to do in one process)."""

    def log_extra(self, writer: Any, stats: EpochStats, step: int) -> None:  # noqa: B027 - an optional hook
        """Log what is not a scalar (histograms...)."""


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@torch.no_grad()
def fixed_noise_rewards(
    policy: DiffusionPolicy,
    core: DenoiseCore,
    num_samples: int,
    seed: int,
    device: str | torch.device = "cpu",
    schedule: sampling.Schedule | None = None,
    conditions: ConditionSet | None = None,
    base_kl: BaseKL | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-sample rewards ``(num_samples,)`` of images from fixed noise, and the images in ``[0, 1]``.

    The initial and policy noise come from ``seed`` (:func:`diffusion_gym.sampling.generate`), so
    the base model and every fine-tuned one are evaluated on the same noise, sample for sample (their
    differences are paired). Conditions cycle over the env's conditions in order (``i % num_classes``;
    a text model's prompt list), and a latent model's samples are decoded by its VAE before the reward.
    ``schedule``: the evaluation chain (default: the policy's, the one it is trained on);
    ``conditions``: the evaluation's conditions (default: the env's; e.g. held-out prompts);
    ``base_kl``: measures each sample's KL to the base model along the way (its denoiser runs the chain).
    """
    conditions = core.conditions if conditions is None else conditions
    ids = conditions.evaluation_ids(num_samples).to(device)
    schedule = policy.schedule if schedule is None else schedule
    denoiser = policy.denoiser() if base_kl is None else base_kl.start(policy.denoiser(), schedule)
    states = sampling.generate(
        denoiser,
        schedule,
        num_samples,
        core.sample_shape,
        conditions.denoiser_input(ids),
        seed=seed,
        device=device,
        on_step=None if base_kl is None else base_kl.on_step,
    )
    images = core.decode(states)
    return core.reward_fn(images, conditions.reward_input(ids)).float().cpu(), images


def evaluate_policy(
    policy: DiffusionPolicy,
    core: DenoiseCore,
    num_samples: int,
    seed: int,
    device: str | torch.device = "cpu",
    schedule: sampling.Schedule | None = None,
    conditions: ConditionSet | None = None,
    base_kl: BaseKL | None = None,
) -> tuple[metrics.MeanStd, Tensor]:
    """Reward (mean, standard error) of :func:`fixed_noise_rewards`, and the images in ``[0, 1]``."""
    rewards, images = fixed_noise_rewards(policy, core, num_samples, seed, device, schedule, conditions, base_kl)
    return metrics.mean_and_standard_error(rewards), images


def evaluation_schedule(config: RunConfig, family: ModelFamily) -> sampling.Schedule | None:
    """The chain of the fixed-noise evaluation; ``None`` (the training chain itself) when ``eval`` sets none.

    ``eval.num_steps`` steps at ``eval.eta``, each defaulting to ``sample``'s, with no SDE window.
    """
    e, s = config.eval, config.sample
    if e.num_steps is None and e.eta is None:
        return None
    steps = s.num_steps if e.num_steps is None else e.num_steps
    eta = s.eta if e.eta is None else e.eta
    return sampling.make_schedule(family.scheduler, steps, eta, config.device)


def evaluation_conditions(config: RunConfig, family: ModelFamily) -> ConditionSet | None:
    """The conditions of the fixed-noise evaluation: ``eval.prompts`` of a text model, or ``None`` (the env's).

    Raises:
        ConfigError: when ``eval.prompts`` is set for a model that takes no prompts.
    """
    prompts = config.eval.prompts
    if prompts is None:
        return None
    if not family.text_conditioned:
        raise ConfigError(
            f"eval.prompts is for text-to-image models; {config.model!r} takes no prompts: set eval.prompts to null"
        )
    return make_conditions(family, prompts, config.env.negative_prompt)


def prompt_metrics(reward_fn: Any, images: Tensor, conditions: ConditionSet, num_samples: int) -> dict[str, float]:
    """Prompt-following metrics of evaluation images when the reward is a prompt-following one, else ``{}``.

    A reward with a ``scorer`` (``prompt_match``, ``prompt_match_smooth``) gives the accuracy, the
    hacking guards and the within-prompt diversity of :func:`agents.prompt_following.prompt_following_metrics`.
    """
    scorer = getattr(reward_fn, "scorer", None)
    if scorer is None:
        return {}
    prompts = conditions.reward_input(conditions.evaluation_ids(num_samples))
    return prompt_following_metrics(scorer, images, prompts)


GRID_MAX_COLUMNS = 16
"""An evaluation grid has one column per condition up to this many conditions."""


def grid_columns(conditions: ConditionSet) -> int | None:
    """Columns of an evaluation grid: one per condition (a class, a prompt) up to 16; ``None``: a square grid."""
    if not conditions.conditional or conditions.size > GRID_MAX_COLUMNS:
        return None
    return conditions.size


def save_grid(images: Tensor, path: Path, num_classes: int | None) -> None:
    """Write ``images`` as a PNG grid, one column per class, upscaled (atomically: a temporary file, then a rename)."""
    from torchvision.utils import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    save_image(grid_image(images, num_classes), tmp)
    tmp.replace(path)


def _flat_scalars(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The config's leaves as TensorBoard hparams (numbers, strings and booleans; others as text)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat_scalars(value, f"{prefix}{key}."))
        elif isinstance(value, int | float | str | bool):
            out[f"{prefix}{key}"] = value
        elif value is not None:
            out[f"{prefix}{key}"] = str(value)
    return out


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
        progress: show progress (rank 0): a bar on a terminal, plain lines otherwise.
        stop_after: stop after this many epochs *of this call* ("train 2, resume, train 2").
        overwrite: replace another run found in ``run_dir`` (otherwise that is an error).
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
        overwrite: bool = False,
    ) -> None:
        self.algorithm_class = algorithm
        self.config = config
        self.run_dir = run_dir
        self.resume = resume
        self.progress = progress
        self.stop_after = stop_after
        self.overwrite = overwrite

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

    def _choose_run_dir(self, dist: Distributed, checkpoint: Checkpoint | None) -> Path:
        """The run directory, refused now if another run holds it (nothing is written yet)."""
        config = self.config
        if self.run_dir is not None:
            chosen = Path(self.run_dir)
        elif checkpoint is not None:  # a resumed run continues in its own directory
            chosen = checkpoint_run_dir(checkpoint)
        else:
            name = config.run_name or time.strftime(f"{config.algo.replace('-', '_')}-%Y%m%d-%H%M%S")
            chosen = Path(config.logdir) / name
        run_dir = dist.broadcast_object(chosen)
        resuming = checkpoint_run_dir(checkpoint) if checkpoint is not None else None
        check_run_dir(run_dir, resuming=resuming, overwrite=self.overwrite)
        return run_dir

    def _write_run_dir(self, dist: Distributed, run_dir: Path, checkpoint: Checkpoint | None) -> None:
        """Take the run directory (once the model and algorithm are built): replace another run, write the config."""
        config = self.config
        if dist.is_main:
            resuming = checkpoint_run_dir(checkpoint) if checkpoint is not None else None
            prepare_run_dir(run_dir, resuming=resuming, overwrite=self.overwrite)
            tmp = run_dir / "config.yaml.tmp"
            tmp.write_text(dump_config(config))
            tmp.replace(run_dir / "config.yaml")
        dist.barrier()

    def _load_resume(self) -> Checkpoint | None:
        if self.resume is None:
            return None
        checkpoint = load_checkpoint(self.resume)
        saved = checkpoint.state.get("config")
        if not isinstance(saved, dict):
            raise CheckpointError(
                f"checkpoint {checkpoint.path} holds no run config: it was not written by this version"
            )
        if saved.get("algo") != self.config.algo:
            raise CheckpointError(
                f"checkpoint {checkpoint.path} was written by algo {saved.get('algo')!r}, this run is "
                f"{self.config.algo!r}: resume it with --algo {saved.get('algo')} (or just --resume {self.resume})"
            )
        check_resume_config(saved, self.config, str(checkpoint.path))
        return checkpoint

    def _run(self, dist: Distributed, device: str) -> TrainResult:
        config = self.config
        checkpoint = self._load_resume()  # before anything is written: a refused run leaves no trace
        run_dir = self._choose_run_dir(dist, checkpoint)
        if device != config.device:  # under torchrun each process drives cuda:<LOCAL_RANK>
            config = config.model_copy(update={"device": device})
        seed_everything(config.seed)
        s = config.sample
        family = load_family(config.model, scheduler=s.scheduler, device=config.device, resolution=s.resolution)
        conditions = make_conditions(family, config.env.prompts, config.env.negative_prompt)
        eval_conditions = evaluation_conditions(config, family)
        schedule = sampling.make_schedule(family.scheduler, s.num_steps, s.eta, config.device)  # every step SDE
        generator = torch.Generator().manual_seed(config.seed)
        progress = Progress(self.algorithm_class.name.upper(), enabled=self.progress and dist.is_main)
        context = RunContext(config, family, conditions, schedule, dist, generator, progress.phase)
        algo = self.algorithm_class(config, context)
        self._write_run_dir(dist, run_dir, checkpoint)
        base = None
        if config.eval.kl_to_base and dist.is_main:  # evaluation runs on rank 0: a frozen copy of the weights
            # before any training or resumed checkpoint
            base = context.make_policy(copy.deepcopy(family.denoiser).requires_grad_(False))
        self._session = _Session(config, run_dir, algo, dist, family, progress, eval_conditions, base)
        result = TrainResult(run_dir=run_dir)
        start = self._restore(checkpoint, result) if checkpoint is not None else 0
        last = config.num_epochs if self.stop_after is None else min(config.num_epochs, start + self.stop_after)
        window = algo.envs.window.describe()
        progress.log(describe_run(config, window, run_dir, start, last, resumed=checkpoint is not None))
        if checkpoint is None:
            self._begin(result)
        progress.start(start, last, config.num_epochs)
        for epoch in range(start, last):
            stats = self._epoch(epoch, result)
            progress.epoch_done(epoch, stats)
            stop = self._session.stop_reason
            if (epoch + 1) % config.save_every == 0 or epoch + 1 == last or stop:
                progress.phase("checkpoint")
                self._session.save(epoch + 1, result)
            if stop:
                result.stopped_early = stop
                progress.log(f"early stop after epoch {epoch + 1} (eval.early_stop): {stop}")
                break
        progress.close()
        self._session.close(result)
        return result

    def _begin(self, result: TrainResult) -> None:
        session = self._session
        session.algo.envs.reset(seed=session.config.seed)
        session.progress.log(f"evaluating the base model on {session.config.eval.num_samples} fixed-noise samples")
        result.base_eval = session.evaluate(step=0)
        session.progress.log(f"base model: eval reward {result.base_eval.mean:.4f} ± {result.base_eval.std:.4f}")

    def _restore(self, ckpt: Checkpoint, result: TrainResult) -> int:
        session = self._session
        state = TrainerState.from_dict(ckpt.state, str(ckpt.path))
        algo = session.algo
        algo.load_policy_weights(ckpt)
        algo.load_state_dict(state.algorithm, ckpt.extra_weights)
        algo.envs.load_state_dict(state.env)
        algo.generator.set_state(state.generator)
        restore_rng_state(state.rng)
        result.base_eval = metrics.MeanStd(*state.base_eval) if state.base_eval else None
        return ckpt.epoch

    def _epoch(self, epoch: int, result: TrainResult) -> EpochStats:
        session, config = self._session, self._session.config
        tic = time.perf_counter()
        session.progress.phase("rollout")
        stats = session.algo.train_epoch(epoch)
        stats.seconds = time.perf_counter() - tic
        session.train_seconds += stats.seconds
        session.check_finite(epoch)
        step = epoch + 1
        writer = session.writer
        for tag, value in stats.scalars().items():
            writer.add_scalar(tag, value, step)
        session.algo.log_extra(writer, stats, step)
        combined = weighted_rewards_of(session.algo.envs.core.reward_fn)
        for name, value in (combined.pop_means() if combined is not None else {}).items():
            writer.add_scalar(f"reward/{name}", value, step)
        writer.add_scalar("time/epoch_seconds", stats.seconds, step)
        if step % config.eval.every == 0 or step == config.num_epochs:
            session.progress.phase("evaluation")
            result.final_eval = session.evaluate(step)
            stats.eval_reward_mean = result.final_eval.mean
        result.epochs.append(stats)
        return stats


def describe_run(config: Any, window: str, run_dir: Path, start: int, last: int, resumed: bool) -> str:
    """The start-up summary: what trains on what, how much per epoch, where it is written."""
    s = config.sample
    first = f"resuming after epoch {start}" if resumed else "starting"
    return (
        f"{config.algo} on {config.model} ({config.device}), reward {config.env.reward}, window {window}: "
        f"{s.num_batches_per_epoch} batch(es) x {s.num_envs} episodes of up to {s.num_steps} steps per epoch; "
        f"{first}, epochs {start + 1}..{last} of {config.num_epochs}; run directory {run_dir}"
    )


class Progress:
    """What a person watching sees: a bar on a terminal, one plain line per epoch otherwise.

    Args:
        name: the algorithm's name, shown first.
        enabled: ``False`` prints nothing (other ranks, ``progress=False``).
    """

    def __init__(self, name: str, enabled: bool) -> None:
        import sys

        self.name, self.enabled = name, enabled
        self.interactive = enabled and sys.stderr.isatty()
        self._bar: Any = None
        self._last = self._total = 0

    def log(self, message: str) -> None:
        """One line, above the bar if there is one."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(f"[{self.name}] {message}")
        else:
            print(f"[{self.name}] {message}", flush=True)

    def start(self, first: int, last: int, total: int) -> None:
        """The epoch loop begins."""
        self._last, self._total = last, total
        if self.interactive:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=last, initial=first, desc=self.name, unit="epoch")

    def phase(self, name: str) -> None:
        """What the current epoch is doing (shown on the bar)."""
        if self._bar is not None:
            self._bar.set_description_str(f"{self.name} [{name}]")

    def epoch_done(self, epoch: int, stats: EpochStats) -> None:
        """An epoch finished: advance the bar, or print its line."""
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(**stats.postfix())
            return
        shown = ", ".join(f"{k} {v}" for k, v in stats.postfix().items())
        evaluated = f", eval reward {stats.eval_reward_mean:.4f}" if stats.eval_reward_mean is not None else ""
        self.log(f"epoch {epoch + 1}/{self._total}: {shown}{evaluated} ({stats.seconds:.1f} s)")

    def close(self) -> None:
        """The loop ended."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


GRID_PIXELS = 64
"""Sample grids show each image at least this many pixels wide (nearest-neighbour upscaling)."""


def grid_image(images: Tensor, num_classes: int | None) -> Tensor:
    """A ``(C, H, W)`` grid of ``images`` in ``[0, 1]``: ``num_classes`` columns (a condition each), upscaled."""
    from torchvision.utils import make_grid

    factor = max(1, GRID_PIXELS // images.shape[-1])
    if factor > 1:
        images = images.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    return make_grid(images, nrow=num_classes or max(1, int(len(images) ** 0.5)), padding=2, pad_value=0.5)


class _Session:
    """The parts of one run the runner's steps share: config, directory, algorithm, writer, progress."""

    def __init__(
        self,
        config: Any,
        run_dir: Path,
        algo: Algorithm,
        dist: Distributed,
        family: ModelFamily,
        progress: Progress,
        eval_conditions: ConditionSet | None = None,
        base: DiffusionPolicy | None = None,
    ) -> None:
        """``base``: the base model's policy, for the KL to it at every evaluation (``eval.kl_to_base``)."""
        from torch.utils.tensorboard import SummaryWriter

        self.config, self.run_dir, self.algo, self.dist, self.family = config, run_dir, algo, dist, family
        self.progress = progress
        self.eval_conditions = eval_conditions
        self.train_seconds = 0.0
        """Seconds this process spent in training epochs (rollout and update, not evaluation or checkpoints)."""
        self.writer: Any = SummaryWriter(str(run_dir / "tb")) if dist.is_main else _NoWriter()
        self.writer.add_text("config", "```yaml\n" + dump_config(config) + "```", 0)
        self.base_eval: metrics.MeanStd | None = None
        self.eval_schedule = evaluation_schedule(config, family)
        self.monitors = EvaluationMonitors(config.eval, run_dir / "eval.jsonl")
        self.base_kl = BaseKL(base) if base is not None else None
        self.stop_reason: str | None = None
        """Why the run stops before its last epoch (the hacking monitor fired), or ``None``."""

    def close(self, result: TrainResult) -> None:
        """Record the run's hyper-parameters with its final evaluation, and close the writer."""
        flat = _flat_scalars(self.config.model_dump(mode="json"))
        final = {"hparam/final_eval_reward": result.final_eval_reward} if result.final_eval_reward is not None else {}
        if result.base_eval_reward is not None:
            final["hparam/base_eval_reward"] = result.base_eval_reward
        if final:
            self.writer.add_hparams(flat, final, run_name="hparams")
        self.writer.close()

    def evaluate(self, step: int) -> metrics.MeanStd:
        """Fixed-noise evaluation on rank 0 (logged, grid written, a line of ``eval.jsonl``), shared with every rank.

        Sets :attr:`stop_reason` when the hacking monitor fires with ``eval.early_stop``.
        """
        mean_std, fired = self._evaluate_main(step) if self.dist.is_main else (None, None)
        shared, fired = self.dist.broadcast_object((tuple(mean_std) if mean_std is not None else None, fired))
        shared = metrics.MeanStd(*shared)
        if fired and self.config.eval.early_stop:
            self.stop_reason = fired
        if step == 0:
            self.base_eval = shared
        return shared

    def _evaluate_main(self, step: int) -> tuple[metrics.MeanStd, str | None]:
        """Rank 0's evaluation: reward, grid, prompt metrics, monitors; what fired the monitor (``None``: nothing)."""
        e, core = self.config.eval, self.algo.envs.core
        conditions = self.eval_conditions if self.eval_conditions is not None else core.conditions
        with evaluation_mode(core.reward_fn):
            mean_std, images = evaluate_policy(
                self.algo.policy,
                core,
                e.num_samples,
                e.seed,
                self.config.device,
                self.eval_schedule,
                conditions,
                self.base_kl,
            )
        columns = grid_columns(conditions)
        self.writer.add_image("eval/samples", grid_image(images, columns), step)
        self.writer.add_scalar("eval/reward_mean", mean_std.mean, step)
        extra = prompt_metrics(core.reward_fn, images, conditions, e.num_samples)
        for name, value in extra.items():
            self.writer.add_scalar(f"eval/prompt_{name}", value, step)
        ids = conditions.evaluation_ids(e.num_samples)
        measured = self.monitors.measure(images, conditions.reward_input(ids), ids.tolist(), core.reward_fn)
        if self.base_kl is not None:
            measured["kl_to_base"], measured["kl_to_base_se"] = metrics.mean_and_standard_error(self.base_kl.result())
        line = self._eval_line(step, mean_std, {**extra, **measured})
        monitor = self.monitors.check(step, line)
        for name, value in {**measured, **monitor}.items():
            if not name.endswith("_se"):
                self.writer.add_scalar(name if name.startswith("monitor/") else f"eval/{name}", value, step)
        line["monitor_fired"] = list(self.monitors.fired)
        save_grid(images, self.run_dir / "samples" / f"epoch-{step:04d}.png", columns)
        with open(self.run_dir / "eval.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        if not self.monitors.fired:
            return mean_std, None
        message = self.monitors.describe(step)
        self.progress.log(message)
        self.writer.add_text("monitor", message, step)
        return mean_std, message

    def _eval_line(self, step: int, mean_std: metrics.MeanStd, extra: dict[str, float]) -> dict[str, Any]:
        """One evaluation's line of ``eval.jsonl``: epoch, episodes, training seconds, reward, metrics."""
        s = self.config.sample
        return {
            "epoch": step,
            "episodes": step * s.num_envs * s.num_batches_per_epoch,
            "train_seconds": round(self.train_seconds, 3),
            "reward_mean": mean_std.mean,
            "reward_se": mean_std.std,
            **{name: None if value != value else value for name, value in extra.items()},  # NaN (none asked): null
        }

    def check_finite(self, epoch: int) -> None:
        """Raise :class:`TrainingDivergedError` if a trainable weight is NaN/Inf (before evaluating or saving)."""
        params = list(self.algo.policy.trainable_parameters())
        if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            raise TrainingDivergedError(
                f"epoch {epoch}: the weights are NaN/Inf after the optimizer step; nothing of this epoch was saved "
                "(the last checkpoint is intact). Lower train.learning_rate or check the reward."
            )

    def save(self, epoch: int, result: TrainResult) -> None:
        """Write the checkpoint after ``epoch`` finished epochs (rank 0), once every process has checked it agrees."""
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
                scheduler=None if self.family.text_conditioned else self.family.scheduler,
                exports=algo.exports(),
            )
        dist.barrier()  # a checkpoint is complete on disk before any rank goes on (or returns)
