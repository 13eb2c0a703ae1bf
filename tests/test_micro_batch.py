"""Memory-aware micro-batching: an out-of-memory micro-batch halves the size and redoes the chunk exactly."""

from __future__ import annotations

import copy

import pytest
import torch

from agents.common.collector import Collector
from agents.common.micro_batch import MicroBatchSize
from agents.common.policy import DiffusionPolicy
from agents.common.rollout import Rollout
from agents.ppo_is.algorithm import ClippedUpdate
from agents.ppo_is.config import load_config
from diffusion_gym import sampling
from diffusion_gym.envs import DiffusionDenoiseVectorEnv

pytestmark = pytest.mark.usefixtures("one_thread")

K = 5


def test_run_halves_until_the_work_fits_and_keeps_the_size():
    sizes, resets = [], []

    def work(size: int) -> int:
        sizes.append(size)
        if size > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return size * 10

    micro = MicroBatchSize(16)
    message = r"out of memory at (16|8|4) pairs .*Tried to allocate.*set train.batch_size=(8|4|2)"
    with pytest.warns(RuntimeWarning, match=message) as caught:
        assert micro.run(work, lambda: resets.append(True)) == 20
    assert [str(w.message).split(" pairs")[0][-2:].strip() for w in caught] == ["16", "8", "4"]
    assert sizes == [16, 8, 4, 2] and len(resets) == 3 and micro.size == 2
    assert micro.run(work, lambda: resets.append(True)) == 20 and sizes[-1] == 2 and len(resets) == 3


def test_run_raises_a_clear_error_when_one_pair_does_not_fit():
    def work(size: int) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory")

    micro = MicroBatchSize(2)
    with (
        pytest.warns(RuntimeWarning),
        pytest.raises(torch.OutOfMemoryError, match="train.batch_size was 2.*gradient_checkpointing"),
    ):
        micro.run(work, lambda: None)


def test_bad_size_is_rejected():
    with pytest.raises(ValueError, match="train.batch_size must be an int >= 1, got 0"):
        MicroBatchSize(0)


def _rollout(model) -> tuple[DiffusionPolicy, Rollout]:
    schedule = sampling.make_schedule(model.scheduler, K, eta=1.0)
    policy = DiffusionPolicy(copy.deepcopy(model.unet), schedule)
    envs = DiffusionDenoiseVectorEnv(num_envs=4, model=model, num_steps=K, check_actions=False)
    envs.reset(seed=0)
    generator = torch.Generator().manual_seed(0)
    buffer = Collector(envs, policy, generator).collect(1)
    buffer.set_advantages(torch.randn(buffer.num_trajectories, generator=generator))
    return policy, buffer


def _update(model, batch_size: int, fits: int | None, micro: MicroBatchSize | None = None, updates: int = 2):
    """``updates`` PPO-IS updates where micro-batches larger than ``fits`` pairs run out of memory."""
    policy, buffer = _rollout(model)
    evaluate, attempts = policy.evaluate, []

    def limited(x, *args, **kwargs):
        attempts.append(x.shape[0])
        if fits is not None and x.shape[0] > fits:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return evaluate(x, *args, **kwargs)

    policy.evaluate = limited
    config = load_config(
        None,
        [f"sample.num_steps={K}", "sample.num_envs=4", f"train.batch_size={batch_size}", "train.num_inner_epochs=2"],
    )
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    logged = [
        ClippedUpdate(policy, optimizer, config.train, generator, micro_batch=micro).update(buffer)
        for _ in range(updates)
    ]
    return policy, logged, attempts


def test_update_after_out_of_memory_equals_the_smaller_configured_size(model):
    micro = MicroBatchSize(8)
    with pytest.warns(RuntimeWarning, match="out of memory at (8|4) pairs"):
        shrunk, logged, attempts = _update(model, 8, fits=3, micro=micro)
    direct, logged_direct, attempts_direct = _update(model, 2, fits=None)
    for a, b in zip(shrunk.unet.state_dict().values(), direct.unet.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert logged == logged_direct and logged[-1]["micro_batch_size"] == 2.0
    # one failure at 8 and one at 4, then only micro-batches of 2: the size is kept across updates
    assert attempts[:2] == [8, 4] and attempts[2:] == attempts_direct
