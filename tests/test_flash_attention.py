"""The Pallas flash kernel (interpret mode on CPU) against the dense path: outputs and gradients
on random packed, expert-sorted layouts and on the golden fixture's layout; block metadata
soundness; dispatch, config, shard_map, and AOT compilation for TPU targets (needs libtpu).

Tolerances (stated in docs/attention.md): fp32 inputs -- out, dq, dk, dv within 2e-5 absolute
(values are O(1..10)); bf16 inputs -- the kernel's error against an fp32 reference on the same
bf16-rounded inputs is at most 1.5x the dense bf16 path's own error + 4e-3.
"""
import functools
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgt_jax.models import attention as A
from sgt_jax.models import config as C
from sgt_jax.models import flash_attention as F

CAUSAL, FULL, NOISE = A.CAUSAL, A.FULL, A.NOISE
FP32_ATOL = 2e-5


# ------------------------------------------------------------------------------------------------
# layouts

def random_row(rng, length, max_doc=60, pad_min=0):
    """One packed row like the data pipeline builds it, then sorted by expert as the decoder does.

    Documents are random sequences of items: causal text (und), a ViT image (full, und), a clean
    VAE image (full; latents gen, its start/end tokens und) and a noised VAE image (noise). The
    tail is one padding document (causal). Returns (doc, split, mode, order) in physical order."""
    doc, split, mode, expert = [], [], [], []
    d = s = 0
    budget = length - pad_min
    while True:
        items, n = [], 0
        for _ in range(rng.integers(1, 5)):
            kind = rng.choice(["text", "vit", "clean", "noise"], p=[0.4, 0.2, 0.15, 0.25])
            size = int(rng.integers(1, max_doc // 2))
            items.append((kind, size))
            n += size + (2 if kind in ("clean", "noise") else 0)
        if len(doc) + n > budget:
            break
        for kind, size in items:
            m = {"text": CAUSAL, "vit": FULL, "clean": FULL, "noise": NOISE}[kind]
            if kind in ("clean", "noise"):
                ex = [0] + [1] * size + [0]
            else:
                ex = [0] * size
            doc += [d] * len(ex)
            split += [s] * len(ex)
            mode += [m] * len(ex)
            expert += ex
            s += 1
        d += 1
    n_pad = length - len(doc)
    doc += [d] * n_pad
    split += [s] * n_pad
    mode += [CAUSAL] * n_pad
    expert += list(rng.integers(0, 2, n_pad))
    perm = np.argsort(np.asarray(expert), kind="stable")
    cols = [np.asarray(x, np.int32)[perm] for x in (doc, split, mode)]
    return (*cols, perm.astype(np.int32))


def random_segments(seed, batch, length, **kw):
    rng = np.random.default_rng(seed)
    rows = [random_row(rng, length, **kw) for _ in range(batch)]
    return A.Segments(*(jnp.asarray(np.stack([r[i] for r in rows])) for i in range(4)))


def random_qkv(seed, batch, length, nh, nkv, hd, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    mk = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32).astype(dtype)  # noqa: E731
    return mk(batch, length, nh, hd), mk(batch, length, nkv, hd), mk(batch, length, nkv, hd), \
        mk(batch, length, nh, hd)


@functools.lru_cache(maxsize=None)
def _value_and_grads(impl, blocks, buckets=None):
    def run(q, k, v, seg, ct):
        def f(q, k, v):
            if impl == "dense":
                return A.dot_product_attention(q, k, v, A.bagel_mask(seg))
            return F.flash_attention(q, k, v, seg, block_sizes=blocks, grid_buckets=buckets)
        o, vjp = jax.vjp(f, q, k, v)
        return (o, *vjp(ct.astype(o.dtype)))
    return jax.jit(run)


def flash_and_dense(q, k, v, seg, blocks, buckets=None):
    fl = _value_and_grads("flash", blocks, buckets)(q, k, v, seg, q)
    de = _value_and_grads("dense", None)(q, k, v, seg, q)
    return fl, de


NAMES = ("out", "dq", "dk", "dv")


# ------------------------------------------------------------------------------------------------
# block metadata

def _dense_blocks(seg, bq, bkv):
    m = np.asarray(A.bagel_mask(seg))
    b, lq, lk = m.shape
    m = m.reshape(b, lq // bq, bq, lk // bkv, bkv)
    return m.any(axis=(2, 4)), m.all(axis=(2, 4))


@pytest.mark.parametrize("bq,bkv", [(8, 8), (16, 8), (8, 32), (32, 32)])
def test_block_classification_is_sound(bq, bkv):
    seg = random_segments(1, 3, 250)
    seg_p, eff, kinds, kinds_dkv = F.plan(seg, F.BlockSizes(bq, bkv, bkv, bq))
    kinds = np.asarray(kinds)
    any_, all_ = _dense_blocks(seg_p, bq, bkv)
    assert not (any_ & (kinds == F.SKIP)).any(), "a block with allowed pairs was classified SKIP"
    assert all_[kinds == F.FULL_BLOCK].all(), "a block with masked pairs was classified FULL"
    assert (kinds == F.SKIP).mean() > 0.3 and (kinds == F.FULL_BLOCK).any()
    # the dk/dv kernel's (kv-major) metadata is the same classification at its own block sizes
    kd = np.asarray(kinds_dkv).transpose(0, 2, 1)
    any_d, all_d = _dense_blocks(seg_p, bkv, bq)
    assert not (any_d & (kd == F.SKIP)).any() and all_d[kd == F.FULL_BLOCK].all()
    # padding tokens are a document of their own
    assert seg_p.doc.shape[1] % np.lcm(bq, bkv) == 0


def test_compact_blocks_lists_live_blocks_first():
    kinds = jnp.asarray([[0, 1, 0, 2, 0], [0, 0, 0, 0, 0], [2, 2, 1, 1, 2]], jnp.int32)
    codes = np.asarray(F.compact_blocks(kinds))
    idx, kind = codes >> 2, codes & 3
    np.testing.assert_array_equal(idx, [[1, 3, 3, 3, 3], [0, 0, 0, 0, 0], [0, 1, 2, 3, 4]])
    np.testing.assert_array_equal(kind, [[1, 2, 0, 0, 0], [0, 0, 0, 0, 0], [2, 2, 1, 1, 2]])


# ------------------------------------------------------------------------------------------------
# numerics against the dense path

@pytest.mark.parametrize("nh,nkv,blocks", [
    (2, 2, F.BlockSizes(16, 32, 32, 16)),      # GQA group 1
    (4, 2, F.BlockSizes(32, 16, 16, 32)),      # group 2
    (7, 1, F.BlockSizes(24, 24, 40, 8)),       # group 7, blocks not dividing L (L padded)
])
def test_matches_dense_fp32(nh, nkv, blocks):
    b, length, hd = 2, 203, 16
    seg = random_segments(nh * 10 + nkv, b, length, pad_min=9)
    q, k, v, _ = random_qkv(0, b, length, nh, nkv, hd)
    fl, de = flash_and_dense(q, k, v, seg, blocks)
    for name, x, y in zip(NAMES, fl, de):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=FP32_ATOL, rtol=0, err_msg=name)


def test_grid_buckets():
    """The shortened grids (lax.switch over n, n/2, n/4, n/8 steps) give the same results; the
    layout's longest live list fits a cut grid in both the forward/dq and the dk/dv kernels."""
    b, length, nh, nkv, hd = 2, 256, 2, 1, 16
    blocks = F.BlockSizes(16, 16, 16, 16)
    seg = random_segments(2, b, length, max_doc=30)
    _, _, kinds, kinds_dkv = F.plan(seg, blocks)
    for kd in (kinds, kinds_dkv):
        live = int(np.max(np.sum(np.asarray(kd) > 0, axis=-1)))
        assert live <= 8 < kd.shape[-1], live          # a 16- or 8-step bucket out of 16
    q, k, v, _ = random_qkv(11, b, length, nh, nkv, hd)
    fl, de = flash_and_dense(q, k, v, seg, blocks, buckets=4)
    for name, x, y in zip(NAMES, fl, de):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=FP32_ATOL, rtol=0, err_msg=name)


def test_matches_dense_bf16():
    b, length, nh, nkv, hd = 2, 160, 4, 2, 16
    seg = random_segments(7, b, length)
    q, k, v, _ = random_qkv(1, b, length, nh, nkv, hd, jnp.bfloat16)
    blocks = F.BlockSizes(32, 32, 32, 32)
    fl, de = flash_and_dense(q, k, v, seg, blocks)
    f32 = lambda t: t.astype(jnp.float32)  # noqa: E731
    ref = _value_and_grads("dense", None)(f32(q), f32(k), f32(v), seg, f32(q))
    for name, x, y, r in zip(NAMES, fl, de, ref):
        assert x.dtype == jnp.bfloat16
        e_flash = np.abs(np.asarray(f32(x)) - np.asarray(r)).max()
        e_dense = np.abs(np.asarray(f32(y)) - np.asarray(r)).max()
        assert e_flash <= 1.5 * e_dense + 4e-3, (name, e_flash, e_dense)


def test_padding_only_row_and_single_tokens():
    """A row that is all padding, and one of one-token documents (every query sees only itself)."""
    length = 40
    pad = [np.zeros(length, np.int32)] * 3 + [np.arange(length, dtype=np.int32)]
    singles = [np.arange(length, dtype=np.int32), np.arange(length, dtype=np.int32),
               np.full(length, NOISE, np.int32), np.arange(length, dtype=np.int32)[::-1].copy()]
    seg = A.Segments(*(jnp.asarray(np.stack([p, s])) for p, s in zip(pad, singles)))
    q, k, v, _ = random_qkv(2, 2, length, 2, 1, 16)
    fl, de = flash_and_dense(q, k, v, seg, F.BlockSizes(16, 16, 16, 16))
    for name, x, y in zip(NAMES, fl, de):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=FP32_ATOL, rtol=0, err_msg=name)
    np.testing.assert_allclose(np.asarray(fl[0][1]), np.repeat(np.asarray(v[1]), 2, axis=1), atol=1e-6)


