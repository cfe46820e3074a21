"""A static-shape KV cache and the decoder over a block of new tokens against it.

``KVCache`` holds, per row, the keys and values of every layer for the tokens of that row's
context so far, RoPE already applied: ``k, v`` (layers, B, C, nkv, hd) with a fixed capacity C,
``length`` (B,) valid entries (always the prefix [0, length)) and ``rope`` (B,) the next RoPE
position (BAGEL's ``kv_lens`` / ``ropes``). Entries are kept in context order; order inside the
cache does not matter to attention (every cached token of a row is visible to every later
token, as in BAGEL, where noised image blocks are never written).

``run_block`` runs the LLM over a block of L new tokens per row (expert-sorted: und tokens
first, ``num_gen`` gen tokens last) attending to ``[cache entries < length; the block]``; inside
the block the mask is BAGEL's packed mask of the block's own ``Segments`` (attention.py), so one
block can be a whole interleaved context (text causal, image blocks bidirectional), one decoded
token, or the noised latents of a flow step. It returns the final-normed hidden states and the
block's keys / values; ``KVCache.write`` appends the first ``n`` of them per row (a flow step
does not write: the cache is unchanged, which is BAGEL's ``update_past_key_values=False``).

Nothing here depends on the data: shapes come from (rows, capacity, block length, num_gen), so a
run compiles each function once per bucket (``bucket``).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sgt_jax.models import attention as attn_lib
from sgt_jax.models.config import head_dim
from sgt_jax.models.layers import rope_cos_sin

CACHE_AXES = ("layers", "batch", None, "kv_heads", "head_dim")   # logical names (parallel/mesh.py RULES)


def bucket(n: int, minimum: int = 16) -> int:
    """The static size a length ``n`` is padded to: the next power of two >= max(n, minimum)
    (so the number of compiled shapes grows with log(n))."""
    n = max(int(n), int(minimum), 1)
    return 1 << (n - 1).bit_length()


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: jax.Array          # (layers, B, C, nkv, hd)
    v: jax.Array
    length: jax.Array     # (B,) int32: valid entries [0, length)
    rope: jax.Array       # (B,) int32: next RoPE position

    @staticmethod
    def create(cfg, rows: int, capacity: int, dtype=None) -> "KVCache":
        c = cfg.llm
        dtype = jnp.dtype(dtype or cfg.compute_dtype)
        shape = (c.num_layers, rows, capacity, c.num_kv_heads, head_dim(cfg))
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((rows,), jnp.int32),
                       jnp.zeros((rows,), jnp.int32))

    @property
    def capacity(self) -> int:
        return int(self.k.shape[2])

    @property
    def rows(self) -> int:
        return int(self.k.shape[1])

    def replace(self, **kw) -> "KVCache":
        return dataclasses.replace(self, **kw)

    def write(self, k_blk: jax.Array, v_blk: jax.Array, n: jax.Array) -> "KVCache":
        """Append the first ``n`` (B,) tokens of the block (layers, B, L, nkv, hd) to each row.
        The whole block is written at ``length`` (the rest is overwritten by the next write), so
        ``length + L <= capacity`` is required -- the callers check it on the host."""
        put = jax.vmap(lambda c, u, o: jax.lax.dynamic_update_slice(c, u.astype(c.dtype), (0, o, 0, 0)),
                       in_axes=(1, 1, 0), out_axes=1)
        return KVCache(put(self.k, k_blk, self.length), put(self.v, v_blk, self.length),
                       self.length + n.astype(jnp.int32), self.rope)


def cache_shardings(cache: KVCache, mesh):
    """NamedShardings of a cache on ``mesh`` through the logical-axis rules (rows over the batch
    axes, kv heads over ``tensor``; an axis that does not divide its dimension is replicated)."""
    from jax.sharding import NamedSharding
    from sgt_jax.parallel.mesh import logical_to_spec

    kv = NamedSharding(mesh, logical_to_spec(CACHE_AXES, cache.k.shape, mesh))
    row = NamedSharding(mesh, logical_to_spec(("batch",), cache.length.shape, mesh))
    return KVCache(kv, kv, row, row)


def check_capacity(length: np.ndarray, block: int, capacity: int, what: str = "context") -> None:
    """Host check before a write: every row's ``length + block`` must fit ``capacity``."""
    worst = int(np.max(np.asarray(length))) + int(block) if np.size(length) else block
    if worst > capacity:
        raise ValueError(f"{what}: {worst} cache entries needed but the KV cache holds {capacity}: "
                         "raise the capacity (--max-context-tokens) or shorten the prompt")


