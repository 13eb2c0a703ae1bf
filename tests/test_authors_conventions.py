"""The HRF authors' conventions (alcazar90/ddpo-celebahq), each against a hand-computed example.

Half-open clusters are tested in test_windows.py and the n − 1 advantage std in test_advantages.py; here the
update: the clip range scaled by (K − k0)/K, the loss summed over steps, one optimizer step per batch; and
when an epoch's first model reference is drawn (after the update).
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from agents.algorithms import load_run_config
from agents.common.advantages import compute_advantages
from agents.common.collector import Collector
from agents.common.config import ConfigError
from agents.common.policy import DiffusionPolicy
from agents.common.rollout import Rollout, RolloutLayout
from agents.ppo_is.algorithm import ClippedUpdate
from agents.ppo_is.config import TrainConfig
from diffusion_gym import sampling
from diffusion_gym.envs import DiffusionDenoiseVectorEnv
from diffusion_gym.references import References, ReferenceSource

K = 40
SHAPE = (1, 16, 16)  # the embedded digits model's samples


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


class VersionedReferences(ReferenceSource):
    """Stand-in model references: each reference's class id is the version of the "model" that drew it."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape, self.version = shape, 0

    def sample(self, n, rng, device="cpu"):
        images = torch.full((n, *self.shape), self.version - 0.5)
        return References(images.to(device), torch.full((n,), self.version, dtype=torch.long))


class BatchConditions:
    """A batch observer that records the class id each batch starts with."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def start_batch(self, groups, conditions):
        self.seen.append(int(conditions[0]))

    def stored_step(self, x0):
        pass

    def end_batch(self, final):
        pass


def _reference_envs(model, refs, window=((2, 4),)):
    envs = DiffusionDenoiseVectorEnv(
        num_envs=4,
        model=model,
        num_steps=6,
        window=window if isinstance(window, str) else list(window),
        references=refs,
        samples_per_reference=4,
        reward="jpeg_compressibility",
        check_actions=False,
    )
    envs.reset(seed=0)
    return envs


@pytest.mark.parametrize(("after_update", "second_epoch"), [(False, [0, 1]), (True, [1, 1])])
def test_an_epochs_first_reference_is_drawn_after_the_update(model, after_update, second_epoch):
    """Two epochs of 2 batches, one reference per batch; the "update" between them makes the model version 1.

    By default the next batch starts as soon as a batch ends, so epoch 2's first batch starts from a
    reference of version 0 (drawn as epoch 1's last batch ended); in the authors' order both of epoch
    2's batches start from version 1.
    """
    refs = VersionedReferences(SHAPE)
    envs = _reference_envs(model, refs)
    policy = DiffusionPolicy(model.unet, sampling.make_schedule(model.scheduler, 6, eta=1.0))
    observer = BatchConditions()
    collector = Collector(
        envs, policy, torch.Generator().manual_seed(0), observers=[observer], redraw_references=after_update
    )
    collector.collect(2)
    refs.version = 1  # the update
    collector.collect(2)
    assert observer.seen == [0, 0, *second_epoch]


def test_a_redrawn_batch_keeps_its_start_step_and_groups(model):
    """The batch's x becomes the new reference noised to the same step with noise drawn from the rng."""
    refs = VersionedReferences(SHAPE)
    core = _reference_envs(model, refs).core
    k0, group = core.k0.clone(), core.group.clone()
    refs.version = 1
    assert core.redraw_references(np.random.default_rng(1))
    assert torch.equal(core.k0, k0) and torch.equal(core.k, k0) and torch.equal(core.group, group)
    assert core.c.tolist() == [1, 1, 1, 1]
    seed = int(np.random.default_rng(1).integers(0, 2**62))
    noise = torch.randn((4, *core.sample_shape), generator=torch.Generator().manual_seed(seed))
    expected = sampling.add_noise(torch.full((4, *core.sample_shape), 0.5), noise, k0, core.schedule)
    assert torch.allclose(core.x, expected, atol=1e-6)
    # a batch that took a step cannot redraw
    core.advance(core.x.clone(), score=False)
    with pytest.raises(RuntimeError, match="not yet taken a step"):
        core.redraw_references(np.random.default_rng(2))


def test_a_batch_from_pure_noise_is_not_redrawn(model):
    core = _reference_envs(model, VersionedReferences(SHAPE), window="full").core
    x = core.x.clone()
    assert not core.redraw_references(np.random.default_rng(1))
    assert torch.equal(core.x, x)


def test_references_after_update_needs_model_references():
    with pytest.raises(ConfigError, match="needs references: model, got references: 'digits'"):
        load_run_config(None, ["env.references_after_update=true", "env.references=digits"])
    config = load_run_config(None, ["env.references_after_update=true", "env.references=model"])
    assert config.env.references_after_update