def test_empty_query_rows_give_zero():
    """Rows with no allowed key (not produced by BAGEL's mask, but the kernel guards them): the
    kernel is driven directly with a q/kv document mismatch to check the l == 0 path."""
    length, hd = 32, 16
    q, k, v, ct = random_qkv(3, 1, length, 2, 2, hd)
    seg = F.pad_segments(A.Segments(*(jnp.asarray(x)[None] for x in (
        np.repeat([0, 1], 16).astype(np.int32), np.repeat([0, 1], 16).astype(np.int32),
        np.zeros(length, np.int32), np.arange(length, dtype=np.int32)))), length)
    tcol = F.token_table(seg)
    krow = tcol.at[:, :16, 0].set(5).transpose(0, 2, 1)      # keys of the first 16 tokens: other doc
    st = F._Static(g=1, hd=hd, nkv=2, bq=16, bkv=16, bq_dkv=16, bkv_dkv=16, scale=0.25,
                   interpret=True, vmem_limit_bytes=None)
    meta = F.compact_blocks(jnp.ones((1, 2, 2), jnp.int32))
    q3 = q.reshape(1, length, -1)
    o3, lse = F._fwd_call(st, q3, k.reshape(1, length, -1), v.reshape(1, length, -1), tcol, krow, meta)
    o = np.asarray(o3).reshape(1, length, 2, hd)
    assert np.all(o[0, :16] == 0) and np.all(np.isinf(np.asarray(lse)[0, :, :, :16]))
    assert np.all(np.isfinite(o)) and np.abs(o[0, 16:]).max() > 0


