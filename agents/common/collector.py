"""Collect rollouts: the policy drives the env's batched core, one whole batch at a time.

The collector is the agent side of the MDP's fast path. It drives the env's
:class:`~diffusion_gym.envs.DenoiseCore` directly (the same state machine behind
``DiffusionDenoise-v0``), so that it can

* keep every tensor on the device and never wait for it between resets (step indices are mirrored on
  the host, the policy noise comes from :func:`policy_noise_sampler`);
* overlap the terminal reward with the next batch: the final images are handed to
  :func:`diffusion_gym.rewards.reward_async` (on a GPU, a host reward such as JPEG is scored on a
  background thread) and the :class:`~agents.common.rollout.Rollout` waits for the scores only when
  the advantages need them;
* let plug-ins watch each batch (:class:`BatchObserver`: DRIFT's diversity potentials).

Under ``torchrun`` each process's core holds its block of the global batch
(:class:`~diffusion_gym.envs.Shard`), and every random draw here is made for the global batch and
sliced, so the union of the processes' rollouts is the rollout of one process with all the envs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from diffusion_gym.envs import DenoiseCore, DiffusionDenoiseVectorEnv
from diffusion_gym.families import ModelFamily
from diffusion_gym.rewards import reward_async

from .distributed import Distributed
from .policy import DiffusionPolicy
from .rollout import Rollout, RolloutLayout

__all__ = ["BatchObserver", "Collector", "make_env", "policy_noise_sampler"]

NOISE_SOURCES = ("cpu", "device")


def make_env(
    config: Any, policy: DiffusionPolicy, family: ModelFamily, dist: Distributed | None = None
) -> DiffusionDenoiseVectorEnv:
    """The trainers' vector env from a run config's ``sample`` and ``env`` sections.

    Under ``torchrun`` the env's core holds this process's ``num_envs / world_size`` episodes of
    every batch.

    Args:
        config: a run config (its ``sample``, ``env`` and ``device``).
        policy: the policy whose current weights the env's probes and model references use.
        family: the model (the env shares the policy's conditions and guidance scale).
        dist: this process's place in the job (default: one process).

    Raises:
        ValueError: for ``sample.start_mode`` other than ``shared`` (the trainers collect whole batches).
    """
    s, e = config.sample, config.env
    if s.start_mode != "shared":
        raise ValueError("the trainers collect whole batches: sample.start_mode must be 'shared' for now")
    dist = dist if dist is not None else Distributed()
    core = DenoiseCore(
        num_envs=s.num_envs // dist.world_size,
        shard=dist.shard(),
        model=family,
        conditions=policy.conditions,
        guidance_scale=policy.guidance_scale,
        reward=e.reward,
        reward_kwargs=e.reward_kwargs,
        window=e.window if isinstance(e.window, str) else [tuple(c) for c in e.window],
        window_kwargs=e.window_kwargs,
        num_steps=s.num_steps,
        eta=s.eta,
        sde_window=s.sde_window,
        sde_window_kwargs=s.sde_window_kwargs,
        references=e.references,
        denoiser=policy.denoiser(),
        samples_per_reference=s.samples_per_reference,
        samples_per_condition=s.samples_per_condition,
        probe_size=e.probe_size,
        device=config.device,
    )
    return DiffusionDenoiseVectorEnv(core.num_envs, check_actions=False, core=core)


def _global_rows(core: DenoiseCore) -> slice:
    return core.shard.block(core.global_num_envs) if core.shard is not None else slice(None)


def policy_noise_sampler(core: DenoiseCore, generator: torch.Generator, where: str = "cpu") -> Callable[[], Tensor]:
    """A callable drawing one rollout step's standard-normal policy noise ``(num_envs, C, H, W)`` on the core's device.

    A sharded core's process draws the noise of the whole global batch and keeps its block, so the
    batch is the same under any number of processes.

    Args:
        core: the env's core (its device, batch and sample shape).
        generator: the trainer's CPU generator.
        where: ``"cpu"`` draws from ``generator`` itself: the same numbers on every device (a GPU run
            repeats a CPU run's trajectories up to float rounding); on a CUDA device the draw goes to
            pinned memory and is copied without blocking. ``"device"`` draws on the device from a
            generator seeded once per call from ``generator`` (which keeps resumed runs exact): no
            host work per step, but the numbers depend on the device's RNG, so runs repeat only on
            the same kind of device.

    Raises:
        ValueError: for an unknown ``where``.
    """
    if where not in NOISE_SOURCES:
        raise ValueError(f"unknown policy noise source {where!r}; valid choices: {list(NOISE_SOURCES)}")
    shape, rows, device = (core.global_num_envs, *core.sample_shape), _global_rows(core), core.device
    if where == "device":
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        device_generator = torch.Generator(device=device).manual_seed(seed)
        return lambda: torch.randn(shape, generator=device_generator, device=device)[rows]
    pinned = device.type == "cuda"
    return lambda: torch.randn(shape, generator=generator, pin_memory=pinned)[rows].to(device, non_blocking=pinned)


class BatchObserver(Protocol):
    """A plug-in that watches each collected batch (e.g. DRIFT's diversity potentials)."""

    def start_batch(self, groups: Tensor, conditions: Tensor) -> None:
        """A batch starts with these groups and conditions (this process's episodes)."""

    def stored_step(self, x0: Tensor) -> None:
        """A stochastic step was stored; ``x0`` is the policy's x̂0 at it."""

    def end_batch(self, final: Tensor) -> None:
        """The batch ended with the images ``final``."""


class Collector:
    """Roll out whole batches of episodes with the current policy into a :class:`Rollout` (no grad).

    Args:
        envs: the vector env (:func:`make_env`); the collector drives its core.
        policy: the Gaussian policy.
        generator: the trainer's CPU generator (policy noise, condition-noise directions).
        dist: this process's place in the job.
        noise: where the policy noise is drawn (:func:`policy_noise_sampler`).
        observers: plug-ins that watch each batch.
        overlap_rewards: start each batch's terminal reward with
            :func:`~diffusion_gym.rewards.reward_async` (a host reward of CUDA images is scored on a
            background thread while the next batch runs); ``False`` scores it at once on this thread
            (``core.reward_fn``), e.g. to measure what the overlap saves. The rewards are the same.
        phase: told ``"HRF-D probe"`` while the window probes for the next start step, ``"rollout"`` after.
        redraw_references: draw the references of each collection's first batch again when it starts
            (:meth:`~diffusion_gym.envs.denoise.DenoiseCore.redraw_references`): model references then
            come from the policy as it is after the last update, not as it was when the previous
            collection's last batch ended.
    """

    def __init__(
        self,
        envs: DiffusionDenoiseVectorEnv,
        policy: DiffusionPolicy,
        generator: torch.Generator,
        dist: Distributed | None = None,
        noise: str = "cpu",
        observers: Sequence[BatchObserver] = (),
        overlap_rewards: bool = True,
        phase: Callable[[str], None] | None = None,
        redraw_references: bool = False,
    ) -> None:
        self.envs, self.core, self.policy, self.generator = envs, envs.core, policy, generator
        self.dist = dist if dist is not None else Distributed()
        self.noise, self.observers = noise, list(observers)
        self.overlap_rewards, self.redraw_references = overlap_rewards, redraw_references
        self.phase = phase if phase is not None else (lambda name: None)
        self.layout = RolloutLayout(self.core.num_envs, self.dist.world_size, self.dist.rank)
        self._cond_dim = policy.condition_noise_dim() if policy.condition_noise is not None else 0

    def collect(self, num_batches: int) -> Rollout:
        """``num_batches`` batches of whole episodes; the env then stands at the next batch's start.

        Between resets the loop never waits for the device. The reward of each batch is started when
        it ends and waited for only when the rollout's rewards are read. With the policy's condition
        noise on (DRIFT), each episode draws one direction at the start of its batch.
        """
        core, policy = self.core, self.policy
        draw_noise = policy_noise_sampler(core, self.generator, self.noise)
        rollout = Rollout(self.layout, core.device, self.dist)
        if self.redraw_references:
            core.redraw_references(self.envs.np_random)
        for _ in range(num_batches):
            cond_noise = None
            if self._cond_dim:
                draw = torch.randn((core.global_num_envs, self._cond_dim), generator=self.generator)
                cond_noise = draw[_global_rows(core)].to(core.device)
            traj = rollout.start_batch(core.c.clone(), core.group.clone(), core.k0.clone(), cond_noise)
            for observer in self.observers:
                observer.start_batch(core.group, core.c)
            step, schedule = None, core.schedule  # the batch's chain: its SDE window's steps are the stochastic ones
            deterministic = schedule.deterministic.cpu().numpy()  # host copy: no device sync per step
            while int(core.k_host[0]) < core.num_steps:  # a shared start: the batch ends together
                x, k, c, k_host = core.x.clone(), core.k.clone(), core.c.clone(), int(core.k_host[0])
                step = policy.act(x, k, c, noise=draw_noise(), cond_noise=cond_noise, schedule=schedule)
                if not deterministic[k_host]:
                    rollout.add(x, step.x_prev, k, c, step.log_prob, traj)
                    for observer in self.observers:
                        observer.stored_step(step.x0)
                core.advance(step.x_prev, score=False)
            images = core.decode(core.x)
            conditions = core.condition_input(core.c)
            if self.overlap_rewards:
                rollout.end_batch(reward_async(core.reward_fn, images, conditions))
            else:
                rollout.end_batch(core.reward_fn(images, conditions))
            for observer in self.observers:
                observer.end_batch(step.x_prev if step is not None else core.x)
            if core.window.needs_probe:
                self.phase("HRF-D probe")
            core.begin(self.envs.np_random)  # the next batch (the vector env's autoreset)
            self.phase("rollout")
        return rollout
