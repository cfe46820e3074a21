#!/usr/bin/env python3
"""Golden fixtures for inference, made by running BAGEL's *own* inference code on CPU in fp32.

Runs in the torch venv of ``scripts/check_bagel_loader.py`` (torch 2.13 + transformers 4.49 +
accelerate; no JAX). BAGEL's source is imported at run time from ``--bagel-src`` (a checkout of
https://github.com/ByteDance-Seed/Bagel); nothing of it is copied here. The GPU-only imports get
check_bagel_loader's import-time shims (pure-torch ``flash_attn_varlen_func``, bottom-right
causal; the hard-coded ``.to(torch.bfloat16)`` casts read as float32).

The model is the tiny random one of ``tests/fixtures/bagel_golden/tiny_v1`` (its
``llm_config.json``, ``vit_config.json``, ``model.safetensors``, ``ae.safetensors`` and the
BagelConfig settings of its ``meta.json``), so this fixture holds no weights of its own.

Cases (every call is BAGEL's, unmodified; the script only wraps methods to *record* what they
receive and return):

* ``vqa``: ``InterleaveInferencer.interleave_inference([image, question],
  understanding_output=True, do_sample=False)`` -> ``prepare_vit_images`` +
  ``forward_cache_update_vit``, ``prepare_prompts`` + ``forward_cache_update_text``,
  ``prepare_start_tokens`` + ``generate_text`` (greedy). Recorded: the KV cache after prefill,
  the logits of every decoding step (``lm_head`` outputs), the generated tokens.
* ``edit_global`` / ``edit_channel`` / ``edit_text_channel``: ``interleave_inference([image,
  instruction])`` -> VAE block (``forward_cache_update_vae``, sampled encode) + ViT block +
  text, the three CFG contexts (``cfg_text``: without the last text, ``cfg_img``: texts only),
  ``generate_image`` with text + image CFG, ``cfg_interval``, the shifted schedule, one
  ``cfg_renorm_type`` each; ``decode_image``. Recorded per Euler step: x_t, t, the applied CFG
  scales, the velocity of each of the three contexts (``llm2vae`` outputs) and the combined
  velocity; the final latent, the decoded float image and the uint8 image.
* ``t2i``: ``interleave_inference([prompt])`` with text CFG only (the ``cfg_text`` context is
  empty), renorm global.
* ``segment``: SGT's segmentation context -- a ViT-only image then the instruction -- built with
  ``update_context_image(vae=False)`` / ``update_context_text`` and sampled with
  ``InterleaveInferencer.gen_image`` (cfg_text context = the image, cfg_img context = the text).

Randomness of the original code (VAE ``DiagonalGaussian`` eps via ``torch.randn_like``, the
initial noise of ``prepare_vae_latent`` via ``torch.randn``) is drawn by BAGEL under
``torch.manual_seed`` and recorded, so a port feeds it back.

    VENV/bin/python scripts/make_inference_golden.py --bagel-src BAGEL_CHECKOUT \\
        --weights tests/fixtures/bagel_golden/tiny_v1 --out tests/fixtures/bagel_golden/inference_v1
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))

# generation settings of the image cases (BAGEL's defaults, except fewer steps)
EULER = dict(num_timesteps=6, timestep_shift=3.0, cfg_interval=[0.5, 1.0])
EDIT_CASES = {
    "edit_global": dict(cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_renorm_type="global", cfg_renorm_min=0.0),
    "edit_channel": dict(cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_renorm_type="channel", cfg_renorm_min=0.5),
    "edit_text_channel": dict(cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_renorm_type="text_channel",
                              cfg_renorm_min=0.0),
}
T2I = dict(cfg_text_scale=4.0, cfg_img_scale=1.0, cfg_renorm_type="global", cfg_renorm_min=0.0)
SEGMENT = dict(cfg_text_scale=3.0, cfg_img_scale=1.5, cfg_renorm_type="global", cfg_renorm_min=0.0)
VQA_MAX_LENGTH = 10


class IdTokenizer:
    """The tokenizer BAGEL's prepare_prompts calls: a prompt is its token ids written as text
    ("5 17 33"), so the fixture needs no vocabulary; decode writes BAGEL's two markers by name."""

    def __init__(self, special):
        self.special = special

    def encode(self, text):
        return [int(x) for x in text.split()]

    def decode(self, ids):
        names = {self.special["bos_token_id"]: "<|im_start|>", self.special["eos_token_id"]: "<|im_end|>"}
        return "".join(names.get(int(i), f" {int(i)}") for i in ids)


