"""BAGEL's packed attention mask from per-token vectors, and document isolation in the LLM."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sgt_jax.models import attention as A
from sgt_jax.models import config as C
from sgt_jax.models.qwen2_mot import Qwen2MoT

CAUSAL, FULL, NOISE = A.CAUSAL, A.FULL, A.NOISE


def seg(doc, split, mode, order=None):
    order = np.arange(len(doc)) if order is None else order
    return A.Segments(*(jnp.asarray(np.asarray(v, np.int32))[None] for v in (doc, split, mode, order)))


def test_hand_built_layout():
    # doc 0: text [0,1] causal, noised image [2,3], text [4] after it; doc 1: image [5,6] full, text [7]
    s = seg(doc=[0, 0, 0, 0, 0, 1, 1, 1], split=[0, 0, 1, 1, 2, 3, 3, 4],
            mode=[CAUSAL, CAUSAL, NOISE, NOISE, CAUSAL, FULL, FULL, CAUSAL])
    want = np.array([
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],   # noise split: everything before + itself, bidirectional
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0, 0],   # later text never sees the noised latents
        [0, 0, 0, 0, 0, 1, 1, 0],   # no attention across documents; full split is bidirectional
        [0, 0, 0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1, 1, 1],
    ], bool)
    np.testing.assert_array_equal(np.asarray(A.bagel_mask(s)[0]), want)


def test_two_noise_splits_do_not_see_each_other_and_clean_copy_is_visible():
    # noised image [1,2], clean copy [3,4] (full), a second noised image [5,6]
    s = seg(doc=[0] * 7, split=[0, 1, 1, 2, 2, 3, 3], mode=[CAUSAL, NOISE, NOISE, FULL, FULL, NOISE, NOISE])
    m = np.asarray(A.bagel_mask(s)[0])
    assert not m[5:, 1:3].any() and not m[1:3, 5:].any()
    assert m[5:, 3:5].all() and m[3:5, 3:5].all() and not m[3:5, 1:3].any()
    assert m[:, 0].all()


def test_mask_follows_order_not_physical_position():
    doc, split, mode = [0, 0, 0, 0, 0], [0, 0, 1, 1, 2], [CAUSAL, CAUSAL, FULL, FULL, CAUSAL]
    base = np.asarray(A.bagel_mask(seg(doc, split, mode))[0])
    perm = np.array([3, 0, 4, 2, 1])
    s = seg(doc, split, mode).permute(jnp.asarray(perm)[None])
    np.testing.assert_array_equal(np.asarray(A.bagel_mask(s)[0]), base[np.ix_(perm, perm)])


def test_gqa_head_mapping_and_empty_rows():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, 4, 6, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 4, 2, 8)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(1, 4, 2, 8)), jnp.float32)
    mask = jnp.asarray(np.tril(np.ones((4, 4), bool)))[None]
    out = np.asarray(A.dot_product_attention(q, k, v, mask))
    for h in range(6):   # query head h uses kv head h // 3
        kv = h // 3
        s = np.einsum("qd,kd->qk", np.asarray(q[0, :, h]), np.asarray(k[0, :, kv])) / np.sqrt(8)
        s = np.where(np.tril(np.ones((4, 4))), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        np.testing.assert_allclose(out[0, :, h], p @ np.asarray(v[0, :, kv]), atol=1e-5)


def _doc(rng, n_text, n_img, noise):
    """One document: causal text, an image split (gen tokens), a trailing causal text."""
    mode = [CAUSAL] * n_text + [NOISE if noise else FULL] * n_img + [CAUSAL] * 3
    split = [0] * n_text + [1] * n_img + [2] * 3
    expert = [0] * n_text + [1] * n_img + [0] * 3
    pos = list(range(n_text)) + [n_text] * n_img + [n_text + (0 if noise else 1) + i for i in range(3)]
    return dict(mode=mode, split=split, expert=expert, pos=pos, n=len(mode))


def _row(docs, length, num_gen):
    doc, split, mode, expert, pos = [], [], [], [], []
    s0 = 0
    for i, d in enumerate(docs):
        doc += [i] * d["n"]
        split += [s0 + s for s in d["split"]]
        s0 += max(d["split"]) + 1
        mode += d["mode"]
        expert += d["expert"]
        pos += d["pos"]
    pad = length - len(doc)
    short_gen = num_gen - sum(expert)
    doc += [len(docs)] * pad
    split += [s0] * pad
    mode += [CAUSAL] * pad
    pos += [0] * pad
    expert += [1] * short_gen + [0] * (pad - short_gen)   # padding fills the gen quota
    return [np.asarray(v, np.int32) for v in (doc, split, mode, expert, pos)]


def test_row_with_two_documents_equals_each_document_alone():
    cfg = C.tiny()
    model = Qwen2MoT(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    d1, d2 = _doc(rng, 5, 6, True), _doc(rng, 4, 4, False)
    length, num_gen = 32, 10
    x_all = jax.random.normal(jax.random.key(0), (1, length, cfg.llm.hidden_size))

    def run(docs, x_rows):
        doc, split, mode, expert, pos = _row(docs, length, num_gen)
        s = seg(doc, split, mode)
        return np.asarray(model(x_rows, jnp.asarray(pos)[None], s, jnp.asarray(expert)[None], num_gen))[0]

    both = run([d1, d2], x_all)
    n1, n2 = d1["n"], d2["n"]
    alone1 = run([d1], x_all)
    x2 = jnp.concatenate([x_all[:, n1:n1 + n2], x_all[:, :length - n2]], axis=1)
    alone2 = run([d2], x2)
    np.testing.assert_allclose(both[:n1], alone1[:n1], atol=2e-5)
    np.testing.assert_allclose(both[n1:n1 + n2], alone2[:n2], atol=2e-5)
