"""Test helper: Gymnasium's and Stable-Baselines3's env checkers, as every env test runs them."""

from __future__ import annotations

import warnings

import gymnasium as gym


def check_envs_are_clean(env: gym.Env, sb3_env: gym.Env, render: bool = True) -> None:
    """Gymnasium's ``check_env`` with warnings as errors on ``env``; SB3's ``check_env`` on ``sb3_env``.

    SB3's two pieces of advice that do not apply (a symmetric normalised action Box, uint8 image spaces)
    are ignored; anything else it raises fails the test.
    """
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # clean: not even a warning
        check_env(env, skip_render_check=not render)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*symmetric and normalized Box action space.*")
        warnings.filterwarnings("ignore", message=".*image.*")  # SB3's advice for uint8 image spaces
        sb3_check_env(sb3_env, warn=True)