class PixelTransform:
    """ToTensor + Normalize(0.5, 0.5) after a PIL bicubic resize of each side to the nearest
    multiple of ``stride`` (the golden's images are chosen so the VAE needs no resize). The
    resulting tensors are stored, so a port is fed the identical pixels."""

    def __init__(self, stride):
        self.stride = stride

    def resize_transform(self, img):
        return self._resize(img)

    def _resize(self, img):
        from PIL import Image

        w, h = img.size
        s = self.stride
        nw, nh = max(s, round(w / s) * s), max(s, round(h / s) * s)
        return img if (nw, nh) == (w, h) else img.resize((nw, nh), Image.BICUBIC)

    def __call__(self, img):
        a = np.asarray(self._resize(img), np.float32) / np.float32(255.0)
        return torch.from_numpy(((a - 0.5) / 0.5).transpose(2, 0, 1).copy())


def ids_text(ids):
    return " ".join(str(int(i)) for i in ids)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()


def build(bagel_src, weights, meta):
    """BAGEL model + AE as app.py builds them, weights from the tiny_v1 set (strict load)."""
    sys.path.insert(0, HERE)
    from check_bagel_loader import ae_params_from_file, install_import_shims, install_runtime_shims

    install_import_shims()
    sys.path.insert(0, bagel_src)
    from safetensors.torch import load_file

    import modeling.autoencoder as ae_mod
    from modeling.bagel import Bagel, BagelConfig, Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    install_runtime_shims(fp32_attention=True)
    llm_config = Qwen2Config.from_json_file(os.path.join(weights, "llm_config.json"))
    llm_config.qk_norm = True
    llm_config.tie_word_embeddings = False
    llm_config.layer_module = "Qwen2MoTDecoderLayer"
    vit_config = SiglipVisionConfig.from_json_file(os.path.join(weights, "vit_config.json"))
    vit_config.rope = False
    vit_config.num_hidden_layers -= 1
    ae_path = os.path.join(weights, "ae.safetensors")
    shape = ae_params_from_file(ae_path)
    orig = ae_mod.AutoEncoderParams
    ae_mod.AutoEncoderParams = lambda **kw: orig(**{**kw, **shape})
    try:
        vae_model, vae_config = ae_mod.load_ae(local_path=ae_path)
    finally:
        ae_mod.AutoEncoderParams = orig
    b = meta["config"]["bagel"]
    config = BagelConfig(visual_gen=True, visual_und=True, llm_config=llm_config, vit_config=vit_config,
                         vae_config=vae_config, vit_max_num_patch_per_side=b["vit_max_num_patch_per_side"],
                         connector_act="gelu_pytorch_tanh", latent_patch_size=b["latent_patch_size"],
                         max_latent_size=b["max_latent_size"], timestep_shift=b["timestep_shift"])
    language_model = Qwen2ForCausalLM(llm_config)
    vit_model = SiglipVisionModel(vit_config)
    model = Bagel(language_model, vit_model, config)
    model.vit_model.vision_model.embeddings.convert_conv2d_to_linear(vit_config, meta=False)
    missing, unexpected = model.load_state_dict(load_file(os.path.join(weights, "model.safetensors")), strict=True)
    assert not missing and not unexpected
    return model.float().eval(), vae_model.float().eval()