def _golden_segments(golden_dir):
    from sgt_jax.convert import check_golden as G
    from sgt_jax.models.qwen2_mot import Routing

    fx = G.load_fixture(str(golden_dir))
    cfg = G.config_from_meta(fx["meta"])
    batch, _, num_gen = G.packed_batch_from_golden(fx["meta"], fx["batch"], cfg, pad_to=114)
    seg = A.Segments(batch.doc_ids, batch.split_ids, batch.split_mode,
                     jnp.broadcast_to(jnp.arange(batch.doc_ids.shape[1], dtype=jnp.int32), batch.doc_ids.shape))
    r = Routing.make(batch.expert, num_gen)
    return cfg, seg.permute(r.perm)


@pytest.mark.golden
def test_golden_layout_matches_dense(golden_dir):
    cfg, seg = _golden_segments(golden_dir)
    length = seg.doc.shape[1]
    nh, nkv, hd = cfg.llm.num_heads, cfg.llm.num_kv_heads, C.head_dim(cfg)
    q, k, v, _ = random_qkv(4, 1, length, nh, nkv, hd)
    fl, de = flash_and_dense(q, k, v, seg, F.BlockSizes(16, 16, 16, 16))
    for name, x, y in zip(NAMES, fl, de):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=FP32_ATOL, rtol=0, err_msg=name)
    kinds = np.asarray(F.plan(seg, F.BlockSizes(16, 16, 16, 16))[2])
    assert (kinds == F.SKIP).any()


