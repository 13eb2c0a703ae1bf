"""DRIFT's three mechanisms (agents/common/drift.py) and their wiring into PPO-IS: known-answer cases."""

import pytest
import torch
from _tiny_unet import tiny_unet

from agents.common.drift import (
    ConditionNoise,
    concentrated_subset,
    diversity_step_rewards,
    group_keys,
    shaped_step_advantages,
)
from agents.common.policy import DiffusionPolicy
from agents.ppo_is import train
from agents.ppo_is.config import ConfigError, load_config
from diffusion_gym import sampling
from diffusion_gym.metrics import group_cosine_diversity
from diffusion_gym.models import load_model

TINY = [
    "sample.num_steps=10",
    "sample.num_envs=8",
    "sample.num_batches_per_epoch=2",
    "sample.samples_per_reference=4",
    "train.batch_size=32",
    "train.gradient_updates_per_epoch=2",
    "eval.num_samples=8",
    "eval.every=100",
    "save_every=100",
    "env.window=[[3, 5]]",
]


# ---- (i) sampling: the reward-concentrated subset -------------------------------------------------


def test_concentrated_subset_drops_the_outliers_of_each_group():
    rewards = torch.tensor([0.0, 10.0, 10.1, 10.2, 50.0, 1.0, 2.0, 3.0, 100.0])
    keys = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1])
    keep = concentrated_subset(rewards, keys, 0.6)  # group 0: m = 3 of 5; group 1: m = ceil(2.4) = 3 of 4
    assert keep.tolist() == [False, True, True, True, False, True, True, True, False]


def test_concentrated_subset_edge_cases():
    rewards = torch.tensor([5.0, 1.0, 2.0, 7.0])
    assert concentrated_subset(rewards, torch.tensor([0, 1, 1, 1]), 1.0).all()  # fraction 1 keeps all
    assert concentrated_subset(rewards, torch.tensor([0, 1, 2, 3]), 0.1).all()  # singletons are kept
    # at least two per group (a baseline needs two); equal spreads: the lowest window
    assert concentrated_subset(torch.tensor([0.0, 1.0, 2.0]), torch.zeros(3), 0.1).tolist() == [True, True, False]
    with pytest.raises(ValueError, match="subset fraction must lie in"):
        concentrated_subset(rewards, torch.zeros(4), 0.0)


def test_group_keys_keep_references_and_conditions_apart():
    keys = group_keys(torch.tensor([0, 1, -1, -1]), torch.tensor([0, 0, 0, 1]))
    assert keys.tolist() == [0, 1, -1, -2]


# ---- (iii) optimisation: the intra-group diversity potential and its shaping ----------------------


def test_group_cosine_diversity_known_values():
    eye = torch.eye(4)
    assert group_cosine_diversity(eye, torch.zeros(4)).tolist() == [1.0, 1.0, 1.0, 1.0]  # orthogonal: distance 1
    same = torch.ones(4, 3)
    assert torch.allclose(group_cosine_diversity(same, torch.zeros(4)), torch.zeros(4), atol=1e-6)
    # groups do not mix; a sample alone in its group has diversity 0
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert group_cosine_diversity(features, torch.tensor([0, 0, 1])).tolist() == [0.0, 0.0, 0.0]
    # one of three is the opposite of the other two: d = (0 + 2) / 2 for the pair, (2 + 2) / 2 for it
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    assert torch.allclose(group_cosine_diversity(features, torch.zeros(3)), torch.tensor([1.0, 1.0, 2.0]))


def test_diversity_shaping_is_potential_based_it_telescopes_to_the_final_diversity():
    generator = torch.Generator().manual_seed(0)
    phi, final = torch.rand(6, 4, generator=generator), torch.rand(4, generator=generator)
    dense = diversity_step_rewards(phi, final, coef=0.5)
    # the shaped return differs from R + λΦ(x_0) by −λΦ(start): a constant of the start state
    assert torch.allclose(dense.sum(0), 0.5 * (final - phi[0]))
    # and the return-to-go from any step s is R + λ(Φ(x_0) − Φ(s_s)): policy-independent up to Φ(s_s)
    to_go = dense.flip(0).cumsum(0).flip(0)
    assert torch.allclose(to_go, 0.5 * (final.view(1, -1) - phi), atol=1e-6)


def test_shaped_advantages_credit_diversity_and_skip_dropped_episodes():
    # one batch, one group of 4, 3 steps; equal rewards, so only the diversity term separates them
    rewards = torch.zeros(4)
    phi = torch.full((3, 4), 0.2)
    final = torch.tensor([0.1, 0.2, 0.3, 0.9])
    keys = torch.zeros(4, dtype=torch.long)
    keep = torch.tensor([True, True, True, False])
    (adv,) = shaped_step_advantages(rewards, final, [phi], keys, keep, coef=1.0, clip=5.0)
    assert adv.shape == (3, 4)
    assert (adv[:, 3] == 0).all()  # dropped: no advantage
    assert (adv[:, 0] < adv[:, 1]).all() and (adv[:, 1] < adv[:, 2]).all()  # more final diversity: higher
    assert torch.allclose(adv[:, :3].mean(1), torch.zeros(3), atol=1e-5)  # standardised per (group, step)
    # with λ = 0 the advantages are the standardised rewards (all equal here: 0)
    (plain,) = shaped_step_advantages(rewards, final, [phi], keys, keep, coef=0.0, clip=5.0)
    assert (plain == 0).all()