class Recorder:
    """Wraps BAGEL methods / torch draws to record their inputs and outputs (behaviour unchanged)."""

    def __init__(self, model, vae_model):
        self.model, self.vae = model, vae_model
        self.reset()
        self._orig = {}
        m = model
        self._wrap(m, "prepare_vae_latent", self._prepare_vae_latent)
        self._wrap(m, "_forward_flow", self._forward_flow)
        self._wrap(m, "generate_text", self._generate_text)
        self._wrap(m, "forward_cache_update_vae", self._cache_update_vae)
        self._wrap(m, "prepare_prompts", self._prepare_prompts)
        self._wrap(m, "prepare_vit_images", self._prepare_vit_images)
        self._wrap(m, "prepare_vae_images", self._prepare_vae_images)
        self._wrap(vae_model, "decode", self._decode)
        m.llm2vae.register_forward_hook(lambda mod, a, out: self.llm2vae_out.append(out.detach().clone()))
        m.language_model.lm_head.register_forward_hook(
            lambda mod, a, out: self.logits.append(out.detach().clone()))

    def reset(self):
        self.init_noise, self.steps, self.llm2vae_out, self.logits = None, [], [], []
        self.vae_eps, self.decoded, self.tokens, self.cache_at_decode = [], None, None, None
        self.blocks = []          # (context name is not known here) every prepare_* call, in order

    def _wrap(self, obj, name, fn):
        orig = getattr(obj, name)
        self._orig[(id(obj), name)] = orig
        setattr(obj, name, lambda *a, **kw: fn(orig, *a, **kw))

    def _prepare_vae_latent(self, orig, *a, **kw):
        out = orig(*a, **kw)
        self.init_noise = out["packed_init_noises"].clone()
        return out

    def _forward_flow(self, orig, *a, **kw):
        self.llm2vae_out = []
        x_t = kw["x_t"].clone()
        v = orig(*a, **kw)
        n = x_t.shape[0]
        idx = kw["packed_vae_token_indexes"]
        outs = [o[idx] for o in self.llm2vae_out]
        rec = {"x_t": x_t, "t": float(kw["timestep"][0]), "cfg_text_scale": kw["cfg_text_scale"],
               "cfg_img_scale": kw["cfg_img_scale"], "v": v.clone(), "v_cond": outs[0],
               "contexts": {c: {"kv_len": int(kw[f"{p}key_values_lens"][0]),
                                "rope": int(kw[f"{p}packed_position_ids"][0])}
                            for c, p in (("gen", ""), ("cfg_text", "cfg_text_"), ("cfg_img", "cfg_img_"))}}
        k = 1
        if kw["cfg_text_scale"] > 1.0:
            rec["v_text_uncond"] = outs[k]
            k += 1
        if kw["cfg_img_scale"] > 1.0:
            rec["v_img_uncond"] = outs[k]
            k += 1
        assert k == len(outs) and all(o.shape[0] == n for o in outs)
        self.steps.append(rec)
        return v

    def _generate_text(self, orig, *a, **kw):
        pkv = kw["past_key_values"]
        self.cache_at_decode = (torch.stack([pkv.key_cache[i].clone() for i in range(pkv.num_layers)]),
                                torch.stack([pkv.value_cache[i].clone() for i in range(pkv.num_layers)]),
                                [int(x) for x in kw["key_values_lens"]],
                                [int(x) for x in kw["packed_query_position_ids"]])
        self.logits = []
        out = orig(*a, **kw)
        self.tokens = out.clone()
        return out

    def _cache_update_vae(self, orig, *a, **kw):
        real = torch.randn_like
        drawn = []

        def randn_like(x, *aa, **kk):
            e = real(x, *aa, **kk)
            drawn.append(e.clone())
            return e

        torch.randn_like = randn_like
        try:
            out = orig(*a, **kw)
        finally:
            torch.randn_like = real
        assert len(drawn) == 1
        self.vae_eps.append(drawn[0])
        return out

    def _prepare_prompts(self, orig, *a, **kw):
        out = orig(*a, **kw)
        self.blocks.append({"type": "text", "ids": [int(x) for x in out[0]["packed_text_ids"]],
                            "kv_len_before": list(kw["curr_kvlens"]), "rope_before": list(kw["curr_rope"])})
        return out

    def _prepare_vit_images(self, orig, *a, **kw):
        out = orig(*a, **kw)
        self.blocks.append({"type": "vit", "num_patches": int(out[0]["vit_token_seqlens"][0]),
                            "kv_len_before": list(kw["curr_kvlens"]), "rope_before": list(kw["curr_rope"]),
                            "packed_vit_position_ids": [int(x) for x in out[0]["packed_vit_position_ids"]],
                            "_tokens": out[0]["packed_vit_tokens"].clone()})
        return out

    def _prepare_vae_images(self, orig, *a, **kw):
        out = orig(*a, **kw)
        self.blocks.append({"type": "vae", "latent_shape": [int(v) for v in out[0]["patchified_vae_latent_shapes"][0]],
                            "kv_len_before": list(kw["curr_kvlens"]), "rope_before": list(kw["curr_rope"]),
                            "_pixels": out[0]["padded_images"].clone()})
        return out

    def _decode(self, orig, *a, **kw):
        out = orig(*a, **kw)
        self.decoded = out.detach().clone()
        return out


