"""The analysis forward: the decoder's layers re-run over the same modules, with each layer's
attention probabilities computed here and reduced on the fly (never part of the training forward).

Per layer the decoder layer's own ``project_qkv`` (norm, q/k/v, qk-norm, RoPE) and ``finish``
(o_proj, MLP) run as in training / inference; in between, this module computes the softmax
attention itself -- fp32 scores over the keys ``[valid cache entries; the block]`` with BAGEL's
packed mask from ``attention.bagel_mask`` on the block's own ``Segments`` -- one query chunk and
one kv-head block at a time, and hands each probability block ``p`` (B, heads_in_block, chunk,
Lk) to a ``reduce(p, q_index, h0)`` that returns a small pytree. The reductions are summed over
chunks and head blocks and stacked over layers, so memory is one (B, hb, chunk, Lk) block plus
the reductions, whatever the row length (16k-token rows: chunk 256, one kv head at a time). The
attention output ``p @ v`` of the same blocks feeds the next layer, so the hidden states are the
model's.

``key_profile(query_weight)`` is the reduction the commands use: per layer, the attention mass
each key receives, averaged over heads and over the queries weighted by ``query_weight`` (B, L)
-> (B, Lk); summed over a set of keys it is "the mass from these queries to those keys".
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sgt_jax.batch import Segments
from sgt_jax.models.attention import bagel_mask
from sgt_jax.models.config import head_dim
from sgt_jax.models.layers import rope_cos_sin
from sgt_jax.models.qwen2_mot import Routing


def _chunks(length: int, chunk: int) -> tuple[int, int]:
    """(chunk size, number of chunks): the queries are padded up to a whole number of chunks."""
    if chunk <= 0 or chunk >= length:
        return length, 1
    return chunk, -(-length // chunk)


def probs_block(q, k, mask):
    """Softmax probabilities of q (B, Lq, nh, hd) over k (B, Lk, nkv, hd) (GQA: query head h
    uses kv head h // (nh / nkv)), mask (B, Lq, Lk) bool -> (B, nh, Lq, Lk) fp32; masked keys
    are exactly 0, a row with no visible key is all 0."""
    b, lq, nh, hd = q.shape
    nkv = k.shape[2]
    g = nh // nkv
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q.reshape(b, lq, nkv, g, hd), k,
                        preferred_element_type=jnp.float32) * (1.0 / jnp.sqrt(jnp.float32(hd)))
    m = mask[:, None, None]
    p = jax.nn.softmax(jnp.where(m, scores, -1e30), axis=-1)
    return jnp.where(m, p, 0.0).reshape(b, nh, lq, -1)


def attention_with_reduce(q, k, v, seg_q: Segments, seg_k: Segments, key_valid, reduce, *,
                          query_chunk: int = 0, head_block: int = 0):
    """One layer's attention. q (B, L, nh, hd); k, v (B, Lk, nkv, hd) = [cache entries; block];
    ``seg_q`` the block's Segments, ``seg_k`` the keys' Segments (cache entries: any values, their
    visibility is ``key_valid``); ``key_valid`` (B, Lk) bool or None: keys visible to every
    query regardless of the mask (valid cache entries), the others follow ``bagel_mask``.
    Returns (output (B, L, nh, hd) in q's dtype, summed reductions)."""
    b, length, nh, hd = q.shape
    lk, nkv = k.shape[1], k.shape[2]
    g = nh // nkv
    hb = nkv if head_block <= 0 else int(head_block)
    if nkv % hb:
        raise ValueError(f"head_block={hb} kv heads must divide num_kv_heads={nkv}")
    qc, n = _chunks(length, query_chunk)
    pad = n * qc - length
    if pad:     # padding queries: a document of their own, their probabilities zeroed before reduce
        q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
        lone = jnp.min(seg_k.doc) - 1
        seg_q = Segments(*(jnp.pad(a, ((0, 0), (0, pad)), constant_values=lone if i == 0 else 0)
                           for i, a in enumerate(seg_q)))
    split = lambda a: a.reshape((b, n, qc) + a.shape[2:]).swapaxes(0, 1)
    xs = (split(q), Segments(*(split(a) for a in seg_q)), jnp.arange(n * qc, dtype=jnp.int32).reshape(n, qc))

    def chunk(carry, x):
        qx, sq, qidx = x
        mask = bagel_mask(sq, seg_k)
        if key_valid is not None:
            mask = mask | key_valid[:, None, :]
        real = (qidx < length)[None, None, :, None]
        outs, acc = [], carry
        for kh in range(0, nkv, hb):
            p = probs_block(qx[:, :, kh * g:(kh + hb) * g], k[:, :, kh:kh + hb], mask)
            r = reduce(jnp.where(real, p, 0.0), jnp.minimum(qidx, length - 1), kh * g)
            acc = jax.tree.map(jnp.add, acc, r)
            pv = p.reshape(b, hb, g, qc, lk).astype(v.dtype)
            outs.append(jnp.einsum("bkgqs,bskd->bqkgd", pv, v[:, :, kh:kh + hb],
                                   preferred_element_type=jnp.float32).reshape(b, qc, hb * g, hd))
        return acc, jnp.concatenate(outs, axis=2).astype(q.dtype)

    probe = jax.eval_shape(lambda: reduce(jnp.zeros((b, hb * g, qc, lk), jnp.float32), xs[2][0], 0))
    init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), probe)
    acc, out = jax.lax.scan(chunk, init, xs)
    return out.swapaxes(0, 1).reshape(b, n * qc, nh, hd)[:, :length], acc


