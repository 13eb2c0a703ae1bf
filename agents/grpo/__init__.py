"""GRPO (Flow-GRPO): PPO-IS's clipped update with per-prompt group-relative advantages and a KL to the base model."""
