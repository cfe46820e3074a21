"""BAGEL's model in Flax NNX: Qwen2 MoT LLM, SigLIP-NaViT, FLUX autoencoder, and the top-level model."""
