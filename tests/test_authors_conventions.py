"""The HRF authors' conventions (alcazar90/ddpo-celebahq), each against a hand-computed example.

Half-open clusters are tested in test_windows.py and the n − 1 advantage std in test_advantages.py; here the
update: the clip range scaled by (K − k0)/K, the loss summed over steps, one optimizer step per batch.
"""

from types import SimpleNamespace

import pytest
import torch

from agents.algorithms import load_run_config
from agents.common.advantages import compute_advantages
from agents.common.config import ConfigError
from agents.common.rollout import Rollout, RolloutLayout
from agents.ppo_is.algorithm import ClippedUpdate
from agents.ppo_is.config import TrainConfig

K = 40


class ShiftPolicy(torch.nn.Module):
    """A stand-in policy whose new log-prob is the stored one plus θ: every ratio is exp(θ)."""

    conditional = False

    def __init__(self, theta: float) -> None:
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor(theta))
        self.schedule = SimpleNamespace(num_steps=K)
        self.stored: torch.Tensor | None = None

    def trainable_parameters(self):
        return iter([self.theta])

    def evaluate(self, x, k, c, x_next, cond_noise):
        # x carries the stored log-prob in its first pixel (see _rollout)
        return SimpleNamespace(log_prob=x.flatten(1)[:, 0] + self.theta, mean=None, std=None)


def _rollout(starts_per_batch, steps=3, advantage=1.0):
    """Batches of 2 trajectories, each ``steps`` stored pairs, with stored log-prob 0 and advantage ``advantage``."""
    rollout = Rollout(RolloutLayout(batch_envs=2), "cpu")
    for start in starts_per_batch:
        ids = rollout.start_batch(
            torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), torch.full((2,), start)
        )
        for k in range(start, start + steps):
            x = torch.zeros(2, 1, 2, 2)
            rollout.add(x, x, torch.full((2,), k), torch.zeros(2, dtype=torch.long), torch.zeros(2), ids)
        rollout.end_batch(torch.zeros(2))
    rollout.set_advantages(torch.full((rollout.num_trajectories,), advantage))
    return rollout


def _update(theta, **train):
    policy = ShiftPolicy(theta)
    config = TrainConfig(clip_range=0.1, **train)
    updater = ClippedUpdate(policy, torch.optim.SGD(policy.parameters(), lr=1.0), config, torch.Generator())
    return policy, updater


def test_the_clip_range_is_scaled_by_the_remaining_steps():
    """K = 40, k0 = 8: ε = 0.1 · 32/40 = 0.08. A ratio of exp(0.09) = 1.094 is inside ±0.1 but clipped at 1.08."""
    rollout = _rollout([8])
    pairs = torch.arange(rollout.num_global_pairs)
    for scaling, expected_loss, clipfrac, grad in (("none", -1.0942, 0.0, -1.0942), ("remaining", -1.08, 1.0, 0.0)):
        policy, updater = _update(0.09, clip_scaling=scaling)
        out = updater.chunk_gradient(rollout, pairs, float(pairs.numel()), micro_batch=64)
        assert out.loss.item() == pytest.approx(expected_loss, abs=1e-4)
        assert out.sums["clipfrac"].item() / out.count == clipfrac
        assert (policy.theta.grad if policy.theta.grad is not None else torch.tensor(0.0)).item() == pytest.approx(
            grad, abs=1e-4
        )
    # the later the start, the tighter: k0 = 28 -> ε = 0.03
    late = _rollout([28])
    policy, updater = _update(0.05, clip_scaling="remaining")
    out = updater.chunk_gradient(late, torch.arange(late.num_global_pairs), 6.0, micro_batch=64)
    assert out.loss.item() == pytest.approx(-1.03, abs=1e-6)


def test_the_advantage_clip_is_scaled_too():
    """clip_advantages = 2.5 at k0 = 8 gives ±2.0, at k0 = 28 ±0.75 (two groups of 4 trajectories)."""
    rewards = torch.tensor([0.0, 0.0, 0.0, 10.0, 0.0, 0.0, 0.0, 10.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    starts = torch.tensor([8, 8, 8, 8, 28, 28, 28, 28])
    clip = 2.5 * (K - starts).float() / K
    adv = compute_advantages(rewards, groups, torch.zeros(8, dtype=torch.long), "group", clip=clip, std="group-sample")
    # unclipped: (10 - 2.5) / 5 = 1.5 and -0.5; the k0 = 28 group's 1.5 is clipped to 0.75
    torch.testing.assert_close(adv, torch.tensor([-0.5, -0.5, -0.5, 1.5, -0.5, -0.5, -0.5, 0.75]), atol=1e-5, rtol=0)


def test_the_loss_is_summed_over_steps_and_averaged_over_trajectories():
    """2 trajectories × 3 steps, each pair's loss −A·r = −1 at θ = 0: the mean over pairs is −1, the authors' −3."""
    rollout = _rollout([8])
    pairs = torch.arange(rollout.num_global_pairs)
    for reduction, expected in (("pairs", -1.0), ("trajectories", -3.0)):
        _, updater = _update(0.0, loss_reduction=reduction)
        out = updater.chunk_gradient(rollout, pairs, updater._normaliser(rollout, pairs), micro_batch=64)
        assert out.loss.item() == pytest.approx(expected, abs=1e-6)


def test_one_optimizer_step_per_batch_in_collection_order():
    rollout = _rollout([8, 12])  # two batches: 6 pairs each (3 steps × 2 envs)
    _, updater = _update(0.0, update_order="batches", gradient_updates_per_epoch=2)
    state = updater.generator.get_state()
    chunks = updater._chunks(rollout, None)
    assert [c.tolist() for c in chunks] == [list(range(6)), list(range(6, 12))]
    assert torch.equal(updater.generator.get_state(), state), "no shuffle drawn"
    ks = [[mb.k.tolist() for mb in rollout.minibatches(c, 64)][0] for c in chunks]
    assert ks == [[8, 8, 9, 9, 10, 10], [12, 12, 13, 13, 14, 14]]
    assert [mb.start.tolist() for mb in rollout.minibatches(chunks[1], 64)] == [[12] * 6]
    _, trajectories = _update(0.0, update_order="batches", gradient_updates_per_epoch=2, loss_reduction="trajectories")
    assert trajectories._normaliser(rollout, chunks[0]) == 2.0, "a batch's own 2 trajectories"


def test_the_authors_update_needs_one_step_per_batch():
    with pytest.raises(
        ConfigError, match=r"set train.gradient_updates_per_epoch to sample.num_batches_per_epoch \(2\)"
    ):
        load_run_config(
            None, ["train.update_order=batches", "train.gradient_updates_per_epoch=4", "sample.num_batches_per_epoch=2"]
        )
    with pytest.raises(ConfigError, match="DRIFT's subsets and per-step advantages"):
        load_run_config(None, ["train.clip_scaling=remaining", "drift.subset_fraction=0.5"])
