"""sgt-jax: Semantic Generative Tuning of unified multimodal models (BAGEL) in JAX/Flax NNX."""

__version__ = "0.1.0"
