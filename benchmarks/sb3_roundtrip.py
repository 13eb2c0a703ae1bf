"""What SB3's numpy boundary costs: rollouts through ``DiffusionVecEnv`` vs the native torch env.

In one run, with the same SB3 policy (``DiffusionActorCriticPolicy``: UNet actor + CNN critic) and
the same env settings, times whole batches of episodes collected

* **native**: ``DiffusionDenoiseVectorEnv`` — observations, actions and rewards stay torch tensors
  on the device;
* **adapter**: ``DiffusionVecEnv`` as SB3's ``collect_rollouts`` drives it — numpy observations →
  ``obs_as_tensor`` → policy → ``actions.cpu().numpy()`` → ``np.clip`` to the action bounds →
  ``step`` (actions back to the device, observations and info back to numpy);
* **SB3 PPO rollout**: ``PPO.collect_rollouts`` itself (adds SB3's rollout buffer and GAE).

The two first loops alternate (native, adapter, native, …) so that other load on the machine hits
both alike; the table reports the median batch time of each and the ratios. Run::

    python benchmarks/sb3_roundtrip.py [--num-envs 64] [--steps 40] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.utils import obs_as_tensor

from agents.sb3 import DiffusionActorCriticPolicy, DiffusionVecEnv
from diffusion_gym.envs import DiffusionDenoiseVectorEnv


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def native_batch(envs: DiffusionDenoiseVectorEnv, policy: DiffusionActorCriticPolicy) -> float:
    """Seconds for one batch of episodes on the native env (tensors only)."""
    obs, _ = envs.observation()
    _sync(envs.device)
    start = time.perf_counter()
    for _ in range(int(envs.steps_remaining().max())):
        actions, _, _ = policy(obs)
        obs, *_ = envs.step(actions)
    _sync(envs.device)
    return time.perf_counter() - start


@torch.no_grad()
def adapter_batch(venv: DiffusionVecEnv, policy: DiffusionActorCriticPolicy, obs: dict) -> tuple[float, dict]:
    """Seconds for one batch through the adapter, as SB3's ``collect_rollouts`` drives it."""
    low, high = venv.action_space.low, venv.action_space.high
    _sync(venv.device)
    start = time.perf_counter()
    for _ in range(int(venv.env.steps_remaining().max())):
        actions, _, _ = policy(obs_as_tensor(obs, policy.device))
        obs, _, _, _ = venv.step(np.clip(actions.cpu().numpy(), low, high))
    _sync(venv.device)
    return time.perf_counter() - start, obs


class _Timer(BaseCallback):
    def _on_rollout_start(self) -> None:
        self.start = time.perf_counter()

    def _on_rollout_end(self) -> None:
        self.seconds = time.perf_counter() - self.start

    def _on_step(self) -> bool:
        return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-envs", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40, help="K; the full window runs K steps per episode")
    parser.add_argument("--repeats", type=int, default=3, help="batches per loop")
    parser.add_argument("--window", default="full")
    parser.add_argument("--model", default="embedded:digits")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    kwargs = dict(num_envs=args.num_envs, num_steps=args.steps, window=args.window, model=args.model, device=device)
    native = DiffusionDenoiseVectorEnv(check_actions=False, **kwargs)
    venv = DiffusionVecEnv(DiffusionDenoiseVectorEnv(check_actions=False, **kwargs))
    policy = DiffusionActorCriticPolicy(
        venv.observation_space, venv.action_space, lambda _: 0.0, **venv.policy_kwargs()
    ).to(device)
    policy.set_training_mode(False)
    native.reset(seed=0)
    venv.seed(0)
    obs = venv.reset()
    native_batch(native, policy)  # warm-up both paths
    _, obs = adapter_batch(venv, policy, obs)

    native_s, adapter_s = [], []
    for _ in range(args.repeats):
        native_s.append(native_batch(native, policy))
        seconds, obs = adapter_batch(venv, policy, obs)
        adapter_s.append(seconds)
    transitions = args.num_envs * int(venv.env.steps_remaining().max())

    ppo_venv = DiffusionVecEnv(DiffusionDenoiseVectorEnv(check_actions=False, **kwargs))
    algo = PPO(
        DiffusionActorCriticPolicy,
        ppo_venv,
        policy_kwargs=ppo_venv.policy_kwargs(),
        n_steps=args.steps,
        batch_size=args.num_envs * args.steps,
        device=device,
    )
    algo.policy.load_state_dict(policy.state_dict())
    timer = _Timer()
    algo._setup_learn(args.num_envs * args.steps, callback=None)
    timer.init_callback(algo)
    ppo_s = []
    for _ in range(args.repeats):
        algo.collect_rollouts(algo.env, timer, algo.rollout_buffer, n_rollout_steps=args.steps)
        ppo_s.append(timer.seconds)

    n, a, p = statistics.median(native_s), statistics.median(adapter_s), statistics.median(ppo_s)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, {device}")
    print(f"{args.model}, {args.num_envs} envs × {args.steps} steps (window={args.window}), policy = UNet + critic")
    print(f"median of {args.repeats} batches of {transitions} transitions; native and adapter batches alternate\n")
    print("| rollout path | s / batch | transitions / s | vs native |\n|---|---|---|---|")
    for name, s in (
        ("native torch vector env", n),
        ("SB3 VecEnv adapter (numpy round trip)", a),
        ("SB3 PPO.collect_rollouts (adapter + rollout buffer)", p),
    ):
        print(f"| {name} | {s:.3f} | {transitions / s:.0f} | {s / n:.3f}× |")
    steps = transitions // args.num_envs
    share, per_step = 100 * (a - n) / a, 1e3 * (a - n) / steps
    print(f"\nnumpy round trip: {share:+.1f}% of an adapter rollout ({per_step:+.2f} ms per batched step)")


if __name__ == "__main__":
    main()
