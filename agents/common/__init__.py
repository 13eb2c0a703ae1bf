"""Pieces shared by agents: the on-policy runner, configs, policy, collector, rollout, advantages, checkpoints."""
