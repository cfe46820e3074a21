#!/usr/bin/env python3
"""Load a BAGEL-layout export with BAGEL's *own* PyTorch loader code and check it.

Runs in a separate virtualenv with torch + transformers 4.49 + accelerate (no JAX, nothing from
sgt_jax is imported). BAGEL's source is imported at run time from ``--bagel-src`` (a checkout of
https://github.com/ByteDance-Seed/Bagel); nothing of it is copied here. On CPU its GPU-only
imports get small import-time shims defined below (a pure-torch ``flash_attn`` module, the
uncompiled ``flex_attention`` / ``create_block_mask(_compile=False)``, and — for the fp32 golden
forward only — the hard-coded ``.to(torch.bfloat16)`` attention casts mapped to float32).

What it does, in BAGEL's order (app.py / inferencer setup):

1. ``Qwen2Config.from_json_file(llm_config.json)`` + qk_norm / untied head / MoT layer;
   ``SiglipVisionConfig.from_json_file(vit_config.json)`` + rope=False, num_hidden_layers - 1;
   ``load_ae(ae.safetensors)`` (BAGEL hard-codes the FLUX AE shape there; for a smaller AE its
   ``AutoEncoderParams`` is given the shape read from the file, nothing else changes);
   ``BagelConfig(...)``; ``init_empty_weights()`` + ``Qwen2ForCausalLM`` / ``SiglipVisionModel`` /
   ``Bagel`` + ``convert_conv2d_to_linear(meta=True)``.
2. **app.py path**: accelerate ``load_checkpoint_and_dispatch`` on ``ema.safetensors`` (or, for a
   sharded export, on the ``*.safetensors.index.json`` and on the directory). Anything the
   checkpoint does not fill stays on the meta device: reported as missing.
3. **eval-script path** (eval/vlm/utils.py, eval/gen/*.py; single file only): a materialised model,
   ``safetensors.torch.load_file(ema.safetensors)`` + ``load_state_dict(strict=False)``.
4. **training-resume path**: BAGEL's ``FSDPCheckpoint.try_load_ckpt(..., resume_from_ema=True)``
   (pops the two sin-cos tables and lets the model rebuild them; single file only).
5. every loaded tensor compared with the file's (exact); the two sin-cos tables BAGEL regenerates
   compared with the exported ones.
6. tokenizer (when tokenizer files are present): BAGEL's ``Qwen2Tokenizer.from_pretrained`` +
   ``data.data_utils.add_special_tokens``; the four ids must resolve.
7. ``--golden DIR``: BAGEL's ``Bagel.forward`` (train mode, flex path) on the golden batch with
   the golden flow noise fed in for ``torch.randn_like``; ce / mse / per-token outputs and the
   LLM input / last hidden state compared with the golden ones.

Prints a JSON summary; exit status 1 on any failure.

    /tmp/bagel_venv/bin/python scripts/check_bagel_loader.py --bagel-src /tmp/bagel_src \\
        --model-dir /tmp/x/export [--golden tests/fixtures/bagel_golden/tiny_v1]
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import importlib.machinery
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import types

import torch

FIXED_TABLES = ("latent_pos_embed.pos_embed", "vit_pos_embed.pos_embed")
SPECIAL = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")
# FLUX AE shape as BAGEL's load_ae hard-codes it
FLUX_AE = dict(in_channels=3, ch=128, out_ch=3, ch_mult=[1, 2, 4, 4], num_res_blocks=2, z_channels=16)


# ----------------------------------------------------------------------------------------------
# import-time shims for BAGEL's GPU-only dependencies (our own code)

def _varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                      dropout_p=0.0, softmax_scale=None, causal=False, **_):
    """flash_attn_varlen_func in plain torch: per-segment softmax attention, GQA by head groups,
    causal aligned bottom-right (flash-attn's convention)."""
    out = torch.empty_like(q)
    h, hk, d = q.shape[1], k.shape[1], q.shape[2]
    scale = softmax_scale if softmax_scale is not None else d ** -0.5
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(cq) - 1):
        qs, ks, vs = q[cq[i]:cq[i + 1]], k[ck[i]:ck[i + 1]], v[ck[i]:ck[i + 1]]
        if hk != h:
            ks = ks.repeat_interleave(h // hk, dim=1)
            vs = vs.repeat_interleave(h // hk, dim=1)
        s = torch.einsum("qhd,khd->hqk", qs.float(), ks.float()) * scale
        if causal:
            lq, lk = qs.shape[0], ks.shape[0]
            mask = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
            s = s.masked_fill(~mask, float("-inf"))
        p = torch.softmax(s, dim=-1)
        out[cq[i]:cq[i + 1]] = torch.einsum("hqk,khd->qhd", p, vs.float()).to(q.dtype)
    return out


def install_import_shims():
    if "flash_attn" not in sys.modules:
        mod = types.ModuleType("flash_attn")
        mod.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
        mod.flash_attn_varlen_func = _varlen_attention
        sys.modules["flash_attn"] = mod


class _TorchFp32Proxy:
    """Stands for the module-global ``torch`` of a BAGEL module: ``torch.bfloat16`` reads as float32,
    so its hard-coded attention casts become no-ops in an fp32 reference run."""

    def __getattr__(self, name):
        return torch.float32 if name == "bfloat16" else getattr(torch, name)


def install_runtime_shims(fp32_attention: bool):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    import modeling.bagel.bagel as bagel_mod
    import modeling.bagel.qwen2_navit as qwen2_navit
    import modeling.bagel.siglip_navit as siglip_navit

    qwen2_navit.flex_attention = flex_attention          # instead of torch.compile(flex_attention)

    def _create_block_mask(*a, **kw):
        kw["_compile"] = False
        return create_block_mask(*a, **kw)

    bagel_mod.create_block_mask = _create_block_mask
    qwen2_navit.sdpa_kernel = lambda *a, **kw: contextlib.nullcontext()
    if fp32_attention:
        qwen2_navit.torch = _TorchFp32Proxy()
        siglip_navit.torch = _TorchFp32Proxy()


@contextlib.contextmanager
def fixed_randn_like(tensor):
    """Bagel.forward draws the flow noise with torch.randn_like: hand it the golden noise."""
    orig = torch.randn_like
    calls = []

    def _randn_like(x, *a, **kw):
        if tuple(x.shape) == tuple(tensor.shape):
            calls.append(tuple(x.shape))
            return tensor.to(dtype=x.dtype, device=x.device).clone()
        return orig(x, *a, **kw)

    torch.randn_like = _randn_like
    try:
        yield calls
    finally:
        torch.randn_like = orig


# ----------------------------------------------------------------------------------------------

def weights_files(model_dir):
    """(kind, checkpoint arg for accelerate, {key: file})"""
    from safetensors import safe_open

    single = os.path.join(model_dir, "ema.safetensors")
    if os.path.exists(single):
        with safe_open(single, "pt") as f:
            return "single", single, {k: single for k in f.keys()}
    idx = sorted(glob.glob(os.path.join(model_dir, "*.safetensors.index.json")))
    if len(idx) != 1:
        raise SystemExit(f"{model_dir}: neither ema.safetensors nor exactly one *.safetensors.index.json")
    with open(idx[0]) as f:
        wm = json.load(f)["weight_map"]
    return "sharded", idx[0], {k: os.path.join(model_dir, v) for k, v in wm.items()}


def read_tensors(key_to_file):
    from safetensors import safe_open

    out = {}
    by_file = {}
    for k, fn in key_to_file.items():
        by_file.setdefault(fn, []).append(k)
    for fn, keys in by_file.items():
        with safe_open(fn, "pt") as f:
            fkeys = set(f.keys())
            for k in keys:
                if k not in fkeys:
                    raise SystemExit(f"index maps {k} to {fn}, which lacks it")
                out[k] = f.get_tensor(k)
    return out


def ae_params_from_file(path):
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        shp = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    ch = shp["encoder.conv_in.weight"][0]
    levels = len({k.split(".")[2] for k in shp if k.startswith("encoder.down.")})
    blocks = len({k.split(".")[4] for k in shp if k.startswith("encoder.down.0.block.")})
    return dict(in_channels=shp["encoder.conv_in.weight"][1], ch=ch, out_ch=shp["decoder.conv_out.weight"][0],
                ch_mult=[shp[f"encoder.down.{i}.block.0.conv1.weight"][0] // ch for i in range(levels)],
                num_res_blocks=blocks, z_channels=shp["decoder.conv_in.weight"][1])


def compare(name, loaded: dict, expected: dict, cast_to=None):
    """Exact comparison of every expected tensor with the loaded one."""
    bad, n = [], 0
    for k, e in expected.items():
        if k not in loaded:
            continue
        t = loaded[k].detach()
        if t.device.type == "meta":
            bad.append(f"{k}: on meta (not loaded)")
            continue
        e2 = e.to(cast_to if cast_to is not None else t.dtype)
        n += 1
        if tuple(t.shape) != tuple(e2.shape):
            bad.append(f"{k}: shape {tuple(t.shape)} vs file {tuple(e2.shape)}")
        elif not torch.equal(t.to(e2.dtype), e2):
            bad.append(f"{k}: values differ, max |diff| {float((t.float() - e.float()).abs().max()):.3g}")
    return {"compared": n, "equal": n - len(bad), "mismatches": bad[:20], "ok": not bad}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bagel-src", required=True, help="a checkout of ByteDance-Seed/Bagel")
    ap.add_argument("--model-dir", required=True, help="a BAGEL-layout export")
    ap.add_argument("--golden", help="golden fixture dir (batch.safetensors, meta.json): run Bagel.forward on it")
    ap.add_argument("--vit-max-patches-per-side", type=int, help="BagelConfig value (default: golden meta, "
                    "else from vit_pos_embed.pos_embed in the weights, else 70)")
    ap.add_argument("--max-latent-size", type=int, help="default: golden meta, else latent_pos_embed, else 64")
    ap.add_argument("--latent-patch-size", type=int, help="default: golden meta, else 2")
    ap.add_argument("--timestep-shift", type=float, help="default: golden meta, else BagelConfig's default")
    ap.add_argument("--dispatch-dtype", choices=["none", "bf16"], default="none",
                    help="dtype= of load_checkpoint_and_dispatch (app.py passes bfloat16; default none = "
                         "the model's fp32, so bf16 files load exactly)")
    ap.add_argument("--tol", type=float, default=1e-4, help="fp32 max |diff| allowed vs golden")
    ap.add_argument("--bf16-rel-tol", type=float, default=5e-2,
                    help="bf16 export: relative ce/mse deviation above which it fails (it is reported anyway)")
    ap.add_argument("--json-out", help="also write the summary here")
    args = ap.parse_args(argv)

    t0 = time.time()
    torch.manual_seed(0)
    bagel_src = os.path.abspath(args.bagel_src)
    model_dir = os.path.abspath(args.model_dir)
    install_import_shims()
    sys.path.insert(0, bagel_src)
    cwd = os.getcwd()

    from accelerate import init_empty_weights, load_checkpoint_and_dispatch
    from safetensors.torch import load_file

    import modeling.autoencoder as ae_mod
    from data.data_utils import add_special_tokens
    from modeling.bagel import Bagel, BagelConfig, Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel
    from modeling.qwen2 import Qwen2Tokenizer

    install_runtime_shims(fp32_attention=True)

    failures = []
    summary = {"model_dir": model_dir, "bagel_src": bagel_src, "torch": torch.__version__}
    try:
        import subprocess
        summary["bagel_commit"] = subprocess.run(["git", "-C", bagel_src, "rev-parse", "HEAD"], capture_output=True,
                                                 text=True).stdout.strip() or None
    except OSError:
        pass
    import accelerate
    import transformers
    summary["transformers"], summary["accelerate"] = transformers.__version__, accelerate.__version__

    meta = None
    if args.golden:
        with open(os.path.join(args.golden, "meta.json")) as f:
            meta = json.load(f)

    kind, ckpt_arg, key_to_file = weights_files(model_dir)
    file_sd = read_tensors(key_to_file)
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in file_sd.values()})
    summary["weights"] = {"layout": kind, "checkpoint": os.path.relpath(ckpt_arg, model_dir),
                          "files": sorted({os.path.basename(v) for v in key_to_file.values()}),
                          "num_tensors": len(file_sd), "dtypes": dtypes}
    is_bf16 = dtypes == ["bfloat16"] or args.dispatch_dtype == "bf16"

    # ---- BagelConfig settings (not in the release files) ----
    gb = (meta or {}).get("config", {}).get("bagel", {})
    vit_side = args.vit_max_patches_per_side or gb.get("vit_max_num_patch_per_side") or (
        math.isqrt(file_sd["vit_pos_embed.pos_embed"].shape[0]) if "vit_pos_embed.pos_embed" in file_sd else 70)
    max_lat = args.max_latent_size or gb.get("max_latent_size") or (
        math.isqrt(file_sd["latent_pos_embed.pos_embed"].shape[0]) if "latent_pos_embed.pos_embed" in file_sd else 64)
    lps = args.latent_patch_size or gb.get("latent_patch_size") or 2
    bagel_kw = dict(vit_max_num_patch_per_side=vit_side, connector_act="gelu_pytorch_tanh", latent_patch_size=lps,
                    max_latent_size=max_lat)
    ts = args.timestep_shift if args.timestep_shift is not None else gb.get("timestep_shift")
    if ts is not None:
        bagel_kw["timestep_shift"] = ts
    summary["bagel_config"] = bagel_kw

    # ---- configs, exactly as app.py ----
    llm_config = Qwen2Config.from_json_file(os.path.join(model_dir, "llm_config.json"))
    llm_config.qk_norm = True
    llm_config.tie_word_embeddings = False
    llm_config.layer_module = "Qwen2MoTDecoderLayer"
    vit_config = SiglipVisionConfig.from_json_file(os.path.join(model_dir, "vit_config.json"))
    vit_config.rope = False
    vit_config.num_hidden_layers -= 1

    # ---- AE: BAGEL's load_ae ----
    ae_path = os.path.join(model_dir, "ae.safetensors")
    ae_shape = ae_params_from_file(ae_path)
    orig_params = ae_mod.AutoEncoderParams
    if ae_shape != FLUX_AE:      # load_ae hard-codes FLUX's shape: give it the file's
        ae_mod.AutoEncoderParams = lambda **kw: orig_params(**{**kw, **ae_shape})
    try:
        vae_model, vae_config = ae_mod.load_ae(local_path=ae_path)
    finally:
        ae_mod.AutoEncoderParams = orig_params
    ae_file = load_file(ae_path)
    ae_sd = vae_model.state_dict()
    ae_missing = sorted(set(ae_sd) - set(ae_file))
    ae_unexp = sorted(set(ae_file) - set(ae_sd))
    ae_cmp = compare("ae", ae_sd, ae_file)
    summary["ae"] = {"load_ae_shape": "FLUX (as hard-coded)" if ae_shape == FLUX_AE else
                     f"from the file (load_ae's AutoEncoderParams given {ae_shape})",
                     "missing": ae_missing, "unexpected": ae_unexp, "tensors": ae_cmp}
    if ae_missing or ae_unexp or not ae_cmp["ok"]:
        failures.append("ae.safetensors does not load exactly")

    config = BagelConfig(visual_gen=True, visual_und=True, llm_config=llm_config, vit_config=vit_config,
                         vae_config=vae_config, **bagel_kw)

    def build(empty: bool):
        ctx = init_empty_weights() if empty else contextlib.nullcontext()
        with ctx:
            language_model = Qwen2ForCausalLM(llm_config)
            vit_model = SiglipVisionModel(vit_config)
            model = Bagel(language_model, vit_model, config)
            model.vit_model.vision_model.embeddings.convert_conv2d_to_linear(vit_config, meta=empty)
        return model

    # ---- 1. app.py: init_empty_weights + load_checkpoint_and_dispatch ----
    dispatch_dtype = torch.bfloat16 if args.dispatch_dtype == "bf16" else None
    checkpoints = [ckpt_arg] + ([model_dir] if kind == "sharded" else [])
    app_results = []
    model = None
    offload_dir = tempfile.mkdtemp(prefix="bagel_offload_")   # app.py passes one; unused with a CPU map
    for ck in checkpoints:
        m = build(empty=True)
        expected_keys = set(m.state_dict())
        res = {"checkpoint": os.path.relpath(ck, model_dir) if ck != model_dir else "<model dir>"}
        try:
            m = load_checkpoint_and_dispatch(m, checkpoint=ck, device_map={"": "cpu"}, offload_buffers=True,
                                             offload_folder=offload_dir,
                                             dtype=dispatch_dtype, force_hooks=True).eval()
        except Exception as e:  # noqa: BLE001
            res["error"] = f"{type(e).__name__}: {e}"
            failures.append(f"load_checkpoint_and_dispatch({res['checkpoint']}) raised")
            app_results.append(res)
            continue
        sd = m.state_dict()
        still_meta = sorted(k for k, t in list(m.named_parameters()) + list(m.named_buffers())
                            if t.device.type == "meta")
        # (accelerate warns "Some parameters are on the meta device because they were offloaded to the
        # cpu" for any map containing "cpu"; this list is what is really left unloaded)
        res["missing_left_on_meta"] = still_meta
        res["unexpected_in_file"] = sorted(set(file_sd) - expected_keys)
        res["not_in_file"] = sorted(expected_keys - set(file_sd))
        res["param_dtypes"] = sorted({str(p.dtype).replace("torch.", "") for p in m.parameters()})
        res["tensors"] = compare("app", sd, file_sd, cast_to=dispatch_dtype)
        if still_meta or res["unexpected_in_file"] or res["not_in_file"] or not res["tensors"]["ok"]:
            failures.append(f"load_checkpoint_and_dispatch({res['checkpoint']}): keys or values wrong")
        app_results.append(res)
        if model is None:
            model = m
    summary["app_load_checkpoint_and_dispatch"] = app_results
    shutil.rmtree(offload_dir, ignore_errors=True)

    # ---- 2. eval scripts: load_file(ema.safetensors) + load_state_dict(strict=False) ----
    if kind == "single":
        m = build(empty=False)
        msg = m.load_state_dict(load_file(ckpt_arg, device="cpu"), strict=False)
        res = {"missing": list(msg.missing_keys), "unexpected": list(msg.unexpected_keys),
               "tensors": compare("eval", m.state_dict(), file_sd)}
        if msg.missing_keys or msg.unexpected_keys or not res["tensors"]["ok"]:
            failures.append("eval-script load_state_dict: keys or values wrong")
        summary["eval_load_state_dict"] = res
        del m
    else:
        summary["eval_load_state_dict"] = "skipped: the eval scripts and try_load_ckpt read ema.safetensors only"

    # ---- 3. training resume: FSDPCheckpoint.try_load_ckpt(resume_from_ema=True) ----
    if kind == "single":
        from train.fsdp_utils import FSDPCheckpoint

        class _Log:
            def __init__(self):
                self.msgs = []

            def info(self, m):
                self.msgs.append(m)

        log = _Log()
        m = build(empty=False)
        m, _ = FSDPCheckpoint.try_load_ckpt(model_dir, log, m, ema_model=None, resume_from_ema=True)
        msg = next((x for x in log.msgs if hasattr(x, "missing_keys")), None)
        sd = m.state_dict()
        regenerated = {k: ({"exact": torch.equal(sd[k], file_sd[k].to(sd[k].dtype)),
                            "at_file_dtype": torch.equal(sd[k].to(file_sd[k].dtype), file_sd[k])}
                           if k in file_sd else None) for k in FIXED_TABLES}
        res = {"missing": list(msg.missing_keys) if msg else None,
               "unexpected": list(msg.unexpected_keys) if msg else None,
               "missing_note": "the two sin-cos tables are popped by try_load_ckpt and rebuilt by the model",
               "regenerated_tables_equal_file": regenerated,
               "tensors": compare("resume", sd, {k: v for k, v in file_sd.items() if k not in FIXED_TABLES})}
        if msg is None or sorted(msg.missing_keys) != sorted(FIXED_TABLES) or msg.unexpected_keys \
                or not res["tensors"]["ok"]:
            failures.append("try_load_ckpt: keys or values wrong")
        if not all(v and v["at_file_dtype"] for v in regenerated.values()):
            failures.append("exported sin-cos tables differ from BAGEL's regenerated ones (at the file's dtype)")
        summary["train_try_load_ckpt"] = res
        del m

    # ---- tokenizer ----
    if any(os.path.exists(os.path.join(model_dir, f)) for f in TOKENIZER_FILES):
        res = {"files": sorted(f for f in os.listdir(model_dir) if f in TOKENIZER_FILES or f.endswith(".json")
                               and ("token" in f or "chat" in f or "generation" in f))}
        try:
            tok = Qwen2Tokenizer.from_pretrained(model_dir)
            n_before = len(tok)
            tok, new_ids, num_new = add_special_tokens(tok)
            res.update(cls=type(tok).__name__, len_before=n_before, num_new_tokens=num_new, new_token_ids=new_ids,
                       len_after=len(tok), llm_vocab_size=llm_config.vocab_size)
            text = "How many red circles are there?"
            ids = tok.encode(text)
            res["encode_example"] = {"text": text, "ids": ids, "decode_roundtrip": tok.decode(ids) == text}
            unk = [k for k, v in new_ids.items() if v is None or v == tok.unk_token_id]
            if unk or num_new:
                failures.append(f"tokenizer: special tokens not in the exported files ({num_new} added, {unk})")
            res["ids_within_llm_vocab"] = all(v < llm_config.vocab_size for v in new_ids.values())
        except Exception as e:  # noqa: BLE001
            res["error"] = f"{type(e).__name__}: {e}"
            failures.append("tokenizer: Qwen2Tokenizer.from_pretrained / add_special_tokens failed")
        summary["tokenizer"] = res
    else:
        summary["tokenizer"] = "no tokenizer files in the export"

    # ---- golden forward ----
    if args.golden and model is not None:
        summary["golden"] = golden_forward(model, args.golden, meta, is_bf16, args, failures)

    os.chdir(cwd)
    summary["seconds"] = round(time.time() - t0, 1)
    summary["failures"] = failures
    summary["ok"] = not failures
    text = json.dumps(summary, indent=1, default=str)
    print(text)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(text + "\n")
    return 0 if not failures else 1


def golden_forward(model, golden, meta, is_bf16, args, failures):
    from safetensors.torch import load_file

    b = load_file(os.path.join(golden, "batch.safetensors"))
    mb = meta["batch"]
    model = model.float().train()
    kw = dict(
        sequence_length=int(mb["sequence_length"]),
        packed_text_ids=b["packed_text_ids"], packed_text_indexes=b["packed_text_indexes"],
        sample_lens=[int(x) for x in mb["sample_lens"]], packed_position_ids=b["packed_position_ids"],
        split_lens=[int(x) for x in mb["split_lens"]], attn_modes=list(mb["attn_modes"]),
        ce_loss_indexes=b["ce_loss_indexes"], packed_label_ids=b["packed_label_ids"],
        packed_vit_tokens=b["packed_vit_tokens"], packed_vit_token_indexes=b["packed_vit_token_indexes"],
        packed_vit_position_ids=b["packed_vit_position_ids"], vit_token_seqlens=b["vit_token_seqlens"],
        padded_latent=b["padded_latent"],
        patchified_vae_latent_shapes=[tuple(int(v) for v in s) for s in mb["patchified_vae_latent_shapes"]],
        packed_latent_position_ids=b["packed_latent_position_ids"],
        packed_vae_token_indexes=b["packed_vae_token_indexes"], packed_timesteps=b["packed_timesteps"],
        mse_loss_indexes=b["mse_loss_indexes"],
    )
    cap = {}
    h1 = model.language_model.register_forward_pre_hook(
        lambda mod, a, k: cap.__setitem__("input_embeds", k["packed_sequence"].detach().clone()), with_kwargs=True)
    h2 = model.language_model.register_forward_hook(
        lambda mod, a, out: cap.__setitem__("last_hidden_state", out.detach().clone()))
    with torch.no_grad(), fixed_randn_like(b["noise"]) as calls:
        out = model(**kw)
    h1.remove()
    h2.remove()
    ce_tok, mse_tok = out["ce"].float(), out["mse"].float()
    ce = float(ce_tok.sum() / ce_tok.numel())
    mse = float(mse_tok.mean(-1).sum() / mse_tok.shape[0])
    L = int(mb["sequence_length"])

    def mad(a, e):
        return float((a.float()[:e.shape[0]] - e.float()).abs().max())

    res = {
        "noise_fed": len(calls) == 1,
        "ce": ce, "golden_ce": float(b["ce"]), "mse": mse, "golden_mse": float(b["mse"]),
        "ce_abs_diff": abs(ce - float(b["ce"])), "mse_abs_diff": abs(mse - float(b["mse"])),
        "ce_rel_diff": abs(ce - float(b["ce"])) / abs(float(b["ce"])),
        "mse_rel_diff": abs(mse - float(b["mse"])) / abs(float(b["mse"])),
        "max_abs_diff": {
            "ce_tok": mad(ce_tok, b["ce_tok"]), "mse_tok": mad(mse_tok, b["mse_tok"]),
            "input_embeds": mad(cap["input_embeds"][:L], b["input_embeds"]),
            "last_hidden_state": mad(cap["last_hidden_state"][:L], b["last_hidden_state"]),
        },
        "shims": "flash_attn_varlen_func -> plain torch; flex_attention uncompiled; create_block_mask(_compile=False);"
                 " .to(torch.bfloat16) attention casts -> float32; torch.randn_like -> golden noise",
    }
    if not res["noise_fed"]:
        failures.append("golden: the golden noise was not fed (randn_like not called once)")
    if is_bf16:
        res["mode"] = ("bf16 weights (bf16 export, or --dispatch-dtype bf16), forward in fp32: the deviation is "
                       "the bf16 rounding of the weights")
        if max(res["ce_rel_diff"], res["mse_rel_diff"]) > args.bf16_rel_tol or not math.isfinite(ce + mse):
            failures.append(f"golden (bf16): relative loss deviation above {args.bf16_rel_tol}")
    else:
        res["mode"] = f"fp32: every max |diff| must be <= {args.tol}"
        worst = max([res["ce_abs_diff"], res["mse_abs_diff"], *res["max_abs_diff"].values()])
        res["worst"] = worst
        if not worst <= args.tol:
            failures.append(f"golden (fp32): max |diff| {worst:.3g} > {args.tol}")
    return res


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
