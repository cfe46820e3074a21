"""Blocked XLA attention for BAGEL's packed mask: only the live (q block, kv block) pairs are computed.

    o = blocked_attention(q, k, v, seg)        # == dot_product_attention(q, k, v, bagel_mask(seg))

The CPU / GPU counterpart of the Pallas kernel (flash_attention.py), in plain XLA:
  * the row is cut into blocks of ``block`` tokens (padded with one extra document, as the kernel
    does); ``flash_attention.classify_blocks`` -- the kernel's own classification, one function
    for both -- marks every (q block, kv block) pair SKIP / PARTIAL / FULL_BLOCK, and
    ``flash_attention.compact_blocks`` lists the non-SKIP pairs of all rows first;
  * the live pairs are processed ``chunk`` at a time in a ``lax.while_loop`` whose trip count is
    ``ceil(live pairs / chunk)``: each step gathers the chunk's q and k/v blocks, computes the
    (chunk, heads, block, block) scores, applies the mask from the token vectors, and folds the
    result into per-q-block running max / sum / accumulator with an online softmax (scatter-max and
    scatter-add by q block, so one chunk may hold several pairs of one q block; a step touches
    only its chunk's blocks);
  * the backward (custom VJP) recomputes the scores chunk by chunk from q, k, v and the forward's
    log-sum-exp, and scatter-adds dq, dk, dv -- one pass, no L x L residual.

Shapes are static (the pair list has all B * L/block * L/block slots; only the loop's trip count
depends on the data), so a training step still compiles once and no row can exceed a capacity:
the work done is the live pairs rounded up to one chunk. Rows with no allowed key give 0 and zero
gradients, as in the dense path. Scores, softmax statistics and accumulators are fp32.

Under a mesh with auto axes the call runs inside ``shard_map`` (rows over the batch axes, kv heads
over the kv-head axis), as the kernel does, so the pair list stays per device.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from sgt_jax.batch import Segments
from sgt_jax.models import flash_attention as fa

_M_INIT = -1e30          # finite running-max start (masked scores are -inf)


@dataclasses.dataclass(frozen=True)
class Blocking:
    """``block``: tokens per q and kv block; ``chunk``: (q block, kv block) pairs per loop step."""
    block: int = 16
    chunk: int = 32

    @classmethod
    def from_config(cls, llm) -> "Blocking":
        """From ``llm.attention_blocked_{block,chunk}`` (missing keys: the defaults)."""
        d = cls()
        return cls(int(llm.get("attention_blocked_block", d.block)),
                   int(llm.get("attention_blocked_chunk", d.chunk)))


@dataclasses.dataclass(frozen=True)
class _St:
    nkv: int
    g: int
    hd: int
    bl: int
    chunk: int
    scale: float


# ------------------------------------------------------------------------------------------------
# the pair list

def plan(seg: Segments, block: int):
    """(padded Segments, kinds (B, n, n), pair codes): the blocks' kinds from
    ``flash_attention.classify_blocks`` and the compacted list of all rows' pairs, flattened over
    (row, q block, kv block): ``4 * pair + kind``, the non-SKIP pairs first."""
    length = seg.doc.shape[1]
    bl = min(block, length)
    seg_p = fa.pad_segments(Segments(*(jnp.asarray(x, jnp.int32) for x in seg)), -(-length // bl) * bl)
    kinds = fa.classify_blocks(seg_p, bl, bl)
    codes = fa.compact_blocks(kinds.reshape(1, -1))[0]
    return seg_p, bl, kinds, codes


def live_pairs(seg: Segments, block: int) -> jax.Array:
    """Number of (q block, kv block) pairs the blocked attention computes (all rows)."""
    _, _, kinds, _ = plan(seg, block)
    return jnp.sum(kinds != fa.SKIP)


# ------------------------------------------------------------------------------------------------
# per-chunk pieces (shared by the forward and the backward)

def _chunk_pairs(codes, n, c, chunk):
    """(global q block, global kv block, live) of chunk ``c``; ``n`` blocks per row."""
    code = lax.dynamic_slice_in_dim(codes, c * chunk, chunk)
    pair, live = code >> 2, (code & 3) != fa.SKIP
    row, rest = pair // (n * n), pair % (n * n)
    return row * n + rest // n, row * n + rest % n, live


def _mask(tok, qi, ki, live):
    """(P, bl, bl) allowed (the kernel's ``_allowed``); ``tok``: (doc, split, order, ko_same,
    ko_other) per block (NB, bl), from the kernel's ``token_table``."""
    doc, split, order, ko_same, ko_other = tok
    q = lambda x: x[qi][:, :, None]  # noqa: E731
    k = lambda x: x[ki][:, None, :]  # noqa: E731
    return fa._allowed(q(doc), q(split), q(order), k(doc), k(split), k(ko_same), k(ko_other)) & live[:, None, None]


