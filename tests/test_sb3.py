import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.env_checker import check_env
from stable_baselines3.common.vec_env import VecMonitor

import diffusion_gym  # noqa: F401  (registers DiffusionDenoise-v0)
from agents.common.policy import DiffusionPolicy
from agents.sb3 import DiffusionActorCriticPolicy, DiffusionVecEnv, GroupStandardizedReward, WarmupSchedule
from diffusion_gym import sampling
from diffusion_gym.envs import DiffusionDenoiseEnv, DiffusionDenoiseVectorEnv
from diffusion_gym.models import load_model

K = 10  # a short chain keeps the tests fast
WINDOW = [(5, 7)]


def _venv(model, num_envs=8, **kwargs):
    kwargs = {"num_steps": K, "window": WINDOW, **kwargs}
    return DiffusionVecEnv(DiffusionDenoiseVectorEnv(num_envs=num_envs, model=model, **kwargs))


def _policy(venv, **kwargs):
    kwargs = {"model": "embedded:digits", "num_steps": K, **kwargs}
    return DiffusionActorCriticPolicy(venv.observation_space, venv.action_space, lambda _: 1e-4, **kwargs)


def _as_tensors(obs):
    return {key: torch.as_tensor(value) for key, value in obs.items()}


def test_sb3_check_env_passes_on_the_single_env(model):
    env = DiffusionDenoiseEnv(model=model, num_steps=K, window=WINDOW)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # SB3's advice on image dtypes and action ranges
        check_env(env, warn=True)


def test_adapter_matches_native_env_and_follows_sb3_conventions(model):
    native = DiffusionDenoiseVectorEnv(num_envs=4, model=model, num_steps=K, window=WINDOW)
    venv = _venv(model, num_envs=4)
    venv.seed(3)
    obs = venv.reset()
    ref_obs, ref_info = native.reset(seed=3)
    assert set(obs) == {"c", "t", "x_t"} and obs["x_t"].dtype == np.float32 and obs["t"].dtype == np.int64
    assert obs["x_t"].shape == (4, 1, 16, 16) and venv.observation_space.contains({k: v[0] for k, v in obs.items()})
    np.testing.assert_array_equal(obs["x_t"], ref_obs["x_t"].numpy())
    assert venv.reset_infos[0]["start_step"] == int(ref_info["start_step"][0])
    generator = torch.Generator().manual_seed(0)
    ended = False
    while not ended:
        actions = torch.randn((4, 1, 16, 16), generator=generator)
        obs, rewards, dones, infos = venv.step(actions.numpy().reshape(4, -1))  # flat actions are accepted
        ref_obs, ref_rewards, ref_done, _, ref_info = native.step(actions)
        np.testing.assert_array_equal(rewards, ref_rewards.numpy())
        np.testing.assert_array_equal(dones, ref_done.numpy())
        np.testing.assert_array_equal(obs["x_t"], ref_obs["x_t"].numpy())
        np.testing.assert_array_equal(obs["t"], ref_obs["t"].numpy())
        ended = bool(dones.all())
    final = ref_info["final_obs"]
    for i in range(4):  # the finished episode is in the info, the new one in reset_infos
        assert infos[i]["raw_reward"] == pytest.approx(float(ref_rewards[i])) and rewards[i] < 0
        np.testing.assert_array_equal(infos[i]["terminal_observation"]["x_t"], final["x_t"][i].numpy())
        assert infos[i]["terminal_observation"]["t"] == int(final["t"][i])
        assert infos[i]["TimeLimit.truncated"] is False
        assert infos[i]["group"] == int(ref_info["final_info"]["group"][i])
        assert venv.reset_infos[i]["group"] == int(ref_info["group"][i]) != infos[i]["group"]
    assert venv.get_attr("num_envs") == [4] * 4 and venv.env_is_wrapped(gym.Wrapper) == [False] * 4


def test_adapter_accepts_make_vec_and_rejects_bad_input(model):
    envs = gym.make_vec(
        "DiffusionDenoise-v0", num_envs=2, vectorization_mode="vector_entry_point", model=model, num_steps=K
    )
    venv = DiffusionVecEnv(envs)
    venv.reset()
    with pytest.raises(ValueError, match=r"actions must have shape \(2, 1, 16, 16\)"):
        venv.step(np.zeros((2, 3)))
    with pytest.raises(TypeError, match="DiffusionDenoiseVectorEnv"):
        DiffusionVecEnv(gym.vector.SyncVectorEnv([lambda: gym.make("CartPole-v1")]))
    with pytest.raises(ValueError, match="indices must be None"):
        venv.set_attr("check", False, indices=[0])
    with pytest.raises(ValueError, match="either an env or env keyword arguments"):
        DiffusionVecEnv(envs, num_envs=2)


