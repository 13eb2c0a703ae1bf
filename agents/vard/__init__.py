"""VARD (value-based reinforced diffusion): a learned value as a dense, differentiable reward with a KL penalty."""
