"""The flow-matching policy math (Flow-GRPO's SDE step): the ODE equals diffusers' Euler step, the SDE keeps the
ODE's marginals, log-probs are a Normal's, and an SDE window makes only its steps stochastic."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffusion_gym import sampling

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(scheduler, num_steps, mu=None):
    ref = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    ref.set_timesteps(num_steps, mu=mu)
    return ref


@pytest.mark.parametrize(
    "config",
    [{"shift": 1.0}, {"shift": 3.0}, {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}],
    ids=["no-shift", "sd3-shift", "flux-dynamic"],
)
def test_noise_level_zero_is_diffusers_euler_step_exactly(config):
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    mu = 0.8 if config.get("use_dynamic_shifting") else None
    schedule = sampling.make_schedule(scheduler, 8, eta=0.0) if mu is None else None
    schedule = schedule or sampling.make_flow_schedule(scheduler, 8, noise_level=0.0, mu=mu)
    ref = _reference(scheduler, 8, mu)
    assert torch.allclose(schedule.timesteps, ref.timesteps.float())
    assert bool(schedule.deterministic.all())
    x = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(0))
    for k in range(8):
        v = torch.randn(x.shape, generator=torch.Generator().manual_seed(k + 1))
        expected = ref.step(v, ref.timesteps[k], x).prev_sample
        step = sampling.denoise_step(v, x, k, schedule)
        assert torch.equal(step.x_prev, expected)
        assert torch.equal(step.log_prob, torch.zeros(3))  # an ODE step is no action
        x = expected


def test_sde_steps_keep_the_odes_terminal_marginals_on_a_gaussian_toy():
    """Data N(m, s²): the exact velocity E[ε − x0 | x_t] is linear in x_t; 10⁵ chains of 200 steps."""
    m, s = 1.5, 0.5

    def velocity(x, t):
        var = (1 - t) ** 2 * s**2 + t**2
        centred = x - (1 - t) * m
        return t / var * centred - (m + (1 - t) * s**2 / var * centred)

    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    moments = {}
    for a in (0.0, 0.3, 0.7, 1.0):
        schedule = sampling.make_flow_schedule(scheduler, 200, noise_level=a)
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(100_000, 1, generator=generator, dtype=torch.float64)
        for k in range(200):
            x = sampling.denoise_step(
                velocity(x, schedule.sigmas[k].double()), x, k, schedule, generator=generator
            ).x_prev
        moments[a] = (x.mean().item(), x.var().item())
    ode_mean, ode_var = moments[0.0]
    assert abs(ode_mean - m) < 0.01 and abs(ode_var - s**2) / s**2 < 0.02
    for a in (0.3, 0.7, 1.0):
        mean, var = moments[a]
        assert abs(mean - ode_mean) / ode_mean < 0.02, (a, mean, ode_mean)
        assert abs(var - ode_var) / ode_var < 0.02, (a, var, ode_var)


def test_sde_step_formula_log_prob_and_the_first_ratio():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    schedule = sampling.make_flow_schedule(scheduler, 6, noise_level=0.7)
    x = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    for k in range(6):
        v = torch.randn(x.shape, generator=torch.Generator().manual_seed(10 + k))
        step = sampling.denoise_step(v, x, k, schedule, generator=torch.Generator().manual_seed(20 + k))
        t, t_next = float(schedule.sigmas[k]), float(schedule.sigmas[k + 1])
        dt = t_next - t
        one_minus_t = 1 - t if t < 1 else 1 - float(schedule.sigmas[1])  # Flow-GRPO's convention at t = 1
        sigma = 0.7 * (t / one_minus_t) ** 0.5
        mean = x + (v + sigma**2 / (2 * t) * (x + (1 - t) * v)) * dt
        assert torch.allclose(step.mean, mean, atol=1e-5)
        assert torch.allclose(step.std.flatten(), torch.tensor(sigma * (-dt) ** 0.5).expand(4).float(), rtol=1e-5)
        normal = torch.distributions.Normal(step.mean.double(), step.std.double())
        expected = normal.log_prob(step.x_prev.double()).mean(dim=(1, 2, 3))
        assert (expected - step.log_prob.double()).abs().max() < 1e-5
        again = sampling.denoise_step(v, x, k, schedule, x_prev=step.x_prev)
        assert (again.log_prob - step.log_prob).abs().max() < 1e-6
        assert torch.allclose(step.x0, x - t * v)
        x = step.x_prev


def test_the_first_step_at_t_one_uses_the_next_sigma_and_stays_finite():
    schedule = sampling.make_flow_schedule(FlowMatchEulerDiscreteScheduler(shift=1.0), 10, noise_level=1.0)
    assert float(schedule.sigmas[0]) == 1.0
    t1 = float(schedule.sigmas[1])
    assert torch.isclose(schedule.std[0], torch.tensor((1.0 / (1 - t1)) ** 0.5 * (1 - t1) ** 0.5))
    assert bool(torch.isfinite(schedule.drift).all() & torch.isfinite(schedule.std).all())


def test_an_sde_window_makes_only_its_steps_stochastic():
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[3, 4]] = True
    schedule = sampling.make_flow_schedule(FlowMatchEulerDiscreteScheduler(shift=3.0), 10, 0.7, sde_steps=mask)
    assert (~schedule.deterministic).nonzero().flatten().tolist() == [3, 4]
    ode = sampling.make_flow_schedule(FlowMatchEulerDiscreteScheduler(shift=3.0), 10, 0.0)
    x, v = torch.randn(2, 4), torch.randn(2, 4)
    assert torch.equal(sampling.denoise_step(v, x, 5, schedule).x_prev, sampling.denoise_step(v, x, 5, ode).x_prev)


def test_add_noise_is_scale_noise():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    schedule = sampling.make_flow_schedule(scheduler, 8)
    ref = _reference(scheduler, 8)
    x0, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    for k in (0, 3, 7):
        expected = ref.scale_noise(x0, ref.timesteps[k : k + 1], noise)
        assert torch.allclose(sampling.add_noise(x0, noise, k, schedule), expected, atol=1e-6)


def test_bad_flow_schedule_arguments_are_named():
    scheduler = FlowMatchEulerDiscreteScheduler()
    with pytest.raises(ValueError, match="noise_level"):
        sampling.make_flow_schedule(scheduler, 4, noise_level=-0.1)
    with pytest.raises(ValueError, match="sde_steps"):
        sampling.make_flow_schedule(scheduler, 4, sde_steps=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="pass mu"):
        sampling.make_flow_schedule(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), 4)
    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler"):
        from diffusers import DDIMScheduler

        sampling.make_flow_schedule(DDIMScheduler(), 4)