def _scores(st, qb, kb, mask):
    """qb (P, bl, nkv, g, hd), kb (P, bl, nkv, hd) -> (P, nkv, g, bl, bl) fp32, masked -inf."""
    s = jnp.einsum("pqhgd,pkhd->phgqk", qb, kb, preferred_element_type=jnp.float32) * st.scale
    return jnp.where(mask[:, None, None], s, -jnp.inf)


def _tokens(seg_p, nb, bl):
    t = fa.token_table(seg_p)
    return tuple(t[..., f].reshape(nb, bl) for f in (fa._DOC, fa._SPLIT, fa._ORDER, fa._KO_SAME, fa._KO_OTHER))


def _trips(codes, chunk):
    live = jnp.sum((codes & 3) != fa.SKIP)
    return (live + chunk - 1) // chunk


# ------------------------------------------------------------------------------------------------
# forward / backward over the pair list

def fwd_step(st: _St, q, k, v, tok, codes, n, carry):
    """One loop step of the forward: chunk ``c`` of the pair list folded into (m, l, acc).

    Only the chunk's q blocks are touched (O(chunk) work, never O(L)): the live pairs of one q
    block are contiguous in the list, so the first of them in the chunk carries the rescale of
    its block's previous sum / accumulator (``x * alpha = x + x * (alpha - 1)``, scatter-added with
    the chunk's contributions)."""
    c, m, l, acc = carry
    qi, ki, live = _chunk_pairs(codes, n, c, st.chunk)
    s = _scores(st, q[qi], k[ki], _mask(tok, qi, ki, live))
    m_old = m[qi]
    m = m.at[qi].max(jnp.max(s, axis=-1))
    m_new = m[qi]
    first = live & jnp.concatenate([jnp.ones((1,), bool), qi[1:] != qi[:-1]])
    grow = jnp.where(first[:, None, None, None], jnp.exp(m_old - m_new) - 1.0, 0.0)   # alpha - 1
    p = jnp.exp(s - m_new[..., None])
    l = l.at[qi].add(l[qi] * grow + jnp.sum(p, axis=-1))
    pv = jnp.einsum("phgqk,pkhd->phgqd", p.astype(v.dtype), v[ki], preferred_element_type=jnp.float32)
    acc = acc.at[qi].add(acc[qi] * grow[..., None] + pv)
    return c + 1, m, l, acc


def fwd_carry(st: _St, nb: int):
    """The forward loop's initial (step, running max, running sum, accumulator)."""
    m0 = jnp.full((nb, st.nkv, st.g, st.bl), _M_INIT, jnp.float32)
    return jnp.int32(0), m0, jnp.zeros_like(m0), jnp.zeros((nb, st.nkv, st.g, st.bl, st.hd), jnp.float32)


def _fwd(st: _St, q, k, v, tok, codes, n):
    """q (NB, bl, nkv, g, hd), k / v (NB, bl, nkv, hd) -> o (like q), lse (NB, nkv, g, bl)."""
    trips = _trips(codes, st.chunk)
    _, m, l, acc = lax.while_loop(lambda cr: cr[0] < trips,
                                  functools.partial(fwd_step, st, q, k, v, tok, codes, n),
                                  fwd_carry(st, q.shape[0]))
    live = l > 0
    o = acc * jnp.where(live, 1.0 / jnp.where(live, l, 1.0), 0.0)[..., None]
    lse = jnp.where(live, m + jnp.log(jnp.where(live, l, 1.0)), jnp.inf)
    return o.transpose(0, 3, 1, 2, 4).astype(q.dtype), lse


def bwd_step(st: _St, q, k, v, tok, codes, n, lse, di, do, carry):
    """One loop step of the backward: chunk ``c``'s contributions scatter-added to (dq, dk, dv)."""
    c, dq, dk, dv = carry
    qi, ki, live = _chunk_pairs(codes, n, c, st.chunk)
    qb, kb, vb, dob = q[qi], k[ki], v[ki], do[qi]
    s = _scores(st, qb, kb, _mask(tok, qi, ki, live))
    p = jnp.exp(s - lse[qi][..., None])                                   # (P, nkv, g, bl, bl)
    dv = dv.at[ki].add(jnp.einsum("phgqk,pqhgd->pkhd", p.astype(do.dtype), dob,
                                  preferred_element_type=jnp.float32))
    dp = jnp.einsum("pqhgd,pkhd->phgqk", dob, vb, preferred_element_type=jnp.float32)
    ds = (p * (dp - di[qi][..., None])).astype(q.dtype)
    dq = dq.at[qi].add(jnp.einsum("phgqk,pkhd->pqhgd", ds, kb, preferred_element_type=jnp.float32))
    dk = dk.at[ki].add(jnp.einsum("phgqk,pqhgd->pkhd", ds, qb, preferred_element_type=jnp.float32))
    return c + 1, dq, dk, dv


