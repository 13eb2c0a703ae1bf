"""Pieces shared by agents: the on-policy runner, configs, the Gaussian UNet policy, collector and rollout, advantages, checkpoints."""
