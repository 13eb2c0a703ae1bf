"""VARD's value function ``V(c, t, x_t) ≈ E[r(x_0) | x_t]``: a small conv net fit by regression.

The value is what turns the terminal reward into a dense, differentiable signal (VARD, Dai et al.,
2025, arXiv 2505.15791): trained on the states of rollouts, each labelled with its episode's final
reward, it predicts the reward from any intermediate image, and its gradient with respect to the
image exists even when the reward's does not (JPEG size).

States are indexed by step index ``k ∈ [0, K]`` (``k = K`` is the clean image). The value network is
told the noise level through the scheduler timestep of the state; the clean image gets the timestep
the last DDIM step moves to (``t_{K-1} − T/K``, i.e. below every sampling timestep, see
:func:`state_timesteps`), because the env reports ``t = 0`` both for the last noisy state (whose
``t_{K-1}`` may be 0) and for the clean one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import Tensor, nn

from diffusion_gym import sampling
from diffusion_gym.conditions import ConditionSet, PromptConditions
from diffusion_gym.envs import DiffusionDenoiseVectorEnv
from diffusion_gym.families import Conditioning

from ..common.policy import DiffusionPolicy

__all__ = [
    "ValueBuffer",
    "ValueData",
    "ValueNetwork",
    "collect_value_data",
    "explained_variance",
    "fit_value",
    "state_timesteps",
]


def state_timesteps(schedule: sampling.DenoisingSchedule) -> Tensor:
    """``(K + 1,)`` timesteps of the states ``x_0 … x_K`` of a K-step chain (int64, on the schedule's device).

    ``state_timesteps(s)[k] = t_k`` for ``k < K``; the clean image ``x_K`` gets ``t_{K-1} − T/K``.
    """
    last = schedule.timesteps[-1:] - max(1, schedule.num_train_timesteps // schedule.num_steps)
    return torch.cat([schedule.timesteps, last])


def _sinusoidal(t: Tensor, dim: int, scale: float) -> Tensor:
    """Sinusoidal features of (float) timesteps ``t / scale · 1000``, as in diffusion UNets."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = (t.float() * (1000.0 / scale)).unsqueeze(1) * freqs.unsqueeze(0)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class _Block(nn.Module):
    """GroupNorm → SiLU → conv, FiLM-modulated by the (time, class) embedding, with a residual."""

    def __init__(self, channels: int, emb_dim: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(min(8, channels), channels)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * channels)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        scale, shift = self.film(emb).unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)
        return h + self.conv(nn.functional.silu(self.norm(h) * (1 + scale) + shift))


def prompt_features(conditions: ConditionSet) -> tuple[Callable[[Tensor], Tensor], int] | None:
    """A text model's condition features for the value: prompt ids -> pooled prompt embeddings.

    The pooled embedding (SD3's and FLUX's ``pooled_projections``, SDXL's ``text_embeds``) where the
    family has one, else the mean of the token embeddings. Returns the feature function and its size,
    or ``None`` for class conditions (the value embeds class ids itself).
    """
    if not isinstance(conditions, PromptConditions):
        return None

    def pooled(encoded: Conditioning) -> Tensor:
        return (encoded.pooled if encoded.pooled is not None else encoded.embeds.mean(dim=1)).detach()

    probe = conditions.family.encode_conditions([""])  # the size, before any prompt is drawn
    return (lambda ids: pooled(conditions.encode(ids))), int(pooled(probe).shape[-1])


