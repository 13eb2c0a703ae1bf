"""Pieces shared by agents: the Gaussian UNet policy, rollout buffer, advantages, checkpoints."""