@pytest.mark.golden
def test_golden_model_forward_with_flash(golden_dir, monkeypatch):
    """The whole model with attention_impl="flash" (interpret mode) passes the golden forward check."""
    from sgt_jax.convert import check_golden as G

    orig = G.config_from_meta

    def with_flash(meta, compute_dtype="float32"):
        cfg = orig(meta, compute_dtype)
        cfg.llm.attention_impl = "flash"
        return cfg

    monkeypatch.setattr(G, "config_from_meta", with_flash)
    err = G.run(str(golden_dir), with_grads=False)
    for name in ("last_hidden_state", "ce_tok", "mse_tok", "loss"):
        assert err[name] <= 1e-5, (name, err[name])
    assert err["mask_mismatches"] == 0


@pytest.mark.parametrize("policy", ["nothing", "context"])
def test_under_remat(policy):
    """Inside jax.checkpoint (the decoder's remat policies): recomputed, or the kernel's output and
    lse saved under the name "context" (policy "minimal" saves it)."""
    b, length, nh, nkv, hd = 1, 64, 2, 1, 16
    seg = random_segments(8, b, length)
    q, k, v, ct = random_qkv(8, b, length, nh, nkv, hd)
    pol = (jax.checkpoint_policies.nothing_saveable if policy == "nothing"
           else jax.checkpoint_policies.save_only_these_names("context"))
    blocks = F.BlockSizes(16, 16, 16, 16)
    f = jax.checkpoint(lambda q, k, v: jnp.tanh(F.flash_attention(q, k, v, seg, block_sizes=blocks)), policy=pol)
    g = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * ct), argnums=(0, 1, 2)))(q, k, v)
    r = jax.grad(lambda q, k, v: jnp.sum(jnp.tanh(A.dot_product_attention(q, k, v, A.bagel_mask(seg))) * ct),
                 argnums=(0, 1, 2))(q, k, v)
    for x, y in zip(g, r):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=FP32_ATOL)


# ------------------------------------------------------------------------------------------------
# dispatch, config, mesh

