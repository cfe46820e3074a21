"""Inference against BAGEL's own inference code (fixture inference_v1, made by
scripts/make_inference_golden.py on the tiny_v1 weights): KV cache after prefill, greedy logits,
the stopping rule, Euler trajectories with text + image CFG for each renorm type, T2I against
the empty context, SGT's segmentation context, decoded images."""
import json

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from sgt_jax.infer.context import Image, Text
from sgt_jax.infer.engine import Engine
from sgt_jax.infer.image import FlowConfig, schedule
from sgt_jax.convert import check_golden as G
from sgt_jax.convert.keymap import load_vae
from sgt_jax.models.vae import AutoEncoder

pytestmark = pytest.mark.golden
TOL = 1e-5
IMAGE_CASES = ("edit_global", "edit_channel", "edit_text_channel", "t2i", "segment")


@pytest.fixture(scope="module")
def golden(golden_dir):
    d = golden_dir.parent / "inference_v1"
    meta = json.loads((d / "meta.json").read_text())
    fx = G.load_fixture(str(golden_dir))
    cfg = G.config_from_meta(fx["meta"])
    model = G.build_model(cfg, fx["model"])
    ae = AutoEncoder(cfg, rngs=nnx.Rngs(0))
    load_vae(ae, fx["ae"])
    return meta, load_file(str(d / "inference.safetensors")), Engine.from_model(model, ae)


def vit_image(patches, pos, p, side):
    """Inverse of data_utils.patchify: the image whose patches BAGEL's ViT received."""
    r, c = pos // side, pos % side
    hp, wp = r.max() + 1, c.max() + 1
    return patches.reshape(hp, wp, p, p, 3).transpose(0, 2, 1, 3, 4).reshape(hp * p, wp * p, 3)


def contexts(meta, t, case):
    """The case's contexts (gen, cfg_text, cfg_img) as Text / Image items, from its recorded blocks."""
    cfg = meta["config"]
    items = []
    for b in case["blocks"]:
        if b["type"] == "text":
            items.append(Text(b["ids"][1:-1]))
        elif b["type"] == "vit":
            img = vit_image(t[b["tensor"]], np.asarray(b["packed_vit_position_ids"]), cfg["vit"]["patch_size"],
                            cfg["bagel"]["vit_max_num_patch_per_side"])
            items.append(Image(img, vae=False, vit=True))
        else:
            items.append(Image(t[b["tensor"]].transpose(1, 2, 0), vae=True, vit=False,
                               eps=t[b["eps"]].transpose(1, 2, 0)))
    return [[items[i] for i in case["contexts"][c]] for c in ("gen", "cfg_text", "cfg_img") if c in case["contexts"]]


def err(a, b):
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


def vqa_cache(golden):
    meta, t, eng = golden
    case = meta["cases"]["vqa"]
    (gen,) = contexts(meta, t, case)
    return eng.prefill(eng.new_cache(1, 64), eng.pack([gen])), case


def test_vqa_prefill_and_greedy_decoding(golden):
    meta, t, eng = golden
    cache, case = vqa_cache(golden)
    n = case["kv_len_at_decode"]
    assert int(cache.length[0]) == n and int(cache.rope[0]) == case["rope_at_decode"]
    assert err(cache.k[:, 0, :n], t["vqa.cache_k"]) < TOL and err(cache.v[:, 0, :n], t["vqa.cache_v"]) < TOL
    cache, out = eng.generate_text(cache, eng.keys([0]), max_new_tokens=case["steps"], return_logits=True)
    assert err(out["logits"][0], t["vqa.logits"]) < TOL
    # BAGEL returns [<|im_start|>, t1 .. t9]: the token of its last step is not kept
    got = np.asarray(out["tokens"][0])
    np.testing.assert_array_equal(got[:case["steps"] - 1], t["vqa.tokens"][1:])
    assert not bool(out["stopped"][0]) and int(out["num_tokens"][0]) == case["steps"]
    assert int(cache.length[0]) == n + case["steps"]


