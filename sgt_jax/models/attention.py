"""Packed attention with BAGEL's mask, computed from per-token vectors (never stored as L x L).

Per token (all int32, shape (B, L); ``Segments`` and the split modes live in sgt_jax/batch.py):
  ``doc``    document (sample) id; padding gets its own id(s) so it sees nothing real;
  ``split``  split id, unique within a row;
  ``mode``   split mode: CAUSAL=0, FULL=1, NOISE=2;
  ``order``  the token's index in packing order (the sequence may be physically permuted, e.g.
             sorted by expert; causality always follows ``order``).

  allowed(q, k) = doc[q] == doc[k]
                  AND ( order[k] <= order[q]  OR  (split[q] == split[k] AND mode[k] != CAUSAL) )
                  AND NOT ( mode[k] == NOISE AND split[q] != split[k] )

One interface, ``attention(q, k, v, seg, impl)``; ``impl="dense"`` is the simple XLA reference (the
whole L x L mask); ``impl="blocked"`` is XLA over the live (q block, kv block) pairs only
(blocked_attention.py); ``impl="flash"`` is the Pallas TPU kernel (flash_attention.py); ``"auto"``
picks flash when compiling for TPU, also ahead of time for a TPU topology from a CPU host, and
blocked on CPU / GPU (``resolve_impl``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sgt_jax.batch import CAUSAL, FULL, NOISE, Segments  # noqa: F401  (the mask vocabulary)
from sgt_jax.models import blocked_attention as ba
from sgt_jax.models import flash_attention as fa
from sgt_jax.models.config import ATTENTION_IMPLS


def bagel_mask(qs: Segments, ks: Segments | None = None) -> jax.Array:
    """(B, Lq, Lk) bool: True where query may attend key."""
    ks = qs if ks is None else ks
    same_doc = qs.doc[:, :, None] == ks.doc[:, None, :]
    same_split = qs.split[:, :, None] == ks.split[:, None, :]
    causal = ks.order[:, None, :] <= qs.order[:, :, None]
    bidir = same_split & (ks.mode[:, None, :] != CAUSAL)
    hidden_noise = (ks.mode[:, None, :] == NOISE) & ~same_split
    return same_doc & (causal | bidir) & ~hidden_noise


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """q: (B, Lq, nh, hd); k, v: (B, Lk, nkv, hd) with nkv | nh (query head h uses kv head
    h // (nh/nkv)); mask (B, Lq, Lk) bool. Softmax in fp32; rows with no allowed key give 0."""
    b, lq, nh, hd = q.shape
    nkv = k.shape[2]
    g = nh // nkv
    qg = q.reshape(b, lq, nkv, g, hd)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / jnp.sqrt(jnp.float32(hd)))
    m = mask[:, None, None, :, :]
    scores = jnp.where(m, scores, -1e30)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(m, probs, 0.0).astype(v.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, lq, nh, hd).astype(q.dtype)


def mesh_axes_from_rules(rules) -> tuple[tuple[str, ...], str | None]:
    """(batch mesh axes, kv-head mesh axis) from a logical-axis rules table (name -> mesh axis or
    axes, e.g. sgt_jax/parallel/mesh.py RULES); None or a table without them: ((), None)."""
    rules = dict(rules or ())
    batch = rules.get("batch") or ()
    head = rules.get("kv_heads")
    return ((batch,) if isinstance(batch, str) else tuple(batch)), (head if isinstance(head, str) else None)


def resolve_impl(impl: str, head_dim: int, platform: str | None = None) -> str:
    """The kernel ``impl`` runs: "auto" is "flash" when the compile target is a TPU and the
    Pallas kernel takes the shapes (head_dim a multiple of 128, as every BAGEL / Qwen2 size),
    "dense" on TPU otherwise, and "blocked" on CPU / GPU. The target is ``platform`` when given,
    else the active mesh's devices -- an AOT topology mesh on a CPU host counts as TPU
    (``flash_attention.target_is_tpu``) -- else the default backend."""
    if impl != "auto":
        return impl
    if platform is None:
        tpu = fa.target_is_tpu()
    else:
        tpu = platform == "tpu"
    if not tpu:
        return "blocked"
    return "flash" if head_dim % 128 == 0 else "dense"


def resolve_vit_impl(impl: str, platform: str | None = None) -> str:
    """The ViT's attention, "dense" or "blocked" (no flash kernel for its head sizes): "auto" is
    dense when compiling for TPU (as before the blocked path existed), else blocked."""
    if impl == "auto":
        tpu = fa.target_is_tpu() if platform is None else platform == "tpu"
        return "dense" if tpu else "blocked"
    if impl not in ("dense", "blocked"):
        raise ValueError(f"vit.attention_impl={impl!r} must be one of ('dense', 'blocked', 'auto')")
    return impl


def attention(q: jax.Array, k: jax.Array, v: jax.Array, seg: Segments, impl: str = "dense",
              block_sizes=None, mesh_axes: tuple = ((), None), blocking=None) -> jax.Array:
    """BAGEL's packed attention. q (B, L, nh, hd), k/v (B, L, nkv, hd) -> (B, L, nh, hd).

    ``impl``: "dense" (XLA, materialises the mask per row), "blocked" (XLA over the live block
    pairs, blocked_attention.py), "flash" (the Pallas kernel of flash_attention.py; interpret mode
    off TPU), "auto" (``resolve_impl``: flash when compiling for TPU, else blocked).
    ``block_sizes``: the kernel's ``flash_attention.BlockSizes`` (None: its defaults);
    ``blocking``: the blocked path's ``blocked_attention.Blocking`` (None: its defaults).
    ``mesh_axes``: (batch mesh axes, kv-head mesh axis) the flash / blocked shard_map splits rows
    and kv heads over (``mesh_axes_from_rules``; the caller resolves them from its rules table)."""
    impl = resolve_impl(impl, q.shape[-1])
    if impl == "dense":
        return dot_product_attention(q, k, v, bagel_mask(seg))
    if impl == "blocked":
        return ba.blocked_attention(q, k, v, seg, blocking=blocking, batch_axes=mesh_axes[0],
                                    kv_head_axis=mesh_axes[1])
    if impl == "flash":
        return fa.flash_attention(q, k, v, seg, block_sizes=block_sizes, batch_axes=mesh_axes[0],
                                  kv_head_axis=mesh_axes[1])
    raise ValueError(f"unknown attention_impl {impl!r}; available: {ATTENTION_IMPLS}")