def _cache_attention(q, k_blk, v_blk, ck, cv, cache_mask, blk_mask, chunk: int):
    """Softmax attention of q (B, L, nh, hd) over [cache (B, C, ..); block (B, L, ..)], GQA;
    fp32 scores. ``chunk`` > 0 processes the queries in chunks (bounds the score memory of a
    large image block)."""
    k = jnp.concatenate([ck.astype(k_blk.dtype), k_blk], axis=1)
    v = jnp.concatenate([cv.astype(v_blk.dtype), v_blk], axis=1)
    mask = jnp.concatenate([jnp.broadcast_to(cache_mask, cache_mask.shape[:1] + blk_mask.shape[1:2]
                                             + cache_mask.shape[2:]), blk_mask], axis=-1)
    length = q.shape[1]
    if chunk <= 0 or length <= chunk or length % chunk:
        return attn_lib.dot_product_attention(q, k, v, mask)
    n = length // chunk
    qs = q.reshape((q.shape[0], n, chunk) + q.shape[2:]).swapaxes(0, 1)
    ms = mask.reshape((mask.shape[0], n, chunk, mask.shape[-1])).swapaxes(0, 1)
    out = jax.lax.map(lambda a: attn_lib.dot_product_attention(a[0], k, v, a[1]), (qs, ms))
    return out.swapaxes(0, 1).reshape(q.shape)


def run_block(lm, x: jax.Array, positions: jax.Array, seg: attn_lib.Segments, num_gen: int,
              cache: KVCache, *, query_chunk: int = 0):
    """The decoder (``lm``: a Qwen2MoT) over an expert-sorted block ``x`` (B, L, H) with RoPE
    ``positions`` (B, L) and in-block mask vectors ``seg``, attending also to every valid entry
    of ``cache``. Returns (hidden (B, L, H) after the final per-expert norm, block keys and values
    (layers, B, L, nkv, hd))."""
    cfg = lm.cfg
    c = cfg.llm
    num_gen = num_gen if lm.mot else 0
    cos, sin = rope_cos_sin(positions, head_dim(cfg), c.rope_theta, lm.dtype)
    blk_mask = attn_lib.bagel_mask(seg)
    cache_mask = (jnp.arange(cache.capacity, dtype=jnp.int32)[None, None, :] < cache.length[:, None, None])
    graphdef, stacked = nnx.split(lm.layers)

    def body(h, xs):
        layer_state, ck, cv = xs
        layer = nnx.merge(graphdef, layer_state)
        q, k, v = layer.project_qkv(h, cos, sin, num_gen)
        o = _cache_attention(q, k, v, ck, cv, cache_mask, blk_mask, query_chunk)
        return layer.finish(h, o.reshape(h.shape[:2] + (-1,)), num_gen), (k, v)

    # scan_layers=False unrolls the layers (one program per layer: exact compiler cost analysis, AOT probes)
    h, (k_blk, v_blk) = jax.lax.scan(body, x.astype(lm.dtype), (stacked, cache.k, cache.v),
                                     unroll=1 if c.scan_layers else True)
    return lm.final_norm(h, num_gen), k_blk, v_blk


def block_segments(split_mode: jax.Array, valid: jax.Array) -> attn_lib.Segments:
    """Mask vectors of a block holding one split per row (``split_mode`` CAUSAL / FULL / NOISE,
    (B, L)), tokens in packing order; ``valid`` False for padding (its own document)."""
    b, length = split_mode.shape
    order = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    doc = jnp.where(valid, 0, 1).astype(jnp.int32)
    return attn_lib.Segments(doc, doc, split_mode.astype(jnp.int32), order)
