"""Mechanistic analysis of checkpoints (issue 18, the paper's Sec. 4.4): ViT feature separability,
text -> ViT attention per layer, latent -> prompt-token attention during generation.
CLI: ``python -m sgt_jax.analyze`` (docs/analysis.md)."""
