"""Agents that solve DiffusionDenoise-v0: PPO-IS and adapters for other RL libraries."""
