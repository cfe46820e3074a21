"""Inference: KV cache, contexts, text and image generation, tasks (docs/inference.md)."""
