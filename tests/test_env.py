import gymnasium as gym
import numpy as np
import pytest
import torch
from _checks import check_envs_are_clean
from diffusers import DDIMScheduler

import diffusion_gym  # noqa: F401  (registers DiffusionDenoise-v0)
from diffusion_gym import sampling
from diffusion_gym.envs import DenoiseCore, DiffusionDenoiseEnv, DiffusionDenoiseVectorEnv
from diffusion_gym.models import load_model
from diffusion_gym.rewards import jpeg_size_kb
from diffusion_gym.windows import WindowWrapper

MODEL_SPEC = "embedded:digits"
K = 10  # a short chain keeps the tests fast; the math is tested at every length in test_sampling.py
WINDOWS = ["full", "hrf", "hrf-early", "hrf-later", "hrf-d", [(2, 3), (5, 7)]]


@pytest.fixture(scope="module")
def model():
    return load_model(MODEL_SPEC)


def _window_kwargs(window):
    # the paper's presets are defined on a 40-step chain
    return {} if window in ("full", "hrf-d") or isinstance(window, list) else {"num_steps": 40}


def test_registration_and_make():
    env = gym.make("DiffusionDenoise-v0")
    assert env.unwrapped.core.num_steps == 40 and env.unwrapped.core.model_spec == "embedded:digits"
    env = gym.make(
        "DiffusionDenoise-v0",
        window="hrf-d",
        reward="jpeg_incompressibility",
        model="embedded:digits",
        num_steps=40,
        eta=1.0,
    )
    assert env.unwrapped.window.describe().startswith("dynamic")
    envs = gym.make_vec("DiffusionDenoise-v0", num_envs=16, vectorization_mode="vector_entry_point", window="hrf")
    assert isinstance(envs.unwrapped, DiffusionDenoiseVectorEnv) and envs.num_envs == 16
    obs, _ = envs.reset(seed=0)
    assert obs["x_t"].shape == (16, 1, 16, 16) and isinstance(obs["x_t"], torch.Tensor)


@pytest.mark.parametrize("window", WINDOWS, ids=str)
def test_gymnasium_and_sb3_check_env_are_clean(window, model):
    kwargs = {"num_steps": K, **_window_kwargs(window)}
    env = gym.make("DiffusionDenoise-v0", model=model, window=window, probe_size=2, **kwargs).unwrapped
    check_envs_are_clean(env, DiffusionDenoiseEnv(model=model, window=window, probe_size=2, **kwargs))


def _ddim(model_scheduler, steps):
    ref = DDIMScheduler.from_config(model_scheduler.config)
    ref.set_timesteps(steps)
    return ref


def _drive(env, unet, schedule, obs, zs):
    """Step the env with the DDIM policy: action = UNet mean + σ·z."""
    x = torch.from_numpy(obs["x_t"])[None]
    c = torch.tensor([int(obs["c"])])
    rewards, steps = [], 0
    while True:
        k = env.unwrapped.core.k_host[0]
        with torch.no_grad():
            out = unet(x, sampling.timestep_at(k, schedule).expand(1), class_labels=c).sample
        action = sampling.denoise_step(out, x, int(k), schedule, noise=zs[k]).x_prev
        obs, reward, terminated, truncated, info = env.step(action[0].numpy())
        rewards.append(reward)
        steps += 1
        x = torch.from_numpy(obs["x_t"])[None]
        if terminated:
            return x, rewards, steps, info
        assert reward == 0.0 and not truncated


