"""Rewards scored in the background (``defer_rewards``): same numbers, no waiting, errors surface."""

from __future__ import annotations

import functools
import threading

import numpy as np
import pytest
import torch

from agents.common.buffer import RolloutBuffer
from agents.common.policy import DiffusionPolicy
from agents.ppo_is.trainer import collect
from diffusion_gym import sampling
from diffusion_gym.envs import DiffusionDenoiseVectorEnv, PendingRewards, denoise
from diffusion_gym.rewards import host_reward, jpeg_size_kb, make_reward, reward_async, runs_on_host

pytestmark = pytest.mark.usefixtures("one_thread")

K = 6
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _env(model, defer: bool, reward="jpeg_compressibility", num_envs: int = 8, **kwargs) -> DiffusionDenoiseVectorEnv:
    return DiffusionDenoiseVectorEnv(
        num_envs=num_envs, model=model, num_steps=K, reward=reward, defer_rewards=defer, **kwargs
    )


def _run_to_end(envs, seed: int = 0, steps: int = K):
    """Step ``envs`` with seeded random actions; return every step's (rewards, terminated, info)."""
    envs.reset(seed=seed)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        actions = torch.randn((envs.num_envs, 1, 16, 16), generator=g).clamp(-1, 1)
        _, rewards, terminated, _, info = envs.step(actions)
        out.append((rewards, terminated, info))
    return out


def test_jpeg_rewards_are_host_rewards_and_others_are_not():
    assert runs_on_host(make_reward("jpeg_compressibility")) and runs_on_host(make_reward("jpeg_incompressibility"))
    assert not runs_on_host(make_reward("digit_confidence"))
    assert not runs_on_host(make_reward(lambda images, c: images.mean((1, 2, 3))))
    marked = make_reward(host_reward(lambda images, c: images.mean((1, 2, 3))))
    assert runs_on_host(marked)  # seen through the CheckedReward wrapper


def test_deferred_rewards_equal_the_synchronous_ones(model):
    plain, deferred = _env(model, False), _env(model, True)
    for (r, done, info), (r_d, done_d, info_d) in zip(_run_to_end(plain), _run_to_end(deferred), strict=True):
        assert torch.equal(done, done_d)
        if not bool(done.any()):
            assert torch.equal(r, r_d) and "pending_reward" not in info_d
            continue
        assert bool(torch.isnan(r_d).all()), "ended envs' rewards are NaN until resolved"
        assert "raw_reward" in info and "raw_reward" not in info_d
        pending = info_d["pending_reward"]
        assert isinstance(pending, PendingRewards)
        assert torch.equal(pending.result(), r) and pending.done()
        assert torch.equal(info["raw_reward"], pending.result())
        assert info_d["final_info"]["pending_reward"] is pending
    # the images scored are the final ones, not the autoreset episodes' first observations
    assert torch.equal(r, jpeg_size_kb(sampling.to_unit_range(info["final_obs"]["x_t"])).neg())


def test_deferred_rewards_of_some_envs_are_scattered_to_their_positions(model):
    """Per-sample starts end envs at different steps: the pending result has zeros elsewhere."""
    kw = {"window": [(1, 4)], "start_mode": "per_sample", "num_envs": 8}
    partial = 0
    for (r, done, _), (r_d, _, info_d) in zip(
        _run_to_end(_env(model, False, **kw), steps=2 * K),
        _run_to_end(_env(model, True, **kw), steps=2 * K),
        strict=True,
    ):
        if bool(done.any()):
            result = info_d["pending_reward"].result()
            assert torch.equal(result, r) and bool((result[~done] == 0).all())
            assert bool(torch.isnan(r_d[done]).all()) and bool((r_d[~done] == 0).all())
            partial += int(not bool(done.all()))
    assert partial > 0, "the test needs steps where only some envs end"


def test_a_host_reward_runs_in_the_background_and_the_step_does_not_wait(model, monkeypatch):
    # what a GPU env does (on a CPU env the reward is scored at once, see the next test)
    monkeypatch.setattr(denoise, "reward_async", functools.partial(reward_async, background=True))
    release, seen = threading.Event(), []

    @host_reward
    def slow_reward(images, conditions):
        seen.append(threading.current_thread().name)
        assert release.wait(timeout=30), "the test never released the reward"
        return images.mean((1, 2, 3))

    envs = _env(model, True, reward=slow_reward)
    steps = _run_to_end(envs)  # returns although the reward is blocked
    pending = steps[-1][2]["pending_reward"]
    assert not pending.done()
    envs.step(torch.zeros((8, 1, 16, 16)))  # the next episodes go on meanwhile
    release.set()
    final = sampling.to_unit_range(steps[-1][2]["final_obs"]["x_t"]).mean((1, 2, 3))
    torch.testing.assert_close(pending.result(), final, rtol=0, atol=1e-6)
    assert seen and seen[0].startswith("diffusion_gym-reward")


