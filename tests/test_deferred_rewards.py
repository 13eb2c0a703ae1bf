"""Terminal rewards overlapped with the next batch (the collector's ``reward_async``): same numbers, no
waiting, a snapshot of the images, errors surfacing when the rewards are read.

The env itself scores every reward at the step it is earned; the overlap lives in the agent's
:class:`~agents.common.collector.Collector`, which drives the env's core with ``score=False`` and
hands the final images to :func:`diffusion_gym.rewards.reward_async`. A host reward (JPEG) of CUDA
images goes to a background thread; on a CPU env the reward runs at once on the calling thread, so the
CPU tests force the thread on (``background=True``) to exercise what a GPU run does.
"""

from __future__ import annotations

import functools
import threading
from concurrent.futures import Future

import pytest
import torch

from agents.common import collector as collector_module
from agents.common.collector import Collector, policy_noise_sampler
from agents.common.policy import DiffusionPolicy
from agents.common.rollout import Rollout, Trajectories
from diffusion_gym import sampling
from diffusion_gym.envs import DiffusionDenoiseVectorEnv, Shard
from diffusion_gym.rewards import host_reward, make_reward, reward_async, runs_on_host

pytestmark = pytest.mark.usefixtures("one_thread")

K = 6
NUM_ENVS = 4
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
HRF_D = {"window": "hrf-d", "probe_size": 2}


def _envs(model, reward="jpeg_compressibility", device: str = "cpu", **kwargs) -> DiffusionDenoiseVectorEnv:
    envs = DiffusionDenoiseVectorEnv(
        num_envs=NUM_ENVS, model=model, num_steps=K, reward=reward, device=device, check_actions=False, **kwargs
    )
    envs.reset(seed=0)
    return envs


def _policy(model, device: str = "cpu") -> DiffusionPolicy:
    return DiffusionPolicy(model.unet, sampling.make_schedule(model.scheduler, K, eta=1.0, device=device))


def _collect(model, num_batches: int = 1, overlap: bool = True, device: str = "cpu", **env_kwargs) -> Rollout:
    envs = _envs(model, device=device, **env_kwargs)
    generator = torch.Generator().manual_seed(0)
    return Collector(envs, _policy(model, device), generator, overlap_rewards=overlap).collect(num_batches)


def _force_background(monkeypatch, background: bool | None) -> None:
    """What the collector's ``reward_async`` does with a host reward: ``True`` is what a GPU run does."""
    monkeypatch.setattr(collector_module, "reward_async", functools.partial(reward_async, background=background))


@torch.no_grad()
def _env_loop(model, num_batches: int, device: str = "cpu", **env_kwargs) -> tuple[Trajectories, torch.Tensor]:
    """The collector's episodes through the plain vector env ``step()`` (which scores synchronously).

    The same policy and policy noise as the collector's; returns the batches' outcomes and the actions
    of the stochastic steps (the collector's stored ``x_next``).
    """
    envs = _envs(model, device=device, **env_kwargs)
    policy = _policy(model, device)
    draw = policy_noise_sampler(envs.core, torch.Generator().manual_seed(0))
    deterministic = policy.schedule.deterministic.cpu()
    obs, info = envs.observation()
    rewards, groups, conditions, starts, actions = [], [], [], [], []
    for _ in range(num_batches):
        starts.append(info["start_step"])
        groups.append(info["group"])
        conditions.append(obs["c"])
        done = torch.zeros(NUM_ENVS, dtype=torch.bool)
        while not bool(done.all()):
            k = info["step_index"]
            step = policy.act(obs["x_t"], k, obs["c"] if policy.conditional else None, noise=draw())
            if not deterministic[int(k[0])]:
                actions.append(step.x_prev)
            obs, reward, done, _, info = envs.step(step.x_prev)
            assert bool(done.all()) or not bool(done.any()), "a shared-start batch ends together"
        rewards.append(reward)
    cat = torch.cat
    return Trajectories(cat(rewards), cat(groups), cat(conditions), cat(starts)), cat(actions)


def _assert_same_rollouts(a: Rollout, b: Rollout) -> None:
    for name, x, y in zip(Trajectories._fields, a.trajectories(), b.trajectories(), strict=True):
        assert torch.equal(x, y), name
    for name, value in a._consolidate().items():
        assert torch.equal(value, b._consolidate()[name]), name


def _assert_matches_env_loop(rollout: Rollout, loop: tuple[Trajectories, torch.Tensor]) -> None:
    expected, actions = loop
    for name, x, y in zip(Trajectories._fields, rollout.trajectories(), expected, strict=True):
        assert torch.equal(x.cpu(), y.cpu()), name
    assert torch.equal(rollout._consolidate()["x_next"].cpu(), actions.cpu())


def test_jpeg_rewards_are_host_rewards_and_others_are_not():
    assert runs_on_host(make_reward("jpeg_compressibility")) and runs_on_host(make_reward("jpeg_incompressibility"))
    assert not runs_on_host(make_reward("digit_confidence"))
    assert not runs_on_host(make_reward(lambda images, c: images.mean((1, 2, 3))))
    marked = make_reward(host_reward(lambda images, c: images.mean((1, 2, 3))))
    assert runs_on_host(marked)  # seen through the CheckedReward wrapper


