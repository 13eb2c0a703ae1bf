"""Weighted sums of named rewards: normalisation, per-component values, evaluation mode, state, config."""

import pytest
import torch

from agents.algorithms import load_run_config
from agents.common.config import ConfigError
from diffusion_gym.envs import DenoiseCore
from diffusion_gym.rewards import (
    WeightedRewards,
    evaluation_mode,
    host_reward,
    make_reward,
    register_reward,
    runs_on_host,
    weighted_rewards_of,
)
from diffusion_gym.rewards.registry import _REGISTRY


def _constant(values):
    """A reward returning fixed values (one per image), recording how often it was called."""

    def reward(images, conditions):
        reward.calls += 1
        return torch.as_tensor(values, dtype=torch.float32)

    reward.calls = 0
    return reward


def _mean_brightness(images, conditions):
    return images.mean(dim=(1, 2, 3))


@pytest.fixture
def scaled_rewards():
    """Two rewards with the same order of images but scales 1 and 1000 (brightness, 1000·brightness)."""
    register_reward("test_bright", lambda: _mean_brightness)
    register_reward("test_bright_k", lambda scale=1000.0: lambda x, c: scale * _mean_brightness(x, c))
    yield
    _REGISTRY.pop("test_bright", None)
    _REGISTRY.pop("test_bright_k", None)


def _images(n=8, seed=0):
    return torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed))


def test_no_normalisation_is_the_weighted_sum_of_raw_rewards():
    a, b = _constant([1.0, 2.0, 3.0]), _constant([10.0, 0.0, -10.0])
    combined = WeightedRewards({"a": a, "b": b}, {"a": 2.0, "b": -0.5})
    assert torch.allclose(combined(_images(3), None), torch.tensor([2 - 5.0, 4.0, 6 + 5.0]))
    assert set(combined.last) == {"a", "b"} and torch.equal(combined.last["b"], torch.tensor([10.0, 0.0, -10.0]))


def test_rank_normalisation_ignores_scale_and_shares_ties():
    combined = WeightedRewards({"a": _constant([5.0, 1.0, 5.0, 9.0])}, {"a": 1.0}, normalize="rank")
    # ranks 1, 0, 2, 3 -> ties at 5 share 1.5; mapped to [-1/2, 1/2] by /(n - 1) - 1/2
    assert torch.allclose(combined(_images(4), None), torch.tensor([0.0, -0.5, 0.0, 0.5]))


@pytest.mark.usefixtures("scaled_rewards")
def test_rank_and_running_put_rewards_of_different_scales_on_one_footing():
    images = _images(16)
    raw = make_reward({"test_bright": 1.0, "test_bright_k": 1.0})
    rank = make_reward({"test_bright": 1.0, "test_bright_k": 1.0}, normalize="rank")
    running = make_reward({"test_bright": 1.0, "test_bright_k": 1.0}, normalize="running")
    # raw: the 1000x reward decides alone; normalised: both count the same
    b = images.mean(dim=(1, 2, 3))
    assert torch.allclose(raw(images), 1001 * b, rtol=1e-5)
    assert torch.equal(rank(images), 2 * make_reward({"test_bright_k": 1.0}, normalize="rank")(images))
    out = running(images)
    expected = 2 * (b - b.mean()) / b.std(unbiased=False)
    assert torch.allclose(out, expected, atol=1e-4)


def test_running_statistics_accumulate_over_batches_and_survive_a_state_round_trip():
    torch.manual_seed(0)
    draws = [torch.randn(32) * 3 + 7 for _ in range(5)]
    batches = iter(draws)
    combined = WeightedRewards({"r": lambda images, conditions: next(batches)}, {"r": 1.0}, normalize="running")
    for _ in draws:
        out = combined(_images(32), None)
    everything = torch.cat(draws)
    assert combined.moments["r"].count == 160
    assert combined.moments["r"].mean == pytest.approx(float(everything.mean()), abs=1e-5)
    assert combined.moments["r"].std == pytest.approx(float(everything.std(unbiased=False)), rel=1e-5)
    assert torch.allclose(out, (draws[-1] - everything.mean()) / everything.std(unbiased=False), atol=1e-4)
    restored = WeightedRewards({"r": _constant([0.0])}, {"r": 1.0}, normalize="running")
    restored.load_reward_state_dict(combined.reward_state_dict())
    assert vars(restored.moments["r"]) == vars(combined.moments["r"])
    with pytest.raises(ValueError, match=r"statistics are for \['r'\], this reward combines \['s'\]"):
        WeightedRewards({"s": _constant([0.0])}, {"s": 1.0}).load_reward_state_dict(combined.reward_state_dict())