def image_case(rec, tensors, name):
    """Store the recorded Euler trajectory of one generate_image call."""
    st = rec.steps
    n, d = st[0]["x_t"].shape
    z = torch.zeros(n, d)
    tensors[f"{name}.init_noise"] = rec.init_noise
    tensors[f"{name}.x_t"] = torch.stack([s["x_t"] for s in st])
    tensors[f"{name}.t"] = torch.tensor([s["t"] for s in st], dtype=torch.float32)
    tensors[f"{name}.v"] = torch.stack([s["v"] for s in st])
    tensors[f"{name}.v_cond"] = torch.stack([s["v_cond"] for s in st])
    tensors[f"{name}.v_text_uncond"] = torch.stack([s.get("v_text_uncond", z) for s in st])
    tensors[f"{name}.v_img_uncond"] = torch.stack([s.get("v_img_uncond", z) for s in st])
    last = st[-1]
    return {"steps": len(st), "cfg_text_scale_applied": [s["cfg_text_scale"] for s in st],
            "cfg_img_scale_applied": [s["cfg_img_scale"] for s in st],
            "t": [s["t"] for s in st], "latent_tokens": n, "last_t": last["t"],
            "context_kv_len_and_rope": last["contexts"]}


def check_contexts(case, contexts):
    """The block indices of each context must add up to the kv length generate_image was given."""
    size = lambda b: {"text": len(b.get("ids", [])), "vit": b.get("num_patches", 0) + 2,
                      "vae": (b["latent_shape"][0] * b["latent_shape"][1] + 2) if b["type"] == "vae" else 0}[b["type"]]
    for c, idx in contexts.items():
        want = case["context_kv_len_and_rope"][c]["kv_len"]
        got = sum(size(case["blocks"][i]) for i in idx)
        assert got == want, (c, idx, got, want)
    case["contexts"] = contexts


