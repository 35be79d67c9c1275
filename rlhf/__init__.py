"""rlhf: SFT → reward model → PPO with a KL penalty, readable and runnable on a laptop CPU."""
__version__ = "0.1.0"
