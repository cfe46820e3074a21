"""The blocked XLA attention (models/blocked_attention.py) against the dense path: outputs and
gradients on random packed, expert-sorted layouts, the golden fixture's layout and the ViT's
block-diagonal mask; dispatch ("auto" per platform), config, one compilation for any layout,
remat and shard_map. Tolerance as the flash kernel's fp32 tests: 2e-5 absolute."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sgt_jax.models import attention as A
from sgt_jax.models import blocked_attention as BA
from sgt_jax.models import config as C
from sgt_jax.models import flash_attention as F
from test_flash_attention import FP32_ATOL, NAMES, _golden_segments, random_qkv, random_segments


def _run(impl, blocking=None):
    def run(q, k, v, seg, ct):
        def f(q, k, v):
            if impl == "dense":
                return A.dot_product_attention(q, k, v, A.bagel_mask(seg))
            return BA.blocked_attention(q, k, v, seg, blocking=blocking)
        o, vjp = jax.vjp(f, q, k, v)
        return (o, *vjp(ct.astype(o.dtype)))
    return jax.jit(run)


def _check(q, k, v, seg, ct, blocking):
    got = _run("blocked", blocking)(q, k, v, seg, ct)
    want = _run("dense")(q, k, v, seg, ct)
    for name, x, y in zip(NAMES, got, want):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=FP32_ATOL, rtol=0, err_msg=name)


@pytest.mark.parametrize("batch,length,nh,nkv,hd,block,chunk", [
    (2, 203, 4, 2, 16, 16, 8),     # L not a multiple of the block, GQA 2, rows of different layouts
    (1, 256, 6, 2, 8, 32, 5),      # GQA 3, a chunk that does not divide the pair count
    (3, 96, 2, 2, 8, 8, 64),       # small blocks, one chunk holds many q blocks' pairs (scatter dups)
    (1, 100, 2, 1, 16, 128, 1),    # one block (clamped to L), one pair per loop step
])
def test_matches_dense_on_random_layouts(batch, length, nh, nkv, hd, block, chunk):
    seg = random_segments(batch * 7 + length, batch, length)
    q, k, v, ct = random_qkv(length, batch, length, nh, nkv, hd)
    _check(q, k, v, seg, ct, BA.Blocking(block, chunk))
    # the work done: only the live pairs (rounded up to a chunk), never all of them
    live = int(BA.live_pairs(seg, block))
    n = -(-length // min(block, length))
    assert 0 < live <= batch * n * n
    if n > 2:
        assert live < batch * n * n


def test_every_pair_live_and_padding_docs():
    """A row that is one bidirectional document (every block pair live: the longest pair list)
    and a row that is mostly padding (many one-block documents)."""
    length = 80
    one = (np.zeros(length), np.zeros(length), np.full(length, A.FULL), np.arange(length))
    pad = (np.r_[np.zeros(5), 1 + np.arange(length - 5)], np.r_[np.zeros(5), 1 + np.arange(length - 5)],
           np.full(length, A.CAUSAL), np.arange(length))
    seg = A.Segments(*(jnp.asarray(np.stack([a, b]).astype(np.int32)) for a, b in zip(one, pad)))
    q, k, v, ct = random_qkv(3, 2, length, 4, 2, 16)
    _check(q, k, v, seg, ct, BA.Blocking(16, 7))
    assert int(BA.live_pairs(seg, 16)) == 25 + 5


def test_golden_layout_matches_dense(golden_dir):
    cfg, seg = _golden_segments(golden_dir)
    length = seg.doc.shape[1]
    q, k, v, ct = random_qkv(4, 1, length, cfg.llm.num_heads, cfg.llm.num_kv_heads, C.head_dim(cfg))
    _check(q, k, v, seg, ct, BA.Blocking(16, 4))


def test_compiles_once_for_any_layout():
    f = _run("blocked", BA.Blocking(16, 8))
    q, k, v, ct = random_qkv(1, 2, 96, 2, 1, 8)
    counts = []
    for seed in range(3):
        jax.block_until_ready(f(q, k, v, random_segments(100 + seed, 2, 96), ct))
        counts.append(int(BA.live_pairs(random_segments(100 + seed, 2, 96), 16)))
    assert len(set(counts)) > 1            # different layouts, different trip counts
    assert f._cache_size() == 1


def test_under_remat():
    """Inside jax.checkpoint saving only "context" (the decoder's minimal policy): o and lse saved."""
    policy = "context"
    seg = random_segments(8, 1, 64)
    q, k, v, ct = random_qkv(8, 1, 64, 2, 1, 16)
    pol = (jax.checkpoint_policies.nothing_saveable if policy == "nothing"
           else jax.checkpoint_policies.save_only_these_names("context"))
    f = jax.checkpoint(lambda q, k, v: jnp.tanh(BA.blocked_attention(q, k, v, seg, blocking=BA.Blocking(16, 4))),
                       policy=pol)
    g = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * ct), argnums=(0, 1, 2)))(q, k, v)
    r = jax.grad(lambda q, k, v: jnp.sum(jnp.tanh(A.dot_product_attention(q, k, v, A.bagel_mask(seg))) * ct),
                 argnums=(0, 1, 2))(q, k, v)
    for x, y in zip(g, r):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=FP32_ATOL)


