"""``info_x0=True``: the env reports the x̂0 prediction of the step just taken (single and vector env)."""

import numpy as np
import pytest
import torch

from diffusion_gym import sampling
from diffusion_gym.envs import DiffusionDenoiseEnv, DiffusionDenoiseVectorEnv

# The embedded networks are tiny: one thread is as fast on quiet cores and far faster on busy ones.
pytestmark = pytest.mark.usefixtures("one_thread")

K = 4


class CountingDenoiser:
    """The base UNet as a denoiser that counts its calls."""

    def __init__(self, unet):
        self.denoise = sampling.unet_denoiser(unet)
        self.calls = 0

    def __call__(self, x, t, c):
        self.calls += 1
        return self.denoise(x, t, c)


def _policy_step(unet, schedule, x, k, c, z):
    t = sampling.timestep_at(k, schedule).expand(x.shape[0]) if isinstance(k, int) else schedule.timesteps[k]
    with torch.no_grad():
        out = unet(x, t, class_labels=c).sample
    return sampling.denoise_step(out, x, k, schedule, noise=z)


def test_single_env_x0_is_the_policy_steps_x0(model):
    unet, _ = model
    env = DiffusionDenoiseEnv(model=model, num_steps=K, info_x0=True)
    schedule = env.core.schedule
    obs, info = env.reset(seed=0)
    assert "x0" not in info  # no step taken yet
    g = torch.Generator().manual_seed(1)
    for k in range(K):
        x, c = torch.from_numpy(obs["x_t"])[None], torch.tensor([int(obs["c"])])
        step = _policy_step(unet, schedule, x, k, c, torch.randn(x.shape, generator=g))
        obs, _, terminated, _, info = env.step(step.x_prev[0].numpy())
        assert info["x0"].dtype == np.float32 and info["x0"].shape == (1, 16, 16)
        np.testing.assert_allclose(info["x0"], step.x0[0].numpy(), atol=1e-5)
    assert terminated


def test_vector_env_x0_every_step_and_at_autoreset(model):
    unet, _ = model
    n = 4
    denoiser = CountingDenoiser(unet)
    envs = DiffusionDenoiseVectorEnv(
        num_envs=n, model=model, num_steps=K, window=[(1, 2)], start_mode="per_sample", info_x0=True, denoiser=denoiser
    )
    schedule = envs.core.schedule
    obs, info = envs.reset(seed=0)
    g = torch.Generator().manual_seed(2)
    ended = 0
    for _ in range(2 * K):
        k = info["step_index"]
        step = _policy_step(unet, schedule, obs["x_t"], k, obs["c"], torch.randn(obs["x_t"].shape, generator=g))
        obs, _, terminated, _, info = envs.step(step.x_prev)
        torch.testing.assert_close(info["x0"], step.x0, atol=1e-5, rtol=0)
        if terminated.any():
            ended += int(terminated.sum())
            torch.testing.assert_close(info["final_info"]["x0"], step.x0, atol=1e-5, rtol=0)
    assert ended >= n and denoiser.calls == 2 * K  # one batched denoiser call per step, none at reset

    # Off (the default): no x0 in info and not a single denoiser call.
    denoiser.calls = 0
    plain = DiffusionDenoiseVectorEnv(num_envs=n, model=model, num_steps=K, denoiser=denoiser)
    obs, info = plain.reset(seed=0)
    for _ in range(K):
        obs, _, _, _, info = plain.step(obs["x_t"] * 0.5)
        assert "x0" not in info
    assert denoiser.calls == 0


def test_info_x0_must_be_a_bool(model):
    with pytest.raises(TypeError, match="info_x0"):
        DiffusionDenoiseEnv(model=model, num_steps=K, info_x0="yes")