def attention_pass(lm, x, positions, seg: Segments, num_gen: int, reduce, *, cache=None,
                   query_chunk: int = 0, head_block: int = 0):
    """The decoder ``lm`` (a Qwen2MoT) over an expert-sorted block ``x`` (B, L, H) -- as
    ``infer.cache.run_block`` / ``Qwen2MoT.decode`` -- attending to the valid entries of ``cache``
    (an ``infer.cache.KVCache`` or None) and to the block under BAGEL's mask. ``reduce(p, q_index,
    h0)``: see ``attention_with_reduce`` (q_index: positions in this sorted block; key index: cache
    entries first, then the block). Returns (final-normed hidden states, reductions stacked over
    layers)."""
    cfg = lm.cfg
    num_gen = num_gen if lm.mot else 0
    cos, sin = rope_cos_sin(positions, head_dim(cfg), cfg.llm.rope_theta, lm.dtype)
    graphdef, stacked = nnx.split(lm.layers)
    b, length = x.shape[:2]
    if cache is not None:
        cap = cache.capacity
        z = jnp.zeros((b, cap), jnp.int32)
        # cache entries: a document no block token has; their visibility is key_valid
        other = z + jnp.min(seg.doc) - 1
        seg_k = Segments(*(jnp.concatenate([other if i == 0 else z, a], axis=1) for i, a in enumerate(seg)))
        key_valid = jnp.concatenate([jnp.arange(cap)[None] < cache.length[:, None],
                                     jnp.zeros((b, length), bool)], axis=1)
        xs = (stacked, cache.k, cache.v)
    else:
        seg_k, key_valid, xs = seg, None, (stacked, None, None)

    def body(h, xs_l):
        layer_state, ck, cv = xs_l
        layer = nnx.merge(graphdef, layer_state)
        q, k, v = layer.project_qkv(h, cos, sin, num_gen)
        if ck is not None:
            k = jnp.concatenate([ck.astype(k.dtype), k], axis=1)
            v = jnp.concatenate([cv.astype(v.dtype), v], axis=1)
        o, red = attention_with_reduce(q, k, v, seg, seg_k, key_valid, reduce, query_chunk=query_chunk,
                                       head_block=head_block)
        return layer.finish(h, o.reshape(h.shape[:2] + (-1,)), num_gen), red

    h, reds = jax.lax.scan(body, x.astype(lm.dtype), xs)
    return lm.final_norm(h, num_gen), reds


def key_profile(query_weight):
    """The reduction: sum over queries (weighted by ``query_weight`` (B, L) of the block, in the
    block's order) and heads of p -> (B, Lk). Divide by (sum of weights x heads) for a mean."""
    def reduce(p, qidx, h0):
        w = jnp.take(query_weight, qidx, axis=1).astype(jnp.float32)
        return jnp.einsum("bhqk,bq->bk", p, w)
    return reduce


def packed_key_profile(model, x, batch, num_gen: int, query_weight, *, query_chunk: int = 0,
                       head_block: int = 0):
    """Per-layer key profiles of a packed row (no cache), in packing order. ``x``: the input
    embeddings (B, L, H) in packing order; ``query_weight`` (B, L) in packing order. Returns
    (layers, B, L): the mean over heads and weighted queries of the attention each key gets."""
    lm = model.language_model
    mot = lm.mot
    length = batch.kind.shape[1]
    r = Routing.make(batch.expert, num_gen if mot else 0)
    order = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), batch.kind.shape)
    seg = Segments(batch.doc_ids, batch.split_ids, batch.split_mode, order).permute(r.perm)
    qw = r.sort(query_weight.astype(jnp.float32))
    _, prof = attention_pass(lm, r.sort(x), r.sort(batch.position_ids), seg, r.num_gen, key_profile(qw),
                             query_chunk=query_chunk, head_block=head_block)
    nh = model.cfg.llm.num_heads
    prof = prof / (jnp.maximum(qw.sum(1), 1e-9)[None, :, None] * nh)
    return jnp.take_along_axis(prof, r.inverse[None], axis=2)