@pytest.mark.parametrize(
    "num_batches,env_kwargs", [(2, {"window": "full"}), (3, HRF_D)], ids=["full-2-batches", "hrf-d-3-batches"]
)
def test_overlapped_rewards_equal_the_env_loops_bit_for_bit(model, monkeypatch, num_batches, env_kwargs):
    """The collector's rollout, its rewards scored at once, overlapped (default) or on the background
    thread, is the env loop's: same rewards, starts, groups, conditions and actions. With HRF-D the
    probes score rewards between batches too, while the background thread scores the last batch."""
    loop = _env_loop(model, num_batches, **env_kwargs)
    assert loop[0].rewards.numel() == NUM_ENVS * num_batches
    synchronous = _collect(model, num_batches, overlap=False, **env_kwargs)
    assert not any(isinstance(r, Future) for r in synchronous._rewards)
    _assert_matches_env_loop(synchronous, loop)
    for background in (None, True):
        _force_background(monkeypatch, background)
        overlapped = _collect(model, num_batches, **env_kwargs)
        assert all(isinstance(r, Future) for r in overlapped._rewards)
        _assert_matches_env_loop(overlapped, loop)
        _assert_same_rollouts(overlapped, synchronous)
    assert bool(torch.isfinite(loop[0].rewards).all())


def _blocked_reward(release: threading.Event, threads: list[str]):
    @host_reward
    def blocked(images, conditions):
        threads.append(threading.current_thread().name)
        assert release.wait(timeout=30), "the test never released the reward"
        return images.mean((1, 2, 3)) + conditions.float()

    return blocked


def _unblocked(images, conditions):
    return images.mean((1, 2, 3)) + conditions.float()


def test_a_blocked_host_reward_does_not_block_the_next_batch(model, monkeypatch):
    _force_background(monkeypatch, True)  # what a GPU run does with a host reward
    release, threads = threading.Event(), []
    try:
        rollout = _collect(model, 2, reward=_blocked_reward(release, threads))  # returns: batch 2 ran meanwhile
        futures = list(rollout._rewards)
        assert not release.is_set() and not any(future.done() for future in futures)
        assert rollout.num_trajectories == 2 * NUM_ENVS and len(rollout) > 0
    finally:
        timer = threading.Timer(0.1, release.set)
        timer.start()
    rewards = rollout.rewards  # waits for the scores
    assert release.is_set() and all(future.done() for future in futures)
    timer.join()
    assert torch.equal(rewards, _collect(model, 2, overlap=False, reward=_unblocked).rewards)
    assert len(threads) == 2 and all(name.startswith("diffusion_gym-reward") for name in threads)


def test_the_images_scored_are_a_snapshot(model, monkeypatch):
    """The next batch overwrites the core's images and conditions in place; the scores are the last batch's."""
    _force_background(monkeypatch, True)
    release = threading.Event()
    envs = _envs(model, reward=_blocked_reward(release, []))
    try:
        rollout = Collector(envs, _policy(model), torch.Generator().manual_seed(0)).collect(1)
        envs.core.x.add_(1.0)  # and the caller scribbles over the core's tensors too
        envs.core.c.add_(1)
    finally:
        release.set()
    assert torch.equal(rollout.rewards, _collect(model, 1, overlap=False, reward=_unblocked).rewards)


@pytest.mark.parametrize("background", [None, True], ids=["default", "background"])
def test_reward_errors_surface_when_the_rewards_are_read(model, monkeypatch, background):
    _force_background(monkeypatch, background)
    bad = host_reward(lambda images, c: torch.full((images.shape[0],), float("nan")))
    rollout = _collect(model, 1, reward=bad)  # collection itself goes through
    with pytest.raises(ValueError, match="non-finite values"):
        _ = rollout.rewards
    with pytest.raises(ValueError, match="non-finite values"):
        rollout.trajectories()


@pytest.mark.parametrize("host", [True, False], ids=["host-reward", "device-reward"])
def test_on_a_cpu_env_the_reward_runs_on_the_calling_thread(model, host):
    seen = []

    def recording(images, conditions):
        seen.append(threading.current_thread())
        return images.mean((1, 2, 3))

    rollout = _collect(model, 2, reward=host_reward(recording) if host else recording)
    assert seen == [threading.main_thread()] * 2  # scored during collect, before anything is read
    assert all(future.done() for future in rollout._rewards)


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


@pytest.mark.parametrize("value", [True, False])
def test_the_vector_env_no_longer_defers_rewards(model, value):
    with pytest.raises(TypeError, match=r"no longer takes defer_rewards=:.*reward_async.*Collector"):
        DiffusionDenoiseVectorEnv(num_envs=2, model=model, num_steps=K, defer_rewards=value)


def test_the_vector_env_no_longer_takes_a_shard(model):
    with pytest.raises(TypeError, match=r"no longer takes shard=:.*DenoiseCore\(.*core=core"):
        DiffusionDenoiseVectorEnv(num_envs=2, model=model, num_steps=K, shard=Shard(0, 2, id))


@CUDA
def test_gpu_overlapped_rewards_give_the_same_epoch():
    """On a GPU the JPEG reward of each batch runs on the background thread while the next batch runs."""
    from diffusion_gym.models import load_model

    loaded = load_model("embedded:digits", device="cuda")
    overlapped = _collect(loaded, 3, device="cuda", **HRF_D)  # JPEG, a host reward of CUDA images: the thread
    synchronous = _collect(loaded, 3, overlap=False, device="cuda", **HRF_D)
    _assert_same_rollouts(overlapped, synchronous)
    _assert_matches_env_loop(overlapped, _env_loop(loaded, 3, device="cuda", **HRF_D))
