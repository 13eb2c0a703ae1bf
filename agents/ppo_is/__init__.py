"""PPO-IS (DDPO-IS with importance sampling and clipping), with HRF / HRF-D windows."""