def test_under_a_mesh_runs_in_shard_map():
    from sgt_jax.parallel.mesh import RULES, make_mesh

    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices")
    mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 2}, devices=jax.devices()[:4])
    batch_axes, head_axis = A.mesh_axes_from_rules(RULES)
    seg = random_segments(6, 4, 48)
    q, k, v, ct = random_qkv(6, 4, 48, 4, 2, 16)

    def loss(q, k, v, seg):
        return jnp.sum(BA.blocked_attention(q, k, v, seg, blocking=BA.Blocking(16, 4), batch_axes=batch_axes,
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
# the ViT

def test_vit_blocked_equals_dense():
    """SigLIP-NaViT over packed images + padding: vit.attention_impl blocked == dense (outputs and
    parameter / input gradients)."""
    from sgt_jax.models.siglip import SiglipNaViT, image_ids_from_lengths

    cfg = C.tiny()
    cfg.vit.attention_blocked_block, cfg.vit.attention_blocked_chunk = 16, 8
    lengths, total = [23, 1, 40, 17], 100
    ids = jnp.asarray(np.stack([image_ids_from_lengths(lengths, total),
                                image_ids_from_lengths([64, 30], total)]))
    rng = np.random.default_rng(0)
    patches = jnp.asarray(rng.normal(size=(2, total, 3 * cfg.vit.patch_size ** 2)), jnp.float32)
    pos = jnp.asarray(rng.integers(0, cfg.vit.max_patches_per_side ** 2, (2, total)), jnp.int32)
    ct = jnp.asarray(rng.normal(size=(2, total, cfg.vit.hidden_size)), jnp.float32)
    out = {}
    for impl in ("dense", "blocked"):
        cfg.vit.attention_impl = impl
        model = SiglipNaViT(cfg, rngs=nnx.Rngs(0))
        gdef, params = nnx.split(model)

        def loss(params, patches):
            return jnp.sum(nnx.merge(gdef, params)(patches, pos, ids) * ct)

        out[impl] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, patches)
    (vd, gd), (vb, gb) = out["dense"], out["blocked"]
    np.testing.assert_allclose(float(vb), float(vd), rtol=1e-5)
    for x, y in zip(jax.tree.leaves(gb), jax.tree.leaves(gd)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# dispatch and config

def test_auto_picks_flash_on_tpu_blocked_elsewhere():
    assert A.resolve_impl("auto", 128, "tpu") == "flash"
    assert A.resolve_impl("auto", 64, "tpu") == "dense"
    assert A.resolve_impl("auto", 128, "cpu") == "blocked"
    assert A.resolve_impl("auto", 128, "gpu") == "blocked"
    assert A.resolve_impl("dense", 128, "cpu") == "dense"
    assert A.resolve_vit_impl("auto", "tpu") == "dense"
    assert A.resolve_vit_impl("auto", "gpu") == "blocked"
    with pytest.raises(ValueError, match="vit.attention_impl"):
        A.resolve_vit_impl("flash")
    seg = random_segments(5, 1, 64)
    q, k, v, _ = random_qkv(5, 1, 64, 2, 1, 16)
    np.testing.assert_array_equal(np.asarray(A.attention(q, k, v, seg, "auto")),             # on CPU
                                  np.asarray(A.attention(q, k, v, seg, "blocked")))

    cfg = C.tiny()
    assert cfg.llm.attention_impl == "auto" and cfg.vit.attention_impl == "auto"
    assert BA.Blocking.from_config(cfg.llm) == BA.Blocking(16, 32)
    for bad in (dict(attention_blocked_block=0), dict(attention_blocked_chunk=-1)):
        c = C.tiny()
        c.llm.update(bad)
        with pytest.raises(ValueError, match="attention_blocked"):
            C.validate(c)
    c = C.tiny()
    c.vit.attention_impl = "flash"
    with pytest.raises(ValueError, match="vit.attention_impl"):
        C.validate(c)
    assert F.SKIP == 0          # the blocked path reads the kernel's block kinds