@pytest.mark.parametrize("start", [0, 4])
def test_env_reproduces_the_diffusers_ddim_loop(model, start):
    unet, scheduler = model
    env = DiffusionDenoiseEnv(model=model, num_steps=K, eta=1.0, window="full" if start == 0 else [(start, start)])
    schedule = env.unwrapped.core.schedule
    obs, info = env.reset(seed=3)
    assert info["start_step"] == start and info["step_index"] == start
    g = torch.Generator().manual_seed(0)
    zs = [torch.randn((1, 1, 16, 16), generator=g) for _ in range(K)]
    final, rewards, steps, info = _drive(env, unet, schedule, obs, zs)

    ref = _ddim(scheduler, K)
    x = torch.from_numpy(obs["x_t"])[None]
    c = torch.tensor([int(obs["c"])])
    for k in range(start, K):
        t = ref.timesteps[k]
        with torch.no_grad():
            out = unet(x, t, class_labels=c).sample
        x = ref.step(out, t, x, eta=1.0, variance_noise=zs[k]).prev_sample
    torch.testing.assert_close(final, x, atol=1e-5, rtol=0)

    assert steps == K - start  # episode length = remaining steps
    assert rewards[:-1] == [0.0] * (steps - 1)
    expected = -jpeg_size_kb(sampling.to_unit_range(final)).item()
    assert rewards[-1] == pytest.approx(expected) and info["raw_reward"] == rewards[-1]


def test_window_start_is_the_noised_reference(model):
    def start_obs(value):
        refs = torch.full((1, 1, 16, 16), value)  # one reference image in [0, 1]
        env = DiffusionDenoiseEnv(model=model, num_steps=K, window=[(6, 6)], references=refs)
        return env.reset(seed=0)

    (white, info), (black, _) = start_obs(1.0), start_obs(0.0)
    a = DiffusionDenoiseEnv(model=model, num_steps=K).core.schedule.alpha_prod[6].item()
    # same seed, same noise ε: x_white - x_black = sqrt(ᾱ)·(1 - (-1)) exactly
    np.testing.assert_allclose(white["x_t"] - black["x_t"], 2 * a**0.5, atol=1e-5)
    assert info["start_step"] == 6 and info["group"] == 0 and white["c"] == 0


def test_bad_input_is_rejected_and_the_env_stays_usable(model):
    with pytest.raises(ValueError, match=r"unknown window 'nope'.*hrf-d"):
        DiffusionDenoiseEnv(model=model, window="nope")
    with pytest.raises(ValueError, match=r"unknown reward 'nope'.*jpeg_compressibility"):
        DiffusionDenoiseEnv(model=model, reward="nope")
    with pytest.raises(ValueError, match=r"embedded:digits"):
        DiffusionDenoiseEnv(model="embedded:nope")
    with pytest.raises(ValueError, match=r"malformed cluster"):
        DiffusionDenoiseEnv(model=model, window=[(5, 2)])
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        DiffusionDenoiseEnv(model=model, num_steps=K, window=[(2, 12)])

    env = DiffusionDenoiseEnv(model=model, num_steps=3)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros((1, 16, 16), np.float32))
    obs, _ = env.reset(seed=0)
    before = obs["x_t"].copy()
    bad_actions = {
        "shape": np.zeros((16, 16), np.float32),
        "dtype": np.zeros((1, 16, 16), np.int64),
        "NaN": np.full((1, 16, 16), np.nan, np.float32),
        "Inf": np.full((1, 16, 16), np.inf, np.float32),
        "bounds": np.full((1, 16, 16), 50.0, np.float32),
    }
    for what, action in bad_actions.items():
        with pytest.raises(ValueError) as err:
            env.step(action)
        assert what.lower() in str(err.value).lower() or "shape" in str(err.value)
        assert env.core.k_host[0] == 0 and np.array_equal(env._obs()["x_t"], before)  # unchanged
    for _ in range(3):
        obs, reward, terminated, _, _ = env.step(np.zeros((1, 16, 16), np.float32))
    assert terminated
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros((1, 16, 16), np.float32))
    env.reset()  # usable again
    with pytest.raises(ValueError, match="start_step"):
        env.reset(options={"start_step": 3})
    with pytest.raises(ValueError, match="unknown reset options"):
        env.reset(options={"start": 1})