def test_stop_token_ends_the_answer_like_bagel(golden):
    meta, t, eng = golden
    cache, _ = vqa_cache(golden)
    case = meta["cases"]["vqa_stop"]
    cache, out = eng.generate_text(cache, eng.keys([0]), max_new_tokens=10, stop_token=case["end_token_id"],
                                   return_logits=True)
    assert int(out["steps"]) == case["steps"]
    assert err(out["logits"][0, :case["steps"]], t["vqa_stop.logits"]) < TOL
    k = int(out["num_tokens"][0])
    assert bool(out["stopped"][0]) and list(np.asarray(out["tokens"][0, :k])) == case["generated_with_start_token"][1:]
    assert np.all(np.asarray(out["logprobs"][0, case["steps"]:]) == 0)


def test_schedule_is_bagels():
    meta_t = np.asarray([1.0, 0.9230769872665405, 0.8181818127632141, 0.6666666865348816, 0.4285714626312256],
                        np.float32)
    ts, dts = schedule(6, 3.0)
    np.testing.assert_array_equal(ts, meta_t)
    np.testing.assert_allclose(ts - dts, np.append(meta_t[1:], 0.0), atol=0)


@pytest.mark.parametrize("name", IMAGE_CASES)
def test_flow_trajectory_with_cfg(golden, name):
    meta, t, eng = golden
    case = meta["cases"][name]
    s = case["settings"]
    flow = FlowConfig(num_timesteps=s["num_timesteps"], timestep_shift=s["timestep_shift"],
                      cfg_text_scale=s["cfg_text_scale"], cfg_img_scale=s["cfg_img_scale"],
                      cfg_interval=tuple(s["cfg_interval"]), cfg_renorm_type=s["cfg_renorm_type"],
                      cfg_renorm_min=s["cfg_renorm_min"])
    ctxs = contexts(meta, t, case)[:flow.num_contexts]
    cache = eng.prefill(eng.new_cache(len(ctxs), 64), eng.pack(ctxs))
    kv = case["context_kv_len_and_rope"]
    names = ("gen", "cfg_text", "cfg_img")[:flow.num_contexts]
    assert [int(x) for x in cache.length] == [kv[c]["kv_len"] for c in names]
    assert [int(x) for x in cache.rope] == [kv[c]["rope"] for c in names]
    H, W = case["image_shape"]
    h, w = H // 16, W // 16
    ts, _ = schedule(flow.num_timesteps, flow.timestep_shift)
    np.testing.assert_array_equal(ts, t[f"{name}.t"])
    lat, tr = eng.sample_latents(cache, h, w, flow, init_noise=t[f"{name}.init_noise"][None], return_trajectory=True)
    on = np.asarray(case["cfg_text_scale_applied"]) > 1       # steps where BAGEL ran the CFG passes
    assert on.any() and not on.all()
    assert err(tr["x_t"][:, 0], t[f"{name}.x_t"]) < TOL
    assert err(tr["v_ctx"][:, 0, 0], t[f"{name}.v_cond"]) < TOL
    assert err(tr["v_ctx"][on, 1, 0], t[f"{name}.v_text_uncond"][on]) < TOL
    if flow.num_contexts == 3:
        assert err(tr["v_ctx"][on, 2, 0], t[f"{name}.v_img_uncond"][on]) < TOL
    assert err(tr["v"][:, 0], t[f"{name}.v"]) < TOL
    assert err(lat[0], t[f"{name}.latent"]) < TOL
    floats, u8 = eng.decode_latents(lat, h, w)
    assert err(floats[0].transpose(2, 0, 1), t[f"{name}.decoded"]) < TOL
    d = np.abs(np.asarray(u8[0], np.int32) - t[f"{name}.image_uint8"].astype(np.int32))
    assert d.max() <= 1 and (d > 0).mean() < 0.01


def test_cfg_matters_in_the_fixture(golden):
    """The fixture can tell the renorm types apart (else the CFG tests would be vacuous)."""
    _, t, _ = golden
    assert err(t["edit_global.v"], t["edit_channel.v"]) > 1e-3
    assert err(t["edit_global.v"], t["edit_text_channel.v"]) > 1e-3
    assert err(t["edit_global.v"], t["edit_global.v_cond"]) > 1e-2
