"""Bad input to the envs gets one clear error, and the env is left as it was; good numpy input is accepted."""

import re

import numpy as np
import pytest
import torch
from _tiny_unet import tiny_unet
from diffusers import DDIMScheduler

from diffusion_gym.conditions import check_condition
from diffusion_gym.envs import DenoiseCore, DiffusionDenoiseEnv, DiffusionDenoiseVectorEnv
from diffusion_gym.models import LoadedModel, load_model

K = 4
SHAPE = (2, 1, 16, 16)


@pytest.fixture(scope="module")
def model():
    return load_model("embedded:digits")


def _vector_env(model, **kwargs):
    return DiffusionDenoiseVectorEnv(num_envs=2, model=model, num_steps=K, **kwargs)


def test_vector_env_takes_a_numpy_action_like_the_same_tensor(model):
    by_numpy, by_tensor = _vector_env(model), _vector_env(model)
    by_numpy.reset(seed=0)
    by_tensor.reset(seed=0)
    by_numpy.action_space.seed(1)
    action = by_numpy.action_space.sample() * 0.1  # what Gymnasium users step a vector env with
    assert isinstance(action, np.ndarray) and action.shape == SHAPE
    obs_a, reward_a, *_ = by_numpy.step(action)
    obs_b, reward_b, *_ = by_tensor.step(torch.from_numpy(action))
    assert isinstance(obs_a["x_t"], torch.Tensor) and obs_a["x_t"].device == by_numpy.device
    assert torch.equal(obs_a["x_t"], obs_b["x_t"]) and torch.equal(reward_a, reward_b)
    obs, *_ = by_numpy.step(np.zeros(SHAPE, np.float64))  # any float dtype, as for tensors
    assert obs["x_t"].dtype == torch.float32 and bool((obs["x_t"] == 0).all())


def test_vector_env_names_what_is_wrong_with_an_action(model):
    envs = _vector_env(model)
    envs.reset(seed=0)
    x_before = envs.core.x.clone()
    with pytest.raises(ValueError, match=r"shape \(2, 1, 16, 16\), got shape \(2, 16, 16\)$"):
        envs.step(np.zeros((2, 16, 16), np.float32))
    with pytest.raises(ValueError, match=r"shape \(2, 1, 16, 16\), got shape \(3, 1, 16, 16\)$"):
        envs.step(torch.zeros(3, 1, 16, 16))
    with pytest.raises(ValueError, match="floating-point array.*got dtype int64"):
        envs.step(np.zeros(SHAPE, np.int64))
    with pytest.raises(ValueError, match=r"torch.Tensor of shape \(2, 1, 16, 16\), got builtins.list"):
        envs.step(np.zeros(SHAPE, np.float32).tolist())
    with pytest.raises(ValueError, match="NaN"):
        envs.step(np.full(SHAPE, np.nan, np.float32))
    assert torch.equal(envs.core.x, x_before) and int(envs.core.k_host[0]) == 0  # nothing was taken


@pytest.mark.parametrize("bad", [3.7, True, "3", 10, -1, np.float32(0.5), [3]])
def test_reset_refuses_a_condition_that_is_not_a_class_id(model, bad):
    single = DiffusionDenoiseEnv(model=model, num_steps=K)
    single.reset(seed=0)
    with pytest.raises(
        ValueError, match=r"condition must be an integer class id in \[0, 9\], got " + re.escape(repr(bad))
    ):
        single.reset(options={"condition": bad})
    envs = _vector_env(model)
    envs.reset(seed=0)
    with pytest.raises(ValueError, match=r"condition must be an integer class id in \[0, 9\]"):
        envs.reset(options={"condition": bad})


def test_a_refused_reset_leaves_the_env_as_it_was(model):
    refused, fresh = DiffusionDenoiseEnv(model=model, num_steps=K), DiffusionDenoiseEnv(model=model, num_steps=K)
    refused.reset(seed=0)
    fresh.reset(seed=0)
    for options in ({"condition": 3.7}, {"start_step": True}, {"start_step": K}):
        with pytest.raises(ValueError):
            refused.reset(options=options)
    obs_a, _ = refused.reset()
    obs_b, _ = fresh.reset()
    assert np.array_equal(obs_a["x_t"], obs_b["x_t"]) and obs_a["c"] == obs_b["c"]


@pytest.mark.parametrize("good", [3, np.int64(3), np.uint8(3), 3.0, torch.tensor(3)])
def test_reset_takes_python_and_numpy_integers(model, good):
    single = DiffusionDenoiseEnv(model=model, num_steps=K)
    obs, _ = single.reset(seed=0, options={"condition": good})
    assert obs["c"] == 3
    envs = _vector_env(model)
    obs, _ = envs.reset(seed=0, options={"condition": good})
    assert obs["c"].tolist() == [3, 3]


def test_an_unconditional_model_takes_condition_zero_only():
    unet = tiny_unet()
    loaded = LoadedModel(unet, DDIMScheduler(num_train_timesteps=1000))
    core = DenoiseCore(num_envs=2, model=loaded, num_steps=K, references="model")
    core.begin(np.random.default_rng(0), condition=0)
    with pytest.raises(ValueError, match=r"\[0, 0\] \(an unconditional model takes condition 0 only\), got 1"):
        core.begin(np.random.default_rng(0), condition=1)
    assert check_condition(np.int32(0), None) == 0


def test_core_arguments_name_the_bad_value(model):
    with pytest.raises(ValueError, match="num_envs must be an int >= 1, got True"):
        DenoiseCore(num_envs=True, model=model, num_steps=K)
    with pytest.raises(ValueError, match="probe_size must be an int >= 1, got 0"):
        DenoiseCore(num_envs=2, model=model, num_steps=K, probe_size=0)
    with pytest.raises(ValueError, match=r"eta must be a number in \[0, 1\], got 1.01"):
        DenoiseCore(num_envs=2, model=model, num_steps=K, eta=1.01)
