"""Pallas TPU flash attention for BAGEL's packed mask (forward + backward, GQA, block skipping).

    o = flash_attention(q, k, v, seg)          # == dot_product_attention(q, k, v, bagel_mask(seg))

q (B, L, nh, hd), k/v (B, L, nkv, hd), ``seg`` the per-token ``Segments`` of sgt_jax/batch.py (doc,
split, mode, order; the row may be physically permuted -- causality follows ``order``). The L x L
mask is never built: every kernel computes it per (q block, kv block) from the token vectors.

Layout and grid
  * q/o/do are viewed as (B, L, nh*hd) (a free reshape). One kernel instance handles the ``g =
    nh/nkv`` query heads of one kv head: its q block is the column block (bq, g*hd) at column index
    ``kv_head`` (query head h uses kv head h // g, so the group is contiguous). K/V blocks are
    (bkv, hd), fetched once per group, and the mask of a block pair is computed once for the g
    heads.
  * Token vectors go in as one int32 table per orientation: ``(B, L, 8)`` (a column per field, the
    side that lives on sublanes) and ``(B, 8, L)`` (a row per field, the side on lanes). Fields:
    doc, split, order, ``ko_same`` (order, or INT_MIN for full/noise keys: the threshold used when
    q and k share a split) and ``ko_other`` (order, or INT_MAX for noise keys: the threshold
    otherwise), so ``allowed = doc_q == doc_k & (k_threshold <= order_q)`` with the threshold
    picked by ``split_q == split_k`` -- a handful of VPU ops per score, shared by the g heads.
  * Forward and dq: grid (B, nkv, L/bq, steps), the last axis walks a *compacted* list of the kv
    blocks that are not fully masked for that q block; dkv: grid (B, nkv, L/bkv, steps) over the
    compacted list of q blocks. The lists are scalar-prefetched (SMEM) and drive the K/V (or Q)
    index maps, so a skipped block is never DMA'd and never computed (the tail of a list repeats
    the last index: no copy, no compute, only the grid-step overhead).

Block metadata (``classify_blocks``): per block, min/max of doc, split and order, the sets of
doc and split ids mod 64 (two uint32 words each: a block straddling the und/gen boundary of the
expert-sorted row holds two unrelated doc ranges, which an interval would merge), the min order of
non-noise tokens and whether any key is causal / non-causal / noise. A pair is SKIP when provably
empty (disjoint docs; or all keys in the future and no same-split bidirectional key possible; or
no shared split and every non-noise key in the future), FULL when provably all-allowed (one shared
document and either every key in the past and none noise, or one shared split with no causal key;
the mask is then not computed), else PARTIAL. The tests check both claims against the dense mask.

Numerics: bf16 (or fp32) inputs, fp32 scores / softmax statistics / accumulators; masked scores
are -inf, the running max starts at a finite -1e30, so rows with no allowed key give 0 and zero
gradients, exactly like the dense path. The backward is FlashAttention-2: lse from the forward,
``di = rowsum(do * o)`` in XLA, one kernel for dq and one for dk/dv (which sums over the g heads
and over the q blocks in VMEM).

Constraints on TPU: hd % 128 == 0 (BAGEL: 128) and block sizes multiples of 128; L is padded to a
multiple of the blocks with one extra padding document (any L works). In interpret mode (CPU) any
sizes work. Under a mesh, the call is wrapped in ``shard_map`` (rows over the ``batch`` mesh axes,
kv heads over the kv-head axis; the caller passes both (``batch_axes``, ``kv_head_axis``,
resolved from its rules table, e.g. ``attention.mesh_axes_from_rules(parallel.mesh.RULES)``).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from sgt_jax.batch import CAUSAL, NOISE, Segments

SKIP, PARTIAL, FULL_BLOCK = 0, 1, 2        # block kinds (low 2 bits of a compacted code)
_DOC, _SPLIT, _ORDER, _KO_SAME, _KO_OTHER = range(5)
_NF = 8                                     # fields per token in the tables (5 used, sublane-aligned)
_I32_MIN, _I32_MAX = -(2 ** 31), 2 ** 31 - 1
_M_INIT = -1e30                             # finite running-max start (masked scores are -inf)
_NT = (((1,), (1,)), ((), ()))              # a @ b.T
_NN = (((1,), (0,)), ((), ()))              # a @ b


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tokens per block: forward and dq kernels use (block_q, block_kv), the dk/dv kernel
    (block_q_dkv, block_kv_dkv). Clamped to the (padded) sequence length."""
    block_q: int = 512
    block_kv: int = 512
    block_q_dkv: int = 512
    block_kv_dkv: int = 512

    @classmethod
    def from_config(cls, llm) -> "BlockSizes":
        """From ``llm.attention_block_{q,kv,q_dkv,kv_dkv}`` (missing keys: the defaults)."""
        d = cls()
        get = lambda n: int(llm.get(f"attention_block_{n}", getattr(d, f"block_{n}")))  # noqa: E731
        return cls(get("q"), get("kv"), get("q_dkv"), get("kv_dkv"))


