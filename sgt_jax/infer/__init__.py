"""Inference over the training modules (docs/inference.md): a static-shape KV cache
(``cache``), contexts prefilled in BAGEL's layout (``context``), text decoding (``text``), the
Euler flow sampler with 3-way CFG (``image``), the ``Engine`` that holds a (sharded) model and
its jitted functions (``engine``), and the four tasks (``tasks``)."""
from sgt_jax.infer import tasks  # noqa: F401
from sgt_jax.infer.cache import KVCache  # noqa: F401
from sgt_jax.infer.context import Image, Text, cfg_contexts  # noqa: F401
from sgt_jax.infer.engine import CheckpointNotFound, Engine, compile_counts  # noqa: F401
from sgt_jax.infer.image import FlowConfig  # noqa: F401
