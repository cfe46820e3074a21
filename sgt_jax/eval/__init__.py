"""Evaluation (docs/evaluation.md): scores of generated masks and answers (``metrics``), held-out
losses and generation over an inference ``Engine`` (``runner``), exports for the official
PyTorch scorers (``exports``); the CLI is ``python -m sgt_jax.evaluate``."""