def test_vector_env_keeps_tensors_shares_start_steps_and_autoresets(model):
    n, per_ref = 8, 4
    envs = DiffusionDenoiseVectorEnv(
        num_envs=n, model=model, num_steps=K, window=[(3, 6)], samples_per_reference=per_ref
    )
    obs, info = envs.reset(seed=1)
    assert all(isinstance(v, torch.Tensor) for v in obs.values())
    start = int(info["start_step"][0])
    assert 3 <= start <= 6 and bool((info["start_step"] == start).all())
    groups = info["group"].view(-1, per_ref)
    assert bool((groups == groups[:, :1]).all()) and groups[:, 0].unique().numel() == n // per_ref
    assert bool((obs["c"].view(-1, per_ref) == obs["c"].view(-1, per_ref)[:, :1]).all())  # a group shares c

    zeros = torch.zeros(n, 1, 16, 16)
    for step in range(K - start):
        action = torch.randn(n, 1, 16, 16).clamp(-3, 3) * 0.1
        obs, rewards, terminated, truncated, info = envs.step(action)
        assert isinstance(rewards, torch.Tensor) and rewards.shape == (n,) and not truncated.any()
        if step < K - start - 1:
            assert not terminated.any() and bool((rewards == 0).all())
    assert bool(terminated.all()) and bool(info["_final_obs"].all())
    torch.testing.assert_close(info["final_obs"]["x_t"], action)
    expected = -jpeg_size_kb(sampling.to_unit_range(action))
    torch.testing.assert_close(rewards, expected.float())
    new_start = int(info["start_step"][0])
    assert 3 <= new_start <= 6 and bool((info["step_index"] == new_start).all())  # same-step autoreset
    assert not torch.equal(obs["x_t"], zeros)
    with pytest.raises(ValueError, match="shape"):
        envs.step(torch.zeros(n - 1, 1, 16, 16))


def test_vector_env_per_sample_starts(model):
    envs = DiffusionDenoiseVectorEnv(num_envs=16, model=model, num_steps=K, window=[(1, 8)], start_mode="per_sample")
    _, info = envs.reset(seed=0)
    starts = info["start_step"]
    assert starts.unique().numel() > 1 and bool(((starts >= 1) & (starts <= 8)).all())
    finished = torch.zeros(16, dtype=torch.bool)
    for _ in range(K - 1):
        _, _, terminated, _, info = envs.step(torch.zeros(16, 1, 16, 16))
        finished |= terminated
    assert finished.all()  # every episode (length K - k0 <= K - 1) has ended at least once


def test_hrf_d_probes_the_current_denoiser(model):
    calls = []
    unet = model.unet

    def denoiser(x, t, c):
        calls.append(int(t[0]))
        return unet(x, t, class_labels=c).sample

    env = DiffusionDenoiseEnv(
        model=model, num_steps=K, window="hrf-d", denoiser=denoiser, probe_size=4, window_kwargs={"stride": 3}
    )
    _, info = env.reset(seed=0)
    assert info["start_step"] in (0, 3, 6, 9)
    assert calls  # the probe used our denoiser
    scores = env.window.last_scores
    assert len(scores["score"]) == 4 and np.argmax(scores["score"]) == [0, 3, 6, 9].index(info["start_step"])


def test_window_wrapper_installs_a_strategy(model):
    env = WindowWrapper(DiffusionDenoiseEnv(model=model, num_steps=K), [(7, 7)])
    _, info = env.reset(seed=0)
    assert info["start_step"] == 7 and env.window.clusters == [(7, 7)]


def test_render_rgb_array(model):
    env = DiffusionDenoiseEnv(model=model, num_steps=K, render_mode="rgb_array")
    env.reset(seed=0)
    frame = env.render()
    assert frame.shape == (16, 16, 3) and frame.dtype == np.uint8


class _ThreadGather:
    """An in-process stand-in for torch.distributed's all-gather: one thread per rank."""

    def __init__(self, world_size):
        import threading

        self.barrier = threading.Barrier(world_size, timeout=60)
        self.slots = [None] * world_size

    def for_rank(self, rank):
        def all_gather(tensor):
            self.slots[rank] = tensor
            self.barrier.wait()
            out = torch.cat(self.slots)
            self.barrier.wait()
            return out

        return all_gather


def _in_threads(fns):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(fns)) as pool:
        return [f.result() for f in [pool.submit(fn) for fn in fns]]


