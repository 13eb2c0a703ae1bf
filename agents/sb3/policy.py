"""An SB3 actor-critic policy whose actor is the UNet Gaussian policy of the denoising MDP.

* Actor: :class:`~agents.common.policy.DiffusionPolicy` (the same class PPO-IS trains), i.e.
  ``π(x_{t-1} | x_t, t, c) = N(μ_θ(x_t, t, c), σ_t² I)`` with σ_t fixed by the scheduler (state
  dependent, not learned) and the log-probability **averaged over pixels** — SB3's
  ``DiagGaussianDistribution`` sums over dimensions, which at 16²…256²·3 pixels makes PPO ratios
  explode. σ = 0 steps (the last DDIM step) are deterministic: log-prob 0, ratio 1, no gradient.
* Critic: :class:`ValueNet`, a small CNN on ``(c, t, x_t)``.

Observations are used as they are: SB3's ``preprocess_obs`` (which one-hot encodes ``Discrete``
entries of Dict spaces) is bypassed; ``"t"`` (a scheduler timestep) is mapped to the step index.

Build it through SB3 with the env's chain settings::

    venv = DiffusionVecEnv(num_envs=32, window="full", reward="jpeg_compressibility")
    model = PPO(DiffusionActorCriticPolicy, venv, policy_kwargs=venv.policy_kwargs())

``model.save`` / ``PPO.load`` work: the UNet is rebuilt from the model spec, then the fine-tuned
weights are loaded.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from gymnasium import spaces
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule
from torch import Tensor, nn

from agents.common.policy import DiffusionPolicy
from diffusion_gym import sampling
from diffusion_gym.conditions import make_conditions
from diffusion_gym.envs.denoise import observation_timesteps, timestep_space_size
from diffusion_gym.families import load_family

_HALF_LOG_2PI_E = 0.5 * math.log(2 * math.pi * math.e)


class PixelMeanGaussian(Distribution):
    """``N(mean, std² I)`` over images with the log-probability and entropy **averaged over pixels**.

    The log-density is :func:`diffusion_gym.sampling.log_prob` (0 where σ = 0). Built by
    :class:`DiffusionActorCriticPolicy`; ``std`` is the scheduler's σ_t (``(B, 1, 1, 1)``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.mean: Tensor | None = None
        self.std: Tensor | None = None

    def proba_distribution_net(self, *args: Any, **kwargs: Any) -> nn.Module:
        """Not used: the UNet is the mean network and σ comes from the scheduler."""
        raise NotImplementedError("PixelMeanGaussian's parameters come from the UNet and the scheduler")

    def proba_distribution(self, mean: Tensor, std: Tensor) -> PixelMeanGaussian:  # type: ignore[override]
        """Set the parameters: ``mean`` ``(B, C, H, W)`` and ``std`` broadcastable to it."""
        self.mean, self.std = mean, torch.broadcast_to(std, mean.shape[:1] + (1,) * (mean.ndim - 1))
        return self

    def _params(self) -> tuple[Tensor, Tensor]:
        if self.mean is None or self.std is None:
            raise RuntimeError("call proba_distribution(mean, std) first")
        return self.mean, self.std

    def log_prob(self, actions: Tensor) -> Tensor:
        """``(B,)`` log-density averaged over pixels; ``actions`` may be flat ``(B, C·H·W)``."""
        mean, std = self._params()
        return sampling.log_prob(actions.reshape(mean.shape), mean, std)

    def entropy(self) -> Tensor:
        """``(B,)`` entropy per pixel, ``log σ + ½ log 2πe`` (0 where σ = 0: a deterministic step)."""
        _, std = self._params()
        s = std.flatten(1)[:, 0]
        safe = torch.where(s == 0, torch.ones_like(s), s)
        return torch.where(s == 0, torch.zeros_like(s), safe.log() + _HALF_LOG_2PI_E)

    def sample(self) -> Tensor:
        """``mean + σ·z``."""
        mean, std = self._params()
        return mean + std * torch.randn_like(mean)

    def mode(self) -> Tensor:
        """The mean (the deterministic action)."""
        return self._params()[0]

    def actions_from_params(self, mean: Tensor, std: Tensor, deterministic: bool = False) -> Tensor:
        """Set the parameters and return actions."""
        return self.proba_distribution(mean, std).get_actions(deterministic=deterministic)

    def log_prob_from_params(self, mean: Tensor, std: Tensor) -> tuple[Tensor, Tensor]:
        """Sample actions and return them with their log-probabilities."""
        actions = self.actions_from_params(mean, std)
        return actions, self.log_prob(actions)


