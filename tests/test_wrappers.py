"""Potential-based shaping: the shaped return is the unshaped one minus Φ(s_0), for any policy."""

import numpy as np
import pytest
import torch

from diffusion_gym import sampling
from diffusion_gym.envs import DiffusionDenoiseEnv, DiffusionDenoiseVectorEnv
from diffusion_gym.wrappers import GroupDiversityPotential, PotentialShaping, VectorPotentialShaping

# The embedded networks are tiny: one thread is as fast on quiet cores and far faster on busy ones.
pytestmark = pytest.mark.usefixtures("one_thread")

K = 4


def brightness(images, conditions=None):
    return images.mean(dim=(1, 2, 3))


def single_potential(obs):
    """An arbitrary state function: depends on the image, the timestep and the condition."""
    return float(np.tanh(obs["x_t"]).mean() * 3 + obs["t"] / 500 - 0.1 * obs["c"])


def batched_potential(obs):
    return torch.tanh(obs["x_t"]).mean(dim=(1, 2, 3)) * 3 + obs["t"].float() / 500 - 0.1 * obs["c"].float()


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_single_env_shaped_return_is_unshaped_minus_phi0(model, gamma):
    env = PotentialShaping(
        DiffusionDenoiseEnv(model=model, num_steps=K, reward=brightness, window=[(0, 2)]), single_potential, gamma
    )
    rng = np.random.default_rng(0)
    for episode in range(4):  # random policies, random start steps
        obs, _ = env.reset(seed=episode)
        phi0 = single_potential(obs)
        shaped = raw = 0.0
        for k in range(K + 1):
            action = rng.normal(0, 1 + episode, size=(1, 16, 16)).clip(-5, 5).astype(np.float32)
            obs, reward, terminated, _, info = env.step(action)
            raw += gamma**k * (reward - info["shaping_reward"])
            shaped += gamma**k * reward
            if terminated:
                break
        assert terminated and raw == pytest.approx(info["raw_reward"] * gamma**k)
        assert shaped - raw == pytest.approx(-phi0, abs=1e-9)
    with pytest.raises(ValueError, match="gamma"):
        PotentialShaping(env.env, single_potential, gamma=1.5)


@pytest.mark.parametrize("gamma", [1.0, 0.8])
def test_vector_env_shaped_return_is_unshaped_minus_phi0_across_autoresets(model, gamma):
    n = 6
    base = DiffusionDenoiseVectorEnv(
        num_envs=n, model=model, num_steps=K, reward=brightness, window=[(0, 2)], start_mode="per_sample"
    )
    envs = VectorPotentialShaping(base, batched_potential, gamma)
    obs, _ = envs.reset(seed=0)
    phi0 = batched_potential(obs)
    shaped, raw, age = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    g = torch.Generator().manual_seed(0)
    finished = 0
    for _ in range(3 * K):
        action = (torch.randn((n, 1, 16, 16), generator=g) * 2).clamp(-5, 5)
        obs, reward, terminated, _, info = envs.step(action)
        discount = gamma**age
        shaped += discount * reward
        raw += discount * (reward - info["shaping_reward"])
        age += 1
        for i in terminated.nonzero().flatten().tolist():
            assert raw[i].item() == pytest.approx(gamma ** (age[i].item() - 1) * info["raw_reward"][i].item(), abs=1e-5)
            assert (shaped[i] - raw[i]).item() == pytest.approx(-phi0[i].item(), abs=1e-5)
            finished += 1
            shaped[i] = raw[i] = age[i] = 0.0
            phi0[i] = batched_potential(obs)[i]  # the new episode's first state
    assert finished >= n


def test_group_diversity_potential_known_answers(model):
    unet, _ = model
    # Two groups of two: identical images (distance 0) and orthogonal ones (distance 1).
    x = torch.zeros(4, 1, 16, 16)
    x[0, 0, 0, 0] = x[1, 0, 0, 0] = 1.0
    x[2, 0, 0, 0] = 1.0
    x[3, 0, 1, 1] = 1.0
    obs = {"x_t": x, "t": torch.zeros(4, dtype=torch.long), "c": torch.zeros(4, dtype=torch.long)}
    torch.testing.assert_close(GroupDiversityPotential(2, scale=0.5)(obs), torch.tensor([0.0, 0.0, 0.5, 0.5]))
    # One group of three with the third orthogonal to the first two (identical): 1/2, 1/2, 1.
    torch.testing.assert_close(
        GroupDiversityPotential(3)({k: v[1:] for k, v in obs.items()} | {"x_t": x[[0, 1, 3]]}),
        torch.tensor([0.5, 0.5, 1.0]),
    )

    # With a denoiser the features are the x̂0 predictions, and the shaping still telescopes.
    n = 4
    base = DiffusionDenoiseVectorEnv(num_envs=n, model=model, num_steps=K, reward=brightness, samples_per_reference=2)
    schedule = base.core.schedule
    potential = GroupDiversityPotential(2, denoiser=sampling.unet_denoiser(unet), schedule=schedule)
    envs = VectorPotentialShaping(base, potential)
    obs, _ = envs.reset(seed=1)
    phi0 = potential(obs)
    total_shaping = torch.zeros(n)
    for _ in range(K):
        obs, _, terminated, _, info = envs.step(obs["x_t"] * 0.7)
        total_shaping += info["shaping_reward"]
    assert bool(terminated.all())
    torch.testing.assert_close(total_shaping, -phi0, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="group_size"):
        GroupDiversityPotential(1)