def test_dispatch_and_config():
    seg = random_segments(5, 1, 64)
    q, k, v, _ = random_qkv(5, 1, 64, 2, 1, 16)
    dense = A.attention(q, k, v, seg, "dense")
    np.testing.assert_allclose(np.asarray(A.attention(q, k, v, seg, "auto")), np.asarray(dense),  # CPU: blocked
                               atol=FP32_ATOL)
    fl = A.attention(q, k, v, seg, "flash", block_sizes=F.BlockSizes(16, 16, 16, 16))
    np.testing.assert_allclose(np.asarray(fl), np.asarray(dense), atol=FP32_ATOL)
    with pytest.raises(ValueError, match="unknown attention_impl"):
        A.attention(q, k, v, seg, "splash")

    cfg = C.tiny()
    for impl in C.ATTENTION_IMPLS:
        cfg.llm.attention_impl = impl
        C.validate(cfg)
    cfg.llm.attention_impl = "splash"
    with pytest.raises(ValueError, match="attention_impl"):
        C.validate(cfg)
    cfg = C.tiny()
    cfg.llm.attention_block_kv = 100
    with pytest.raises(ValueError, match="attention_block_kv"):
        C.validate(cfg)
    cfg.llm.attention_block_kv = 256
    assert F.BlockSizes.from_config(cfg.llm) == F.BlockSizes(512, 256, 512, 512)
    with pytest.raises(ValueError, match="multiples of 128"):
        F.plan(random_segments(5, 1, 300), F.BlockSizes(96, 128, 128, 128), interpret=False)


def test_under_a_mesh_runs_in_shard_map():
    from sgt_jax.parallel.mesh import RULES, make_mesh

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    batch_axes, head_axis = A.mesh_axes_from_rules(RULES)
    assert (batch_axes, head_axis) == (("data", "fsdp"), "tensor")
    b, length, nh, nkv, hd = 4, 48, 4, 2, 16
    seg = random_segments(6, b, length)
    q, k, v, ct = random_qkv(6, b, length, nh, nkv, hd)
    blocks = F.BlockSizes(16, 16, 16, 16)

    def loss(q, k, v, seg):
        return jnp.sum(F.flash_attention(q, k, v, seg, block_sizes=blocks, batch_axes=batch_axes,
                                         kv_head_axis=head_axis) * ct)

    with jax.set_mesh(mesh):
        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        assert "shard_map" in str(jax.make_jaxpr(fn)(q, k, v, seg))
        val, grads = fn(q, k, v, seg)
    ref_val, ref_grads = jax.value_and_grad(
        lambda q, k, v: jnp.sum(A.dot_product_attention(q, k, v, A.bagel_mask(seg)) * ct),
        argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(float(val), float(ref_val), rtol=1e-5)
    for x, y in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=FP32_ATOL)


# ------------------------------------------------------------------------------------------------
# AOT for TPU targets

AOT_SCRIPT = r"""
import json, os, sys
import jax, jax.numpy as jnp
sys.path.insert(0, os.getcwd())
from bench.attention_blocks import compile_attention
out = {}
for chip in ("v5p", "v6e"):
    r = compile_attention(chip, "flash", seq_len=1024, batch=1)
    out[chip] = {k: r[k] for k in ("device_kind", "temp_bytes", "flops")}
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install 'libtpu==0.0.42.*' for jax 0.10.2)")
def test_aot_compiles_for_v5p_and_v6e():
    """fwd + bwd of the 7B attention shape (nh 28, nkv 4, hd 128) compiles for both TPU targets."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1", TPU_SKIP_MDS_QUERY="1")
    env.pop("XLA_FLAGS", None)
    p = subprocess.run([sys.executable, "-c", AOT_SCRIPT], cwd=root, env=env, capture_output=True,
                       text=True, timeout=900)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT")]
    assert p.returncode == 0 and line, p.stderr[-3000:]
    out = json.loads(line[0][len("RESULT"):])
    assert out["v5p"]["device_kind"].startswith("TPU v5") and out["v6e"]["device_kind"].startswith("TPU v6")
    assert all(r["flops"] > 0 for r in out.values())
