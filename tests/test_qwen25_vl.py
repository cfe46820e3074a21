"""Qwen2.5-VL parity against transformers' PyTorch ``Qwen2_5_VLForConditionalGeneration`` (run
live on CPU in fp32 with a tiny random config): vision tower output, last hidden states and
logits for interleaved image + text (two samples, three images of different sizes, packed into
one row here and run one by one there), gradients of a loss w.r.t. every parameter; M-RoPE
positions against ``get_rope_index``; preprocessing against the HF image processor."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from sgt_jax.convert import omnigen2_keymap  # noqa: E402
from sgt_jax.models import omnigen2_config, qwen25_vl  # noqa: E402

VS, VE = 152, 153
# (height, width) in pixels of the images of sample A (two) and sample B (one)
SIZES_A = [(84, 168), (56, 56)]
SIZES_B = [(112, 84)]


def hf_config(cfg):
    from transformers import Qwen2_5_VLConfig

    c, v = cfg.llm, cfg.vision
    hc = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                         intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
                         num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                         rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=c.tie_word_embeddings,
                         rope_parameters=dict(rope_type="default", rope_theta=c.rope_theta,
                                              mrope_section=list(c.mrope_section)),
                         max_position_embeddings=512),
        vision_config=dict(depth=v.depth, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                           num_heads=v.num_heads, out_hidden_size=v.out_hidden_size, in_channels=v.in_channels,
                           patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
                           spatial_merge_size=v.spatial_merge_size, window_size=v.window_size,
                           fullatt_block_indexes=list(v.fullatt_block_indexes), hidden_act="silu"),
        image_token_id=c.image_token_id, vision_start_token_id=VS, vision_end_token_id=VE,
        video_token_id=154, bos_token_id=None, eos_token_id=None,
        tie_word_embeddings=c.tie_word_embeddings)
    hc._attn_implementation = "eager"
    hc.text_config._attn_implementation = "eager"
    hc.vision_config._attn_implementation = "eager"
    return hc


def sample_ids(rng, cfg, sizes):
    m, p = cfg.vision.spatial_merge_size, cfg.vision.patch_size
    ids = list(rng.integers(0, 150, 3))
    for h, w in sizes:
        ids += [VS] + [cfg.llm.image_token_id] * ((h // p // m) * (w // p // m)) + [VE]
        ids += list(rng.integers(0, 150, 2))
    return np.asarray(ids, np.int64)


@pytest.fixture(scope="module")
def golden():
    """Run the PyTorch original on samples A and B; keep its weights, inputs and outputs."""
    cfg = omnigen2_config.qwen25_vl_tiny()
    torch.manual_seed(0)
    model = transformers.Qwen2_5_VLForConditionalGeneration(hf_config(cfg)).float().eval()
    with torch.no_grad():  # perturb everything (norm scales and biases included) away from init
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rng = np.random.default_rng(0)
    feat = cfg.vision.in_channels * cfg.vision.temporal_patch_size * cfg.vision.patch_size ** 2
    out = dict(cfg=cfg, samples=[], state={k: v.detach().numpy().copy() for k, v in model.state_dict().items()})
    model.zero_grad()
    total = 0.0
    for sizes in (SIZES_A, SIZES_B):
        grids = [(1, h // cfg.vision.patch_size, w // cfg.vision.patch_size) for h, w in sizes]
        pix = [rng.standard_normal((g[1] * g[2], feat)).astype(np.float32) for g in grids]
        ids = sample_ids(rng, cfg, sizes)
        labels = rng.integers(0, cfg.llm.vocab_size, len(ids))
        proj = rng.standard_normal((len(ids), cfg.llm.hidden_size)).astype(np.float32)
        ids_t = torch.tensor(ids)[None]
        res = model(input_ids=ids_t, pixel_values=torch.tensor(np.concatenate(pix)),
                    image_grid_thw=torch.tensor(grids), mm_token_type_ids=(ids_t == cfg.llm.image_token_id).int(),
                    output_hidden_states=True, return_dict=True)
        h = res.hidden_states[-1][0]
        loss = (torch.nn.functional.cross_entropy(res.logits[0], torch.tensor(labels), reduction="sum")
                + (h * torch.tensor(proj)).sum())
        loss.backward()
        total += loss.item()
        with torch.no_grad():
            vis = model.model.visual(torch.tensor(np.concatenate(pix)), grid_thw=torch.tensor(grids)).pooler_output
            pos, _ = model.model.get_rope_index(ids_t, (ids_t == cfg.llm.image_token_id).int(), torch.tensor(grids))
        out["samples"].append(dict(grids=grids, pix=pix, ids=ids, labels=labels, proj=proj,
                                   logits=res.logits[0].detach().numpy(), hidden=h.detach().numpy(),
                                   vision=vis.numpy(), positions=pos[:, 0].numpy()))
    out["loss"] = total
    out["grads"] = {omnigen2_keymap.released_name(k): p.grad.numpy().copy()
                    for k, p in model.named_parameters()}
    return out


def packed_inputs(cfg, samples, num_patches=144, length=64):
    """Both samples in ONE packed text row, their images in ONE packed vision row."""
    unit = cfg.vision.spatial_merge_size ** 2
    vision = qwen25_vl.pack_vision([[(p, g) for s in samples for p, g in zip(s["pix"], s["grids"])]],
                                   cfg.vision, num_patches)
    first_a = 0
    first_b = sum(len(p) for p in samples[0]["pix"]) // unit
    text = qwen25_vl.pack_text([[(s["ids"], s["grids"]) for s in samples]], cfg, length,
                               vision_offsets=[[first_a, first_b]])
    return vision, text


def jax_model(golden):
    model = qwen25_vl.Qwen25VL(golden["cfg"], rngs=nnx.Rngs(0))
    return omnigen2_keymap.load_qwen25_vl(model, golden["state"])


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def test_rope_index_matches_get_rope_index(golden):
    cfg = golden["cfg"]
    for s in golden["samples"]:
        np.testing.assert_array_equal(qwen25_vl.rope_index(s["ids"], s["grids"], cfg), s["positions"])


@pytest.fixture(scope="module")
def ran(golden):
    """One compiled program for the forward and gradient checks: the loss of the golden run (CE of
    the logits against random labels + a random projection of the last hidden states, summed over
    both samples) with (vision tokens, hidden states, logits) as aux, and its gradient."""
    cfg = golden["cfg"]
    model = jax_model(golden)
    vision, text = packed_inputs(cfg, golden["samples"])
    labels = np.zeros(text["input_ids"].shape, np.int32)
    proj = np.zeros(text["input_ids"].shape + (cfg.llm.hidden_size,), np.float32)
    at = 0
    for s in golden["samples"]:
        n = len(s["ids"])
        labels[0, at:at + n], proj[0, at:at + n] = s["labels"], s["proj"]
        at += n
    weight = jnp.asarray((text["doc"] >= 0).astype(np.float32))
    vision, text = jax.tree.map(jnp.asarray, vision), jax.tree.map(jnp.asarray, text)

    def loss_fn(m):
        v = m.visual(vision["patches"], vision["pos_hw"], vision["image_ids"], vision["window_ids"])
        h = m(vision, text)
        logits = m.logits(h)
        ce = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, jnp.asarray(labels)[..., None], -1)[..., 0]
        return jnp.sum(ce * weight) + jnp.sum(h * jnp.asarray(proj)), (v, h, logits)

    (loss, (v, h, logits)), grads = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))(model)
    return dict(loss=float(loss), v=np.asarray(v), h=np.asarray(h), logits=np.asarray(logits), grads=grads)


def test_forward_parity(golden, ran):
    cfg = golden["cfg"]
    v = ran["v"].reshape(-1, cfg.llm.hidden_size)
    at_v = at_t = 0
    errs = {}
    for i, s in enumerate(golden["samples"]):
        nv, nt = len(s["vision"]), len(s["ids"])
        errs[f"vision{i}"] = rel(v[at_v:at_v + nv], s["vision"])
        errs[f"hidden{i}"] = rel(ran["h"][0, at_t:at_t + nt], s["hidden"])
        errs[f"logits{i}"] = rel(ran["logits"][0, at_t:at_t + nt], s["logits"])
        at_v, at_t = at_v + nv, at_t + nt
    assert not np.any(v[at_v:])   # the padding tail of the vision row is zero
    print(errs)
    assert max(errs.values()) <= 1e-5, errs


def test_gradient_parity(golden, ran):
    cfg = golden["cfg"]
    assert abs(ran["loss"] - golden["loss"]) <= 1e-5 * abs(golden["loss"])
    gmodel = qwen25_vl.Qwen25VL(cfg, rngs=nnx.Rngs(0))
    nnx.update(gmodel, ran["grads"])
    ours = omnigen2_keymap.export_qwen25_vl(gmodel)
    assert set(ours) == set(golden["grads"])
    errs = {k: rel(ours[k], golden["grads"][k]) for k in ours}
    worst = sorted(errs.items(), key=lambda kv: -kv[1])[:3]
    print(worst)
    assert worst[0][1] <= 1e-4, worst


def test_export_round_trip_and_refusals(golden):
    cfg = golden["cfg"]
    model = jax_model(golden)
    exported = omnigen2_keymap.export_qwen25_vl(model)
    want = {omnigen2_keymap.released_name(k): v for k, v in golden["state"].items()}
    assert set(exported) == set(want)
    for k in want:
        np.testing.assert_array_equal(exported[k], want[k], err_msg=k)
    bad = dict(exported)
    bad.pop("visual.blocks.1.attn.qkv.bias")
    bad["model.layers.0.mlp.gate_proj.weight"] = bad["model.layers.0.mlp.gate_proj.weight"][:, :3]
    bad["extra.weight"] = np.zeros(2, np.float32)
    with pytest.raises(ValueError) as e:
        omnigen2_keymap.load_qwen25_vl(qwen25_vl.Qwen25VL(cfg, rngs=nnx.Rngs(1)), bad)
    msg = str(e.value)
    assert "1 missing keys: visual.blocks.1.attn.qkv.bias" in msg
    assert "1 unexpected keys: extra.weight" in msg
    assert "model.layers.0.mlp.gate_proj.weight: file (96, 3), config expects (96, 64)" in msg


def test_preprocess_matches_hf_image_processor():
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil, smart_resize as hf_smart_resize)

    cfg = omnigen2_config.qwen25_vl_tiny()
    for h, w in [(100, 37), (1000, 3000), (20, 30), (333, 777), (4000, 3000)]:
        assert qwen25_vl.smart_resize(h, w, 28, 56 * 56, 28 * 28 * 1280) == \
            tuple(hf_smart_resize(h, w, 28, 56 * 56, 28 * 28 * 1280))
    rng = np.random.default_rng(1)
    proc = Qwen2VLImageProcessorPil(patch_size=14, temporal_patch_size=2, merge_size=2)
    for shape in [(84, 140, 3), (61, 130, 3)]:       # a multiple of 28 (no resize), and a resized one
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        ref = proc(images=[Image.fromarray(img)], return_tensors="np")
        patches, grid = qwen25_vl.preprocess_image(img, cfg.vision)
        assert tuple(ref["image_grid_thw"][0]) == grid
        np.testing.assert_allclose(patches, ref["pixel_values"], atol=1e-5)


def test_config_validation():
    cfg = omnigen2_config.qwen25_vl_tiny()
    cfg.llm.mrope_section = (2, 2, 2)
    with pytest.raises(ValueError, match="mrope_section"):
        omnigen2_config.validate_qwen25_vl(cfg)
    cfg = omnigen2_config.qwen25_vl_tiny()
    cfg.vision.out_hidden_size = 32
    with pytest.raises(ValueError, match="out_hidden_size"):
        omnigen2_config.validate_qwen25_vl(cfg)
    cfg = omnigen2_config.qwen25_vl_tiny()
    cfg.vision.fullatt_block_indexes = (9,)
    with pytest.raises(ValueError, match="fullatt_block_indexes"):
        omnigen2_config.validate_qwen25_vl(cfg)


def _count(build):
    st = nnx.state(nnx.eval_shape(build), nnx.Param)
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(st))


def test_qwen25_vl_3b_parameter_count():
    """The real config's parameters, counted on transformers' own model (meta device) and here:
    3,754,622,976 (vision tower 668,684,288; the head is tied to the embedding)."""
    from transformers import Qwen2_5_VLConfig

    cfg = omnigen2_config.qwen25_vl_3b()
    hc = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                         num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-6,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[16, 24, 24])),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                           window_size=112, fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu"),
        tie_word_embeddings=True)
    with torch.device("meta"):
        ref = transformers.Qwen2_5_VLForConditionalGeneration(hc)
    want = sum(p.numel() for p in ref.parameters())
    assert want == 3_754_622_976
    assert _count(lambda: qwen25_vl.Qwen25VL(cfg, rngs=nnx.Rngs(0))) == want
    # and the config read back from the transformers config equals the preset
    back = omnigen2_config.from_hf_qwen25_vl(hc.to_dict())
    for part in ("llm", "vision"):
        assert back[part].to_dict() == cfg[part].to_dict(), part


def test_export_loads_unchanged_in_transformers(golden, tmp_path):
    """Our export (released key names, one safetensors file + the config) loads with
    ``from_pretrained`` into transformers' model with nothing missing or unexpected, and that
    model reproduces the golden logits."""
    from safetensors.numpy import save_file

    cfg = golden["cfg"]
    save_file(omnigen2_keymap.export_qwen25_vl(jax_model(golden)), str(tmp_path / "model.safetensors"))
    hf_config(cfg).to_json_file(str(tmp_path / "config.json"))
    model, info = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(tmp_path), output_loading_info=True, attn_implementation="eager")
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    s = golden["samples"][0]
    ids = torch.tensor(s["ids"])[None]
    with torch.no_grad():
        logits = model.float().eval()(input_ids=ids, pixel_values=torch.tensor(np.concatenate(s["pix"])),
                                       image_grid_thw=torch.tensor(s["grids"]),
                                       mm_token_type_ids=(ids == cfg.llm.image_token_id).int()).logits[0].numpy()
    np.testing.assert_array_equal(logits, s["logits"])
