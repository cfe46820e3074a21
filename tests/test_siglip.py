"""SigLIP-NaViT: BAGEL golden fixture, independent HF reference, scan/remat equivalence, key table."""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sgt_jax.convert import keymap
from sgt_jax.models import siglip
from sgt_jax.models.config import tiny

from golden import GOLDEN  # noqa: E402  (the shipped golden fixtures)
TOL = 1e-5


def _need_golden():
    if not (GOLDEN / "model.safetensors").exists():
        pytest.fail(f"golden fixture not found at {GOLDEN} (SGT_GOLDEN_DIR)")


def _load(name: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    return load_file(str(GOLDEN / name))


def _golden_model(cfg=None) -> siglip.SiglipNaViT:
    model = siglip.SiglipNaViT(cfg or tiny(), rngs=nnx.Rngs(0))
    keymap.load_vit(model, _load("model.safetensors"))
    return model


@nnx.jit
def _forward(model, patches, pos, ids):
    return model(patches, pos, ids)


def _run(model, patches, pos, ids):
    """One packed row through the model (jitted)."""
    return np.asarray(_forward(model, jnp.asarray(patches)[None], jnp.asarray(pos, jnp.int32)[None],
                               jnp.asarray(ids, jnp.int32)[None])[0])


def test_patchify_and_position_ids_match_bagel():
    _need_golden()
    d = _load("vit_single.safetensors")
    img_hwc = d["pixel_values"].transpose(1, 2, 0)
    np.testing.assert_array_equal(siglip.patchify(img_hwc, 14), d["packed_pixel_values"])
    h, w = img_hwc.shape[0] // 14, img_hwc.shape[1] // 14
    np.testing.assert_array_equal(siglip.position_ids(h, w, tiny().vit.max_patches_per_side),
                                  d["packed_flattened_position_ids"])


def test_golden_single_image_with_padding():
    _need_golden()
    d = _load("vit_single.safetensors")
    model = _golden_model()
    n = d["packed_pixel_values"].shape[0]
    pad = 5
    rng = np.random.default_rng(0)
    patches = np.concatenate([d["packed_pixel_values"], rng.normal(size=(pad, 588)).astype(np.float32)])
    pos = np.concatenate([d["packed_flattened_position_ids"], rng.integers(0, 10 ** 6, pad)]).astype(np.int32)
    ids = np.concatenate([np.zeros(n, np.int32), -np.ones(pad, np.int32)])
    out = _run(model, patches, pos, ids)
    err = np.abs(out[:n] - d["vit_output"]).max()
    print(f"golden vit_output max abs err {err:.3e}")
    assert err <= TOL
    assert np.all(out[n:] == 0)
    unpadded = _run(model, d["packed_pixel_values"], d["packed_flattened_position_ids"], np.zeros(n, np.int32))
    assert np.abs(unpadded - out[:n]).max() <= 1e-6


def test_golden_batch_images_are_independent():
    _need_golden()
    b = _load("batch.safetensors")
    model = _golden_model()
    tokens, pos, lens = b["packed_vit_tokens"], b["packed_vit_position_ids"], b["vit_token_seqlens"]
    ids = siglip.image_ids_from_lengths(lens, total=len(tokens) + 3)
    patches = np.concatenate([tokens, np.ones((3, tokens.shape[1]), np.float32)])
    pos_p = np.concatenate([pos, np.zeros(3, pos.dtype)])
    packed = _run(model, patches, pos_p, ids)
    start, worst = 0, 0.0
    for n in lens:
        alone = _run(model, tokens[start:start + n], pos[start:start + n], np.zeros(n, np.int32))
        worst = max(worst, float(np.abs(alone - packed[start:start + n]).max()))
        start += n
    print(f"packed vs per-image max abs err {worst:.3e}")
    assert worst <= TOL


def test_matches_hf_siglip_vision_model():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hcfg = transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=56, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
        vision_use_head=False)
    hcfg._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = transformers.SiglipVisionModel(hcfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.ndim == 1 else 0.2))
            if name.endswith("layer_norm1.weight") or name.endswith("layer_norm2.weight"):
                p.add_(1.0)
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items() if "position_ids" not in k}
    # transformers 5 drops the `vision_model.` level; on-disk HF checkpoints have it.
    sd = {(k if k.startswith(siglip.HF_VIT_PREFIX) else siglip.HF_VIT_PREFIX + k): v for k, v in sd.items()}
    key = siglip.HF_VIT_PREFIX + "embeddings.patch_embedding.weight"
    assert sd[key].shape == (32, 3, 14, 14)
    conv = sd[key]
    sd[key] = siglip.conv_patch_weight_to_linear(conv)
    np.testing.assert_array_equal(siglip.linear_patch_weight_to_conv(sd[key], 14), conv)

    cfg = tiny()
    cfg.vit.update(dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                        patch_size=14, max_patches_per_side=4))
    model = siglip.SiglipNaViT(cfg, rngs=nnx.Rngs(1))
    keymap.load_vit(model, sd, prefix=siglip.HF_VIT_PREFIX)

    img = np.random.default_rng(0).uniform(-1, 1, (3, 56, 56)).astype(np.float32)
    with torch.no_grad():
        ref = hf(pixel_values=torch.from_numpy(img)[None]).last_hidden_state[0].numpy()
    patches = siglip.patchify(img.transpose(1, 2, 0), 14)
    out = _run(model, patches, siglip.position_ids(4, 4, 4), np.zeros(16, np.int32))
    err = np.abs(out - ref).max()
    print(f"HF SiglipVisionModel max abs err {err:.3e}")
    assert err <= TOL