@dataclasses.dataclass(frozen=True)
class _Static:
    g: int
    hd: int
    nkv: int
    bq: int
    bkv: int
    bq_dkv: int
    bkv_dkv: int
    scale: float
    interpret: bool
    vmem_limit_bytes: int | None
    buckets: int = 1            # grid-length buckets (see _bucketed)


def target_is_tpu() -> bool:
    """True when compiling for TPU: the platform of the active mesh (also an AOT topology mesh on
    a CPU host), else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    dev = getattr(mesh, "abstract_device", None)
    if not mesh.empty and dev is not None and getattr(dev, "platform", None):
        return dev.platform == "tpu"
    return jax.default_backend() == "tpu"


# ------------------------------------------------------------------------------------------------
# per-token tables and per-block metadata (plain XLA, outside the kernels)

def pad_segments(seg: Segments, length: int) -> Segments:
    """Append ``length - L`` tokens forming one extra causal document (after every real one)."""
    n = length - seg.doc.shape[1]
    if n == 0:
        return seg
    b = seg.doc.shape[0]
    tail = lambda v, extra: jnp.concatenate(  # noqa: E731
        [v, jnp.broadcast_to(extra, (b, n)).astype(v.dtype)], axis=1)
    return Segments(tail(seg.doc, jnp.max(seg.doc, 1, keepdims=True) + 1),
                    tail(seg.split, jnp.max(seg.split, 1, keepdims=True) + 1),
                    tail(seg.mode, jnp.full((b, 1), CAUSAL, jnp.int32)),
                    tail(seg.order, jnp.max(seg.order, 1, keepdims=True) + 1 + jnp.arange(n)[None]))


def token_table(seg: Segments) -> jax.Array:
    """(B, L, 8) int32: doc, split, order, ko_same, ko_other, 0, 0, 0 (see the module doc)."""
    ko_same = jnp.where(seg.mode == CAUSAL, seg.order, _I32_MIN)
    ko_other = jnp.where(seg.mode == NOISE, _I32_MAX, seg.order)
    z = jnp.zeros_like(seg.doc)
    return jnp.stack([seg.doc, seg.split, seg.order, ko_same, ko_other, z, z, z], axis=-1).astype(jnp.int32)


def _bitset(ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(..., size) ids -> two uint32 words per block: the set of ``id mod 64`` (a block's ids can
    only meet another block's if their sets intersect -- exact for < 64 distinct ids per row)."""
    h = jnp.remainder(ids, 64).astype(jnp.uint32)
    one = jnp.uint32(1)
    lo = jnp.where(h < 32, jnp.left_shift(one, h % 32), jnp.uint32(0))
    hi = jnp.where(h >= 32, jnp.left_shift(one, h % 32), jnp.uint32(0))
    red = lambda x: lax.reduce(x, jnp.uint32(0), lax.bitwise_or, (x.ndim - 1,))  # noqa: E731
    return red(lo), red(hi)