class ValueNetwork(nn.Module):
    """``V(c, t, x_t)``: predicted final reward of a (noisy) image at timestep ``t`` with condition ``c``.

    A conv trunk (stem, then ``depth`` stages of a FiLM residual block and a stride-2 conv), global
    average pooling, and an MLP head on the pooled features and the (time + class) embedding. Any
    image size works (the pooling is global). The output is in reward units:
    ``V = target_mean + target_std · head``, where the normalisation follows the data it is fit on
    (:func:`fit_value`), so the head (:meth:`normalized`) works at unit scale whatever the reward's.

    Args:
        in_channels: image channels ``C``.
        num_classes: number of class conditions (``None``: unconditional).
        condition_dim: size of the condition features of a text-to-image model (the prompt's pooled
            embedding, :func:`prompt_features`); the value is then called with condition ids and
            turns them into features with :attr:`condition_features`, which the trainer sets.
        width: channels of the first stage (doubled per stage).
        depth: number of down-sampling stages.
        num_train_timesteps: ``T`` of the scheduler (scales the timestep features).
        emb_dim: size of the time/class embedding.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int | None = None,
        width: int = 32,
        depth: int = 2,
        num_train_timesteps: int = 1000,
        emb_dim: int = 64,
        condition_dim: int | None = None,
    ) -> None:
        super().__init__()
        if num_classes and condition_dim:
            raise ValueError("a value network is conditioned on class ids or on prompt features, not both")
        self.num_classes = num_classes
        self.num_train_timesteps = num_train_timesteps
        self.emb_dim = emb_dim
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(num_classes, emb_dim) if num_classes else None
        self.condition_proj = nn.Linear(condition_dim, emb_dim) if condition_dim else None
        self.condition_features: Callable[[Tensor], Tensor] | None = None
        """Condition ids -> ``(B, condition_dim)`` features (a text model's prompt embeddings)."""
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        blocks, downs, channels = [], [], width
        for _ in range(depth):
            blocks.append(_Block(channels, emb_dim))
            downs.append(nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1))
            channels *= 2
        self.blocks, self.downs = nn.ModuleList(blocks), nn.ModuleList(downs)
        self.out_block = _Block(channels, emb_dim)
        self.head = nn.Sequential(
            nn.Linear(channels + emb_dim + in_channels, 128), nn.SiLU(), nn.Linear(128, 1)
        )  # + the image's channel means: a direct path for global statistics
        self.register_buffer("target_mean", torch.zeros(()))
        self.register_buffer("target_std", torch.ones(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def set_normalization(self, targets: Tensor) -> None:
        """Set the output scale to the mean and std of ``targets`` (std floored at 1e-6), keeping ``V`` unchanged.

        The first call just sets the scale. Later calls (the reward moves as the policy improves)
        rescale the head's last layer so that ``V`` itself is preserved (PopArt, van Hasselt et al.,
        2016): only the normalised units change.
        """
        mean = targets.float().mean().item()
        std = max(targets.float().std().item() if targets.numel() > 1 else 1.0, 1e-6)
        if bool(self.initialized):
            last = self.head[-1]
            old_mean, old_std = self.target_mean.item(), self.target_std.item()
            last.weight.mul_(old_std / std)
            last.bias.mul_(old_std).add_(old_mean - mean).div_(std)
        self.target_mean.fill_(mean)
        self.target_std.fill_(std)
        self.initialized.fill_(True)

    def normalized(self, x: Tensor, t: Tensor, c: Tensor | None = None) -> Tensor:
        """The head's output, ``(V − target_mean) / target_std``, shape ``(B,)``."""
        emb = self.time_mlp(_sinusoidal(t.to(x.device), self.emb_dim, self.num_train_timesteps))
        if self.class_emb is not None:
            if c is None:
                raise ValueError("this value network is class-conditional: pass conditions (class ids)")
            emb = emb + self.class_emb(c.to(x.device).long())
        if self.condition_proj is not None:
            if c is None or self.condition_features is None:
                raise ValueError("this value network is prompt-conditioned: set condition_features and pass prompt ids")
            emb = emb + self.condition_proj(self.condition_features(c).to(x.device).float())
        h = self.stem(x.float())
        for block, down in zip(self.blocks, self.downs, strict=True):
            h = down(block(h, emb))
        h = self.out_block(h, emb).mean(dim=(2, 3))
        return self.head(torch.cat([h, emb, x.float().mean(dim=(2, 3))], dim=1)).squeeze(1)

    def forward(self, x: Tensor, t: Tensor, c: Tensor | None = None) -> Tensor:
        """``(B,)`` predicted final rewards of images ``x`` (``[-1, 1]`` model scale) at timesteps ``t``."""
        return self.target_mean + self.target_std * self.normalized(x, t, c)


class ValueData(NamedTuple):
    """Regression data: states of rollouts and their episodes' final rewards."""

    x: Tensor
    """``(N, C, H, W)`` images of the states."""
    t: Tensor
    """``(N,)`` their timesteps (:func:`state_timesteps`)."""
    k: Tensor
    """``(N,)`` their step indices (``K`` = clean)."""
    c: Tensor
    """``(N,)`` conditions (class ids; 0 for an unconditional model)."""
    target: Tensor
    """``(N,)`` the final reward of each state's episode."""

    def __len__(self) -> int:
        return int(self.target.shape[0])

    def rows(self, index: Tensor) -> ValueData:
        """The rows at ``index``."""
        return ValueData(*(v[index] for v in self))

    @staticmethod
    def cat(parts: list[ValueData]) -> ValueData:
        """Concatenate row-wise."""
        return ValueData(*(torch.cat(column) for column in zip(*parts, strict=True)))


class ValueBuffer:
    """The value's training set: the rollout states of the last ``max_epochs`` epochs.

    Older policies' states stay useful for a while (the value generalises across nearby policies)
    and a larger set regularises the fit; the oldest epoch is dropped first.

    Args:
        max_epochs: epochs of rollouts kept.
    """

    def __init__(self, max_epochs: int = 4) -> None:
        if max_epochs < 1:
            raise ValueError(f"max_epochs must be >= 1, got {max_epochs}")
        self.max_epochs = max_epochs
        self.parts: list[ValueData] = []

    def add(self, data: ValueData) -> None:
        """Add one epoch's rollout states (dropping the oldest epoch when full)."""
        self.parts = [*self.parts, data][-self.max_epochs :]

    def data(self) -> ValueData:
        """All kept rows."""
        if not self.parts:
            raise ValueError("the value buffer is empty")
        return ValueData.cat(self.parts)

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)


@torch.no_grad()
def collect_value_data(
    envs: DiffusionDenoiseVectorEnv,
    policy: DiffusionPolicy,
    num_batches: int,
    generator: torch.Generator,
) -> tuple[ValueData, Tensor]:
    """Roll out ``num_batches`` batches of whole episodes and label every state with its final reward.

    The env must start its batches together (``start_mode="shared"``, the default), so that all
    episodes of a batch end on the same step. Every state is kept: the start state, each
    intermediate one and the clean image (from ``info["final_obs"]``).

    Args:
        envs: the vector env (its reward is any registered or custom reward; no gradient needed).
        policy: the current policy (its UNet samples the actions).
        num_batches: batches of ``envs.num_envs`` episodes.
        generator: CPU generator of the policy noise.

    Returns:
        ``(data, rewards)``: the labelled states, and the ``(num_batches · B,)`` final rewards.
    """
    if envs.core.start_mode != "shared":
        raise ValueError("collect_value_data needs an env with start_mode='shared' (whole batches end together)")
    timesteps = state_timesteps(policy.schedule).to(envs.device)
    K = policy.schedule.num_steps
    parts, all_rewards = [], []
    obs, info = envs.observation()
    for _ in range(num_batches):
        xs, ks, cs = [], [], []
        rewards = None
        for _ in range(int(envs.steps_remaining().max())):
            k = info["step_index"]
            xs.append(obs["x_t"])
            ks.append(k)
            cs.append(obs["c"])
            z = torch.randn(obs["x_t"].shape, generator=generator).to(envs.device)
            step = policy.act(obs["x_t"], k, obs["c"] if policy.conditional else None, noise=z)
            obs, rewards, terminated, _, info = envs.step(step.x_prev)
        if rewards is None or not bool(terminated.all()):
            raise RuntimeError("a batch did not end together: use start_mode='shared'")
        final = info["final_obs"]
        xs.append(final["x_t"])
        ks.append(torch.full_like(ks[-1], K))
        cs.append(final["c"])
        k_all = torch.cat(ks)
        steps = len(xs)
        parts.append(
            ValueData(
                x=torch.cat(xs),
                t=timesteps[k_all],
                k=k_all,
                c=torch.cat(cs),
                target=rewards.float().repeat(steps),
            )
        )
        all_rewards.append(rewards.float())
    return ValueData.cat(parts), torch.cat(all_rewards)


def _minibatches(n: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[Tensor]:
    """``steps`` index batches of ``batch_size`` rows, passing over shuffled data as often as needed."""
    order = torch.randperm(n, generator=generator)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=generator), 0
        yield order[pos : pos + batch_size]
        pos += batch_size


def fit_value(
    value: ValueNetwork,
    optimizer: torch.optim.Optimizer,
    data: ValueData,
    num_steps: int,
    batch_size: int,
    generator: torch.Generator,
    max_grad_norm: float = 1.0,
) -> dict[str, float]:
    """Regress ``value`` on ``data`` (MSE in normalised units) for ``num_steps`` optimizer steps.

    Before fitting, the value's output normalisation is set to ``data``'s target mean and std
    (:meth:`ValueNetwork.set_normalization`, which preserves the value's predictions).

    Returns:
        ``loss`` (mean normalised MSE over the steps), ``final_loss`` (normalised MSE of the last
        minibatch) and ``explained_variance`` (``1 − MSE / Var(target)`` over ``data``, in
        reward units, computed after fitting; 0 = no better than the mean, 1 = perfect).
    """
    value.set_normalization(data.target)
    value.train()
    batch_size = min(batch_size, len(data))
    total, last = 0.0, float("nan")
    for index in _minibatches(len(data), batch_size, num_steps, generator):
        rows = data.rows(index.to(data.x.device))
        target = (rows.target - value.target_mean) / value.target_std
        loss = nn.functional.mse_loss(value.normalized(rows.x, rows.t, rows.c), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(value.parameters(), max_grad_norm)
        optimizer.step()
        last = loss.item()
        total += last
    value.eval()
    return {
        "loss": total / max(num_steps, 1),
        "final_loss": last,
        "explained_variance": explained_variance(value, data),
    }


@torch.no_grad()
def explained_variance(value: ValueNetwork, data: ValueData, batch_size: int = 1024) -> float:
    """``1 − MSE(V, target) / Var(target)`` over ``data`` (1: perfect; 0: the constant baseline)."""
    preds = torch.cat(
        [
            value(data.x[i : i + batch_size], data.t[i : i + batch_size], data.c[i : i + batch_size])
            for i in range(0, len(data), batch_size)
        ]
    )
    var = data.target.float().var().item() if len(data) > 1 else 0.0
    mse = (preds - data.target.float()).pow(2).mean().item()
    return 1.0 - mse / var if var > 0 else float("nan")
