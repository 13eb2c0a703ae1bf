"""sampling.py against diffusers' schedulers: same noise, same result, at every step index."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from diffusion_gym import sampling
from diffusion_gym.models import ARCHITECTURES

K = 20
SHAPE = (3, 2, 6, 6)
CONFIGS = {name: cfg for name, (_, cfg) in ARCHITECTURES.items()}  # cosine (digits), linear (celebahq)


def _ddim(config: dict, **overrides) -> DDIMScheduler:
    s = DDIMScheduler.from_config({**config, **overrides})
    s.set_timesteps(K)
    return s


def _inputs(seed: int, k: int):
    g = torch.Generator().manual_seed(seed * 100 + k)
    model_output, x, z = (torch.randn(SHAPE, generator=g) for _ in range(3))
    return model_output, x * 1.5, z


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip_sample", [True, False])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_step_equals_diffusers(config_name, eta, clip_sample, prediction_type):
    ref = _ddim(CONFIGS[config_name], clip_sample=clip_sample, prediction_type=prediction_type)
    schedule = sampling.make_schedule(ref, K, eta=eta)
    assert schedule.timesteps.tolist() == ref.timesteps.tolist()
    for k, t in enumerate(ref.timesteps):
        model_output, x, z = _inputs(1, k)
        expected = ref.step(model_output, t, x, eta=eta, variance_noise=z).prev_sample
        mean = sampling.step_mean(model_output, x, k, schedule)
        std = sampling.step_std(k, schedule, mean)
        torch.testing.assert_close(mean + std * z, expected, atol=1e-5, rtol=0)
        out = sampling.denoise_step(model_output, x, k, schedule, noise=z)
        torch.testing.assert_close(out.x_prev, expected, atol=1e-5, rtol=0)


def test_ddim_use_clipped_model_output_and_thresholding():
    for overrides in ({"thresholding": True, "clip_sample": False, "sample_max_value": 1.5}, {}):
        ref = _ddim(CONFIGS["digits"], **overrides)
        schedule = sampling.make_schedule(ref, K, eta=0.7)
        for k, t in enumerate(ref.timesteps):
            model_output, x, z = _inputs(2, k)
            expected = ref.step(model_output, t, x, eta=0.7, variance_noise=z, use_clipped_model_output=True)
            out = sampling.denoise_step(model_output, x, k, schedule, noise=z, use_clipped_model_output=True)
            torch.testing.assert_close(out.x_prev, expected.prev_sample, atol=1e-5, rtol=0)
            torch.testing.assert_close(out.x0, expected.pred_original_sample, atol=1e-5, rtol=0)


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("num_steps", [K, 1000])
def test_ddpm_step_equals_diffusers(config_name, variance_type, prediction_type, num_steps):
    ref = DDPMScheduler.from_config(
        {**CONFIGS[config_name], "variance_type": variance_type, "prediction_type": prediction_type}
    )
    ref.set_timesteps(num_steps)
    schedule = sampling.make_schedule(ref, num_steps)
    indices = range(num_steps) if num_steps == K else [0, 1, 500, 998, 999]
    for k in indices:
        t = ref.timesteps[k]
        model_output, x, _ = _inputs(3, k)
        expected = ref.step(model_output, t, x, generator=torch.Generator().manual_seed(k)).prev_sample
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(k))  # the draw diffusers made
        out = sampling.denoise_step(model_output, x, k, schedule, noise=z)
        torch.testing.assert_close(out.x_prev, expected, atol=1e-5, rtol=0)


def test_deterministic_steps_are_flagged():
    ddim = sampling.make_schedule(_ddim(CONFIGS["digits"]), K, eta=1.0)
    assert ddim.deterministic.tolist() == [False] * (K - 1) + [True]  # set_alpha_to_one: last σ = 0
    no_one = sampling.make_schedule(_ddim(CONFIGS["digits"], set_alpha_to_one=False, steps_offset=1), K, eta=1.0)
    assert not no_one.deterministic.any()
    assert sampling.make_schedule(_ddim(CONFIGS["digits"]), K, eta=0.0).deterministic.all()
    ddpm = DDPMScheduler.from_config(CONFIGS["celebahq-256"])
    assert sampling.make_schedule(ddpm, K).deterministic.tolist() == [False] * (K - 1) + [True]


def test_log_prob_is_normal_log_density_averaged_over_pixels():
    schedule = sampling.make_schedule(_ddim(CONFIGS["celebahq-256"]), K, eta=1.0)
    for k in (0, 7, K - 2):
        model_output, x, z = _inputs(4, k)
        out = sampling.denoise_step(model_output, x, k, schedule, noise=z)
        direct = torch.distributions.Normal(out.mean, out.std).log_prob(out.x_prev).mean(dim=(1, 2, 3))
        torch.testing.assert_close(out.log_prob, direct, atol=1e-5, rtol=1e-6)
        # scoring another action recomputes its density, not the sampled one's
        other = out.x_prev + 0.1
        rescored = sampling.denoise_step(model_output, x, k, schedule, x_prev=other)
        direct = torch.distributions.Normal(out.mean, out.std).log_prob(other).mean(dim=(1, 2, 3))
        torch.testing.assert_close(rescored.log_prob, direct, atol=1e-5, rtol=1e-6)
    last = sampling.denoise_step(*_inputs(4, K - 1)[:2], K - 1, schedule)
    assert torch.equal(last.log_prob, torch.zeros(SHAPE[0]))  # σ = 0: no density, masked, never NaN
    assert torch.equal(last.x_prev, last.mean)


def test_batched_step_indices_match_per_sample_calls():
    schedule = sampling.make_schedule(_ddim(CONFIGS["digits"]), K, eta=1.0)
    model_output, x, z = _inputs(5, 0)
    ks = torch.tensor([0, 9, K - 1])
    batched = sampling.denoise_step(model_output, x, ks, schedule, noise=z)
    for i, k in enumerate(ks.tolist()):
        single = sampling.denoise_step(model_output[i : i + 1], x[i : i + 1], k, schedule, noise=z[i : i + 1])
        torch.testing.assert_close(batched.x_prev[i : i + 1], single.x_prev)
        torch.testing.assert_close(batched.log_prob[i : i + 1], single.log_prob)
    assert sampling.timestep_at(ks, schedule).tolist() == [schedule.timesteps[k].item() for k in ks.tolist()]


def test_add_noise_equals_diffusers():
    ref = _ddim(CONFIGS["celebahq-256"])
    schedule = sampling.make_schedule(ref, K)
    x0, noise, _ = _inputs(6, 0)
    for k in (0, 5, K - 1):
        expected = ref.add_noise(x0, noise, ref.timesteps[k : k + 1])
        torch.testing.assert_close(sampling.add_noise(x0, noise, k, schedule), expected, atol=1e-6, rtol=0)
    ks = torch.tensor([0, 5, K - 1])
    expected = ref.add_noise(x0, noise, ref.timesteps[ks])
    torch.testing.assert_close(sampling.add_noise(x0, noise, ks, schedule), expected, atol=1e-6, rtol=0)


def test_low_precision_inputs_get_fp32_math():
    schedule = sampling.make_schedule(_ddim(CONFIGS["digits"]), K, eta=1.0)
    model_output, x, z = _inputs(7, 3)
    full = sampling.denoise_step(model_output, x, 3, schedule, noise=z)
    half = sampling.denoise_step(model_output.bfloat16(), x.bfloat16(), 3, schedule, noise=z)
    assert half.x_prev.dtype == torch.bfloat16 and half.log_prob.dtype == torch.float32
    torch.testing.assert_close(half.mean, full.mean, atol=0.05, rtol=0.05)


def test_bad_arguments_name_the_value():
    ddim = _ddim(CONFIGS["digits"])
    with pytest.raises(ValueError, match="num_steps"):
        sampling.make_schedule(ddim, 0)
    with pytest.raises(ValueError, match="eta"):
        sampling.make_schedule(ddim, K, eta=float("nan"))
    learned = DDPMScheduler.from_config({**CONFIGS["digits"], "variance_type": "learned_range"})
    with pytest.raises(ValueError, match="learned_range"):
        sampling.make_schedule(learned, K)
    schedule = sampling.make_schedule(ddim, K)
    with pytest.raises(IndexError, match=str(K)):
        sampling.step_std(K, schedule, torch.zeros(1))
    with pytest.raises(IndexError):
        sampling.add_noise(torch.zeros(2, 1), torch.zeros(2, 1), torch.tensor([0, -1]), schedule)


def _toy_denoiser(x, t, c):
    """An elementwise stand-in for a UNet: per-row results do not depend on the batch."""
    return 0.3 * x + t.view(-1, 1, 1, 1).to(x.dtype) / 1000


def _hand_loop(schedule, x, generator):
    """The loop run_chain used to be: denoise_step drawing with ``generator=`` at every step."""
    for k in range(schedule.num_steps):
        t = sampling.timestep_at(k, schedule).expand(x.shape[0])
        x = sampling.denoise_step(_toy_denoiser(x, t, None), x, k, schedule, generator=generator).x_prev
    return x


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_denoise_chain_with_generator_noise_equals_the_hand_written_loop(eta):
    schedule = sampling.make_schedule(_ddim(CONFIGS["digits"]), K, eta=eta)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    expected = _hand_loop(schedule, x, torch.Generator().manual_seed(1))
    noise = sampling.GeneratorNoise(torch.Generator().manual_seed(1))
    assert torch.equal(sampling.denoise_chain(_toy_denoiser, x, schedule, noise=noise), expected)
    assert torch.equal(
        sampling.run_chain(_toy_denoiser, x, schedule, generator=torch.Generator().manual_seed(1)), expected
    )


def test_global_batch_noise_shards_equal_the_whole_batch():
    schedule = sampling.make_schedule(_ddim(CONFIGS["digits"]), K, eta=1.0)
    x = torch.randn((5, 2, 6, 6), generator=torch.Generator().manual_seed(0))
    whole = sampling.denoise_chain(
        _toy_denoiser, x, schedule, noise=sampling.GlobalBatchNoise(torch.Generator().manual_seed(3), 5, slice(None))
    )
    assert torch.equal(whole, _hand_loop(schedule, x, torch.Generator().manual_seed(3)))
    parts = []
    for rows in (slice(0, 3), slice(3, 5), slice(5, 5)):  # the last process holds no rows
        noise = sampling.GlobalBatchNoise(torch.Generator().manual_seed(3), 5, rows)
        parts.append(sampling.denoise_chain(_toy_denoiser, x[rows], schedule, noise=noise))
    assert parts[2].shape == (0, 2, 6, 6)
    assert torch.equal(torch.cat(parts), whole)


def test_split_chains_with_precomputed_noise_equal_one_chain_and_report_every_step():
    schedule = sampling.make_schedule(_ddim(CONFIGS["digits"]), K, eta=1.0)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    noise = sampling.PrecomputedNoise(torch.randn((K, *SHAPE), generator=torch.Generator().manual_seed(1)))
    seen: list[int] = []
    whole = sampling.denoise_chain(_toy_denoiser, x, schedule, noise=noise, on_step=lambda k, step: seen.append(k))
    assert seen == list(range(K))
    half = sampling.denoise_chain(_toy_denoiser, x, schedule, stop=7, noise=noise)
    assert torch.equal(sampling.denoise_chain(_toy_denoiser, half, schedule, start=7, noise=noise), whole)


def test_deterministic_chain_needs_no_noise_but_a_stochastic_one_does():
    ddim = _ddim(CONFIGS["digits"])
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    eta0 = sampling.make_schedule(ddim, K, eta=0.0)
    drawn = sampling.denoise_chain(_toy_denoiser, x, eta0, noise=sampling.GeneratorNoise(torch.Generator()))
    assert torch.equal(sampling.denoise_chain(_toy_denoiser, x, eta0), drawn)
    eta1 = sampling.make_schedule(ddim, K, eta=1.0)
    with pytest.raises(ValueError, match="noise=None.*stochastic"):
        sampling.denoise_chain(_toy_denoiser, x, eta1)
    sampling.denoise_chain(_toy_denoiser, x, eta1, start=K - 1)  # the last step (σ = 0) alone is deterministic
    for start, stop in ((-1, None), (3, 2), (0, K + 1)):
        with pytest.raises(ValueError, match=f"start={start}"):
            sampling.denoise_chain(_toy_denoiser, x, eta0, start=start, stop=stop)


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_eta_one_keeps_the_ddim_mean_real_and_eta_above_one_is_rejected(config_name, set_alpha_to_one):
    ddim = _ddim(CONFIGS[config_name], set_alpha_to_one=set_alpha_to_one)
    for num_steps in (1, 2, 10, 40, 1000):
        schedule = sampling.make_schedule(ddim, num_steps, eta=1.0)
        # the mean's sqrt(1 − ᾱ_prev − σ²), as _mean_from computes it in float32: never NaN at eta = 1
        assert bool((1 - schedule.alpha_prod_prev - schedule.std**2 >= 0).all())
        if set_alpha_to_one:  # why 1.01 is refused: σ²/(1 − ᾱ_prev) = eta²·(1 − ᾱ/ᾱ_prev)/(1 − ᾱ) reaches eta² > 1
            ratio = (1 - schedule.alpha_prod / schedule.alpha_prod_prev) / (1 - schedule.alpha_prod)
            assert float(ratio.max()) > 1 / 1.01**2
    for eta in (1.01, -0.1, float("inf"), True, "1"):
        with pytest.raises(ValueError, match=rf"eta must be a number in \[0, 1\], got {eta!r}"):
            sampling.make_schedule(ddim, K, eta=eta)
    sampling.make_schedule(ddim, K, eta=0)  # an int is fine
