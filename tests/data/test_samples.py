"""Sample builders: BAGEL's resize rule, sequence-plan layouts, CFG dropout, the tokenizer."""
import pickle

import numpy as np
import pytest
from PIL import Image

from sgt_jax import batch as B
from sgt_jax.data import config as C
from sgt_jax.data import samples as S
from sgt_jax.data.instructions import SEGMENT_INSTRUCTION, SEGMENT_INSTRUCTIONS
from sgt_jax.data.records import BadRecord
from sgt_jax.data.tokenizer import SPECIAL_TOKENS, Tokenizer, build_tiny_tokenizer, load_tokenizer
from sgt_jax.models import attention


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(build_tiny_tokenizer(str(tmp_path_factory.mktemp("tok") / "t")))


def _img(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _builder(tok, **kw):
    cfg = C.tiny_data_config()
    for k, v in kw.items():
        tgt = cfg
        for p in k.split(".")[:-1]:
            tgt = tgt[p]
        tgt[k.split(".")[-1]] = v
    return S.SampleBuilder(cfg, tok), cfg


# ---------------------------------------------------------------------------------------------
# transforms

def test_make_divisible_bankers_rounding():
    assert S.make_divisible(40, 16) == 32          # round(2.5) == 2 (Python / BAGEL)
    assert S.make_divisible(56, 16) == 64          # round(3.5) == 4
    assert S.make_divisible(3, 16) == 16           # at least one stride


@pytest.mark.parametrize("w,h,args,expected", [
    # SA-1B portrait 1500x2250, SGT ViT ImageTransform(224, 224, 14): long edge capped -> 154x224
    (1500, 2250, (224, 224, 14, 1806336), (154, 224)),
    # same image, SGT VAE ImageTransform(1024, 512, 16)
    (1500, 2250, (1024, 512, 16, 1806336), (688, 1024)),
    # small image is upscaled to the min short edge
    (100, 80, (1024, 512, 16, 1806336), (640, 512)),
    # a square image already in range is only snapped to the stride
    (700, 700, (1024, 512, 16, 1806336), (704, 704)),
])
def test_resize_rule(w, h, args, expected):
    assert S.resize_hw(w, h, *args) == expected


def test_max_pixels_area_quirk_and_sqrt_option():
    # VQA record with 3 images of 980x980: max_pixels / 3 = 669013 < 960400 -> BAGEL scales each
    # side by the AREA ratio 0.6966 (over-shrinks to 686); the sqrt option gives 812.
    args = (980, 378, 14, 2_007_040)
    assert S.resize_hw(980, 980, *args, img_num=3) == (686, 686)
    assert S.resize_hw(980, 980, *args, img_num=3, sqrt_max_pixels=True) == (812, 812)
    assert S.resize_hw(980, 980, *args, img_num=1) == (980, 980)


def test_transform_is_pil_bicubic_and_normalize_is_totensor():
    img = _img(37, 53)
    t = S.ImageTransform(112, 56, 14)
    out = t(img)
    w, h = t.size(53, 37)
    assert out.shape == (h, w, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.asarray(Image.fromarray(img).resize((w, h), Image.BICUBIC)))
    x = S.normalize(np.array([[[0, 255, 128]]], np.uint8))
    np.testing.assert_array_equal(x, ((np.array([0, 255, 128], np.float32) / np.float32(255) - 0.5) / 0.5)[None, None])
    assert x.dtype == np.float32 and x.min() == -1.0 and x.max() == 1.0


# ---------------------------------------------------------------------------------------------
# layouts

def test_split_mode_constants_match_attention():
    assert (S.CAUSAL, S.FULL, S.NOISE) == (attention.CAUSAL, attention.FULL, attention.NOISE)


def test_seg_sample_layout(tok):
    b, cfg = _builder(tok, **{"samples.text_cond_dropout_prob": 0.0})
    rec = {"task": "seg", "id": "a", "image": _img(90, 120), "target": _img(90, 120, 1)}
    s = b(rec, stream="seg", index=3)
    t, sp = s.tokens, tok.special
    kind, pos, mode, split = t["kind"], t["position_ids"], t["split_mode"], t["split_ids"]
    # [vs vit.. ve] [bos instr.. eos] [vs latents.. ve]
    n_vit = s.num_vit_patches
    instr = tok.decode(t["text_ids"][n_vit + 3:][:list(t["text_ids"][n_vit + 3:]).index(sp.eos_token_id)])
    assert instr in SEGMENT_INSTRUCTIONS
    n_txt = len(tok.encode(instr)) + 2
    assert list(np.unique(split)) == [0, 1, 2]
    assert (mode[split == 0] == S.FULL).all() and (mode[split == 1] == S.CAUSAL).all()
    assert (mode[split == 2] == S.NOISE).all()
    assert (pos[split == 0] == 0).all()
    np.testing.assert_array_equal(pos[split == 1], np.arange(1, 1 + n_txt))
    assert (pos[split == 2] == 1 + n_txt).all()
    assert (kind[split == 0][1:-1] == B.VIT).all() and (kind[split == 2][1:-1] == B.VAE_NOISED).all()
    assert t["text_ids"][0] == sp.start_of_image and t["text_ids"][n_vit + 1] == sp.end_of_image
    assert not t["ce_mask"].any()
    assert t["mse_mask"].sum() == s.num_gen == (kind == B.VAE_NOISED).sum()
    ts = t["timesteps"][kind == B.VAE_NOISED]
    assert np.isfinite(ts).all() and (ts == ts[0]).all()
    # images: ViT by the 224-style rule (tiny: 112), VAE target by the 64-128 rule
    h, w = S.resize_hw(120, 90, 112, 112, 14, C.BAGEL_MAX_PIXELS)[::-1]
    assert n_vit == (h // 14) * (w // 14)
    vh, vw = s.vae_images[0].shape[:2]
    assert (vw, vh) == S.resize_hw(120, 90, 128, 64, 16, C.BAGEL_MAX_PIXELS)
    assert s.num_gen == (vh // 16) * (vw // 16)
    lp = t["latent_position_ids"][kind == B.VAE_NOISED]
    r, c = np.meshgrid(np.arange(vh // 16), np.arange(vw // 16), indexing="ij")
    np.testing.assert_array_equal(lp, (r * cfg.max_latent_size + c).reshape(-1))


def test_seg_target_is_the_mask_not_the_rgb(tok):
    b, _ = _builder(tok)
    img, mask = _img(64, 64), np.zeros((64, 64, 3), np.uint8)
    mask[:32] = (255, 0, 0)
    s = b({"task": "seg", "id": "a", "image": img, "target": mask}, stream="seg", index=0)
    vae = s.vae_images[0]
    assert vae[0, 0].tolist() == [255, 0, 0] and vae[-1, -1].tolist() == [0, 0, 0]


def test_text_dropout_keeps_rope_image_dropout_advances_it(tok):
    sp = tok.special
    spec = S.LayoutSpec(sp, vit_max_patches_per_side=8, max_latent_size=8)
    vit = S.Item("vit_image", enable_cfg=1, image=_img(28, 28))
    txt = S.Item("text", enable_cfg=1, text_ids=[5, 6, 7])
    vae = S.Item("vae_image", loss=1, image=_img(32, 32), timestep=0.3)
    full = S.layout([vit, txt, vae], spec)
    assert full.tokens["position_ids"][-1] == 1 + 5
    txt.dropped = True
    no_txt = S.layout([vit, txt, vae], spec)
    assert no_txt.tokens["position_ids"][-1] == 1          # text dropout: rope not advanced
    txt.dropped, vit.dropped = False, True
    no_vit = S.layout([vit, txt, vae], spec)
    assert no_vit.tokens["position_ids"][0] == 1           # image dropout: rope advanced
    assert no_vit.num_vit_patches == 0


def test_clean_vae_image_advances_rope_and_has_minus_inf_timestep(tok):
    sp = tok.special
    spec = S.LayoutSpec(sp, vit_max_patches_per_side=8, max_latent_size=8)
    s = S.layout([S.Item("vae_image", image=_img(32, 48)), S.Item("text", text_ids=[9]),
                  S.Item("vae_image", loss=1, image=_img(32, 32), timestep=-0.5),
                  S.Item("vae_image", image=_img(32, 32))], spec)
    t = s.tokens
    assert (t["timesteps"][t["kind"] == B.VAE_CLEAN] == -np.inf).all()
    assert (t["timesteps"][t["kind"] == B.VAE_NOISED] == np.float32(-0.5)).all()
    # clean at 0; text 1..3; noised at 4 (not advancing); the clean copy after it shares 4
    assert t["position_ids"][0] == 0 and t["position_ids"][-1] == 4
    assert (t["position_ids"][t["split_ids"] == 2] == 4).all()
    m = t["vae_image"] == 0
    np.testing.assert_array_equal(t["vae_row"][m], [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(t["vae_col"][m], [0, 1, 2, 0, 1, 2])


def test_vqa_layout_ce_shift_and_placeholders(tok):
    b, _ = _builder(tok)
    rec = {"task": "vqa", "id": "q", "images": [_img(60, 80), _img(70, 50, 1)],
           "conversations": [{"from": "human", "value": "<image>\nWhat is here? <image> and there"},
                             {"from": "gpt", "value": "Two shapes."},
                             {"from": "human", "value": "Colors?"}, {"from": "gpt", "value": "Red."}]}
    s = b(rec, stream="vqa", index=0)
    t, sp = s.tokens, tok.special
    modes = [int(t["split_mode"][t["split_ids"] == i][0]) for i in range(s.num_splits)]
    # vit, text, vit, text, text(gpt), text, text(gpt)
    assert modes == [S.FULL, S.CAUSAL, S.FULL, S.CAUSAL, S.CAUSAL, S.CAUSAL, S.CAUSAL]
    assert len(np.unique(s.vit_image_ids)) == 2
    # CE: on [bos, ids] of each gpt turn, labels ids + [eos]
    for answer, split in (("Two shapes.", 4), ("Red.", 6)):
        ids = tok.encode(answer)
        m = t["split_ids"] == split
        np.testing.assert_array_equal(t["ce_mask"][m], [True] * (len(ids) + 1) + [False])
        np.testing.assert_array_equal(t["ce_labels"][m][:-1], ids + [sp.eos_token_id])
        np.testing.assert_array_equal(t["text_ids"][m], [sp.bos_token_id] + ids + [sp.eos_token_id])
        np.testing.assert_allclose(t["ce_weights"][m][:-1], 1 / np.sqrt(len(ids) + 1), rtol=1e-6)
    assert t["ce_mask"].sum() == len(tok.encode("Two shapes.")) + len(tok.encode("Red.")) + 2
    # human text stripped around <image>
    m = t["split_ids"] == 1
    assert tok.decode(t["text_ids"][m][1:-1]) == "What is here?"
    # RoPE: positions increase by one per image block, by n+2 per text
    assert t["position_ids"][t["split_ids"] == 2][0] == 1 + len(tok.encode("What is here?")) + 2


def test_vqa_bad_records(tok):
    b, _ = _builder(tok)
    conv = [{"from": "human", "value": "<image> <image> Hi"}, {"from": "gpt", "value": "Yo"}]
    with pytest.raises(BadRecord) as e:
        b({"task": "vqa", "id": "x", "images": [_img(40, 40)], "conversations": conv}, stream="v", index=0)
    assert e.value.reason == "placeholder_mismatch"
    with pytest.raises(BadRecord) as e:
        b({"task": "vqa", "id": "x", "images": [], "conversations": [{"from": "human", "value": "Hi"}]},
          stream="v", index=0)
    assert e.value.reason == "no_loss"
    with pytest.raises(BadRecord) as e:
        b({"task": "vqa", "id": "x", "conversations": "nope"}, stream="v", index=0)
    assert e.value.reason == "bad_conversation"
    with pytest.raises(BadRecord) as e:
        b({"task": "seg", "id": "x", "image": np.zeros((8, 8), np.uint8), "target": _img(8, 8)},
          stream="s", index=0)
    assert e.value.reason == "bad_array"
    with pytest.raises(BadRecord) as e:
        b({"task": "edit", "id": "x"}, stream="s", index=0)
    assert e.value.reason == "unknown_task"
    # text-only VQA is fine
    s = b({"task": "vqa", "id": "t", "images": [], "conversations": conv[1:] + conv[1:]}, stream="v", index=0)
    assert s.num_vit_patches == 0 and s.num_gen == 0


def test_t2i_and_recon_plans(tok):
    b, _ = _builder(tok, **{"samples.text_cond_dropout_prob": 0.0})
    s = b({"task": "t2i", "id": "c", "image": _img(64, 96), "caption": "a red circle"}, stream="t", index=0)
    modes = [int(s.tokens["split_mode"][s.tokens["split_ids"] == i][0]) for i in range(s.num_splits)]
    assert modes == [S.CAUSAL, S.NOISE] and s.num_vit_patches == 0 and s.num_vae_images == 1
    img = _img(64, 96)
    r = b({"task": "recon", "id": "r", "image": img}, stream="r", index=0)
    modes = [int(r.tokens["split_mode"][r.tokens["split_ids"] == i][0]) for i in range(r.num_splits)]
    assert modes == [S.FULL, S.CAUSAL, S.NOISE]
    vh, vw = r.vae_images[0].shape[:2]
    np.testing.assert_array_equal(r.vae_images[0], S.resize(img, vw, vh))   # target = the input RGB


def test_randomness_is_a_function_of_seed_stream_index(tok):
    b, _ = _builder(tok)
    rec = {"task": "seg", "id": "a", "image": _img(64, 64), "target": _img(64, 64, 1)}
    a1, a2 = b(rec, stream="seg", index=7), b(rec, stream="seg", index=7)
    for k in S.TOKEN_KEYS:
        np.testing.assert_array_equal(a1.tokens[k], a2.tokens[k])
    ts = {float(b(rec, stream="seg", index=i).tokens["timesteps"][-2]) for i in range(20)}
    assert len(ts) == 20
    b2, _ = _builder(tok, seed=1)
    assert float(b2(rec, stream="seg", index=7).tokens["timesteps"][-2]) != float(a1.tokens["timesteps"][-2])


def test_cfg_dropout_rate_and_instruction_variety(tok):
    b, _ = _builder(tok, **{"samples.text_cond_dropout_prob": 0.25})
    rec = {"task": "seg", "id": "a", "image": _img(32, 32), "target": _img(32, 32, 1)}
    n, dropped, instr = 400, 0, set()
    for i in range(n):
        s = b(rec, stream="seg", index=i)
        has_text = (s.tokens["split_mode"] == S.CAUSAL).any()
        dropped += not has_text
        instr.add(s.text)
    assert 0.18 < dropped / n < 0.32
    assert len(instr) > 80
    b, _ = _builder(tok, **{"samples.instruction": "fixed"})
    assert b(rec, stream="seg", index=0).text == SEGMENT_INSTRUCTION


def test_timesteps_are_standard_normal(tok):
    rng = np.random.default_rng(0)
    items = [[S.Item("vae_image", loss=1)] for _ in range(2000)]
    t = np.array([S.draw_timesteps(it, rng)[0].timestep for it in items])
    assert abs(t.mean()) < 0.1 and abs(t.std() - 1) < 0.1


def test_instructions():
    assert SEGMENT_INSTRUCTIONS[0] == "Segment instances with different colors."
    assert len(set(SEGMENT_INSTRUCTIONS)) >= 100
    assert all(s.strip() == s and s[-1] in ".?" for s in SEGMENT_INSTRUCTIONS)


# ---------------------------------------------------------------------------------------------
# tokenizer

def test_tiny_tokenizer_loads_like_qwen2(tok, tmp_path):
    sp = tok.special
    ids = [tok._tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert [sp.bos_token_id, sp.eos_token_id, sp.start_of_image, sp.end_of_image] == ids
    assert max(ids) == tok.vocab_size - 1 and len(set(ids)) == 4
    assert type(tok._tok).__name__ == "Qwen2Tokenizer"
    text = "Segment instances with different colors. How many red circles? 12"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|vision_start|>") == [sp.start_of_image]          # specials are atomic
    assert all(i < tok.vocab_size for i in tok.encode("日本語 ü"))          # byte-level: no unk
    t2 = pickle.loads(pickle.dumps(tok))
    assert t2.encode(text) == tok.encode(text) and t2.special == sp
    d = build_tiny_tokenizer(str(tmp_path / "t"), texts=["aaa bbb"] * 10, vocab_size=300)
    assert 261 < Tokenizer(d).vocab_size <= 300        # a small corpus may give fewer merges
    with pytest.raises(FileNotFoundError, match="build_tiny_tokenizer"):
        Tokenizer(str(tmp_path / "missing")).encode("x")


def test_tiny_tokenizer_has_the_slow_qwen2_files(tok, tmp_path):
    """BAGEL's loaders read the tokenizer with its slow Qwen2Tokenizer under transformers 4.49:
    vocab.json + merges.txt (the BPE of tokenizer.json) and tokenizer_config.json in the classic
    layout (added_tokens_decoder; no list-valued extra_special_tokens, which 4.x cannot read).
    scripts/check_bagel_loader.py runs BAGEL's own loader on such files (docs/convert.md)."""
    import json
    from pathlib import Path

    from sgt_jax.convert.bagel_io import tokenizer_notes

    d = Path(tok.path)
    tj = json.loads((d / "tokenizer.json").read_text())
    assert json.loads((d / "vocab.json").read_text()) == tj["model"]["vocab"]
    merges = (d / "merges.txt").read_text().splitlines()
    assert merges[0].startswith("#version") and len(merges) - 1 == len(tj["model"]["merges"])
    tcfg = json.loads((d / "tokenizer_config.json").read_text())
    assert not isinstance(tcfg.get("extra_special_tokens"), list)
    assert tcfg["additional_special_tokens"] == list(SPECIAL_TOKENS)
    dec = {v["content"]: int(k) for k, v in tcfg["added_tokens_decoder"].items() if v["special"]}
    assert [dec[t] for t in SPECIAL_TOKENS] == list(tok.special.as_dict().values())
    assert tokenizer_notes(str(d)) == []
