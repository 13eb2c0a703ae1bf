"""SDE windows on flow chains: fixed, random (Flow-GRPO-Fast) and sliding (MixGRPO) windows choose each
batch's stochastic steps, count from the batch's start step (so they compose with HRF starts), are the
only steps stored and trained, and resume exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from agents.algorithms import load_run_config, train
from agents.common.checkpoint import latest_checkpoint
from agents.common.config import ConfigError
from diffusion_gym import sampling
from diffusion_gym.envs import DiffusionDenoiseVectorEnv
from diffusion_gym.families import load_family
from diffusion_gym.sde_windows import RandomSdeWindow, SlidingSdeWindow, make_sde_window

TOY = Path(__file__).resolve().parents[1] / "envs_configs" / "sd3-tiny_grpo_prompt_color.yaml"


def _stochastic(schedule: sampling.Schedule) -> list[int]:
    return (~schedule.deterministic).nonzero().flatten().tolist()


def test_a_random_window_draws_size_steps_uniformly_in_its_range():
    window = RandomSdeWindow(size=2)
    window.bind(10)  # default range: the first half of the chain, as Flow-GRPO's (0, K // 2)
    rng = np.random.default_rng(0)
    starts = [window.next_window(rng) for _ in range(2000)]
    assert all(b - a == 2 for a, b in starts)
    counts = np.bincount([a for a, _ in starts])
    assert len(counts) == 4 and counts.min() > 400  # uniform over the first steps 0..3 (ends at or before 5)
    assert window.batches == 2000


def test_a_sliding_window_moves_every_n_batches_and_wraps():
    window = SlidingSdeWindow(size=2, stride=1, every=2)
    window.bind(6)
    rng = np.random.default_rng(0)
    starts = [window.next_window(rng)[0] for _ in range(12)]
    assert starts == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 0, 0]
    window.restart()
    assert window.next_window(rng) == (0, 2)


def test_bad_windows_are_named():
    with pytest.raises(ValueError, match=r"unknown sde_window 'mix'; valid choices: \['random', 'sliding'\]"):
        make_sde_window("mix")
    with pytest.raises(ValueError, match="need a named SDE window"):
        make_sde_window((0, 2), size=2)
    with pytest.raises(ValueError, match="bad sde_window_kwargs for 'random'"):
        make_sde_window("random", stride=2)
    with pytest.raises(ValueError, match=r"low \+ size <= high <= 6"):
        make_sde_window("sliding", size=8).bind(6)
    with pytest.raises(ValueError, match="sde window size must be an int >= 1, got 0"):
        make_sde_window("random", size=0)
    with pytest.raises(ValueError, match="start_mode='shared'"):
        DiffusionDenoiseVectorEnv(2, model="random:sd3-tiny", num_steps=4, sde_window=(0, 2), start_mode="per_sample")
    with pytest.raises(ConfigError, match="sample.sde_window: VARD"):
        load_run_config(None, ["sample.sde_window=random"], algo="vard")


def test_a_window_keeps_each_steps_coefficients():
    family = load_family("random:sd3-tiny")
    full = sampling.make_schedule(family.scheduler, 6, eta=0.7)
    mask = torch.tensor([False, True, True, False, False, False])
    windowed = full.with_sde_steps(mask)
    built = sampling.make_schedule(family.scheduler, 6, eta=0.7, sde_window=(1, 3))
    for name in ("std", "drift", "noise_level", "sigmas", "dt", "timesteps"):
        assert torch.equal(getattr(windowed, name), getattr(built, name)), name
    assert _stochastic(windowed) == [1, 2]


def test_windows_count_from_the_batch_start_and_compose_with_an_hrf_start():
    kwargs = {"model": "random:sd3-tiny", "num_steps": 6, "eta": 0.7, "references": "model", "sde_window": (0, 2)}
    envs = DiffusionDenoiseVectorEnv(2, window=[(3, 3)], **kwargs)
    envs.reset(seed=0)
    assert envs.core.k0.tolist() == [3, 3] and _stochastic(envs.core.schedule) == [3, 4]
    late = DiffusionDenoiseVectorEnv(2, window=[(5, 5)], **kwargs)
    late.reset(seed=0)
    assert _stochastic(late.core.schedule) == [5]  # cut at the chain's end


def test_only_the_window_steps_are_stored_and_trained_and_resume_is_exact(tmp_path):
    """A random 2-step window of a 6-step chain: 2 pairs per episode, ratio 1 at the first recomputation,
    and a run stopped after one epoch resumes to the same adapters (the window's draws continue)."""
    overrides = [
        "sample.num_steps=6",
        "sample.num_envs=4",
        "sample.samples_per_condition=2",
        "sample.num_batches_per_epoch=2",
        "sample.sde_window=random",
        "sample.sde_window_kwargs={size: 2, high: 6}",
        "eval.num_samples=2",
        "eval.num_steps=3",
        "num_epochs=2",
        "eval.every=2",
    ]
    straight = train(load_run_config(TOY, overrides), run_dir=tmp_path / "a", progress=False)
    assert all(e.num_pairs == 4 * 2 * 2 and e.first_ratio_max_dev < 1e-6 for e in straight.epochs)
    train(load_run_config(TOY, overrides), run_dir=tmp_path / "b", progress=False, stop_after=1)
    train(load_run_config(TOY, overrides), run_dir=tmp_path / "b", resume=tmp_path / "b", progress=False)
    a = load_file(latest_checkpoint(tmp_path / "a") / "lora.safetensors")
    b = load_file(latest_checkpoint(tmp_path / "b") / "lora.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_collector_samples_ode_steps_outside_the_window():
    """Outside the window the rollout's step is the ODE step (no noise), inside it the SDE step."""
    from agents.common.policy import DiffusionPolicy

    envs = DiffusionDenoiseVectorEnv(
        2, model="random:sd3-tiny", num_steps=4, eta=0.7, sde_window="sliding", sde_window_kwargs={"size": 2}
    )
    core = envs.core
    policy = DiffusionPolicy(core.family, core.sde_schedule, conditions=core.conditions)
    envs.reset(seed=0)
    assert core.sde_steps == (0, 2) and _stochastic(core.schedule) == [0, 1]
    x, k, c = core.x.clone(), core.k.clone(), core.c.clone()
    noise = torch.randn_like(x)
    inside = policy.act(x, k, c, noise=noise, schedule=core.schedule)
    windowed = policy.act(x, k, c, noise=noise, schedule=core.schedule.with_sde_steps(torch.zeros(4, dtype=bool)))
    ode = policy.act(x, k, c, noise=noise, schedule=sampling.make_schedule(core.scheduler, 4, eta=0.0))
    assert torch.allclose(windowed.x_prev, ode.x_prev, atol=1e-6) and not torch.allclose(inside.x_prev, ode.x_prev)
