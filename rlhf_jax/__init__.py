"""rlhf_jax: Fine-Tuning Language Models from Human Preferences (Ziegler et al. 2019) in JAX/Flax."""

__version__ = "0.1.0"
