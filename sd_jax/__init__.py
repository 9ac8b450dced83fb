"""sd_jax: Stable Diffusion trained end to end in JAX/Flax."""

__version__ = "0.1.0"