def test_log_prob_equals_ppo_is_policy_evaluate(model):
    """The SB3 policy's log-prob of (state, action) is DiffusionPolicy.evaluate's, to 1e-5."""
    venv = _venv(model, num_envs=6)
    policy = _policy(venv)
    unet, scheduler = load_model("embedded:digits")
    reference = DiffusionPolicy(unet, sampling.make_schedule(scheduler, K, eta=1.0))
    g = torch.Generator().manual_seed(0)
    k = torch.tensor([0, 3, 5, 8, 9, 9])  # k = 9 is the σ = 0 last DDIM step
    x = torch.randn((6, 1, 16, 16), generator=g)
    c = torch.tensor([0, 1, 2, 3, 4, 5])
    obs = {"c": c, "t": reference.schedule.timesteps[k], "x_t": x}
    actions, values, old_log_prob = policy(obs)
    assert actions.shape == (6, 1, 16, 16) and values.shape == (6, 1)
    actions[5] += 0.1  # a deterministic step scores 0 whatever the action
    _, log_prob, entropy = policy.evaluate_actions(obs, actions.reshape(6, -1))  # SB3's buffer stores flat actions
    expected = reference.evaluate(x, k, c, actions).log_prob
    torch.testing.assert_close(log_prob, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(log_prob[:5], old_log_prob[:5], atol=1e-5, rtol=0)  # ratio 1 right after sampling
    assert log_prob[4] == 0 and log_prob[5] == 0 and entropy[4] == 0  # σ = 0: not a stochastic action
    assert log_prob[:4].abs().max() < 10  # a mean over pixels, not a sum over 256 of them
    assert log_prob.requires_grad


def test_ppo_runs_and_save_load_gives_identical_log_probs_and_actions(model, tmp_path):
    torch.manual_seed(0)
    venv = _venv(model, num_envs=4)
    algo = PPO(
        DiffusionActorCriticPolicy,
        GroupStandardizedReward(VecMonitor(venv)),
        policy_kwargs=venv.policy_kwargs(model="embedded:digits"),
        n_steps=6,
        batch_size=12,
        n_epochs=1,
        learning_rate=1e-4,
        gamma=1.0,
        gae_lambda=1.0,
        seed=0,
        device="cpu",
    )
    before = {k: v.clone() for k, v in algo.policy.actor.unet.state_dict().items()}
    algo.learn(total_timesteps=2 * 6 * 4)
    after = algo.policy.actor.unet.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "PPO did not update the UNet"
    assert algo.logger.name_to_value["train/clip_fraction"] >= 0

    algo.save(tmp_path / "agent")
    loaded = PPO.load(tmp_path / "agent", device="cpu")
    assert isinstance(loaded.policy, DiffusionActorCriticPolicy)
    obs = venv.reset()
    tensors = _as_tensors(obs)
    actions = torch.as_tensor(algo.predict(obs, deterministic=False)[0])
    for policy in (algo.policy, loaded.policy):
        policy.set_training_mode(False)
    with torch.no_grad():
        v1, lp1, _ = algo.policy.evaluate_actions(tensors, actions)
        v2, lp2, _ = loaded.policy.evaluate_actions(tensors, actions)
    torch.testing.assert_close(lp1, lp2, atol=0, rtol=0)
    torch.testing.assert_close(v1, v2, atol=0, rtol=0)
    np.testing.assert_array_equal(algo.predict(obs, deterministic=True)[0], loaded.predict(obs, deterministic=True)[0])
    torch.manual_seed(5)
    a1 = algo.predict(obs)[0]
    torch.manual_seed(5)
    np.testing.assert_array_equal(a1, loaded.predict(obs)[0])


def test_group_standardized_reward(model):
    venv = GroupStandardizedReward(_venv(model, num_envs=8, samples_per_reference=4))
    venv.reset()
    dones = np.zeros(8, bool)
    while not dones.any():
        obs, rewards, dones, infos = venv.step(np.clip(np.random.default_rng(0).normal(size=(8, 256)), -10, 10))
    assert dones.all()
    raw = np.array([info["raw_reward"] for info in infos])
    groups = np.array([info["group"] for info in infos])
    assert len(set(groups)) == 2
    for g in set(groups):
        r, z = raw[groups == g], rewards[groups == g]
        assert abs(z.mean()) < 1e-5
        if r.std() > 0:
            np.testing.assert_allclose(z, (r - r.mean()) / (r.std() + 1e-6), rtol=1e-4, atol=1e-5)


def test_policy_rejects_mismatched_chain_and_options(model):
    venv = _venv(model, num_envs=2)
    obs = _as_tensors(venv.reset())
    policy = _policy(venv, num_steps=K + 2)  # env has K steps: its timesteps are not all on this chain
    with pytest.raises(ValueError, match="not steps of the policy's chain.*valid timesteps"):
        policy.predict_values({**obs, "t": torch.tensor([1, 999])})
    with pytest.raises(ValueError, match="pass the model's spec string"):
        venv.policy_kwargs()
    assert venv.policy_kwargs(model="embedded:digits", eta=0.5) == {
        "model": "embedded:digits",
        "num_steps": K,
        "eta": 0.5,
        "scheduler": "ddim",
    }
    with pytest.raises(ValueError, match="use_sde and squash_output must be False"):
        _policy(venv, use_sde=True)
    with pytest.raises(ValueError, match="model spec string"):
        _policy(venv, model=model)
    with pytest.raises(ValueError, match="state shape"):
        DiffusionActorCriticPolicy(
            venv.observation_space, gym.spaces.Box(-1, 1, (3, 8, 8)), lambda _: 1e-4, num_steps=K
        )


def test_warmup_schedule():
    schedule = WarmupSchedule(5e-4, warmup_fraction=2 / 12)
    assert schedule(1 - 1 / 12) == pytest.approx(2.5e-4)  # SB3 updates after the first rollout: half the rate
    assert schedule(1 - 2 / 12) == pytest.approx(5e-4) and schedule(0.1) == 5e-4
    assert WarmupSchedule(1e-3, 0)(1.0) == 1e-3
    with pytest.raises(ValueError, match="warmup_fraction"):
        WarmupSchedule(1e-3, 1.5)