def _block_stats(seg: Segments, size: int) -> dict:
    b, length = seg.doc.shape
    r = lambda x: x.reshape(b, length // size, size)  # noqa: E731
    doc, split, order, mode = r(seg.doc), r(seg.split), r(seg.order), r(seg.mode)
    (d0, d1), (s0, s1) = _bitset(doc), _bitset(split)
    return dict(
        dmin=doc.min(-1), dmax=doc.max(-1), smin=split.min(-1), smax=split.max(-1),
        dbits0=d0, dbits1=d1, sbits0=s0, sbits1=s1,
        omin=order.min(-1), omax=order.max(-1),
        omin_nn=jnp.where(mode != NOISE, order, _I32_MAX).min(-1),
        any_noise=(mode == NOISE).any(-1), any_causal=(mode == CAUSAL).any(-1),
        any_bidir=(mode != CAUSAL).any(-1))


def classify_blocks(seg: Segments, bq: int, bkv: int) -> jax.Array:
    """(B, L/bq, L/bkv) int32 in {SKIP, PARTIAL, FULL_BLOCK} from per-block statistics only.
    SKIP => no allowed (q, k) pair in the block; FULL_BLOCK => every pair allowed."""
    qs, ks = _block_stats(seg, bq), _block_stats(seg, bkv)
    Q = lambda n: qs[n][:, :, None]  # noqa: E731
    K = lambda n: ks[n][:, None, :]  # noqa: E731
    bits_disjoint = lambda p: ((Q(p + "0") & K(p + "0")) | (Q(p + "1") & K(p + "1"))) == 0  # noqa: E731
    doc_disjoint = (Q("dmax") < K("dmin")) | (Q("dmin") > K("dmax")) | bits_disjoint("dbits")
    split_disjoint = (Q("smax") < K("smin")) | (Q("smin") > K("smax")) | bits_disjoint("sbits")
    all_future = Q("omax") < K("omin")
    empty = (doc_disjoint
             | (all_future & (split_disjoint | ~K("any_bidir")))
             | (split_disjoint & (K("omin_nn") > Q("omax"))))
    one_doc = (Q("dmin") == Q("dmax")) & (K("dmin") == K("dmax")) & (Q("dmin") == K("dmin"))
    one_split = (Q("smin") == Q("smax")) & (K("smin") == K("smax")) & (Q("smin") == K("smin"))
    full = one_doc & (((K("omax") <= Q("omin")) & ~K("any_noise")) | (one_split & ~K("any_causal")))
    return jnp.where(empty, SKIP, jnp.where(full, FULL_BLOCK, PARTIAL)).astype(jnp.int32)


def compact_blocks(kind: jax.Array) -> jax.Array:
    """(..., n) kinds -> (..., n) codes ``4 * block_index + kind``: the non-SKIP blocks first (in
    index order), then the last such index repeated with kind SKIP (no DMA, no compute)."""
    n = kind.shape[-1]
    j = jnp.arange(n, dtype=jnp.int32)
    perm = jnp.argsort(jnp.where(kind > 0, j, n + j), axis=-1).astype(jnp.int32)
    count = jnp.sum(kind > 0, axis=-1, keepdims=True, dtype=jnp.int32)
    last = jnp.take_along_axis(perm, jnp.maximum(count - 1, 0), axis=-1)
    live = j < count
    idx = jnp.where(live, perm, last)
    k = jnp.where(live, jnp.take_along_axis(kind, perm, axis=-1), SKIP)
    return (idx * 4 + k).astype(jnp.int32)


# ------------------------------------------------------------------------------------------------
# kernels

def _allowed(q_doc, q_split, q_order, k_doc, k_split, k_same, k_other):
    """BAGEL's mask from broadcastable per-token fields (q-major or k-major orientation)."""
    thr = jnp.where(q_split == k_split, k_same, k_other)
    return (q_doc == k_doc) & (thr <= q_order)


def _mask_q_major(qcol_ref, krow_ref):
    """(bq, bkv): q fields are columns of a (bq, 8) block, k fields rows of an (8, bkv) block."""
    qc = lambda f: qcol_ref[:, f:f + 1]  # noqa: E731
    kr = lambda f: krow_ref[f:f + 1, :]  # noqa: E731
    return _allowed(qc(_DOC), qc(_SPLIT), qc(_ORDER), kr(_DOC), kr(_SPLIT), kr(_KO_SAME), kr(_KO_OTHER))


def _mask_k_major(kcol_ref, qrow_ref):
    """(bkv, bq): the same mask transposed (dk/dv kernel)."""
    kc = lambda f: kcol_ref[:, f:f + 1]  # noqa: E731
    qr = lambda f: qrow_ref[f:f + 1, :]  # noqa: E731
    return _allowed(qr(_DOC), qr(_SPLIT), qr(_ORDER), kc(_DOC), kc(_SPLIT), kc(_KO_SAME), kc(_KO_OTHER))


def _dot(a, b, dims):
    """MXU matmul with fp32 accumulation; fp32 operands at full precision, bf16 at the native one
    (explicit, so a global ``jax_default_matmul_precision`` cannot change the kernel)."""
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, dims, precision=(prec, prec), preferred_element_type=jnp.float32)