def test_evaluation_mode_returns_the_raw_sum_and_leaves_statistics_and_logs_alone():
    combined = WeightedRewards(
        {"a": _constant([1.0, 3.0]), "b": _constant([2.0, 2.0])}, {"a": 1.0, "b": 2.0}, "running"
    )
    combined(_images(2), None)
    before = combined.reward_state_dict()
    checked = make_reward(combined)  # a callable: wrapped in the usual checks
    with evaluation_mode(checked):
        assert torch.equal(checked(_images(2)), torch.tensor([5.0, 7.0]))
    assert combined.training and combined.reward_state_dict() == before
    assert combined.pop_means() == {"a": 2.0, "b": 2.0}, "only the training call is in the epoch's means"
    assert combined.pop_means() == {}


def test_host_rewards_combine_to_a_host_reward():
    host = host_reward(_constant([1.0]))
    assert runs_on_host(make_reward({"jpeg_compressibility": 1.0, "jpeg_incompressibility": 0.5}))
    assert runs_on_host(WeightedRewards({"a": host}, {"a": 1.0}))
    assert not runs_on_host(WeightedRewards({"a": host, "b": _constant([1.0])}, {"a": 1.0, "b": 1.0}))


def test_bad_weighted_rewards_are_named():
    with pytest.raises(ValueError, match=r"unknown reward 'jpeg'; valid choices: \["):
        make_reward({"jpeg": 1.0})
    with pytest.raises(ValueError, match=r"options \['digit_confidence'\] name no reward of the weighted sum"):
        make_reward({"jpeg_compressibility": 1.0}, digit_confidence={})
    with pytest.raises(ValueError, match=r"unknown normalize 'zscore'; valid choices: \['none', 'running', 'rank'\]"):
        make_reward({"jpeg_compressibility": 1.0}, normalize="zscore")
    with pytest.raises(ValueError, match="weights must be finite numbers"):
        make_reward({"jpeg_compressibility": float("nan")})
    with pytest.raises(ValueError, match="at least one reward"):
        make_reward({})


def test_per_reward_options_reach_each_factory():
    images = _images(4)
    combined = make_reward({"jpeg_compressibility": 1.0}, jpeg_compressibility={"quality": 50})
    assert torch.equal(combined(images), make_reward("jpeg_compressibility", quality=50)(images))


def test_the_yaml_form_validates_and_bad_keys_are_named():
    config = load_run_config(
        None, ["env.reward={jpeg_compressibility: 1.0, digit_confidence: 0.5}", "env.reward_kwargs={normalize: rank}"]
    )
    assert config.env.reward == {"jpeg_compressibility": 1.0, "digit_confidence": 0.5}
    with pytest.raises(ConfigError, match=r"env.reward: unknown reward 'pickscor'"):
        load_run_config(None, ["env.reward={pickscor: 1.0}"])
    with pytest.raises(ConfigError, match=r"env.reward_kwargs.normalize: unknown 'z'"):
        load_run_config(None, ["env.reward={jpeg_compressibility: 1.0}", "env.reward_kwargs={normalize: z}"])
    with pytest.raises(ConfigError, match=r"env.reward_kwargs.jpeg_compressibility: .*accepts \['quality'\]"):
        load_run_config(
            None, ["env.reward={jpeg_compressibility: 1.0}", "env.reward_kwargs={jpeg_compressibility: {q: 1}}"]
        )


def test_the_env_checkpoints_the_running_statistics(model):
    def core():
        return DenoiseCore(
            num_envs=2,
            model=model,
            reward={"jpeg_compressibility": 1.0, "digit_confidence": 1.0},
            reward_kwargs={"normalize": "running"},
            num_steps=2,
        )

    first = core()
    first.reward_fn(_images(2), torch.tensor([0, 1]))
    state = first.state_dict()
    second = core()
    second.load_state_dict(state)
    assert (
        weighted_rewards_of(second.reward_fn).reward_state_dict()
        == weighted_rewards_of(first.reward_fn).reward_state_dict()
    )
    assert weighted_rewards_of(second.reward_fn).moments["digit_confidence"].count == 2