def test_on_a_cpu_env_a_host_reward_is_scored_at_once_on_the_calling_thread(model):
    seen = []

    @host_reward
    def recording_reward(images, conditions):
        seen.append(threading.current_thread())
        return images.mean((1, 2, 3))

    pending = _run_to_end(_env(model, True, reward=recording_reward))[-1][2]["pending_reward"]
    assert pending.done() and seen == [threading.main_thread()]


def test_a_device_reward_is_computed_at_once(model):
    envs = _env(model, True, reward="digit_confidence")
    pending = _run_to_end(envs)[-1][2]["pending_reward"]
    assert pending.done()
    plain = _run_to_end(_env(model, False, reward="digit_confidence"))[-1][0]
    assert torch.equal(pending.result(), plain)


def test_reward_errors_surface_when_the_rewards_are_read(model):
    bad = host_reward(lambda images, c: torch.full((images.shape[0],), float("nan")))
    pending = _run_to_end(_env(model, True, reward=bad))[-1][2]["pending_reward"]
    with pytest.raises(ValueError, match="non-finite values"):
        pending.result()


def test_reward_async_scores_a_snapshot_of_the_images():
    release = threading.Event()

    @host_reward
    def blocked_mean(images, conditions):
        release.wait(timeout=30)
        return images.mean((1, 2, 3)) + conditions.float()

    images, conditions = torch.rand(3, 1, 4, 4), torch.tensor([0, 1, 2])
    expected = images.mean((1, 2, 3)) + conditions.float()
    future = reward_async(blocked_mean, images, conditions, background=True)
    images.zero_()  # the caller reuses its buffers at once
    conditions.zero_()
    release.set()
    assert torch.equal(future.result(), expected)


def test_defer_rewards_must_be_a_bool(model):
    with pytest.raises(TypeError, match="defer_rewards must be a bool"):
        DiffusionDenoiseVectorEnv(num_envs=2, model=model, num_steps=K, defer_rewards="yes")


def _collect(model, defer: bool, device: str = "cpu") -> RolloutBuffer:
    schedule = sampling.make_schedule(model.scheduler, K, eta=1.0, device=device)
    policy = DiffusionPolicy(model.unet, schedule)
    envs = DiffusionDenoiseVectorEnv(
        num_envs=4, model=model, num_steps=K, window="hrf-d", probe_size=2, device=device, defer_rewards=defer
    )
    envs.reset(seed=0)
    buffer = RolloutBuffer(device)
    collect(envs, policy, buffer, 3, torch.Generator().manual_seed(0))
    return buffer


def _assert_same_rollouts(a: RolloutBuffer, b: RolloutBuffer) -> None:
    assert torch.equal(a.rewards, b.rewards) and a.rewards.numel() == 12
    for name in ("groups", "conditions", "start_steps"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name, value in a._consolidate().items():
        assert torch.equal(value, b._consolidate()[name]), name


@pytest.mark.parametrize("background", [None, True], ids=["default", "background"])
def test_collect_with_deferred_rewards_gives_the_same_epoch(model, monkeypatch, background):
    """The trainer's rollout (HRF-D: probes score rewards between batches too) is unchanged."""
    monkeypatch.setattr(denoise, "reward_async", functools.partial(reward_async, background=background))
    deferred = _collect(model, True)
    assert deferred._pending, "the rewards are still pending after collect"
    _assert_same_rollouts(_collect(model, False), deferred)
    assert not deferred._pending
    assert np.isfinite(deferred.rewards.numpy()).all()


@CUDA
def test_gpu_collect_with_deferred_rewards_gives_the_same_epoch():
    from diffusion_gym.models import load_model

    loaded = load_model("embedded:digits", device="cuda")
    _assert_same_rollouts(_collect(loaded, False, "cuda"), _collect(loaded, True, "cuda"))
