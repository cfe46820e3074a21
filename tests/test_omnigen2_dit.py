"""OmniGen2 DiT parity against the unmodified PyTorch ``OmniGen2Transformer2DModel`` (fixture
tests/fixtures/omnigen2_golden/dit_tiny.*, written by scripts/make_omnigen2_golden.py): velocity
for two batches of differently sized latents (with reference images in one sample, none in the
other; a batch without any reference image), gradients w.r.t. every parameter."""
from __future__ import annotations

import ast
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from sgt_jax.convert import omnigen2_keymap
from sgt_jax.models import omnigen2_config, omnigen2_dit

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "omnigen2_golden")
SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "make_omnigen2_golden.py")
# static shapes of the test: text, reference and noisy-image token slots per row
LT, LR, LN = 8, 32, 32


@pytest.fixture(scope="module")
def golden():
    g = dict(np.load(os.path.join(FIX, "dit_tiny.npz")))
    return g, load_file(os.path.join(FIX, "dit_tiny.safetensors"))


def rows(g, cfg):
    """Both fixture batches as ONE static batch of 4 rows (the second batch's rows simply have no
    reference tokens): -> timesteps (4,), layout arrays, [(batch, index, sample)]."""
    samples, ts, keys = [], [], []
    for b in (0, 1):
        text, mask = g[f"b{b}_text"], g[f"b{b}_mask"]
        for i in range(len(text)):
            refs = []
            while f"b{b}_ref{i}_{len(refs)}" in g:
                refs.append(g[f"b{b}_ref{i}_{len(refs)}"])
            samples.append(dict(text=text[i][mask[i]], latent=g[f"b{b}_latent{i}"], refs=refs))
            ts.append(g[f"b{b}_t"][i])
            keys.append((b, i))
    lay = omnigen2_dit.layout(samples, cfg, LT, LR, LN)
    return np.asarray(ts, np.float32), lay, list(zip(keys, samples))


def model_from(state):
    cfg = omnigen2_config.dit_tiny()
    return omnigen2_keymap.load_dit(omnigen2_dit.OmniGen2DiT(cfg, rngs=nnx.Rngs(0)), state)


ARGS = ("text", "text_valid", "ref_tokens", "ref_ids", "x_tokens", "x_valid", "positions")


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def test_generator_config_is_dit_tiny():
    tree = ast.parse(open(SCRIPT).read())
    cfg_src = next(n.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "CFG")
    gen = ast.literal_eval(cfg_src)
    cfg = omnigen2_config.dit_tiny()
    names = dict(num_attention_heads="num_heads")
    for k, v in gen.items():
        assert tuple(cfg[names.get(k, k)]) == tuple(v) if isinstance(v, tuple) else cfg[names.get(k, k)] == v, k


@pytest.fixture(scope="module")
def ran(golden):
    """One compiled program for both checks: velocity (aux) and the gradient of sum(v * w)."""
    g, state = golden
    cfg = omnigen2_config.dit_tiny()
    model = model_from(state)
    t, lay, items = rows(g, cfg)
    w = np.zeros(lay["x_tokens"].shape, np.float32)
    for r, ((b, i), s) in enumerate(items):
        tok = omnigen2_dit.patchify_latent(g[f"b{b}_w{i}"], cfg.patch_size)
        w[r, :len(tok)] = tok
    args = [jnp.asarray(lay[k]) for k in ARGS]

    def loss_fn(m):
        v = m(jnp.asarray(t), *args)
        return jnp.sum(v * jnp.asarray(w)), v

    (loss, v), grads = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))(model)
    return dict(cfg=cfg, items=items, v=np.asarray(v), loss=float(loss), grads=grads)


def test_velocity_parity(golden, ran):
    g, _ = golden
    cfg = ran["cfg"]
    errs = {}
    for r, ((b, i), s) in enumerate(ran["items"]):
        c, h, w = s["latent"].shape
        got = omnigen2_dit.unpatchify_latent(ran["v"][r], h, w, cfg.patch_size, cfg.out_channels)
        errs[f"b{b}s{i}"] = rel(got, g[f"b{b}_out{i}"])
    print(errs)
    assert max(errs.values()) <= 1e-5, errs


def test_gradient_parity(golden, ran):
    g, _ = golden
    assert abs(ran["loss"] - float(g["loss"])) <= 1e-5 * abs(float(g["loss"]))
    gm = omnigen2_dit.OmniGen2DiT(ran["cfg"], rngs=nnx.Rngs(0))
    nnx.update(gm, ran["grads"])
    ours = omnigen2_keymap.export_dit(gm)
    want = {k[len("grad/"):]: v for k, v in g.items() if k.startswith("grad/")}
    assert set(ours) == set(want)
    errs = sorted(((rel(ours[k], want[k]), k) for k in ours), reverse=True)
    print(errs[:3])
    assert errs[0][0] <= 1e-4, errs[:3]


def test_export_round_trip_is_bit_exact_and_refusals(golden):
    _, state = golden
    model = model_from(state)
    out = omnigen2_keymap.export_dit(model)
    assert set(out) == set(state)
    for k in state:
        np.testing.assert_array_equal(out[k], state[k], err_msg=k)
    bad = dict(state)
    del bad["layers.1.attn.norm_k.weight"]
    bad["noise_refiner.0.norm1.linear.weight"] = bad["noise_refiner.0.norm1.linear.weight"][:4]
    with pytest.raises(ValueError) as e:
        model_from(bad)
    assert "1 missing keys: layers.1.attn.norm_k.weight" in str(e.value)
    assert "noise_refiner.0.norm1.linear.weight: file (4, 48), config expects (192, 48)" in str(e.value)


def test_layout_positions_follow_the_original_rules():
    cfg = omnigen2_config.dit_tiny()
    s = dict(text=np.zeros((3, cfg.text_feat_dim)), latent=np.zeros((4, 4, 6)),
             refs=[np.zeros((4, 2, 4)), np.zeros((4, 6, 2))])
    lay = omnigen2_dit.layout([s], cfg, 4, 12, 8)
    pos = lay["positions"][0]
    np.testing.assert_array_equal(pos[:3], [[0, 0, 0], [1, 1, 1], [2, 2, 2]])
    # ref 0: 1x2 tokens at shift 3; ref 1: 3x1 tokens at shift 3 + max(1, 2) = 5
    np.testing.assert_array_equal(pos[4:6], [[3, 0, 0], [3, 0, 1]])
    np.testing.assert_array_equal(pos[6:9], [[5, 0, 0], [5, 1, 0], [5, 2, 0]])
    # noisy image: 2x3 tokens at shift 5 + max(3, 1) = 8
    np.testing.assert_array_equal(pos[16:22, 0], [8] * 6)
    np.testing.assert_array_equal(pos[16:22, 1:], [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]])
    with pytest.raises(ValueError, match="do not fit"):
        omnigen2_dit.layout([s], cfg, 2, 12, 8)
    bad = omnigen2_config.dit_tiny()
    bad.axes_dim_rope = (4, 4, 2)
    with pytest.raises(ValueError, match="axes_dim_rope"):
        omnigen2_config.validate_dit(bad)


def test_real_config_parameter_count():
    """3,967,161,400: the unmodified OmniGen2Transformer2DModel built on the meta device with the
    config of omnigen2_config.dit_omnigen2() (command in docs/omnigen2.md)."""
    st = nnx.state(nnx.eval_shape(lambda: omnigen2_dit.OmniGen2DiT(omnigen2_config.dit_omnigen2(),
                                                                   rngs=nnx.Rngs(0))), nnx.Param)
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(st)) == 3_967_161_400