# ---- (ii) prompting: annealed condition-embedding noise -------------------------------------------


def test_condition_noise_weight_is_annealed_over_the_denoising_time():
    noise = ConditionNoise(0.5, (0.2, 0.6))
    t = torch.tensor([0, 200, 400, 600, 999])
    assert torch.allclose(noise.weight(t, 1000), torch.tensor([0.0, 0.0, 0.25, 0.5, 0.5]))
    e = torch.randn(3, 16)
    direction = torch.randn(3, 16)
    out = noise.perturb(e, direction, torch.tensor([0.0, 1.0, 2.0]))
    assert torch.equal(out[0], e[0])
    rms = e.pow(2).mean(1).sqrt()
    assert torch.allclose(out[1] - e[1], rms[1] * direction[1]) and torch.allclose(
        out[2] - e[2], 2 * rms[2] * direction[2]
    )
    with pytest.raises(ValueError, match="tau"):
        ConditionNoise(0.5, (0.6, 0.2))


def test_condition_noise_changes_the_policy_and_its_log_prob_is_recomputed_exactly():
    loaded = load_model("embedded:digits")
    schedule = sampling.make_schedule(loaded.scheduler, 10, eta=1.0)
    policy = DiffusionPolicy(loaded.unet, schedule, condition_noise=ConditionNoise(1.0))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 16, 16, generator=generator)
    c = torch.arange(4)
    k = torch.zeros(4, dtype=torch.long)  # the noisiest step: full weight at t/T ≈ 1
    direction = torch.randn(4, policy.unet.class_embedding.embedding_dim, generator=generator)
    noise = torch.randn(4, 1, 16, 16, generator=generator)
    clean = policy.act(x, k, c, noise=noise)
    noisy = policy.act(x, k, c, noise=noise, cond_noise=direction)
    assert (noisy.mean - clean.mean).abs().max() > 1e-3  # the conditioning moved the Gaussian's mean
    zero = policy.act(x, k, c, noise=noise, cond_noise=torch.zeros_like(direction))
    assert torch.equal(zero.mean, clean.mean)  # no direction: exactly the plain policy
    with torch.no_grad():  # the update recomputes the rollout's log-prob with the stored direction
        again = policy.evaluate(x, k, c, noisy.x_prev, direction)
        plain = policy.evaluate(x, k, c, noisy.x_prev)
    assert torch.equal(again.log_prob, noisy.log_prob)
    assert not torch.equal(plain.log_prob, noisy.log_prob)
    assert torch.equal(policy.denoiser()(x, schedule.timesteps[k], c), policy.model_output(x, k, c).float())


def test_condition_noise_needs_a_class_embedding():
    unet = tiny_unet()  # unconditional: no class embedding to perturb
    schedule = sampling.make_schedule(load_model("embedded:digits").scheduler, 10)
    with pytest.raises(ValueError, match="drift.condition_noise"):
        DiffusionPolicy(unet, schedule, condition_noise=ConditionNoise(0.5))


# ---- wiring into PPO-IS -------------------------------------------------------------------------


def test_drift_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="drift.condition_noise_tau"):
        load_config(None, ["drift.condition_noise_tau=[0.9, 0.1]"])
    with pytest.raises(ConfigError, match="drift.subset_fraction"):
        load_config(None, ["drift.subset_fraction=1.5"])


def test_ppo_is_with_all_drift_mechanisms(tmp_path):
    """Subset, condition noise and shaping together: the update trains on the kept half only, and
    the first ratio is 1 (the condition noise of each episode is replayed exactly)."""
    drift = ["drift.subset_fraction=0.5", "drift.condition_noise=0.5", "drift.diversity_coef=0.1"]
    result = train(load_config(None, TINY + drift), run_dir=tmp_path / "run", progress=False, stop_after=2)
    for epoch in result.epochs:
        assert epoch.drift["kept_fraction"] == 0.5  # groups of 4 keep their 2 most concentrated rewards
        assert 0 < epoch.drift["final_diversity"] < 2
        assert epoch.first_ratio_max_dev < 1e-5


def test_drift_subset_leaves_out_the_dropped_pairs(tmp_path, monkeypatch):
    """The update sees exactly the kept trajectories' pairs."""
    from agents.ppo_is.algorithm import ClippedUpdate

    seen = {}
    original = ClippedUpdate.update

    def spy(self, rollout, keep_pairs=None):
        seen["pairs"], seen["kept"] = len(rollout), int(keep_pairs.sum())
        return original(self, rollout, keep_pairs)

    monkeypatch.setattr(ClippedUpdate, "update", spy)
    train(
        load_config(None, [*TINY, "drift.subset_fraction=0.5"]), run_dir=tmp_path / "run", progress=False, stop_after=1
    )
    assert seen["kept"] * 2 == seen["pairs"]