@pytest.mark.parametrize(
    "window,references", [("full", None), ([(2, 3), (5, 7)], "digits"), ("hrf-d", "model")], ids=str
)
def test_sharded_envs_hold_blocks_of_the_unsharded_batch(model, window, references):
    """Two shards of 4 envs = one env of 8: same draws (references, noise, conditions, groups),
    the same HRF-D choice from split probes, and a global state that loads under any sharding. Images
    agree to float rounding: the UNet may round differently in the shards' smaller batches."""
    from diffusion_gym.envs import Shard

    kwargs = dict(
        model=model,
        num_steps=K,
        window=window,
        window_kwargs={"stride": 3} if window == "hrf-d" else {},
        references=references,
        probe_size=3,  # split 2 + 1
        samples_per_reference=3,  # the middle group straddles the shards
    )

    def sharded(rank):  # a sharded core, wrapped by the vector env
        core = DenoiseCore(num_envs=4, shard=Shard(rank, 2, gather.for_rank(rank)), **kwargs)
        return DiffusionDenoiseVectorEnv(core.num_envs, check_actions=False, core=core)

    def run(env):
        obs, info = env.reset(seed=3)
        seen = [(obs, info)]
        for _ in range(2 if window != "hrf-d" else 1):  # whole batches, each ending in an autoreset (a new probe)
            for _ in range(int(env.steps_remaining()[0])):
                obs, _, _, _, info = env.step(obs["x_t"] * 0.9)
            seen.append((obs, info))
        return seen, env.state_dict()

    whole = DiffusionDenoiseVectorEnv(num_envs=8, check_actions=False, **kwargs)
    gather = _ThreadGather(2)
    shards = [sharded(r) for r in (0, 1)]
    seen, expected = run(whole)
    for r, (part, state) in enumerate(_in_threads([lambda e=e: run(e) for e in shards])):
        block = slice(4 * r, 4 * r + 4)
        for (obs, info), (o, i) in zip(seen, part, strict=True):
            assert torch.allclose(o["x_t"], obs["x_t"][block], atol=1e-5) and torch.equal(o["c"], obs["c"][block])
            assert torch.equal(i["start_step"], info["start_step"][block])
            assert torch.equal(i["group"], info["group"][block])
        for name, value in expected["core"]["episodes"].items():  # the state is the whole batch's
            # (model references are denoised in smaller batches: the UNet's float rounding may differ)
            assert torch.allclose(state["core"]["episodes"][name].float(), value.float(), atol=1e-5), name
        assert state["core"]["window"] == expected["core"]["window"] and state["np_random"] == expected["np_random"]
    resharded = sharded(1)
    resharded.load_state_dict(expected)
    assert torch.equal(resharded.observation()[0]["x_t"], whole.observation()[0]["x_t"][4:])
    if window == "hrf-d":
        assert shards[0].window.last_scores == shards[1].window.last_scores
        assert shards[0].window.chosen == whole.window.chosen
        assert np.allclose(shards[0].window.last_scores["reward"], whole.window.last_scores["reward"], atol=1e-5)


def test_shard_needs_shared_starts_and_whole_batches(model):
    from diffusion_gym.envs import Shard

    with pytest.raises(ValueError, match="start_mode='shared'"):
        DenoiseCore(num_envs=2, model=model, num_steps=K, start_mode="per_sample", shard=Shard(0, 2, id))
    with pytest.raises(ValueError, match=r"shard rank must be an int in \[0, 1\], got 2"):
        Shard(2, 2, id)
    core = DenoiseCore(num_envs=2, model=model, num_steps=K, shard=Shard(0, 2, id))
    with pytest.raises(ValueError, match="whole batches only: got 1 of 2"):
        core.begin(np.random.default_rng(0), indices=np.array([0]))


def test_a_wrapped_core_needs_its_own_size_and_no_other_env_arguments(model):
    core = DenoiseCore(num_envs=2, model=model, num_steps=K)
    with pytest.raises(ValueError, match=r"pass num_envs=2 \(its size\).*got num_envs=3"):
        DiffusionDenoiseVectorEnv(3, core=core)
    with pytest.raises(ValueError, match=r"no other env arguments.*\['num_steps'\]"):
        DiffusionDenoiseVectorEnv(2, core=core, num_steps=K)
    envs = DiffusionDenoiseVectorEnv(core.num_envs, core=core)
    assert envs.core is core and envs.num_envs == 2