def blocks_meta(rec, tensors, name):
    out = []
    vit = vae = 0
    for b in rec.blocks:
        b = dict(b)
        if b["type"] == "vit":
            tensors[f"{name}.vit_patches{vit}"] = b.pop("_tokens")
            b["tensor"] = f"{name}.vit_patches{vit}"
            vit += 1
        elif b["type"] == "vae":
            tensors[f"{name}.vae_pixels{vae}"] = b.pop("_pixels")[0]
            tensors[f"{name}.vae_eps{vae}"] = rec.vae_eps[vae][0]
            b["tensor"], b["eps"] = f"{name}.vae_pixels{vae}", f"{name}.vae_eps{vae}"
            vae += 1
        out.append(b)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bagel-src", required=True, help="a checkout of ByteDance-Seed/Bagel (056b5fd)")
    ap.add_argument("--weights", required=True, help="the tiny_v1 fixture dir (configs + weights + meta.json)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    bagel_src, weights = os.path.abspath(args.bagel_src), os.path.abspath(args.weights)
    with open(os.path.join(weights, "meta.json")) as f:
        wmeta = json.load(f)
    torch.manual_seed(args.seed)
    model, vae_model = build(bagel_src, weights, wmeta)
    from PIL import Image

    from inferencer import InterleaveInferencer

    special = wmeta["config"]["special_tokens"]
    tok = IdTokenizer(special)
    vit_tf = PixelTransform(wmeta["config"]["vit"]["patch_size"])
    vae_tf = PixelTransform(wmeta["config"]["bagel"]["vae_image_downsample"])
    inf = InterleaveInferencer(model, vae_model, tok, vae_tf, vit_tf, dict(special))
    rec = Recorder(model, vae_model)
    rng = np.random.default_rng(args.seed)
    vocab = wmeta["config"]["llm"]["vocab_size"]
    text_ids = lambda n: rng.integers(0, min(special.values()), n).tolist()   # no special ids
    # a 64x48 image: 4x3 latent tokens for the VAE; resized to 70x42 -> 5x3 patches for the ViT
    img_edit = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    img_vqa = Image.fromarray(rng.integers(0, 256, (42, 56, 3), dtype=np.uint8))
    question, instruction, prompt, seg_instr = text_ids(7), text_ids(5), text_ids(6), text_ids(4)

    tensors, cases = {}, {}
    tensors["vqa.image_uint8"] = torch.from_numpy(np.asarray(img_vqa).copy())

    # ---- VQA: understanding, greedy ----
    def vqa_case(name, question):
        rec.reset()
        out = inf.interleave_inference([img_vqa, ids_text(question)], understanding_output=True, do_sample=False,
                                       max_think_token_n=VQA_MAX_LENGTH)
        k, v, kv_lens, ropes = rec.cache_at_decode
        t = {f"{name}.cache_k": k, f"{name}.cache_v": v, f"{name}.logits": torch.cat(rec.logits, dim=0),
             f"{name}.tokens": rec.tokens[:, 0]}
        case = {"call": "interleave_inference([image, question], understanding_output=True, do_sample=False, "
                        f"max_think_token_n={VQA_MAX_LENGTH})",
                "question_ids": question, "blocks": blocks_meta(rec, t, name),
                "contexts": {"gen": [0, 1]},
                "kv_len_at_decode": kv_lens[0], "rope_at_decode": ropes[0],
                "generated_with_start_token": [int(x) for x in rec.tokens[:, 0]],
                "decoded_text": out[0], "steps": len(rec.logits),
                "stopped_on_eos": bool(len(rec.logits) < VQA_MAX_LENGTH)}
        return case, t

    cases["vqa"], t = vqa_case("vqa", question)
    tensors.update(t)
    # stop token: the tiny random model never ranks <|im_end|> first, so the stopping rule is
    # recorded with generate_text's own end_token_id set to a token the greedy answer above
    # produces (the calls of InterleaveInferencer.gen_text, without its decode)
    gen_toks = cases["vqa"]["generated_with_start_token"]
    stop = next(tk for i, tk in enumerate(gen_toks) if i >= 2 and tk not in gen_toks[:i])
    rec.reset()
    # the image as interleave_inference hands it on (vae_transform.resize_transform first)
    ctx = inf.update_context_image(vae_tf.resize_transform(img_vqa), inf.init_gen_context(), vae=False, vit=True)
    ctx = inf.update_context_text(ids_text(question), ctx)
    gi = model.prepare_start_tokens(ctx["kv_lens"], ctx["ropes"], inf.new_token_ids)
    model.generate_text(past_key_values=ctx["past_key_values"], max_length=VQA_MAX_LENGTH, do_sample=False,
                        end_token_id=stop, **gi)
    assert rec.cache_at_decode[2] == [cases["vqa"]["kv_len_at_decode"]]
    assert torch.equal(rec.cache_at_decode[0], tensors["vqa.cache_k"])
    tensors["vqa_stop.logits"] = torch.cat(rec.logits, dim=0)
    tensors["vqa_stop.tokens"] = rec.tokens[:, 0]
    cases["vqa_stop"] = {"call": "update_context_image(image, vae=False) + update_context_text(question); "
                                 f"prepare_start_tokens; generate_text(max_length={VQA_MAX_LENGTH}, do_sample=False, "
                                 f"end_token_id={stop})",
                         "question_ids": question, "same_context_as": "vqa", "end_token_id": stop,
                         "generated_with_start_token": [int(x) for x in rec.tokens[:, 0]],
                         "steps": len(rec.logits)}
    assert cases["vqa_stop"]["steps"] < VQA_MAX_LENGTH

    # ---- editing with text + image CFG, one run per renorm type (same seed -> same draws) ----
    for name, kw in EDIT_CASES.items():
        rec.reset()
        torch.manual_seed(args.seed + 1)
        out = inf.interleave_inference([img_edit, ids_text(instruction)], **EULER, **kw)
        cases[name] = {"call": f"interleave_inference([image, instruction], **{json.dumps({**EULER, **kw})})",
                       "instruction_ids": instruction, "settings": {**EULER, **kw},
                       "image_shape": [img_edit.size[1], img_edit.size[0]],
                       "blocks": blocks_meta(rec, tensors, name), **image_case(rec, tensors, name)}
        check_contexts(cases[name], {"gen": [0, 1, 2], "cfg_text": [0, 1], "cfg_img": [3]})
        tensors[f"{name}.decoded"] = rec.decoded[0]
        tensors[f"{name}.image_uint8"] = torch.from_numpy(np.asarray(out[0]).copy())
    tensors["edit.image_uint8_input"] = torch.from_numpy(np.asarray(img_edit).copy())

    # ---- text-to-image: text CFG against the empty context ----
    rec.reset()
    torch.manual_seed(args.seed + 2)
    out = inf.interleave_inference([ids_text(prompt)], image_shapes=(32, 48), **EULER, **T2I)
    cases["t2i"] = {"call": f"interleave_inference([prompt], image_shapes=(32, 48), **{json.dumps({**EULER, **T2I})})",
                    "prompt_ids": prompt, "settings": {**EULER, **T2I}, "image_shape": [32, 48],
                    "blocks": blocks_meta(rec, tensors, "t2i"), **image_case(rec, tensors, "t2i")}
    check_contexts(cases["t2i"], {"gen": [0], "cfg_text": [], "cfg_img": [1]})
    tensors["t2i.decoded"] = rec.decoded[0]
    tensors["t2i.image_uint8"] = torch.from_numpy(np.asarray(out[0]).copy())

    # ---- SGT segmentation context: ViT-only image, then the instruction ----
    rec.reset()
    torch.manual_seed(args.seed + 3)
    gen = inf.init_gen_context()
    cfg_img = copy.deepcopy(gen)
    gen = inf.update_context_image(img_vqa, gen, vae=False, vit=True)
    cfg_text = copy.deepcopy(gen)
    gen = inf.update_context_text(ids_text(seg_instr), gen)
    cfg_img = inf.update_context_text(ids_text(seg_instr), cfg_img)
    shape = (48, 64)
    img = inf.gen_image(shape, gen, cfg_text_precontext=cfg_text, cfg_img_precontext=cfg_img, **EULER, **SEGMENT)
    cases["segment"] = {"call": "update_context_image(image, vae=False) + update_context_text(instruction); "
                                "gen_image(cfg_text_precontext=<image only>, cfg_img_precontext=<text only>, "
                                f"**{json.dumps({**EULER, **SEGMENT})})",
                        "instruction_ids": seg_instr, "settings": {**EULER, **SEGMENT}, "image_shape": list(shape),
                        "blocks": blocks_meta(rec, tensors, "segment"), **image_case(rec, tensors, "segment")}
    check_contexts(cases["segment"], {"gen": [0, 1], "cfg_text": [0], "cfg_img": [2]})
    tensors["segment.decoded"] = rec.decoded[0]
    tensors["segment.image_uint8"] = torch.from_numpy(np.asarray(img).copy())

    # final latents: x_T-1 - v * dt of the last step (what generate_image returns)
    for name in list(EDIT_CASES) + ["t2i", "segment"]:
        n = cases[name]
        ts = torch.linspace(1, 0, EULER["num_timesteps"])
        s = EULER["timestep_shift"]
        ts = s * ts / (1 + (s - 1) * ts)
        dts = ts[:-1] - ts[1:]
        tensors[f"{name}.latent"] = tensors[f"{name}.x_t"][-1] - tensors[f"{name}.v"][-1] * dts[-1]
        n["dts"] = [float(x) for x in dts]

    os.makedirs(args.out, exist_ok=True)
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    save_file(tensors, os.path.join(args.out, "inference.safetensors"))
    import transformers

    commit = subprocess.run(["git", "-C", bagel_src, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {
        "format_version": 1, "name": os.path.basename(os.path.normpath(args.out)), "seed": args.seed,
        "bagel_repo": "https://github.com/ByteDance-Seed/Bagel", "bagel_commit_full": commit,
        "torch_version": torch.__version__, "transformers_version": transformers.__version__,
        "generator": "scripts/make_inference_golden.py: unmodified BAGEL inference code on CPU in float32 "
                     "(check_bagel_loader's import-time shims), methods wrapped only to record",
        "weights": {"dir": "../tiny_v1", "files": {f: sha256(os.path.join(weights, f)) for f in
                                                   ("model.safetensors", "ae.safetensors", "llm_config.json",
                                                    "vit_config.json")}},
        "config": wmeta["config"], "special_tokens": special, "vocab_size": vocab,
        "euler": EULER, "cases": cases,
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                    for k, v in sorted(tensors.items())},
    }
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(json.dumps({k: {kk: vv for kk, vv in c.items() if kk not in ("blocks",)} for k, c in cases.items()},
                     indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