def _random_inputs(cfg, seed=0):
    rng = np.random.default_rng(seed)
    lens = [6, 4, 3]
    ids = siglip.image_ids_from_lengths(lens, total=16)
    patches = rng.normal(size=(2, 16, 3 * cfg.vit.patch_size ** 2)).astype(np.float32)
    pos = np.concatenate([siglip.position_ids(2, 3, 8), siglip.position_ids(2, 2, 8),
                          siglip.position_ids(1, 3, 8), np.zeros(3, np.int32)])
    ids2 = np.stack([ids, siglip.image_ids_from_lengths([16])])
    pos2 = np.stack([pos, np.arange(16, dtype=np.int32)])
    return jnp.asarray(patches), jnp.asarray(pos2), jnp.asarray(ids2)


def _model_with(**vit_kw):
    cfg = tiny()
    cfg.vit.update(vit_kw)
    return siglip.SiglipNaViT(cfg, rngs=nnx.Rngs(3))


def test_scan_loop_and_remat_equivalence():
    cfg = tiny()
    inputs = _random_inputs(cfg)
    base = _model_with()
    loop = _model_with(scan_layers=False)
    full = _model_with(remat_policy="full")
    for m, has_scan, has_remat in ((base, True, False), (loop, False, False), (full, True, True)):
        gd, st = nnx.split(m)
        jaxpr = str(jax.make_jaxpr(lambda s: nnx.merge(gd, s)(*inputs))(st))
        assert ("scan[" in jaxpr) == has_scan and ("remat" in jaxpr) == has_remat
    state = nnx.state(base)
    for m in (loop, full):
        nnx.update(m, state)
    ref = _forward(base, *inputs)
    for m in (loop, full):
        np.testing.assert_allclose(np.asarray(_forward(m, *inputs)), np.asarray(ref), atol=1e-6, rtol=0)

    @nnx.jit
    def grads(m):
        return nnx.value_and_grad(lambda m: jnp.sum(jnp.sin(m(*inputs))))(m)

    l_ref, g_ref = grads(base)
    for m in (full,):  # each grad program costs ~2 s of XLA:CPU compile; forward covers the rest
        l, g = grads(m)
        np.testing.assert_allclose(float(l), float(l_ref), rtol=1e-6)
        for (p, a), (_, b) in zip(nnx.to_flat_state(g_ref), nnx.to_flat_state(g)):
            np.testing.assert_allclose(np.asarray(b[...]), np.asarray(a[...]), atol=1e-5, rtol=1e-5,
                                       err_msg=str(p))


def test_every_config_remat_policy_is_accepted():
    from sgt_jax.models.config import REMAT_POLICIES
    from sgt_jax.models.layers import remat
    for policy in REMAT_POLICIES:
        f = remat(lambda x: jnp.tanh(x) * 2.0, policy)
        assert float(jax.grad(lambda x: f(x))(0.0)) == 2.0
    with pytest.raises(ValueError, match="remat_policy"):
        _model_with(remat_policy="bogus")


def test_param_logical_names():
    model = _model_with()
    names = {tuple(map(str, p)): v.get_metadata()["out_sharding"]
             for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert names[("layers", "q_proj", "kernel")] == ("layers", "embed", "heads")
    assert names[("layers", "out_proj", "kernel")] == ("layers", "heads", "embed")
    assert names[("layers", "fc1", "kernel")] == ("layers", "embed", "mlp")
    assert names[("position_embedding",)] == ("vit_pos", "embed")
    assert all(n[0] == "layers" for p, n in names.items() if p[0] == "layers")


def test_export_roundtrip_and_load_errors():
    _need_golden()
    full = _load("model.safetensors")
    vit = {k: v for k, v in full.items() if k.startswith(siglip.BAGEL_VIT_PREFIX)}
    model = _golden_model()
    exported = keymap.export_vit(model)
    assert set(exported) == set(vit)
    for k, v in vit.items():
        assert exported[k].dtype == v.dtype and exported[k].shape == v.shape, k
        np.testing.assert_array_equal(exported[k], v, err_msg=k)
    assert len(siglip.torch_key_table(tiny())) == len(vit)

    bad = dict(vit)
    del bad["vit_model.vision_model.encoder.layers.1.mlp.fc2.bias"]
    bad["vit_model.vision_model.encoder.layers.2.mlp.fc2.bias"] = np.zeros(32, np.float32)
    bad["vit_model.vision_model.encoder.layers.0.self_attn.q_proj.weight"] = np.zeros((32, 16), np.float32)
    fresh = siglip.SiglipNaViT(tiny(), rngs=nnx.Rngs(0))
    before = keymap.export_vit(fresh)
    with pytest.raises(ValueError) as e:
        keymap.load_vit(fresh, bad)
    msg = str(e.value)
    assert "missing" in msg and "encoder.layers.1.mlp.fc2.bias" in msg
    assert "unexpected" in msg and "encoder.layers.2.mlp.fc2.bias" in msg
    assert "mis-shaped" in msg and "layers.0.self_attn.q_proj.weight" in msg
    after = keymap.export_vit(fresh)
    assert all(np.array_equal(before[k], after[k]) for k in before)  # nothing written on error