class ValueNet(nn.Module):
    """A small critic ``V(c, k, x_t)``: a strided CNN on the image, embeddings of step index and class.

    Args:
        in_channels: image channels.
        num_steps: K (the step-index embedding's size).
        num_classes: number of conditions (1 for an unconditional model).
        channels: widths of the two stride-2 convolutions.
        embed_dim: size of the step and class embeddings and of the hidden layer.
    """

    def __init__(
        self,
        in_channels: int,
        num_steps: int,
        num_classes: int,
        channels: tuple[int, int] = (16, 32),
        embed_dim: int = 64,
    ) -> None:
        super().__init__()
        c1, c2 = channels
        self.image = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(c2 * 16, embed_dim),
        )
        self.step = nn.Embedding(num_steps, embed_dim)
        self.condition = nn.Embedding(num_classes, embed_dim)
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(embed_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, 1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, x: Tensor, k: Tensor, c: Tensor) -> Tensor:
        """``(B, 1)`` values."""
        return self.head(self.image(x.float()) + self.step(k) + self.condition(c))


class DiffusionActorCriticPolicy(BasePolicy):
    """SB3 policy: the UNet Gaussian policy (actor) and a small CNN critic.

    Args:
        observation_space: the env's ``Dict({"c", "t", "x_t"})`` space.
        action_space: the env's image ``Box``.
        lr_schedule: SB3's learning-rate schedule (its value at progress 1 is the initial rate).
        model: model spec for :func:`diffusion_gym.families.load_family` (a string, so that saved agents
            can rebuild the UNet), e.g. ``"embedded:digits"`` or ``"random:sd-tiny"``.
        num_steps: K of the env's chain.
        eta: the env's DDIM eta.
        scheduler: ``"ddim"`` or ``"ddpm"``, as the env.
        prompts: a text-to-image env's prompt list (the observations' ``"c"`` are ids into it).
        negative_prompt: a text-to-image env's negative prompt.
        guidance_scale: the classifier-free guidance of the actor (default: the model's).
        critic_channels: widths of the critic's convolutions.
        critic_embed_dim: width of the critic's embeddings.
        autocast_dtype: run the UNet under autocast with this dtype (``None`` = fp32).
        optimizer_class: optimizer over actor and critic (default AdamW, as PPO-IS).
        optimizer_kwargs: its options (default ``weight_decay=1e-3``).
        use_sde: must be ``False`` (σ comes from the scheduler).
        squash_output: must be ``False``.

    Raises:
        ValueError: for observation/action spaces that do not match the model, or ``use_sde``.
    """

    def __init__(
        self,
        observation_space: spaces.Dict,
        action_space: spaces.Box,
        lr_schedule: Schedule,
        model: str = "embedded:digits",
        num_steps: int = 40,
        eta: float = 1.0,
        scheduler: str = "ddim",
        prompts: list[str] | None = None,
        negative_prompt: str | None = None,
        guidance_scale: float | None = None,
        critic_channels: tuple[int, int] = (16, 32),
        critic_embed_dim: int = 64,
        autocast_dtype: torch.dtype | None = None,
        optimizer_class: type[torch.optim.Optimizer] = torch.optim.AdamW,
        optimizer_kwargs: dict[str, Any] | None = None,
        use_sde: bool = False,
        squash_output: bool = False,
    ) -> None:
        if use_sde or squash_output:
            raise ValueError(
                "DiffusionActorCriticPolicy's σ is the scheduler's: use_sde and squash_output must be False, "
                f"got use_sde={use_sde!r}, squash_output={squash_output!r}"
            )
        if not isinstance(model, str):
            raise ValueError(f"model must be a model spec string (e.g. 'embedded:digits'), got {type(model).__name__}")
        if optimizer_kwargs is None:
            optimizer_kwargs = {"weight_decay": 1e-3} if optimizer_class is torch.optim.AdamW else {}
        super().__init__(
            observation_space,
            action_space,
            optimizer_class=optimizer_class,
            optimizer_kwargs=optimizer_kwargs,
            normalize_images=False,
        )
        self.model_spec, self.num_steps, self.eta, self.scheduler_kind = model, num_steps, eta, scheduler
        self.critic_channels, self.critic_embed_dim = tuple(critic_channels), critic_embed_dim
        self.autocast_dtype = autocast_dtype
        self.prompts = None if prompts is None else list(prompts)
        self.negative_prompt, self.guidance_scale = negative_prompt, guidance_scale

        family = load_family(model, scheduler=scheduler)
        conditions = make_conditions(family, self.prompts, negative_prompt)
        schedule = sampling.make_schedule(family.scheduler, num_steps, eta=eta)
        self.actor = DiffusionPolicy(
            family, schedule, autocast_dtype=autocast_dtype, conditions=conditions, guidance_scale=guidance_scale
        )
        self.sample_shape = tuple(int(s) for s in action_space.shape)
        self._check_spaces(observation_space, action_space, schedule)
        num_classes = int(observation_space["c"].n)
        self.critic = ValueNet(self.sample_shape[0], num_steps, num_classes, self.critic_channels, critic_embed_dim)
        step_of_t = torch.full((timestep_space_size(schedule),), -1, dtype=torch.long)
        step_of_t[observation_timesteps(schedule)] = torch.arange(num_steps)
        self.register_buffer("step_of_timestep", step_of_t, persistent=False)
        self.action_dist = PixelMeanGaussian()
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    def _check_spaces(self, observation_space: spaces.Space, action_space: spaces.Space, schedule: Any) -> None:
        unet_shape = tuple(self.actor.family.sample_shape)
        keys = ("c", "t", "x_t")
        if not isinstance(observation_space, spaces.Dict) or set(observation_space.spaces) != set(keys):
            raise ValueError(f"observation_space must be a Dict with keys {list(keys)}, got {observation_space}")
        if not isinstance(action_space, spaces.Box) or self.sample_shape != unet_shape:
            raise ValueError(f"action_space must be a Box of the model's state shape {unet_shape}, got {action_space}")
        if observation_space["t"].n != timestep_space_size(schedule):
            raise ValueError(
                f"observation 't' has {observation_space['t'].n} timesteps but the model's scheduler has "
                f"{timestep_space_size(schedule)}: the env and model={self.model_spec!r} do not match"
            )

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.pop("normalize_images", None)
        data.update(
            model=self.model_spec,
            num_steps=self.num_steps,
            eta=self.eta,
            scheduler=self.scheduler_kind,
            prompts=self.prompts,
            negative_prompt=self.negative_prompt,
            guidance_scale=self.guidance_scale,
            critic_channels=self.critic_channels,
            critic_embed_dim=self.critic_embed_dim,
            autocast_dtype=self.autocast_dtype,
            optimizer_class=self.optimizer_class,
            optimizer_kwargs=self.optimizer_kwargs,
            lr_schedule=self._dummy_schedule,
        )
        return data

    # ------------------------------------------------------------------------------- inputs
    def _schedule_on_device(self) -> None:
        device = self.step_of_timestep.device
        if self.actor.schedule.device != device:
            self.actor.schedule = self.actor.schedule.to(device)

    def unpack(self, obs: PyTorchObs) -> tuple[Tensor, Tensor, Tensor]:
        """``(x, k, c)`` from an observation batch (``t`` mapped to the step index ``k``; ``c`` condition ids).

        Raises:
            ValueError: if a timestep is not one of the policy's chain (env and policy differ in
                ``num_steps`` or scheduler). Checked on the CPU only (no host sync on accelerators).
        """
        self._schedule_on_device()
        device = self.step_of_timestep.device
        x = obs["x_t"].to(device=device, dtype=torch.float32).reshape(-1, *self.sample_shape)
        t = obs["t"].to(device).reshape(-1).long()
        c = obs["c"].to(device).reshape(-1).long()
        if device.type == "cpu" and bool(((t < 0) | (t >= self.step_of_timestep.numel())).any()):
            raise ValueError(f"observation timesteps must lie in [0, {self.step_of_timestep.numel() - 1}], got {t}")
        k = self.step_of_timestep[t.clamp(0, self.step_of_timestep.numel() - 1)]
        if device.type == "cpu" and bool((k < 0).any()):
            valid = self.actor.schedule.timesteps.tolist()
            raise ValueError(
                f"observation timesteps {sorted(set(t[k < 0].tolist()))} are not steps of the policy's chain "
                f"(num_steps={self.num_steps}, scheduler={self.scheduler_kind!r}); valid timesteps: {valid}"
            )
        return x, k, c

    # ------------------------------------------------------------------------------- SB3 API
    def forward(self, obs: PyTorchObs, deterministic: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """Sample actions; return ``(actions (B, C, H, W), values (B, 1), log_probs (B,))``."""
        x, k, c = self.unpack(obs)
        step = self.actor.act(x, k, c)
        actions, log_prob = step.x_prev, step.log_prob
        if deterministic:
            actions = step.mean.to(x.dtype)
            log_prob = sampling.log_prob(actions, step.mean, step.std)
        return actions, self.critic(x, k, c), log_prob

    def evaluate_actions(self, obs: PyTorchObs, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(values, log_prob, entropy)`` of stored actions, with gradients (PPO's update).

        ``log_prob`` is :meth:`DiffusionPolicy.evaluate`'s: the same number PPO-IS computes.
        """
        x, k, c = self.unpack(obs)
        step = self.actor.evaluate(x, k, c, actions.reshape(x.shape).to(x.dtype))
        entropy = self.action_dist.proba_distribution(step.mean, step.std).entropy()
        return self.critic(x, k, c), step.log_prob, entropy

    def get_distribution(self, obs: PyTorchObs) -> PixelMeanGaussian:
        """The action distribution at ``obs`` (mean from the UNet, σ from the scheduler)."""
        x, k, c = self.unpack(obs)
        out = self.actor.model_output(x, k, c)
        mean = sampling.step_mean(out, x, k, self.actor.schedule)
        return PixelMeanGaussian().proba_distribution(mean, sampling.step_std(k, self.actor.schedule, mean))

    def predict_values(self, obs: PyTorchObs) -> Tensor:
        """``(B, 1)`` critic values."""
        x, k, c = self.unpack(obs)
        return self.critic(x, k, c)

    def _predict(self, observation: PyTorchObs, deterministic: bool = False) -> Tensor:
        return self.get_distribution(observation).get_actions(deterministic=deterministic)

    # ------------------------------------------------------------------------------- extras
    @torch.no_grad()
    def generate(self, n: int, seed: int = 1234, conditions: Tensor | None = None) -> Tensor:
        """``n`` samples from fixed noise (:func:`diffusion_gym.sampling.generate`): images in ``[-1, 1]`` or latents.

        Conditions (ids) default to ``i mod`` the number of conditions (classes, prompts), so that
        evaluations of different policies (and of PPO-IS's fixed-noise evaluation) are paired image
        by image. :meth:`generate_images` decodes them.
        """
        self._schedule_on_device()
        if conditions is None and self.actor.conditional:
            conditions = torch.arange(n) % int(self.observation_space["c"].n)
        if conditions is not None:
            conditions = self.actor.conditioning(conditions.to(self.device))
        was_training = self.training
        self.set_training_mode(False)
        images = sampling.generate(
            self.actor.denoiser(), self.actor.schedule, n, self.sample_shape, conditions, seed=seed, device=self.device
        )
        self.set_training_mode(was_training)
        return images

    @torch.no_grad()
    def generate_images(self, n: int, seed: int = 1234, conditions: Tensor | None = None) -> Tensor:
        """:meth:`generate`'s samples as images in ``[0, 1]`` (a latent model's decoded by its VAE)."""
        return self.actor.family.decode(self.generate(n, seed, conditions))


class WarmupSchedule:
    """Linear learning-rate warm-up, then constant: an SB3 schedule of ``progress_remaining`` (1 → 0).

    Args:
        learning_rate: the rate after warm-up.
        warmup_fraction: fraction of the training run (of ``total_timesteps``) spent warming up.
    """

    def __init__(self, learning_rate: float, warmup_fraction: float) -> None:
        if not (learning_rate > 0 and 0 <= warmup_fraction <= 1):
            raise ValueError(
                f"need learning_rate > 0 and 0 <= warmup_fraction <= 1, got {learning_rate!r}, {warmup_fraction!r}"
            )
        self.learning_rate, self.warmup_fraction = float(learning_rate), float(warmup_fraction)

    def __call__(self, progress_remaining: float) -> float:
        """The rate at ``progress_remaining``; SB3 updates it once per rollout."""
        done = 1.0 - progress_remaining
        if self.warmup_fraction == 0 or done >= self.warmup_fraction:
            return self.learning_rate
        return self.learning_rate * max(done, 0.0) / self.warmup_fraction
