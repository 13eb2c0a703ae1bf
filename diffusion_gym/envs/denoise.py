"""``DiffusionDenoise-v0``: the denoising chain of a diffusion model as a Gymnasium MDP.

Two front ends share one batched torch core (:class:`DenoiseCore`):

* :class:`DiffusionDenoiseEnv` — a single ``gymnasium.Env`` speaking numpy (passes
  ``gymnasium.utils.env_checker.check_env`` and Stable-Baselines3's ``check_env``);
* :class:`DiffusionDenoiseVectorEnv` — a native ``gymnasium.vector.VectorEnv`` whose observations,
  actions, rewards and flags are torch tensors on its device (no host round trip per step), with
  batched rewards and Gymnasium's ``SAME_STEP`` autoreset.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from diffusers import ModelMixin
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space
from torch import Tensor

from .. import sampling
from ..conditions import ConditionSet, PromptConditions, make_conditions
from ..families import ModelFamily, PixelFamily, load_family
from ..families.base import check_guidance_scale
from ..models import DEFAULT_MODEL, LoadedModel, is_embedded_digits
from ..references import ReferenceSource, make_references
from ..rewards import RewardFn, make_reward
from ..sde_windows import SdeWindow, make_sde_window
from ..windows import ProbeResult, WindowStrategy, make_window

PIXEL_BOUND = 10.0
"""Bound of the image Box spaces: noisy images are N(0, 1)-scaled, so |x| < 10 in practice."""
START_MODES = ("shared", "per_sample")

Denoiser = sampling.Denoiser


@dataclass(frozen=True)
class Shard:
    """This process's share of a batch that several processes collect together (data-parallel training).

    The *global* batch has ``num_envs × world_size`` episodes; the process of rank ``r`` holds the
    episodes ``[r · num_envs, (r + 1) · num_envs)``. Every process keeps the same RNG state, draws the
    randomness of the whole global batch (start step, references, initial noise) and keeps its
    slice, so that the union of the shards is exactly the batch one process with
    ``num_envs × world_size`` envs would collect. HRF-D probes and model-sampled references are split
    across the processes and their results gathered with ``all_gather``; the env's state is the
    global batch's, so that a checkpoint resumes under any number of processes.

    The environment library knows nothing of ``torch.distributed``: the trainer passes the
    collective in.

    Args:
        rank: this process's index in ``[0, world_size)``.
        world_size: number of processes sharing the batch.
        all_gather: ``all_gather(t)`` returns every process's ``t`` concatenated along dim 0 in rank
            order (first dims may differ); every process must call it together.
    """

    rank: int
    world_size: int
    all_gather: Callable[[Tensor], Tensor]

    def __post_init__(self) -> None:
        if not isinstance(self.world_size, int) or self.world_size < 1:
            raise ValueError(f"shard world_size must be an int >= 1, got {self.world_size!r}")
        if not isinstance(self.rank, int) or not 0 <= self.rank < self.world_size:
            raise ValueError(f"shard rank must be an int in [0, {self.world_size - 1}], got {self.rank!r}")
        if not callable(self.all_gather):
            raise TypeError(f"shard all_gather must be callable, got {self.all_gather!r}")

    def block(self, n: int) -> slice:
        """This process's rows of a global batch of ``n = world_size × m`` rows (contiguous blocks of ``m``)."""
        m = n // self.world_size
        return slice(self.rank * m, (self.rank + 1) * m)

    def part(self, n: int) -> slice:
        """This process's rows when ``n`` items (not necessarily divisible) are split as evenly as possible."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))


def _is_int(value: Any) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _check_core_args(
    *,
    num_envs: int,
    start_mode: str,
    shard: Shard | None,
    info_x0: bool,
    samples_per_reference: int,
    samples_per_condition: int,
    probe_size: int,
) -> None:
    """Raise a ``ValueError`` (``TypeError`` for a wrong type) naming a bad :class:`DenoiseCore` argument."""
    if not _is_int(num_envs) or num_envs < 1:
        raise ValueError(f"num_envs must be an int >= 1, got {num_envs!r}")
    if start_mode not in START_MODES:
        raise ValueError(f"unknown start_mode {start_mode!r}; valid choices: {list(START_MODES)}")
    if shard is not None and not isinstance(shard, Shard):
        raise TypeError(f"shard must be a diffusion_gym.envs.Shard or None, got {shard!r}")
    if shard is not None and start_mode != "shared":
        raise ValueError(
            f"a sharded env needs start_mode='shared' (got {start_mode!r}): episodes of a shared-start "
            "batch end together, so every process resets the same global batch at the same step"
        )
    if not isinstance(info_x0, bool):
        raise TypeError(f"info_x0 must be a bool, got {info_x0!r}")
    sizes = (
        ("samples_per_reference", samples_per_reference),
        ("samples_per_condition", samples_per_condition),
        ("probe_size", probe_size),
    )
    for name, value in sizes:
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _numpy_actions(actions: np.ndarray, expected: tuple[int, ...], device: torch.device) -> Tensor:
    """A numpy batch of actions (e.g. a sample of the vector env's action space) as a tensor on ``device``."""
    if actions.dtype.kind != "f":
        raise ValueError(f"actions must be a floating-point array of shape {expected}, got dtype {actions.dtype}")
    return torch.from_numpy(np.ascontiguousarray(actions)).to(device)


def _parse_device(device: str | torch.device) -> torch.device:
    """``torch.device(device)``, with one clear error for a string torch does not read."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a torch device; valid choices: 'cpu', 'cuda', 'cuda:N'") from None


def observation_timesteps(schedule: sampling.Schedule) -> Tensor:
    """The ``(K,)`` int64 timesteps the observations show: the scheduler's, a flow model's rounded.

    The observation space's ``"t"`` is ``Discrete(timestep_space_size(schedule))``.
    """
    if schedule.timesteps.is_floating_point():
        return schedule.timesteps.round().long()
    return schedule.timesteps.long()


def timestep_space_size(schedule: sampling.Schedule) -> int:
    """``n`` of the observations' ``Discrete`` ``"t"``: ``num_train_timesteps`` (1001 for a flow chain from t = 1)."""
    return max(schedule.num_train_timesteps, int(observation_timesteps(schedule).max()) + 1)


def as_family(model: str | LoadedModel | ModelFamily, scheduler: str, device: torch.device) -> ModelFamily:
    """The model family of an env's ``model`` argument (a spec is loaded with :func:`load_family`)."""
    if isinstance(model, ModelFamily):
        return model
    if isinstance(model, LoadedModel):
        return PixelFamily.from_loaded(model)
    return load_family(model, scheduler=scheduler, device=device)


class DenoiseCore:
    """The batched state machine behind both envs: ``B`` episodes as torch tensors on one device.

    Args mirror :class:`DiffusionDenoiseEnv` (see there), plus ``num_envs`` (``B``) and ``shard``
    (a :class:`Shard`: this core holds ``B`` episodes of a global batch of ``B × world_size``; needs
    ``start_mode="shared"``).
    """

    def __init__(
        self,
        *,
        num_envs: int,
        model: str | LoadedModel | ModelFamily = DEFAULT_MODEL,
        reward: str | RewardFn = "jpeg_compressibility",
        window: str | Sequence[Sequence[int]] | WindowStrategy = "full",
        num_steps: int = 40,
        eta: float = 1.0,
        scheduler: str = "ddim",
        references: str | Tensor | ReferenceSource | None = None,
        denoiser: Denoiser | torch.nn.Module | None = None,
        samples_per_reference: int = 4,
        start_mode: str = "shared",
        probe_size: int = 8,
        device: str | torch.device = "cpu",
        reward_kwargs: dict[str, Any] | None = None,
        window_kwargs: dict[str, Any] | None = None,
        shard: Shard | None = None,
        info_x0: bool = False,
        prompts: Any = None,
        negative_prompt: str | None = None,
        guidance_scale: float | None = None,
        conditions: ConditionSet | None = None,
        sde_window: Sequence[int] | str | SdeWindow | None = None,
        sde_window_kwargs: dict[str, Any] | None = None,
        samples_per_condition: int = 1,
    ) -> None:
        _check_core_args(
            num_envs=num_envs,
            start_mode=start_mode,
            shard=shard,
            info_x0=info_x0,
            samples_per_reference=samples_per_reference,
            samples_per_condition=samples_per_condition,
            probe_size=probe_size,
        )
        self.shard = shard
        self.info_x0 = info_x0
        self.last_x0: Tensor | None = None
        self.device = _parse_device(device)
        self.num_envs = num_envs
        self.global_num_envs = num_envs * (shard.world_size if shard is not None else 1)
        self.start_mode = start_mode
        self.samples_per_reference = samples_per_reference
        self.samples_per_condition = samples_per_condition
        self.probe_size = probe_size

        self.family = as_family(model, scheduler, self.device)
        self.model_spec = model if isinstance(model, str) else f"<{type(model).__name__}>"
        self.unet = self.family.denoiser
        self.scheduler = self.family.scheduler
        self.scheduler_kind = scheduler  # the argument (flow models ignore it: their scheduler is fixed)
        self.sample_shape: tuple[int, ...] = tuple(self.family.sample_shape)
        if conditions is None:
            conditions = make_conditions(self.family, prompts, negative_prompt)
        elif prompts is not None or negative_prompt is not None:
            raise ValueError("pass either conditions= or prompts=/negative_prompt=, not both")
        self.conditions = conditions
        self.num_classes: int | None = getattr(self.family, "num_classes", None)
        self.guidance_scale = (
            self.family.default_guidance_scale if guidance_scale is None else check_guidance_scale(guidance_scale)
        )
        self.num_steps = num_steps
        self.schedule = sampling.make_schedule(self.scheduler, num_steps, eta, self.device)
        self.sde_schedule = self.schedule
        """The chain with every step stochastic; :attr:`schedule` is the current batch's (its SDE window)."""
        self.sde_window = self._sde_window(sde_window, sde_window_kwargs or {}, start_mode)
        self.sde_steps: tuple[int, int] | None = None
        self.probe_schedule = sampling.make_schedule(self.scheduler, num_steps, eta=0.0, device=self.device)
        self.eta = eta

        self.reward_fn = make_reward(reward, **(reward_kwargs or {}))
        self.reward_name = reward if isinstance(reward, str) else getattr(self.reward_fn, "name", "custom")
        self.set_denoiser(denoiser)
        self.references = self._references(references)
        self.window: WindowStrategy = make_window(window, **(window_kwargs or {}))
        self.window.bind(num_steps)

        self._allocate_episodes()

    def _allocate_episodes(self) -> None:
        """The per-env episode tensors (state, step index, start, condition, group) and the counters."""
        b = self.num_envs
        self.x = torch.zeros((b, *self.sample_shape), device=self.device)
        self.k = torch.zeros(b, dtype=torch.long, device=self.device)
        self.k0 = torch.zeros(b, dtype=torch.long, device=self.device)
        self.c = torch.zeros(b, dtype=torch.long, device=self.device)
        self.group = torch.full((b,), -1, dtype=torch.long, device=self.device)
        self.k_host = np.zeros(b, dtype=np.int64)  # host mirror of k: termination needs no device sync
        self.started = False
        self._from_references = False  # whether the current batch started from noised references
        self._condition: int | None = None  # the current batch's fixed condition (begin's condition)
        self._next_group = 0
        self._episodes_since_batch = 0

    def _sde_window(self, spec: Any, kwargs: dict[str, Any], start_mode: str) -> SdeWindow | None:
        """The SDE window of a flow chain (``None``: every step is stochastic)."""
        window = make_sde_window(spec, **kwargs)
        if window is None:
            return None
        if not isinstance(self.schedule, sampling.FlowSchedule):
            raise ValueError(
                f"sde_window applies to flow-matching schedulers (SD3, FLUX); this {type(self.scheduler).__name__} "
                "chain takes None"
            )
        if start_mode != "shared":
            raise ValueError("an sde_window needs start_mode='shared': the window counts from the batch's start step")
        window.bind(self.num_steps)
        return window

    def _set_sde_steps(self, a: int, b: int) -> None:
        """Make the steps ``[a, b)`` (cut at the chain's end) the current batch's only SDE steps."""
        a, b = min(a, self.num_steps), min(b, self.num_steps)
        mask = torch.zeros(self.num_steps, dtype=torch.bool)
        mask[a:b] = True
        self.schedule = self.sde_schedule.with_sde_steps(mask)  # type: ignore[union-attr]
        self.sde_steps = (a, b)

    def _references(self, spec: str | Tensor | ReferenceSource | None) -> ReferenceSource:
        """The reference source of ``spec`` (default: the embedded digits, or the current model's samples)."""
        default = "digits" if is_embedded_digits(self.unet) else "model"
        prompt_conditions = isinstance(self.conditions, PromptConditions)
        return make_references(
            default if spec is None else spec,
            self.family.image_shape,
            model_sampler=self._sample_from_model,
            num_classes=self.num_classes,
            encode=None if isinstance(self.family, PixelFamily) else self.family.encode_images,
            prompt_id=self.conditions.check if prompt_conditions else None,
            draw=self.conditions.draw if prompt_conditions else None,
        )

    # ----------------------------------------------------------------------------------- policy
    def set_denoiser(self, denoiser: Denoiser | torch.nn.Module | None) -> None:
        """Use ``denoiser`` to probe (HRF-D) and to sample model references.

        Args:
            denoiser: a UNet (called as the family calls its denoiser, with the env's guidance
                scale), any ``(x, t, c) -> model_output`` callable (``c`` as
                :meth:`ConditionSet.denoiser_input` gives it: class ids, or a ``Conditioning`` of
                prompts), or ``None`` for the loaded base model.
        """
        if denoiser is None:
            denoiser = self.unet
        if isinstance(denoiser, ModelMixin):  # a diffusers network (UNet, transformer): call it as the family does
            denoiser = self.family.chain_denoiser(self.guidance_scale, network=denoiser)
        if not callable(denoiser):
            raise TypeError(f"denoiser must be a UNet module or a callable (x, t, c) -> output, got {denoiser!r}")
        self.denoiser: Denoiser = denoiser

    @torch.no_grad()
    def _sample_from_model(self, n: int, conditions: Tensor | None, generator: torch.Generator) -> Tensor:
        x = torch.randn((n, *self.sample_shape), generator=generator).to(self.device)
        # With a shard, the chains are split across processes; each draws the whole batch's policy noise
        # and keeps its rows (it may have none), so the gathered images equal the unsharded ones.
        rows = slice(None) if self.shard is None else self.shard.part(n)
        c = self.conditions.denoiser_input(conditions[rows]) if conditions is not None else None
        noise = sampling.GlobalBatchNoise(generator, n, rows)
        x = sampling.denoise_chain(self.denoiser, x[rows], self.schedule, c, noise=noise)
        return x if self.shard is None else self.shard.all_gather(x)

    def probe(self, references: Tensor, conditions: Tensor, noise: Tensor) -> Callable[[int], ProbeResult]:
        """HRF-D's probe: ``probe(k)`` noises ``references`` to ``k`` and denoises deterministically.

        With a :class:`Shard`, each process denoises and scores its part of the references and the
        results are gathered: every process gets the whole probe's rewards and images.
        """
        part = slice(None) if self.shard is None else self.shard.part(references.shape[0])
        references, conditions, noise = references[part], conditions[part], noise[part]

        def run(k: int) -> ProbeResult:
            if references.shape[0] == 0:  # more processes than probe references: nothing to do here
                images, rewards = references, torch.zeros(0, dtype=torch.float64, device=self.device)
            else:
                images = references
                if k < self.num_steps:
                    x = sampling.add_noise(references, noise, k, self.probe_schedule)
                    images = sampling.run_chain(
                        self.denoiser, x, self.probe_schedule, self.conditions.denoiser_input(conditions), start=k
                    )
                rewards = self.score(images, conditions)
            if self.shard is not None:  # float64 on every process: exact for float32 and float64 rewards
                images, rewards = self.shard.all_gather(images), self.shard.all_gather(rewards.double())
            return ProbeResult(rewards=rewards, images=images)

        return run

    def condition_input(self, c: Tensor) -> Any:
        """What the reward receives as conditions for ids ``c``: class ids (``None`` unconditional) or prompts."""
        return self.conditions.reward_input(c)

    def decode(self, x: Tensor) -> Tensor:
        """Images in ``[0, 1]`` of clean states ``x`` (the family's ``decode``: the VAE for latents, in chunks)."""
        return self.family.decode(x)

    @torch.no_grad()
    def score(self, x: Tensor, c: Tensor) -> Tensor:
        """The reward ``r(decode(x), conditions of c)`` of clean states ``x`` with condition ids ``c``."""
        return self.reward_fn(self.decode(x), self.condition_input(c))

    @torch.no_grad()
    def predict_x0(self) -> Tensor:
        """The denoiser's x̂0 prediction at the current images (one denoiser call, no gradient).

        ``x̂0 = sampling.predict_x0_eps(denoiser(x, t_k, c), x, k).x0`` (clipped as the scheduler is
        configured): the ``x0`` of :func:`diffusion_gym.sampling.denoise_step` for a policy that uses
        the env's denoiser. Returns ``(B, C, H, W)`` float32 on the device.
        """
        k = self.k.clamp(max=self.num_steps - 1)
        t = self.schedule.timesteps.to(self.device)[k]
        x0, _ = sampling.predict_x0_eps(
            self.denoiser(self.x, t, self.conditions.denoiser_input(self.c)), self.x, k, self.schedule
        )
        return x0.float()

    # ----------------------------------------------------------------------------------- episodes
    def begin(
        self,
        rng: np.random.Generator,
        indices: np.ndarray | None = None,
        start_step: int | None = None,
        condition: Any = None,
    ) -> None:
        """Start new episodes for the envs in ``indices`` (default: all, a new batch).

        With a :class:`Shard`, the draws are those of the whole global batch and this core keeps its
        block, so ``indices`` must be all envs (a shared-start batch ends everywhere at once).
        ``condition``: a class id, or a prompt (or prompt id) of a text-to-image model.
        """
        if condition is not None:
            condition = self.conditions.check(condition)
        if start_step is not None and (not _is_int(start_step) or not 0 <= start_step < self.num_steps):
            raise ValueError(f"start_step must be an int in [0, {self.num_steps - 1}], got {start_step!r}")
        idx = np.arange(self.num_envs) if indices is None else np.asarray(indices)
        if self.shard is not None and len(idx) != self.num_envs:
            raise ValueError(f"a sharded env starts whole batches only: got {len(idx)} of {self.num_envs} env indices")
        n = len(idx) * (self.shard.world_size if self.shard is not None else 1)
        generator = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
        probe = None
        if start_step is None and self.window.needs_probe:
            refs = self.references.sample(self.probe_size, rng, self.device)
            noise = torch.randn((self.probe_size, *self.sample_shape), generator=generator).to(self.device)
            probe = self.probe(refs.images, refs.conditions, noise)
        if start_step is not None:
            steps = np.full(n, int(start_step), dtype=np.int64)
        elif self.start_mode == "shared":
            steps = np.repeat(self.window.next_batch(1, rng, probe), n)
        else:
            steps = self.window.next_batch(n, rng, probe, count=False)
            self._episodes_since_batch += n
            while self._episodes_since_batch >= self.num_envs:
                self._episodes_since_batch -= self.num_envs
                self.window.count_batch()

        noise = torch.randn((n, *self.sample_shape), generator=generator).to(self.device)
        k0 = torch.from_numpy(steps).to(self.device)
        self._from_references = self.window.uses_references or (start_step is not None and start_step > 0)
        if self._from_references:
            which, group, count = self._groups(n, self.samples_per_reference)
            x, c = self._noised_references(which, count, noise, k0, rng)
        elif self.samples_per_condition > 1:  # GRPO: groups of episodes share a condition (a prompt)
            which, group, count = self._groups(n, self.samples_per_condition)
            x, c = noise, self.conditions.draw(count, rng).to(self.device)[which]
        else:
            x = noise
            c = self.conditions.draw(n, rng)
            c, group = c.to(self.device), torch.full((n,), -1, dtype=torch.long, device=self.device)
        self._condition = None if condition is None else int(condition)
        if condition is not None:
            c = torch.full_like(c, int(condition))
        if self.shard is not None:  # keep this process's block of the global batch
            mine = self.shard.block(n)
            x, k0, c, group, steps = x[mine], k0[mine], c[mine], group[mine], steps[mine]
        t_idx = torch.from_numpy(idx).to(self.device)
        self.x[t_idx] = x.to(self.x.dtype)
        self.k[t_idx], self.k0[t_idx], self.c[t_idx], self.group[t_idx] = k0, k0, c.long(), group
        self.k_host[idx] = steps
        self.started = True
        if self.sde_window is not None:  # the batch's SDE steps, counted from its (shared) start step
            a, b = self.sde_window.next_window(rng)
            self._set_sde_steps(int(steps[0]) + a, int(steps[0]) + b)

    def _noised_references(
        self, which: Tensor, count: int, noise: Tensor, k0: Tensor, rng: np.random.Generator
    ) -> tuple[Tensor, Tensor]:
        """Draw ``count`` references and noise reference ``which[i]`` to step ``k0[i]`` for episode ``i``."""
        refs = self.references.sample(count, rng, self.device)
        x = sampling.add_noise(refs.images[which], noise, k0, self.schedule)
        return x, refs.conditions[which]

    def redraw_references(self, rng: np.random.Generator) -> bool:
        """Draw the references of a batch that has not taken a step again, e.g. after a policy update.

        Model references (``references="model"``) are the current policy's samples. The trainers
        start the next batch as soon as a batch ends, so an epoch's first batch would start from
        samples of the model *before* the epoch's update; calling this at the start of each
        collection draws them from the updated model instead, as the HRF authors' code does. The
        batch keeps its start step and group ids; its references, their conditions and the initial
        noise are drawn anew from ``rng``. A batch that starts from pure noise is left as it is.

        Returns:
            whether the batch's references were drawn again.

        Raises:
            RuntimeError: if no batch was started, or the batch has already taken a step.
        """
        if not self.started or bool((self.k != self.k0).any()):
            raise RuntimeError("redraw_references needs a batch that has started and not yet taken a step")
        if not self._from_references:
            return False
        if len(np.unique(self.k_host)) != 1:
            raise RuntimeError("redraw_references needs a batch with one shared start step (start_mode='shared')")
        n = self.global_num_envs
        generator = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
        noise = torch.randn((n, *self.sample_shape), generator=generator).to(self.device)
        size = self.samples_per_reference
        which = torch.arange(n, device=self.device) // size
        k0 = torch.full((n,), int(self.k_host[0]), dtype=torch.long, device=self.device)
        x, c = self._noised_references(which, -(-n // size), noise, k0, rng)
        if self._condition is not None:
            c = torch.full_like(c, self._condition)
        if self.shard is not None:
            mine = self.shard.block(n)
            x, c = x[mine], c[mine]
        self.x.copy_(x.to(self.x.dtype))
        self.c.copy_(c.long())
        return True

    def _groups(self, n: int, size: int) -> tuple[Tensor, Tensor, int]:
        """Split ``n`` episodes into consecutive groups of ``size``.

        Returns each episode's group index in the batch, its group id, and the number of groups.
        """
        groups = -(-n // size)
        which = torch.arange(n, device=self.device) // size
        group = torch.arange(self._next_group, self._next_group + groups, device=self.device)[which]
        self._next_group += groups
        return which, group, groups

    def check_actions(self, actions: Tensor) -> None:
        """Raise a clear error for actions of the wrong shape/dtype or with NaN/Inf/out-of-bound values."""
        expected = (self.num_envs, *self.sample_shape)
        if not isinstance(actions, Tensor):
            kind = type(actions)
            raise ValueError(
                f"action must be a torch.Tensor of shape {expected}, got {kind.__module__}.{kind.__name__}"
            )
        if tuple(actions.shape) != expected:
            raise ValueError(f"action must be a tensor of shape {expected}, got shape {tuple(actions.shape)}")
        if not actions.is_floating_point():
            raise ValueError(f"action must be a floating-point tensor, got dtype {actions.dtype}")
        if not bool(torch.isfinite(actions).all()):
            raise ValueError("action contains NaN or Inf values")
        if bool((actions.abs() > PIXEL_BOUND).any()):
            raise ValueError(f"action values must lie in [-{PIXEL_BOUND}, {PIXEL_BOUND}] (the action space bounds)")

    def advance(self, actions: Tensor, score: bool = True) -> tuple[Tensor, np.ndarray]:
        """Apply ``actions`` (``x_prev`` for every env); return ``(rewards, terminated)``.

        ``rewards`` is a ``(B,)`` tensor (0 except at terminal steps, where it is ``r(x_0, c)``,
        computed in one batched call); ``terminated`` is a host bool array. With ``info_x0`` the
        denoiser's x̂0 at the images being left is kept in :attr:`last_x0` (one denoiser call).
        ``score=False`` leaves the terminal rewards to the caller (0 here): an agent that drives the
        core itself scores the final images :attr:`x` when and where it likes.
        """
        if not self.started or (self.k_host >= self.num_steps).any():
            raise RuntimeError("the episode has ended (or never started): call reset() before step()")
        self.last_x0 = self.predict_x0() if self.info_x0 else None  # of the state the step leaves
        self.x = actions.to(device=self.device, dtype=self.x.dtype, copy=True)  # never alias the caller's memory
        self.k += 1
        self.k_host += 1
        terminated = self.k_host >= self.num_steps
        rewards = torch.zeros(self.num_envs, device=self.device)
        if not score or not terminated.any():
            return rewards, terminated
        done = None if terminated.all() else torch.from_numpy(np.flatnonzero(terminated)).to(self.device)
        x, c = (self.x, self.c) if done is None else (self.x[done], self.c[done])
        r = self.score(x, c).to(self.device).float()
        if done is None:
            return r, terminated
        return rewards.index_copy_(0, done, r), terminated

    def timesteps(self) -> Tensor:
        """``(B,)`` int64 scheduler timestep of each env's current state (0 once it is clean).

        A flow model's timestep ``t · 1000`` is a float; the observation rounds it to the nearest
        integer (``observation_timesteps``), which identifies the step as well.
        """
        k = self.k.clamp(max=self.num_steps - 1)
        t = observation_timesteps(self.schedule).to(self.device)[k]
        return torch.where(self.k >= self.num_steps, torch.zeros_like(t), t)

    def observation(self) -> dict[str, Tensor]:
        """The batched observation ``{"c", "t", "x_t"}`` (tensors on the device)."""
        return {"c": self.c.clone(), "t": self.timesteps(), "x_t": self.x.clone()}

    # ----------------------------------------------------------------------------------- spaces
    def single_spaces(self, vector: bool = False) -> tuple[spaces.Dict, spaces.Box]:
        """The observation and action spaces of one env (``vector=True``: ``c`` as condition ids)."""
        image = spaces.Box(-PIXEL_BOUND, PIXEL_BOUND, shape=self.sample_shape, dtype=np.float32)
        observation = spaces.Dict(
            {
                "c": spaces.Discrete(self.conditions.size) if vector else self.conditions.single_space(),
                "t": spaces.Discrete(timestep_space_size(self.schedule)),
                "x_t": image,
            }
        )
        return observation, image

    def restart(self) -> None:
        """Forget the episode history (window schedule, group ids): what a seeded reset does."""
        self.window.restart()
        if self.sde_window is not None:
            self.sde_window.restart()
        self._next_group = 0
        self._episodes_since_batch = 0

    def state_dict(self) -> dict[str, Any]:
        """Everything a checkpoint needs to continue exactly: window, counters and the open episodes.

        With a :class:`Shard` the episodes are gathered from all processes (every process must call
        this together): the state is the global batch's, independent of the number of processes.
        """
        episodes = {name: getattr(self, name).clone() for name in ("x", "k", "k0", "c", "group")}
        k_host = torch.from_numpy(self.k_host.copy())
        if self.shard is not None:
            episodes = {name: self.shard.all_gather(value) for name, value in episodes.items()}
            k_host = self.shard.all_gather(k_host.to(self.device))
        return {
            "window": self.window.state_dict(),
            "sde_window": self.sde_window.state_dict() if self.sde_window is not None else None,
            "sde_steps": self.sde_steps,
            "conditions": self.conditions.state_dict(),
            "reward": self._reward_state(),
            "next_group": self._next_group,
            "episodes_since_batch": self._episodes_since_batch,
            "started": self.started,
            "from_references": self._from_references,
            "condition": self._condition,
            "episodes": {name: value.cpu() for name, value in episodes.items()},
            "k_host": k_host.cpu().numpy(),
        }

    def _reward_state(self) -> Any:
        """The reward's own state (a weighted reward's running statistics), or ``None``."""
        get = getattr(self.reward_fn, "reward_state_dict", None)
        return get() if callable(get) else None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (same global batch size and sample shape; a sharded core takes its block)."""
        mine = self.shard.block(self.global_num_envs) if self.shard is not None else slice(None)
        for name, value in state["episodes"].items():
            expected = (self.global_num_envs, *getattr(self, name).shape[1:])
            if value.shape != expected:
                raise ValueError(
                    f"saved env state has {name} of shape {tuple(value.shape)}, this env needs {expected} "
                    "(num_envs or model changed?)"
                )
        self.window.load_state_dict(state["window"])
        if self.sde_window is not None and state.get("sde_window") is not None:
            self.sde_window.load_state_dict(state["sde_window"])
        if self.sde_window is not None and state.get("sde_steps") is not None:
            self._set_sde_steps(*state["sde_steps"])
        self.conditions.load_state_dict(state.get("conditions", {}))
        if state.get("reward") is not None and hasattr(self.reward_fn, "load_reward_state_dict"):
            self.reward_fn.load_reward_state_dict(state["reward"])
        self._next_group = int(state["next_group"])
        self._episodes_since_batch = int(state["episodes_since_batch"])
        self.started = bool(state["started"])
        self._from_references = bool(state.get("from_references", self.window.uses_references))
        self._condition = state.get("condition")
        for name, value in state["episodes"].items():
            setattr(self, name, value[mine].to(self.device))
        self.k_host = np.asarray(state["k_host"], dtype=np.int64)[mine].copy()


_ENV_DOC_ARGS = """
    Args:
        model: a model spec for :func:`diffusion_gym.families.load_family` (default ``"embedded:digits"``;
            ``"random:sd-tiny"``, a Stable Diffusion / SDXL pipeline folder or cached hub id for text
            to image), a loaded ``ModelFamily`` or a ``LoadedModel``.
        reward: a registered reward name (``"jpeg_compressibility"``, ``"jpeg_incompressibility"``,
            ``"laion_aesthetic"``, ``"digit_confidence"``, ``"remote"``…), a mapping of names to weights
            (their weighted sum, :class:`~diffusion_gym.rewards.WeightedRewards`) or a callable
            ``(images in [0, 1], conditions) -> (B,) tensor``; ``conditions`` are class ids (``None``
            for an unconditional model) or, for a text-to-image model, the list of prompts.
        window: ``"full"`` (DDPO), ``"hrf"``, ``"hrf-baseline"``, ``"hrf-early"``, ``"hrf-later"``,
            ``"hrf-d"``, a list of ``(a, b)`` step-index clusters, or a ``WindowStrategy``.
        num_steps: K, the number of DDIM/DDPM steps (paper: 40).
        eta: DDIM's eta; 1.0 makes every step but the last a stochastic action.
        scheduler: ``"ddim"`` (default) or ``"ddpm"``.
        references: clean images windowed episodes start from: ``"digits"`` (default for the embedded
            model), ``"model"`` (samples of the current denoiser; default for other models), a
            folder (class subfolders; for a text-to-image model captioned images, encoded by the
            VAE), a tensor of images in ``[0, 1]`` or a ``ReferenceSource``.
        denoiser: the current policy's network for HRF-D probes and model references (a UNet or a
            ``(x, t, c) -> output`` callable); default: the loaded base model.
        samples_per_reference: episodes started from each reference in a batch (one advantage group).
        samples_per_condition: episodes from pure noise come in consecutive groups of this many that share
            one condition (a prompt, a class) and a group id (``info["group"]``): GRPO's group size. 1
            (default): each episode draws its own condition and has group −1.
        start_mode: ``"shared"`` (default; one start step per batch, as the paper's code) or
            ``"per_sample"`` (one start step per episode, the paper's Algorithm 1).
        probe_size: references per HRF-D probe.
        device: torch device of the model and (vector env) of all tensors.
        reward_kwargs: options of the reward factory.
        window_kwargs: options of the window (``iterations``, ``beta``, ``stride``, ``batches_per_iteration``…).
        shard: (:class:`DenoiseCore` only) a :class:`Shard`: the core's ``num_envs`` episodes are one
            process's block of a batch collected by ``world_size`` processes (data-parallel training).
        info_x0: put ``info["x0"]``, the x̂0 (predicted clean image, ``[-1, 1]`` scale) of the step just
            taken, in every step's info. The env receives only the action ``x_{t-1}``, and x̂0 cannot be
            recovered from ``(x_t, x_{t-1})`` at a stochastic step, so the env computes it with its
            ``denoiser`` at the image the step leaves: one extra denoiser call per step (no gradient).
            It equals the policy's own ``denoise_step(...).x0`` when the policy is the env's denoiser
            (``set_denoiser``). Default ``False``: no cost.
        prompts: a text-to-image model's prompt source: ``"animals"`` (default, a built-in set), a
            text file (one prompt per line), a list of prompts, a callable ``fn(rng) -> str`` or a
            ``PromptSource`` (:mod:`diffusion_gym.prompts`). Episodes draw their prompt from it.
        negative_prompt: a text-to-image model's negative prompt (``None``: the pipeline's default
            unconditional input).
        guidance_scale: classifier-free guidance ``ε_u + g(ε_c − ε_u)`` of the env's denoiser (probes,
            model references); default: the model's (7.5 SD, 5 SDXL, 1 pixel models). A trained
            policy uses its own, which the agents keep equal.
        conditions: (:class:`DenoiseCore` only) a built :class:`~diffusion_gym.conditions.ConditionSet`
            shared with the agent's policy (instead of ``prompts``/``negative_prompt``).
        sde_window: flow-matching models (SD3, FLUX) only: which steps are stochastic SDE steps, chosen
            per batch and counted from the batch's start step (:mod:`diffusion_gym.sde_windows`):
            ``(a, b)`` (Flow-GRPO-Fast), ``"random"`` (Flow-GRPO-Fast's random window), ``"sliding"``
            (MixGRPO) or an ``SdeWindow``; the other steps are deterministic ODE steps (not actions an
            agent trains on). ``core.schedule`` is the current batch's chain. ``None``: every step is
            an SDE step with noise level ``eta``.
        sde_window_kwargs: options of a named SDE window (``size``, ``low``, ``high``; sliding:
            ``stride``, ``every``).
"""


_REMOVED_VECTOR_KWARGS = {
    "defer_rewards": "the env returns every reward at the step it is earned; to overlap host rewards with the "
    "next batch, drive DenoiseCore.advance(actions, score=False) and score the final images yourself "
    "(diffusion_gym.rewards.reward_async), as agents.common.collector.Collector does",
    "shard": "build DenoiseCore(num_envs=..., shard=Shard(rank, world_size, all_gather), ...) and pass it as "
    "DiffusionDenoiseVectorEnv(num_envs, core=core)",
}


class _CoreFrontEnd:
    """What both front ends expose of their :class:`DenoiseCore`."""

    core: DenoiseCore

    @property
    def window(self) -> WindowStrategy:
        """The window strategy."""
        return self.core.window

    def set_window(self, window: WindowStrategy) -> None:
        """Install another window strategy (see :class:`~diffusion_gym.windows.WindowWrapper`)."""
        window.bind(self.core.num_steps)
        self.core.window = window

    def set_denoiser(self, denoiser: Denoiser | torch.nn.Module | None) -> None:
        """See :meth:`DenoiseCore.set_denoiser`."""
        self.core.set_denoiser(denoiser)

    @property
    def prompts(self) -> list[str] | None:
        """A text-to-image env's prompts by id (``obs["c"]`` of the vector env indexes them); ``None`` otherwise."""
        conditions = self.core.conditions
        return conditions.prompts if isinstance(conditions, PromptConditions) else None

    def _begin(self, rng: np.random.Generator, options: dict[str, Any] | None) -> None:
        """Start episodes as ``reset`` does, after checking ``options``."""
        options = dict(options or {})
        unknown = set(options) - {"start_step", "condition"}
        if unknown:
            raise ValueError(f"unknown reset options {sorted(unknown)}; valid choices: ['condition', 'start_step']")
        self.core.begin(rng, start_step=options.get("start_step"), condition=options.get("condition"))


class DiffusionDenoiseEnv(_CoreFrontEnd, gym.Env[dict[str, Any], np.ndarray]):
    """Fine-tune a diffusion model's denoising chain with a reward on the final image.

    ## Description
    The reverse (denoising) chain of a diffusion model seen as an MDP, as in DDPO (Black et al.,
    2024) and HRF (arXiv 2410.08315, §4.2). An episode denoises one image from a start step to the
    clean image; the agent is the denoiser: it proposes the next, less noisy image. The UNet of the
    model, read as the Gaussian ``π(x_{t-1} | x_t, t, c) = N(μ_θ, σ_t² I)`` (DDIM with ``eta`` or the
    DDPM posterior, :mod:`diffusion_gym.sampling`), is the natural policy.

    ## Action Space
    ``Box(-10, 10, shape=(C, H, W), float32)``: ``x_{t-1}``, the next image in the model's ``[-1, 1]``
    scale (noisy images are larger). Actions of the wrong shape or dtype, with NaN/Inf, or outside the
    bounds are rejected with a ``ValueError`` and leave the env unchanged.

    ## Observation Space
    ``Dict({"c": Discrete(num_classes), "t": Discrete(T), "x_t": Box(-10, 10, (C, H, W), float32)})``:
    the condition (class id; always 0 for an unconditional model), the scheduler timestep of the
    current image (0 once clean) and the noisy image itself. For a text-to-image (latent) model,
    ``"c"`` is ``Text``: the prompt, and ``x_t`` the latent (``C, H, W`` of the latent space; actions
    are latents too). Stable-Baselines3 does not take ``Text`` observations: wrap the env in
    :class:`~diffusion_gym.wrappers.PromptIdObservation` (``"c"`` becomes the prompt's id).

    ## Rewards
    0 at every step but the last; at the last, ``r(x_0, c)`` on the final image mapped to ``[0, 1]``
    (JPEG (in)compressibility in kB, the LAION aesthetic score, or any callable). A latent ``x_0`` is
    decoded by the model's VAE first (in chunks, no gradient); a text model's reward gets the prompts.

    ## Starting State
    The window strategy picks the start step index ``k_0`` (0 = noisiest). With ``"full"`` the
    image is pure noise ``N(0, I)`` and ``c`` is drawn uniformly. With any other window, a reference
    image ``x_ref`` (and its condition) is noised to ``k_0``:
    ``x = sqrt(ᾱ_{t_{k_0}}) x_ref + sqrt(1 − ᾱ_{t_{k_0}}) ε``.
    ``reset(options={"start_step": k, "condition": c})`` overrides both. A seeded ``reset(seed=s)``
    starts afresh: the RNG *and* the window schedule (iteration 0), so that it is deterministic.

    ## Episode End
    Terminates after the last step (``K − k_0`` steps); never truncated. Stepping after the end
    without ``reset`` raises a ``RuntimeError``.

    ## Info
    ``start_step`` (``k_0``), ``step_index`` (``k`` of the current image), ``timestep``,
    ``group`` (id of the reference image; −1 for pure noise), at the end, ``raw_reward`` and, with
    ``info_x0=True``, after every step ``x0``: the denoiser's x̂0 at the image the step left
    (``(C, H, W)`` float32 array; see ``info_x0`` below).
    {args}
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 8}

    def __init__(self, render_mode: str | None = None, **kwargs: Any) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"unknown render_mode {render_mode!r}; valid choices: {self.metadata['render_modes']}")
        self.render_mode = render_mode
        self.core = DenoiseCore(num_envs=1, **kwargs)
        self.observation_space, self.action_space = self.core.single_spaces()

    def _obs(self) -> dict[str, Any]:
        obs = self.core.observation()
        return {
            "c": self.core.conditions.single_value(int(obs["c"][0].item())),
            "t": np.int64(obs["t"][0].item()),
            "x_t": obs["x_t"][0].detach().cpu().numpy().astype(np.float32),
        }

    def _info(self) -> dict[str, Any]:
        core = self.core
        return {
            "start_step": int(core.k0[0]),
            "step_index": int(core.k_host[0]),
            "timestep": int(core.timesteps()[0]),
            "group": int(core.group[0]),
        }

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Start an episode; ``options`` may set ``start_step`` and ``condition``."""
        super().reset(seed=seed)
        if seed is not None:
            self.core.restart()
        self._begin(self.np_random, options)
        return self._obs(), self._info()

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        """Take ``x_{t-1} = action``."""
        if not self.core.started or self.core.k_host[0] >= self.core.num_steps:
            raise RuntimeError("the episode has ended (or never started): call reset() before step()")
        if isinstance(action, Tensor):
            action = action.detach().cpu().numpy()
        action = np.asarray(action)
        if action.dtype.kind != "f":
            raise ValueError(
                f"action must be a float32 array of shape {self.core.sample_shape}, got dtype {action.dtype}"
            )
        if action.shape != self.core.sample_shape:
            raise ValueError(f"action must be a float32 array of shape {self.core.sample_shape}, got {action.shape}")
        tensor = torch.as_tensor(action, dtype=torch.float32).unsqueeze(0)
        self.core.check_actions(tensor)
        rewards, terminated = self.core.advance(tensor)
        info = self._info()
        if self.core.last_x0 is not None:
            info["x0"] = self.core.last_x0[0].cpu().numpy()
        reward = float(rewards[0])
        if terminated[0]:
            info["raw_reward"] = reward
        return self._obs(), reward, bool(terminated[0]), False, info

    def render(self) -> np.ndarray | None:
        """The current image as an ``H × W × 3`` uint8 array (``render_mode="rgb_array"``)."""
        if self.render_mode != "rgb_array":
            return None
        return _to_rgb(self.core.decode(self.core.x[:1])[0])


class DiffusionDenoiseVectorEnv(_CoreFrontEnd, VectorEnv):
    """``num_envs`` denoising episodes as one batch of torch tensors (native vector env).

    Everything stays on ``device``: observations are dicts of tensors (``"c"``, ``"t"``: ``(B,)``
    int64; ``"x_t"``: ``(B, C, H, W)`` float32; for a text-to-image model ``"c"`` holds prompt ids,
    the prompts being :attr:`prompts`), actions a ``(B, C, H, W)`` tensor (a float numpy array,
    such as a sample of ``action_space``, is accepted and moved to the device), rewards a
    ``(B,)`` float32 tensor, terminations and truncations ``(B,)`` bool tensors. The reward is
    computed once per batch, for all envs that finish at a step.

    Batch semantics: with ``start_mode="shared"`` (default, as the paper's code) a batch shares
    one start step chosen by the window, ``samples_per_reference`` consecutive envs start from the
    same reference image (``info["group"]``, the advantage group), and all envs finish on the same
    step; the whole batch then autoresets to a new start step. With ``"per_sample"`` each env draws
    its own start step and autoresets on its own.

    Autoreset: Gymnasium's ``AutoresetMode.SAME_STEP``. The step on which episodes end returns the
    *new* episodes' first observations; the final ones are in ``info["final_obs"]`` (a dict of
    batched tensors) and ``info["final_info"]``, with the mask ``info["_final_obs"]``.

    Info: ``start_step``, ``step_index``, ``group`` (``(B,)`` tensors), ``raw_reward`` (with the
    mask ``_raw_reward``) at terminal steps and,
    with ``info_x0=True``, ``x0``: the ``(B, C, H, W)`` x̂0 of the step just taken by every env (for
    the envs that ended, of their last step; also in ``final_info``).

    ``check_actions=False`` skips the NaN/bound checks (one device sync per step) on fast paths.

    ``core=`` wraps an existing :class:`DenoiseCore` instead of building one from the keyword
    arguments: data-parallel agents build the core with a :class:`Shard` (their block of a batch that
    several processes collect together) and drive it directly, as does an agent that overlaps host
    rewards with the next batch (``DenoiseCore.advance(..., score=False)``).
    {args}
    """

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP, "render_modes": ["rgb_array"]}

    def __init__(
        self,
        num_envs: int = 16,
        check_actions: bool = True,
        render_mode: str | None = None,
        *,
        core: DenoiseCore | None = None,
        **kwargs: Any,
    ) -> None:
        for removed, replacement in _REMOVED_VECTOR_KWARGS.items():
            if removed in kwargs:
                raise TypeError(f"DiffusionDenoiseVectorEnv no longer takes {removed}=: {replacement}")
        if core is not None:
            if kwargs or core.num_envs != num_envs:
                raise ValueError(
                    f"core= wraps a built DenoiseCore: pass num_envs={core.num_envs} (its size) and no other env "
                    f"arguments, got num_envs={num_envs} and {sorted(kwargs)}"
                )
            self.core = core
        else:
            self.core = DenoiseCore(num_envs=num_envs, **kwargs)
        self.num_envs = num_envs
        self.device = self.core.device
        self.check = check_actions
        self.render_mode = render_mode
        self.single_observation_space, self.single_action_space = self.core.single_spaces(vector=True)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._np_random: np.random.Generator | None = None

    def _info(self) -> dict[str, Any]:
        core = self.core
        return {"start_step": core.k0.clone(), "step_index": core.k.clone(), "group": core.group.clone()}

    def steps_remaining(self) -> np.ndarray:
        """Host-side ``(B,)`` number of steps left in each env's episode (no device sync)."""
        return self.core.num_steps - self.core.k_host

    def state_dict(self) -> dict[str, Any]:
        """The env's RNG, window and open episodes, for exact resumption (see :meth:`DenoiseCore.state_dict`)."""
        rng = None if self._np_random is None else self._np_random.bit_generator.state
        return {"core": self.core.state_dict(), "np_random": rng}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.core.load_state_dict(state["core"])
        if state["np_random"] is not None:
            self._np_random, _ = gym.utils.seeding.np_random(0)
            self._np_random.bit_generator.state = state["np_random"]

    def observation(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The current observation and info, without stepping (e.g. after :meth:`load_state_dict`)."""
        return self.core.observation(), self._info()

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Start a new batch of episodes; ``options`` may set ``start_step`` and ``condition``."""
        if seed is not None or self._np_random is None:
            self._np_random, self._np_random_seed = gym.utils.seeding.np_random(seed)
            self.core.restart()
        self._begin(self.np_random, options)
        return self.core.observation(), self._info()

    def step(self, actions: Tensor | np.ndarray) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor, dict[str, Any]]:
        """Take ``x_{t-1} = actions`` in every env.

        Args:
            actions: a ``(B, C, H, W)`` float tensor, or a float numpy array of that shape (e.g. a sample
                of :attr:`action_space`, as Gymnasium's vector envs take), which is moved to the env's device.
        """
        core = self.core
        if not core.started:
            raise RuntimeError("call reset() before step()")
        if isinstance(actions, np.ndarray):
            actions = _numpy_actions(actions, (self.num_envs, *core.sample_shape), self.device)
        if self.check:
            core.check_actions(actions)
        rewards, terminated = core.advance(actions)
        info = self._info()
        if core.last_x0 is not None:
            info["x0"] = core.last_x0
        if terminated.all() or not terminated.any():  # no host-to-device copy (a stream sync) on plain steps
            done = torch.full((self.num_envs,), bool(terminated.all()), device=self.device)
        else:
            done = torch.from_numpy(terminated).to(self.device)
        if terminated.any():
            info["raw_reward"], info["_raw_reward"] = rewards.clone(), done.clone()
        if terminated.any():
            info["final_obs"], info["final_info"] = core.observation(), dict(info)
            info["_final_obs"] = info["_final_info"] = done
            core.begin(self.np_random, indices=np.flatnonzero(terminated))
            info.update(self._info())
        truncated = torch.zeros_like(done)
        return core.observation(), rewards, done, truncated, info

    def render(self) -> tuple[np.ndarray, ...] | None:
        """The current images as ``H × W × 3`` uint8 arrays."""
        if self.render_mode != "rgb_array":
            return None
        return tuple(_to_rgb(image) for image in self.core.decode(self.core.x))


def _to_rgb(image: Tensor) -> np.ndarray:
    """An image in ``[0, 1]`` as an ``H × W × 3`` uint8 array."""
    image = (image * 255).round().byte().cpu()
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return image.permute(1, 2, 0).numpy()


DiffusionDenoiseEnv.__doc__ = (DiffusionDenoiseEnv.__doc__ or "").replace("{args}", _ENV_DOC_ARGS)
DiffusionDenoiseVectorEnv.__doc__ = (DiffusionDenoiseVectorEnv.__doc__ or "").replace("{args}", _ENV_DOC_ARGS)