def _bwd(st: _St, q, k, v, tok, codes, n, o, lse, do):
    di = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1).transpose(0, 2, 3, 1)  # (NB, nkv, g, bl)
    z = lambda x: jnp.zeros(x.shape, jnp.float32)  # noqa: E731
    trips = _trips(codes, st.chunk)
    _, dq, dk, dv = lax.while_loop(lambda cr: cr[0] < trips,
                                   functools.partial(bwd_step, st, q, k, v, tok, codes, n, lse, di, do),
                                   (jnp.int32(0), z(q), z(k), z(v)))
    return (dq * st.scale).astype(q.dtype), (dk * st.scale).astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 6))
def _blocked(st, q, k, v, tok, codes, n):
    return _fwd(st, q, k, v, tok, codes, n)[0]


def _blocked_fwd(st, q, k, v, tok, codes, n):
    o, lse = _fwd(st, q, k, v, tok, codes, n)
    o, lse = checkpoint_name(o, "context"), checkpoint_name(lse, "context")
    return o, (q, k, v, tok, codes, o, lse)


def _blocked_bwd(st, n, res, do):
    q, k, v, tok, codes, o, lse = res
    dq, dk, dv = _bwd(st, q, k, v, tok, codes, n, o, lse, do.astype(q.dtype))
    return dq, dk, dv, None, None


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


# ------------------------------------------------------------------------------------------------
# public entry point

def prepare(q, k, v, seg, blocking: Blocking, sm_scale=None):
    """(static settings, blocked q, k, v, token fields, pair codes, blocks per row, padded L):
    the operands of the loops (also used by bench/attention_cpu.py to count one step's FLOPs)."""
    b, length, nh, hd = q.shape
    nkv = k.shape[2]
    if nh % nkv or k.shape != v.shape or k.shape[:2] != (b, length) or k.shape[3] != hd:
        raise ValueError(f"blocked attention: q {q.shape}, k {k.shape}, v {v.shape}: need k == v shapes "
                         "(B, L, nkv, hd) with nkv | nh")
    seg_p, bl, _, codes = plan(seg, blocking.block)
    lp = seg_p.doc.shape[1]
    n, nb = lp // bl, b * (lp // bl)
    chunk = max(1, min(blocking.chunk, nb * n))
    codes = jnp.pad(codes, (0, -(-codes.shape[0] // chunk) * chunk - codes.shape[0]))   # SKIP tail
    st = _St(nkv=nkv, g=nh // nkv, hd=hd, bl=bl, chunk=chunk,
             scale=float(sm_scale if sm_scale is not None else 1.0 / math.sqrt(hd)))
    pad = lambda x: jnp.pad(x, ((0, 0), (0, lp - length), (0, 0), (0, 0)))  # noqa: E731
    qb = pad(q).reshape(nb, bl, nkv, st.g, hd)
    kb, vb = pad(k).reshape(nb, bl, nkv, hd), pad(v.astype(k.dtype)).reshape(nb, bl, nkv, hd)
    return st, qb, kb, vb, _tokens(seg_p, nb, bl), codes, n, lp


def _blocked_local(q, k, v, seg, blocking: Blocking, sm_scale):
    b, length, nh, hd = q.shape
    st, qb, kb, vb, tok, codes, n, lp = prepare(q, k, v, seg, blocking, sm_scale)
    o = _blocked(st, qb, kb, vb, tok, codes, n)
    return o.reshape(b, lp, nh, hd)[:, :length]


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, seg: Segments, *,
                      blocking: Blocking | None = None, sm_scale: float | None = None,
                      batch_axes: tuple[str, ...] = (), kv_head_axis: str | None = None) -> jax.Array:
    """BAGEL's packed attention over the live blocks only; same contract as
    ``attention.dot_product_attention(q, k, v, bagel_mask(seg))``. q (B, L, nh, hd), k / v
    (B, L, nkv, hd). Under an active mesh with auto axes, runs inside shard_map like
    ``flash_attention.flash_attention`` (rows over ``batch_axes``, kv heads over ``kv_head_axis``)."""
    fn = functools.partial(_blocked_local, blocking=blocking or Blocking(), sm_scale=sm_scale)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not fa._auto_axes(mesh):
        return fn(q, k, v, seg)
    batch, head = fa._mesh_specs(mesh, q.shape[0], k.shape[2], tuple(batch_axes), kv_head_axis)
    from jax.sharding import PartitionSpec as P

    bspec = batch if len(batch) > 1 else (batch[0] if batch else None)
    x = P(bspec, None, head, None)
    s = P(bspec, None)
    return jax.shard_map(fn, mesh=mesh, in_specs=(x, x, x, Segments(s, s, s, s)), out_specs=x,
                         check_vma=False)(q, k, v, seg)