def _dispatch(code, body):
    """Run ``body(masked)`` for PARTIAL / FULL_BLOCK steps; nothing for SKIP."""
    kind = code & 3
    pl.when(kind == PARTIAL)(lambda: body(True))
    pl.when(kind == FULL_BLOCK)(lambda: body(False))


def _fwd_kernel(meta, qcol, krow, q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc, *, st: _Static):
    b, i, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    nt, hd = pl.num_programs(3), st.hd

    @pl.when(t == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, _M_INIT, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc[...] = jnp.zeros(acc.shape, jnp.float32)

    def body(masked):
        mask = _mask_q_major(qcol, krow) if masked else None
        k, v = k_ref[...], v_ref[...]
        for h in range(st.g):
            sl = slice(h * hd, (h + 1) * hd)
            s = _dot(q_ref[:, sl], k, _NT) * st.scale
            if masked:
                s = jnp.where(mask, s, -jnp.inf)
            m_prev, l_prev = m_sc[h], l_sc[h]                           # (bq, 128), lanes equal
            m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            p = jnp.exp(s - m_new[:, :1])
            alpha = jnp.exp(m_prev - m_new)
            l_sc[h] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
            m_sc[h] = m_new
            pv = _dot(p.astype(v.dtype), v, _NN)
            acc[:, sl] = alpha[:, :1] * acc[:, sl] + pv

    _dispatch(meta[b, i, t], body)

    @pl.when(t == nt - 1)
    def _finish():
        for h in range(st.g):
            sl = slice(h * hd, (h + 1) * hd)
            m, l = m_sc[h], l_sc[h]
            live = l > 0
            inv = jnp.where(live, 1.0 / jnp.where(live, l, 1.0), 0.0)
            o_ref[:, sl] = (acc[:, sl] * inv[:, :1]).astype(o_ref.dtype)
            lse = jnp.where(live, m + jnp.log(jnp.where(live, l, 1.0)), jnp.inf)   # (bq, 128)
            lse_ref[h:h + 1, :] = jnp.transpose(lse)[:1, :]


def _dq_kernel(meta, qcol, krow, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dq_ref, acc, *, st: _Static):
    b, i, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    nt, hd = pl.num_programs(3), st.hd

    @pl.when(t == 0)
    def _init():
        acc[...] = jnp.zeros(acc.shape, jnp.float32)

    def body(masked):
        mask = _mask_q_major(qcol, krow) if masked else None
        k, v = k_ref[...], v_ref[...]
        for h in range(st.g):
            sl = slice(h * hd, (h + 1) * hd)
            s = _dot(q_ref[:, sl], k, _NT) * st.scale
            p = jnp.exp(s - lse_ref[h][:, None])
            if masked:
                p = jnp.where(mask, p, 0.0)
            dp = _dot(do_ref[:, sl], v, _NT)
            ds = p * (dp - di_ref[h][:, None])
            acc[:, sl] += _dot(ds.astype(k.dtype), k, _NN)

    _dispatch(meta[b, i, t], body)

    @pl.when(t == nt - 1)
    def _finish():
        dq_ref[...] = (acc[...] * st.scale).astype(dq_ref.dtype)


def _dkv_kernel(meta, kcol, qrow, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dk_ref, dv_ref,
                dk_acc, dv_acc, *, st: _Static):
    b, j, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    nt, hd = pl.num_programs(3), st.hd

    @pl.when(t == 0)
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    def body(masked):
        mask = _mask_k_major(kcol, qrow) if masked else None              # (bkv, bq)
        k, v = k_ref[...], v_ref[...]
        for h in range(st.g):
            sl = slice(h * hd, (h + 1) * hd)
            q, do = q_ref[:, sl], do_ref[:, sl]
            s = _dot(k, q, _NT) * st.scale
            p = jnp.exp(s - lse_ref[h:h + 1, :])
            if masked:
                p = jnp.where(mask, p, 0.0)
            dv_acc[...] += _dot(p.astype(do.dtype), do, _NN)
            dp = _dot(v, do, _NT)
            ds = p * (dp - di_ref[h:h + 1, :])
            dk_acc[...] += _dot(ds.astype(q.dtype), q, _NN)

    _dispatch(meta[b, j, t], body)

    @pl.when(t == nt - 1)
    def _finish():
        dk_ref[...] = (dk_acc[...] * st.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


# ------------------------------------------------------------------------------------------------
# pallas_call wrappers

def _params(st: _Static, n_parallel: int = 3):
    return pltpu.CompilerParams(dimension_semantics=("parallel",) * n_parallel + ("arbitrary",),
                                vmem_limit_bytes=st.vmem_limit_bytes)


def _cost(st: _Static, b: int, lp: int, other: int, nh: int, passes: int, nbytes: int):
    """Cost if every grid step did work: ``lp`` rows x ``other`` = steps x block columns. An upper
    bound -- skipped steps do none; XLA cannot see inside the kernel. ``nbytes``: from
    ``_grid_bytes``."""
    return pl.CostEstimate(flops=int(2 * passes * b * nh * lp * other * st.hd),
                           transcendentals=int(b * nh * lp * other), bytes_accessed=int(nbytes))


def _grid_bytes(grid, streamed, resident) -> int:
    """HBM bytes of a call: the blocks that change with the last (live-block list) grid axis are
    fetched at every one of the grid's steps (``streamed``: their bytes per step); the others
    once per (row, kv head) block (``resident``: the whole arrays read or written, once)."""
    return int(math.prod(grid) * sum(streamed) + sum(resident))


def _nbytes(*xs) -> list:
    return [x.size * x.dtype.itemsize for x in xs]


def _fwd_call(st: _Static, q3, k3, v3, tcol, trow, meta):
    b, lp, _ = q3.shape
    g, hd, nkv, bq, bkv = st.g, st.hd, st.nkv, st.bq, st.bkv
    kv_blk = lambda bb, h, i, t, m: (bb, m[bb, i, t] >> 2, h)  # noqa: E731
    grid = (b, nkv, lp // bq, meta.shape[-1])
    it = k3.dtype.itemsize
    nbytes = _grid_bytes(grid, [2 * bkv * hd * it],                    # a K and a V block per step
                         _nbytes(q3, q3) + [b * nkv * g * lp * 4])     # q in, o out, lse out
    return pl.pallas_call(
        functools.partial(_fwd_kernel, st=st),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=grid,
            in_specs=[pl.BlockSpec((None, bq, _NF), lambda bb, h, i, t, m: (bb, i, 0)),
                      pl.BlockSpec((None, _NF, bkv), lambda bb, h, i, t, m: (bb, 0, m[bb, i, t] >> 2)),
                      pl.BlockSpec((None, bq, g * hd), lambda bb, h, i, t, m: (bb, i, h)),
                      pl.BlockSpec((None, bkv, hd), kv_blk),
                      pl.BlockSpec((None, bkv, hd), kv_blk)],
            out_specs=[pl.BlockSpec((None, bq, g * hd), lambda bb, h, i, t, m: (bb, i, h)),
                       pl.BlockSpec((None, None, g, bq), lambda bb, h, i, t, m: (bb, h, 0, i))],
            scratch_shapes=[pltpu.VMEM((g, bq, 128), jnp.float32), pltpu.VMEM((g, bq, 128), jnp.float32),
                            pltpu.VMEM((bq, g * hd), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(q3.shape, q3.dtype),
                   jax.ShapeDtypeStruct((b, nkv, g, lp), jnp.float32)],
        compiler_params=_params(st), interpret=st.interpret, name="bagel_flash_fwd",
        cost_estimate=_cost(st, b, lp, meta.shape[-1] * bkv, g * nkv, 2, nbytes),
    )(meta, tcol, trow, q3, k3, v3)


def _dq_call(st: _Static, q3, k3, v3, do3, lse, di, tcol, trow, meta):
    b, lp, _ = q3.shape
    g, hd, nkv, bq, bkv = st.g, st.hd, st.nkv, st.bq, st.bkv
    kv_blk = lambda bb, h, i, t, m: (bb, m[bb, i, t] >> 2, h)  # noqa: E731
    q_blk = lambda bb, h, i, t, m: (bb, i, h)  # noqa: E731
    row_blk = lambda bb, h, i, t, m: (bb, h, 0, i)  # noqa: E731
    grid = (b, nkv, lp // bq, meta.shape[-1])
    nbytes = _grid_bytes(grid, [2 * bkv * hd * k3.dtype.itemsize],     # a K and a V block per step
                         _nbytes(q3, do3, q3, lse, di))               # q, do, lse, di in; dq out
    return pl.pallas_call(
        functools.partial(_dq_kernel, st=st),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=grid,
            in_specs=[pl.BlockSpec((None, bq, _NF), lambda bb, h, i, t, m: (bb, i, 0)),
                      pl.BlockSpec((None, _NF, bkv), lambda bb, h, i, t, m: (bb, 0, m[bb, i, t] >> 2)),
                      pl.BlockSpec((None, bq, g * hd), q_blk),
                      pl.BlockSpec((None, bkv, hd), kv_blk),
                      pl.BlockSpec((None, bkv, hd), kv_blk),
                      pl.BlockSpec((None, bq, g * hd), q_blk),
                      pl.BlockSpec((None, None, g, bq), row_blk),
                      pl.BlockSpec((None, None, g, bq), row_blk)],
            out_specs=pl.BlockSpec((None, bq, g * hd), q_blk),
            scratch_shapes=[pltpu.VMEM((bq, g * hd), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q3.shape, q3.dtype),
        compiler_params=_params(st), interpret=st.interpret, name="bagel_flash_dq",
        cost_estimate=_cost(st, b, lp, meta.shape[-1] * bkv, g * nkv, 3, nbytes),
    )(meta, tcol, trow, q3, k3, v3, do3, lse, di)


def _dkv_call(st: _Static, q3, k3, v3, do3, lse, di, tcol, trow, meta):
    b, lp, _ = q3.shape
    g, hd, nkv, bq, bkv = st.g, st.hd, st.nkv, st.bq_dkv, st.bkv_dkv
    q_blk = lambda bb, h, j, t, m: (bb, m[bb, j, t] >> 2, h)  # noqa: E731
    kv_blk = lambda bb, h, j, t, m: (bb, j, h)  # noqa: E731
    row_blk = lambda bb, h, j, t, m: (bb, h, 0, m[bb, j, t] >> 2)  # noqa: E731
    grid = (b, nkv, lp // bkv, meta.shape[-1])
    it = q3.dtype.itemsize
    nbytes = _grid_bytes(grid, [2 * bq * g * hd * it, 2 * g * bq * 4],  # q, do blocks; lse, di rows
                         _nbytes(k3, v3, k3, v3))                      # k, v in; dk, dv out
    return pl.pallas_call(
        functools.partial(_dkv_kernel, st=st),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=grid,
            in_specs=[pl.BlockSpec((None, bkv, _NF), lambda bb, h, j, t, m: (bb, j, 0)),
                      pl.BlockSpec((None, _NF, bq), lambda bb, h, j, t, m: (bb, 0, m[bb, j, t] >> 2)),
                      pl.BlockSpec((None, bq, g * hd), q_blk),
                      pl.BlockSpec((None, bkv, hd), kv_blk),
                      pl.BlockSpec((None, bkv, hd), kv_blk),
                      pl.BlockSpec((None, bq, g * hd), q_blk),
                      pl.BlockSpec((None, None, g, bq), row_blk),
                      pl.BlockSpec((None, None, g, bq), row_blk)],
            out_specs=[pl.BlockSpec((None, bkv, hd), kv_blk), pl.BlockSpec((None, bkv, hd), kv_blk)],
            scratch_shapes=[pltpu.VMEM((bkv, hd), jnp.float32), pltpu.VMEM((bkv, hd), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(k3.shape, k3.dtype), jax.ShapeDtypeStruct(v3.shape, v3.dtype)],
        compiler_params=_params(st), interpret=st.interpret, name="bagel_flash_dkv",
        cost_estimate=_cost(st, b, lp, meta.shape[-1] * bq, g * nkv, 4, nbytes),
    )(meta, tcol, trow, q3, k3, v3, do3, lse, di)


# ------------------------------------------------------------------------------------------------
# custom VJP

def _bucketed(st: _Static, call, meta, *args):
    """``call(*args, meta[..., :T])`` with the grid's step axis cut to T: the smallest of ``n /
    2**i`` (i < st.buckets) holding every q (kv) block's live list -- ``lax.switch`` over the
    compiled variants, so a skipped block costs no grid step either. One bucket: T = n."""
    n = meta.shape[-1]
    sizes = sorted({-(-n // 2 ** i) for i in range(max(st.buckets, 1))})
    if len(sizes) == 1:
        return call(*args, meta)
    live = jnp.max(jnp.sum((meta & 3) > 0, axis=-1))
    idx = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), live.astype(jnp.int32), side="left")
    branches = [functools.partial(lambda t, m, *a: call(*a, m[..., :t]), t) for t in sizes]
    return lax.switch(idx, branches, meta, *args)


def _fwd(st, q3, k3, v3, tcol, trow, meta):
    return _bucketed(st, lambda *a: _fwd_call(st, *a), meta, q3, k3, v3, tcol, trow)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st, q3, k3, v3, tcol, trow, meta, meta_dkv):
    return _fwd(st, q3, k3, v3, tcol, trow, meta)[0]


def _flash_fwd(st, q3, k3, v3, tcol, trow, meta, meta_dkv):
    o3, lse = _fwd(st, q3, k3, v3, tcol, trow, meta)
    o3, lse = checkpoint_name(o3, "context"), checkpoint_name(lse, "context")
    return o3, (q3, k3, v3, tcol, trow, meta, meta_dkv, o3, lse)


def _flash_bwd(st, res, do3):
    q3, k3, v3, tcol, trow, meta, meta_dkv, o3, lse = res
    b, lp, _ = q3.shape
    do3 = do3.astype(q3.dtype)
    di = jnp.sum(do3.astype(jnp.float32).reshape(b, lp, -1, st.hd)
                 * o3.astype(jnp.float32).reshape(b, lp, -1, st.hd), axis=-1)        # (B, Lp, nh)
    di = di.transpose(0, 2, 1).reshape(b, st.nkv, st.g, lp)
    dq = _bucketed(st, lambda *a: _dq_call(st, *a), meta, q3, k3, v3, do3, lse, di, tcol, trow)
    dk, dv = _bucketed(st, lambda *a: _dkv_call(st, *a), meta_dkv, q3, k3, v3, do3, lse, di, tcol, trow)
    return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ------------------------------------------------------------------------------------------------
# public entry points

def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _clamp(block: int, length: int, align: int) -> int:
    return min(block, _round_up(length, align))


def plan(seg: Segments, block_sizes: BlockSizes | None = None, interpret: bool = True):
    """(padded Segments, effective BlockSizes, forward kinds, dkv kinds (kv-major)): the block
    metadata the kernels use, exposed for tests and the block-skipping benchmark."""
    bs = block_sizes or BlockSizes()
    length = seg.doc.shape[1]
    align = 8 if interpret else 128
    eff = BlockSizes(*(_clamp(x, length, align) for x in dataclasses.astuple(bs)))
    if not interpret:
        bad = [x for x in dataclasses.astuple(eff) if x % 128]
        if bad:
            raise ValueError(f"flash attention on TPU needs block sizes that are multiples of 128, got {bs}")
    lcm = functools.reduce(math.lcm, dataclasses.astuple(eff))
    seg_p = pad_segments(Segments(*(jnp.asarray(x, jnp.int32) for x in seg)), _round_up(length, lcm))
    kinds = classify_blocks(seg_p, eff.block_q, eff.block_kv)
    kinds_dkv = classify_blocks(seg_p, eff.block_q_dkv, eff.block_kv_dkv).transpose(0, 2, 1)
    return seg_p, eff, kinds, kinds_dkv


def _flash_local(q, k, v, seg, block_sizes, sm_scale, interpret, vmem_limit_bytes, grid_buckets):
    b, length, nh, hd = q.shape
    nkv = k.shape[2]
    if nh % nkv or k.shape != v.shape or k.shape[:2] != (b, length) or k.shape[3] != hd:
        raise ValueError(f"flash attention: q {q.shape}, k {k.shape}, v {v.shape}: need k == v shapes "
                         "(B, L, nkv, hd) with nkv | nh")
    if not interpret and hd % 128:
        raise ValueError(f"flash attention on TPU needs head_dim % 128 == 0, got {hd}")
    seg_p, eff, kinds, kinds_dkv = plan(seg, block_sizes, interpret)
    lp = seg_p.doc.shape[1]
    st = _Static(g=nh // nkv, hd=hd, nkv=nkv, bq=eff.block_q, bkv=eff.block_kv, bq_dkv=eff.block_q_dkv,
                 bkv_dkv=eff.block_kv_dkv, scale=float(sm_scale if sm_scale is not None else 1.0 / math.sqrt(hd)),
                 interpret=bool(interpret), vmem_limit_bytes=vmem_limit_bytes,
                 buckets=int(grid_buckets if grid_buckets is not None else (1 if interpret else 4)))
    pad = lambda x: jnp.pad(x.reshape(b, length, -1), ((0, 0), (0, lp - length), (0, 0)))  # noqa: E731
    tcol = token_table(seg_p)
    o3 = _flash(st, pad(q), pad(k), pad(v.astype(k.dtype)), tcol, tcol.transpose(0, 2, 1),
                compact_blocks(kinds), compact_blocks(kinds_dkv))
    return o3[:, :length].reshape(b, length, nh, hd)


def _auto_axes(mesh) -> set:
    from jax.sharding import AxisType

    return {a for a in mesh.axis_names if mesh._name_to_type[a] == AxisType.Auto and mesh.shape[a] > 1}


def _mesh_specs(mesh, b: int, nkv: int, batch_axes: tuple[str, ...], kv_head_axis: str | None):
    """(batch axes, kv-head axis): those of the wanted ones that are auto mesh axes and divide
    the shapes."""
    auto = _auto_axes(mesh)
    batch, size = [], 1
    for a in batch_axes:
        if a in auto and b % (size * mesh.shape[a]) == 0:
            batch.append(a)
            size *= mesh.shape[a]
    head = kv_head_axis
    head = head if isinstance(head, str) and head in auto and nkv % mesh.shape[head] == 0 else None
    return tuple(batch), head


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, seg: Segments, *,
                    block_sizes: BlockSizes | None = None, sm_scale: float | None = None,
                    interpret: bool | None = None, vmem_limit_bytes: int | None = None,
                    grid_buckets: int | None = None, batch_axes: tuple[str, ...] = (),
                    kv_head_axis: str | None = None) -> jax.Array:
    """BAGEL's packed attention with the Pallas kernels; same contract as
    ``attention.dot_product_attention(q, k, v, bagel_mask(seg))``.

    ``interpret=None``: interpret mode unless compiling for TPU. ``grid_buckets``: compile the
    kernels for this many grid lengths (n, n/2, n/4, ... steps per q / kv block; the smallest that
    holds the batch's longest live-block list runs); None: 4 on TPU, 1 in interpret mode.
    Under an active mesh with auto axes, runs inside shard_map with rows split over
    ``batch_axes`` and kv heads over ``kv_head_axis`` (those of them that divide the shapes; the
    rest replicated)."""
    interpret = (not target_is_tpu()) if interpret is None else interpret
    fn = functools.partial(_flash_local, block_sizes=block_sizes, sm_scale=sm_scale,
                           interpret=interpret, vmem_limit_bytes=vmem_limit_bytes,
                           grid_buckets=grid_buckets)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not _auto_axes(mesh):      # no mesh, or already inside shard_map
        return fn(q, k, v, seg)
    batch, head = _mesh_specs(mesh, q.shape[0], k.shape[2], tuple(batch_axes), kv_head_axis)
    from jax.sharding import PartitionSpec as P

    bspec = batch if len(batch) > 1 else (batch[0] if batch else None)
    x = P(bspec, None, head, None)
    s = P(bspec, None)
    return jax.shard_map(fn, mesh=mesh, in_specs=(x, x, x, Segments(s, s, s, s)), out_specs=x,
                         check_vma=False)(q, k, v, seg)
