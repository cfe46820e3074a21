"""This stack's train step against BAGEL's own PyTorch training step, side by side in one run.

    python bench/step_vs_bagel.py [--rounds 6] [--block 2] [--attention_impl dense] \\
        [--bagel-python /tmp/bagel_venv/bin/python] [--bagel-src /tmp/bagel_src]

Two long-lived processes, interleaved: this one (JAX: ``train/loop.Program``'s jitted step) and a
worker in BAGEL's virtualenv (torch, no JAX; BAGEL's code imported from ``--bagel-src`` with the
CPU import-time shims of ``scripts/check_bagel_loader.py``). Each round runs a block of JAX steps,
then a block of BAGEL steps, so machine noise hits both alike; both use ``--threads`` threads.

Same model and same row on both sides: a small BAGEL (4 MoT layers, hidden 512, SigLIP 4 layers,
FLUX-structured AE ch 32 / z 16), randomly initialised here and exported under BAGEL's key names
(``convert/keymap.export_state`` / ``export_vae``, ``bagel_io.bagel_config_files``); one packed row
of 2176 tokens (6 samples: 3 image-understanding samples with 1167 ViT patches, 3 text-to-image
samples with 768 noised latent tokens, 146 text tokens incl. specials, 95 padding), written once in
the golden-fixture format (the JAX side reads it with ``convert/check_golden.packed_batch_from_golden``,
BAGEL's ``Bagel.forward`` takes it as it is).

The BAGEL step is its training loop's (train/pretrain_unified_navit.py) on one process:
``vae_model.encode(padded_images)`` under no_grad; ``Bagel.forward`` with
``nested_attention_masks`` (its per-sample SDPA path, masks from BAGEL's own
``prepare_attention_mask_per_sample``; attention in fp32: the hard-coded bf16 casts are mapped to
fp32 as for the golden fixtures); loss = ce (token mean) + mse; backward; ``clip_grad_norm_``;
``torch.optim.AdamW``; the EMA update with ``torch._foreach_mul_/add_`` as ``fsdp_ema_update``.
The JAX step is ``sgt_train_step`` (VAE encode, forward, backward, clip, AdamW, EMA, NaN guard).

Measured: the full step; and its parts -- VAE encode, forward+backward, optimizer(+clip, EMA).
BAGEL's parts are timed inside its eager step; the JAX parts are separately jitted functions of
the same code (``step.encode_images``, the step's loss under ``value_and_grad``, the optimizer
tail). FLOPs: JAX = XLA's ``cost_analysis()["flops"]`` of the compiled function (every HLO op,
elementwise included); PyTorch = ``torch.utils.flop_counter.FlopCounterMode`` over one step
(matmuls, convolutions and SDPA only). Sanity: the CE of the first step does not depend on the
flow noise (no CE position attends to a noised latent), so both sides must agree on it.

Writes bench/results/step_vs_bagel.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW_TOKENS = 2176
VQA_VIT = ((20, 20), (19, 19), (14, 29))      # ViT patch grids of the 3 understanding images (1167 patches)
VQA_TEXT = (30, 28, 32)                      # their question+answer text (CE on all but the last token)
T2I_TEXT = (15, 14, 15)                      # the 3 prompts
T2I_LATENT = (16, 16)                        # latent tokens per generated image (256 px, 768 in all)
SPECIAL = 4                                  # bos, eos, start_of_image, end_of_image = vocab - 4 ...
IMPLS = ("dense", "blocked", "auto")


# ------------------------------------------------------------------------------------------------
# the torch worker (runs in BAGEL's venv; imports neither jax nor sgt_jax)

def torch_worker(args):
    out = os.fdopen(os.dup(1), "w", buffering=1)     # results; everything printed goes to stderr
    os.dup2(2, 1)
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import check_bagel_loader as cbl                 # BAGEL's CPU import shims (ours)

    cbl.install_import_shims()
    sys.path.insert(0, os.path.abspath(args.bagel_src))
    import modeling.autoencoder as ae_mod
    from data.data_utils import prepare_attention_mask_per_sample
    from modeling.bagel import Bagel, BagelConfig, Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel
    from safetensors.torch import load_file
    from torch.utils.flop_counter import FlopCounterMode

    cbl.install_runtime_shims(fp32_attention=True)
    d = args.dir
    with open(os.path.join(d, "row.json")) as f:
        meta = json.load(f)
    llm_config = Qwen2Config.from_json_file(os.path.join(d, "llm_config.json"))
    llm_config.qk_norm, llm_config.tie_word_embeddings = True, False
    llm_config.layer_module = "Qwen2MoTDecoderLayer"
    vit_config = SiglipVisionConfig.from_json_file(os.path.join(d, "vit_config.json"))
    vit_config.rope = False
    vit_config.num_hidden_layers -= 1
    ae_path = os.path.join(d, "ae.safetensors")
    orig = ae_mod.AutoEncoderParams
    shape = cbl.ae_params_from_file(ae_path)
    ae_mod.AutoEncoderParams = lambda **kw: orig(**{**kw, **shape})
    try:
        vae, vae_config = ae_mod.load_ae(local_path=ae_path)
    finally:
        ae_mod.AutoEncoderParams = orig
    vae.eval()
    config = BagelConfig(visual_gen=True, visual_und=True, llm_config=llm_config, vit_config=vit_config,
                         vae_config=vae_config, **meta["bagel_config"])
    model = Bagel(Qwen2ForCausalLM(llm_config), SiglipVisionModel(vit_config), config)
    model.vit_model.vision_model.embeddings.convert_conv2d_to_linear(vit_config, meta=False)
    msg = model.load_state_dict(load_file(os.path.join(d, "ema.safetensors")), strict=False)
    model.float().train()

    b = load_file(os.path.join(d, "row.safetensors"))
    mb = meta["batch"]
    masks, i = [], 0
    for n in mb["samples_split_counts"]:
        masks.append(prepare_attention_mask_per_sample(mb["split_lens"][i:i + n], mb["attn_modes"][i:i + n]))
        i += n
    kw = dict(sequence_length=int(mb["sequence_length"]), packed_text_ids=b["packed_text_ids"],
              packed_text_indexes=b["packed_text_indexes"], sample_lens=list(mb["sample_lens"]),
              packed_position_ids=b["packed_position_ids"], nested_attention_masks=masks,
              split_lens=list(mb["split_lens"]), attn_modes=list(mb["attn_modes"]),
              ce_loss_indexes=b["ce_loss_indexes"], packed_label_ids=b["packed_label_ids"],
              packed_vit_tokens=b["packed_vit_tokens"], packed_vit_token_indexes=b["packed_vit_token_indexes"],
              packed_vit_position_ids=b["packed_vit_position_ids"], vit_token_seqlens=b["vit_token_seqlens"],
              patchified_vae_latent_shapes=[tuple(s) for s in mb["patchified_vae_latent_shapes"]],
              packed_latent_position_ids=b["packed_latent_position_ids"],
              packed_vae_token_indexes=b["packed_vae_token_indexes"], packed_timesteps=b["packed_timesteps"],
              mse_loss_indexes=b["mse_loss_indexes"])
    images = b["padded_images"]
    t = meta["train"]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t["lr"], betas=(t["b1"], t["b2"]), eps=t["eps"],
                            weight_decay=t["weight_decay"])
    ema = [p.detach().clone() for p in params]
    n_ce, n_mse = len(b["ce_loss_indexes"]), len(b["mse_loss_indexes"])

    def step():
        t0 = time.perf_counter()
        with torch.no_grad():
            latent = vae.encode(images)
        t1 = time.perf_counter()
        o = model(**kw, padded_latent=latent)
        ce = o["ce"].sum() / n_ce
        loss = t["ce_weight"] * ce + t["mse_weight"] * o["mse"].mean(-1).sum() / n_mse
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, t["max_grad_norm"])
        opt.step()
        with torch.no_grad():
            torch._foreach_mul_(ema, t["ema_decay"])
            torch._foreach_add_(ema, [p.detach() for p in params], alpha=1 - t["ema_decay"])
        t3 = time.perf_counter()
        return {"full": t3 - t0, "vae": t1 - t0, "fwd_bwd": t2 - t1, "opt": t3 - t2,
                "ce": float(ce.detach()), "loss": float(loss.detach())}

    def send(obj):
        out.write(json.dumps(obj) + "\n")

    send({"ready": True, "missing": sorted(msg.missing_keys), "unexpected": sorted(msg.unexpected_keys),
          "torch": torch.__version__, "threads": torch.get_num_threads()})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "steps":
            send({"times": [step() for _ in range(cmd["n"])]})
        elif cmd["op"] == "flops":
            parts = {}
            with torch.no_grad(), FlopCounterMode(display=False) as fc:
                latent = vae.encode(images)
            parts["vae"] = fc.get_total_flops()
            with FlopCounterMode(display=False) as fc:
                o = model(**kw, padded_latent=latent)
                loss = o["ce"].sum() / n_ce + o["mse"].mean(-1).sum() / n_mse
                opt.zero_grad(set_to_none=True)
                loss.backward()
            parts["fwd_bwd"] = fc.get_total_flops()
            with FlopCounterMode(display=False) as fc:
                torch.nn.utils.clip_grad_norm_(params, t["max_grad_norm"])
                opt.step()
            parts["opt"] = fc.get_total_flops()
            parts["full"] = parts["vae"] + parts["fwd_bwd"] + parts["opt"]
            send({"flops": parts})
        elif cmd["op"] == "quit":
            send({"bye": True})
            return


# ------------------------------------------------------------------------------------------------
# the shared model config and packed row (JAX side writes them)

def bench_config(attention_impl: str):
    import importlib

    cfg = importlib.import_module("configs.tiny").get_config()
    m = cfg.model
    m.llm.update(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_layers=4, num_heads=8,
                 num_kv_heads=2, bos_token_id=4092, eos_token_id=4093, start_of_image=4094, end_of_image=4095)
    m.vit.update(hidden_size=384, intermediate_size=1536, num_layers=4, num_heads=6, max_patches_per_side=32)
    m.vae.update(ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=16)
    m.bagel.update(vit_max_num_patch_per_side=32, max_latent_size=32, timestep_shift=1.0)
    m.llm.attention_impl = attention_impl
    if "attention_impl" in m.vit:
        m.vit.attention_impl = attention_impl
    cfg.data.update(rows_per_batch=1, tokens_per_row=ROW_TOKENS, gen_tokens_per_row=768,
                    vit_patches_per_row=sum(h * w for h, w in VQA_VIT), vae_images_per_row=len(T2I_TEXT),
                    vae_image_size=256, max_tokens_per_sample=ROW_TOKENS, ce_tokens_per_row=128)
    cfg.data.vae_images_dtype = "float32"
    cfg.train.update(lr=1e-4, warmup_steps=0, max_grad_norm=1.0, ema_decay=0.999)
    cfg.mesh.update(data=1, fsdp=1, tensor=1)
    return cfg


def make_row(cfg, seed: int = 0):
    """(meta, tensors) of one packed row in the golden-fixture format (BAGEL's forward inputs)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    llm = cfg.model.llm
    p, side = cfg.model.vit.patch_size, cfg.model.vit.max_patches_per_side
    lp, ml = cfg.model.bagel.latent_patch_size, cfg.model.bagel.max_latent_size
    z = cfg.model.vae.z_channels
    text_ids, text_idx, pos, vit_idx, vit_pos, seqlens, vae_idx, lat_pos = ([] for _ in range(8))
    ce_idx, labels, mse_idx, sample_lens, split_lens, modes, nsplits = ([] for _ in range(7))
    cur = 0

    def text(ids, rope):
        nonlocal cur
        text_ids.extend(ids)
        text_idx.extend(range(cur, cur + len(ids)))
        pos.extend(range(rope, rope + len(ids)))
        cur += len(ids)
        return rope + len(ids)

    def words(n):
        return rng.integers(0, llm.vocab_size - SPECIAL, n).tolist()

    for (h, w), m in zip(VQA_VIT, VQA_TEXT):          # image understanding: [<img> patches </img>] [text]
        start = cur
        text([llm.start_of_image], 0)
        vit_idx.extend(range(cur, cur + h * w))
        vit_pos.extend((np.arange(h)[:, None] * side + np.arange(w)[None]).reshape(-1).tolist())
        seqlens.append(h * w)
        pos.extend([0] * (h * w))
        cur += h * w
        text([llm.end_of_image], 0)
        ids = words(m)
        c0 = cur
        text(ids, 1)
        ce_idx.extend(range(c0, c0 + m - 1))
        labels.extend(ids[1:])
        split_lens += [h * w + 2, m]
        modes += ["full", "causal"]
        sample_lens.append(cur - start)
        nsplits.append(2)
    for m in T2I_TEXT:                                # text to image: [prompt] [<img> latents </img>]
        start = cur
        rope = text(words(m), 0)
        text([llm.start_of_image], rope)
        hh, ww = T2I_LATENT
        vae_idx.extend(range(cur, cur + hh * ww))
        mse_idx.extend(range(cur, cur + hh * ww))
        lat_pos.extend((np.arange(hh)[:, None] * ml + np.arange(ww)[None]).reshape(-1).tolist())
        pos.extend([rope] * (hh * ww))
        cur += hh * ww
        text([llm.end_of_image], rope)
        split_lens += [m, hh * ww + 2]
        modes += ["causal", "noise"]
        sample_lens.append(cur - start)
        nsplits.append(2)
    assert len(pos) == cur              # appended in sequence order
    n_img = len(T2I_TEXT)
    size = T2I_LATENT[0] * lp * 2 ** (len(cfg.model.vae.ch_mult) - 1)
    i64 = lambda a: np.asarray(a, np.int64)
    t = {"packed_text_ids": i64(text_ids), "packed_text_indexes": i64(text_idx), "packed_position_ids": i64(pos),
         "packed_vit_tokens": rng.uniform(-1, 1, (len(vit_idx), 3 * p * p)).astype(np.float32),
         "packed_vit_token_indexes": i64(vit_idx), "packed_vit_position_ids": i64(vit_pos),
         "vit_token_seqlens": np.asarray(seqlens, np.int32),
         "padded_images": rng.uniform(-1, 1, (n_img, 3, size, size)).astype(np.float32),
         "padded_latent": np.zeros((n_img, z, size // 8, size // 8), np.float32),   # JAX side only (shapes)
         "noise": np.zeros((len(vae_idx), lp * lp * z), np.float32),                 # JAX side only (shapes)
         "packed_latent_position_ids": i64(lat_pos), "packed_vae_token_indexes": i64(vae_idx),
         "packed_timesteps": rng.standard_normal(len(vae_idx)).astype(np.float32),
         "ce_loss_indexes": i64(ce_idx), "packed_label_ids": i64(labels), "mse_loss_indexes": i64(mse_idx),
         "patchified_vae_latent_shapes": np.asarray([T2I_LATENT] * n_img, np.int64)}
    # one timestep per image, as BAGEL draws them
    t["packed_timesteps"] = np.repeat(rng.standard_normal(n_img).astype(np.float32), T2I_LATENT[0] * T2I_LATENT[1])
    meta = {"batch": {"sequence_length": cur, "sample_lens": sample_lens, "split_lens": split_lens,
                      "attn_modes": modes, "samples_split_counts": nsplits,
                      "patchified_vae_latent_shapes": [list(T2I_LATENT)] * n_img},
            "bagel_config": {"vit_max_num_patch_per_side": cfg.model.bagel.vit_max_num_patch_per_side,
                             "connector_act": "gelu_pytorch_tanh", "latent_patch_size": lp, "max_latent_size": ml,
                             "timestep_shift": float(cfg.model.bagel.timestep_shift)},
            "train": {k: float(cfg.train[k]) for k in ("lr", "b1", "b2", "eps", "weight_decay", "max_grad_norm",
                                                       "ema_decay", "ce_weight", "mse_weight")},
            "counts": {"tokens": cur, "row": ROW_TOKENS, "vit": len(vit_idx), "latent": len(vae_idx),
                       "text": len(text_ids), "samples": len(sample_lens), "ce": len(ce_idx)}}
    assert cur == sum(sample_lens) == sum(split_lens) <= ROW_TOKENS
    return meta, t


# ------------------------------------------------------------------------------------------------
# the JAX side

def _flops(compiled) -> float:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0]
    return float(ca.get("flops", float("nan")))


class JaxSide:
    def __init__(self, cfg, d: str, meta: dict, tensors: dict):
        import jax
        import jax.numpy as jnp
        import optax
        from flax import nnx
        from safetensors.numpy import save_file

        from sgt_jax.convert import keymap
        from sgt_jax.convert.bagel_io import bagel_config_files
        from sgt_jax.convert.check_golden import packed_batch_from_golden
        from sgt_jax.parallel import mesh as mesh_lib
        from sgt_jax.train import loop
        from sgt_jax.train import step as step_lib
        from sgt_jax.train.optimizer import ema_update

        self.jax = jax
        mesh = mesh_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
        t0 = time.perf_counter()
        self.program = prog = loop.Program(cfg, mesh=mesh)
        self.state, self.consts = prog.init(0)
        self.init_s = time.perf_counter() - t0
        # the same weights for BAGEL, under its names
        model = nnx.merge(prog.graphdef, self.state.params, self.consts.frozen, self.consts.fixed)
        save_file({k: v.copy() for k, v in keymap.export_state(model, keymap.bagel_table(cfg.model)).items()},
                  os.path.join(d, "ema.safetensors"))
        vae = nnx.merge(prog.vae_graphdef, self.consts.vae)
        save_file({k: v.copy() for k, v in keymap.export_vae(vae).items()}, os.path.join(d, "ae.safetensors"))
        lj, vj = bagel_config_files(cfg.model, torch_dtype="float32")
        for name, obj in (("llm_config.json", lj), ("vit_config.json", vj)):
            with open(os.path.join(d, name), "w") as f:
                json.dump(obj, f, indent=1)
        gmeta = {"batch": {**meta["batch"], "sample_lens": meta["batch"]["sample_lens"]}}
        batch, _, num_gen = packed_batch_from_golden(gmeta, tensors, cfg.model, pad_to=ROW_TOKENS)
        assert num_gen == prog.num_gen, (num_gen, prog.num_gen)
        assert meta["counts"]["ce"] <= prog.num_ce, "the row has more CE tokens than data.ce_tokens_per_row"
        self.batch = jax.device_put(batch.replace(latents=None), prog.batch_sharding)
        rows = jnp.arange(1)
        key = jax.random.key(0)
        k_vae, k_noise = jax.random.split(key)
        t = cfg.train
        vae_fn = jax.jit(lambda consts, imgs: step_lib.encode_images(prog.vae_graphdef, consts.vae, imgs, k_vae, rows))
        grad_fn = jax.jit(jax.value_and_grad(step_lib._loss_fn(prog.graphdef, t, prog.num_gen), has_aux=True))

        def opt_fn(state, grads):
            norm = optax.global_norm(grads)
            updates, opt_state = prog.tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            ema = ema_update(state.ema, params, t.ema_decay)
            ok = jnp.isfinite(norm)
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
            return keep(params, state.params), keep(opt_state, state.opt_state), keep(ema, state.ema)

        opt_fn = jax.jit(opt_fn)
        self.latents = vae_fn(self.consts, self.batch.vae_images)
        self.mb = self.batch.replace(latents=self.latents, vae_images=None)
        self.fns = {
            "full": (prog.step_fn, lambda: (self.state, self.consts, self.batch)),
            "vae": (vae_fn, lambda: (self.consts, self.batch.vae_images)),
            "fwd_bwd": (grad_fn, lambda: (self.state.params, self.consts, self.mb, k_noise, rows)),
        }
        (_, _), grads = grad_fn(self.state.params, self.consts, self.mb, k_noise, rows)
        self.grads = grads
        self.fns["opt"] = (opt_fn, lambda: (self.state, self.grads))
        tc = time.perf_counter()
        prog.step_fn.lower(*self.fns["full"][1]()).compile()
        self.compile_s = time.perf_counter() - tc
        # XLA's cost analysis counts a while loop's body once: count the FLOPs on the same step
        # with the layers unrolled (the same computation); the VAE and the optimizer have no loops
        unrolled = cfg.copy_and_resolve_references()
        unrolled.model.llm.scan_layers = unrolled.model.vit.scan_layers = False
        full = _flops(loop.Program(unrolled, mesh=mesh).step_fn.lower(*self.fns["full"][1]()).compile())
        self.flops = {"full": full, "vae": _flops(vae_fn.lower(*self.fns["vae"][1]()).compile()),
                      "opt": _flops(opt_fn.lower(*self.fns["opt"][1]()).compile())}
        self.flops["fwd_bwd"] = full - self.flops["vae"] - self.flops["opt"]
        self.first_ce = None

    def run(self, name: str) -> float:
        jax = self.jax
        fn, a = self.fns[name]
        t0 = time.perf_counter()
        if name == "full":
            self.state, m = fn(*a())
            jax.block_until_ready((self.state, m))
            if self.first_ce is None:
                self.first_ce = float(m["ce"])
        else:
            jax.block_until_ready(fn(*a()))
        return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------

def summarize(xs):
    return {"median_s": statistics.median(xs), "min_s": min(xs), "n": len(xs)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", choices=["torch"], help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--block", type=int, default=2, help="steps per process per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attention_impl", default="dense", help=f"one of {IMPLS} (the LLM's, and the ViT's if it has one)")
    ap.add_argument("--bagel-python", default="/tmp/bagel_venv/bin/python")
    ap.add_argument("--bagel-src", default="/tmp/bagel_src")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "step_vs_bagel.json"))
    args = ap.parse_args()
    if args.worker == "torch":
        return torch_worker(args)
    if args.attention_impl not in IMPLS:
        ap.error(f"--attention_impl must be one of {IMPLS}, got {args.attention_impl!r}")
    sys.path.insert(0, ROOT)
    from sgt_jax.models.config import ATTENTION_IMPLS

    if args.attention_impl not in ATTENTION_IMPLS:
        ap.error(f"--attention_impl {args.attention_impl}: this checkout's models/config.py ATTENTION_IMPLS is "
                 f"{ATTENTION_IMPLS} (the blocked attention is not merged here yet)")
    for path, what in ((args.bagel_python, "--bagel-python"), (os.path.join(args.bagel_src, "modeling"), "--bagel-src")):
        if not os.path.exists(path):
            ap.error(f"{what}: {path} does not exist")
    import jax

    cfg = bench_config(args.attention_impl)
    tmp = tempfile.mkdtemp(prefix="step_vs_bagel_")
    meta, tensors = make_row(cfg)
    from safetensors.numpy import save_file

    save_file({k: v for k, v in tensors.items() if k not in ("padded_latent", "noise")},
              os.path.join(tmp, "row.safetensors"))
    with open(os.path.join(tmp, "row.json"), "w") as f:
        json.dump(meta, f)
    print(f"row: {meta['counts']}", flush=True)
    js = JaxSide(cfg, tmp, meta, tensors)
    print(f"JAX: init {js.init_s:.1f} s, step compile {js.compile_s:.1f} s", flush=True)

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    worker = subprocess.Popen([args.bagel_python, os.path.abspath(__file__), "--worker", "torch", "--dir", tmp,
                               "--threads", str(args.threads), "--bagel-src", args.bagel_src],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def ask(obj):
        worker.stdin.write(json.dumps(obj) + "\n")
        worker.stdin.flush()
        line = worker.stdout.readline()
        if not line:
            raise SystemExit("the BAGEL worker died (see its stderr above)")
        return json.loads(line)

    ready = json.loads(worker.stdout.readline() or "{}")
    if not ready.get("ready"):
        raise SystemExit("the BAGEL worker did not start")
    unexpected = [k for k in ready["missing"] if not k.endswith("pos_embed.pos_embed")] + ready["unexpected"]
    if unexpected:
        raise SystemExit(f"BAGEL did not load the exported weights exactly: {unexpected[:10]}")
    parts = ("full", "vae", "fwd_bwd", "opt")
    jt = {k: [] for k in parts}
    tt = {k: [] for k in parts}
    # warm-up (first runs, from the same initial weights: the CE check), not timed
    for k in parts:
        js.run(k)
    torch_ce = ask({"op": "steps", "n": 1})["times"][0]["ce"]
    torch_flops = ask({"op": "flops"})["flops"]
    for r in range(args.rounds):
        for _ in range(args.block):
            for k in parts:
                jt[k].append(js.run(k))
        for x in ask({"op": "steps", "n": args.block})["times"]:
            for k in parts:
                tt[k].append(x[k])
        print(f"round {r + 1}/{args.rounds}: JAX full {jt['full'][-1]:.2f} s, BAGEL full {tt['full'][-1]:.2f} s",
              flush=True)
    ask({"op": "quit"})
    worker.wait(timeout=60)

    res = {"jax": {k: summarize(v) for k, v in jt.items()}, "bagel": {k: summarize(v) for k, v in tt.items()}}
    ratios = {k: {"median": res["jax"][k]["median_s"] / res["bagel"][k]["median_s"],
                  "min": res["jax"][k]["min_s"] / res["bagel"][k]["min_s"]} for k in parts}
    flops = {"jax": js.flops, "bagel": torch_flops,
             "ratio": {k: js.flops[k] / torch_flops[k] if torch_flops[k] else None for k in parts},
             "what": {"jax": "XLA cost_analysis()['flops'] of the compiled function (all HLO ops; the step with "
                             "its layer scans unrolled; fwd_bwd = full - vae - opt)",
                      "bagel": "torch FlopCounterMode (matmul, conv, SDPA only)"}}
    report = {"command": "python bench/step_vs_bagel.py " + " ".join(sys.argv[1:]),
              "attention_impl": args.attention_impl, "row": meta["counts"], "results": res, "ratio_jax_over_bagel": ratios,
              "flops": flops, "jax_step_compile_s": js.compile_s,
              "first_step_ce": {"jax": js.first_ce, "bagel": torch_ce,
                                "abs_diff": abs(js.first_ce - torch_ce) if js.first_ce is not None else None},
              "rounds": args.rounds, "block": args.block, "threads": args.threads,
              "machine": {"backend": jax.default_backend(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "jax": jax.__version__, "torch": ready["torch"], "torch_threads": ready["threads"]}}
    print(f"{'part':8s} {'JAX med':>9s} {'BAGEL med':>9s} {'ratio':>6s} {'JAX min':>9s} {'BAGEL min':>9s} {'ratio':>6s}"
          f" {'JAX GFLOP':>9s} {'BAGEL GFLOP':>11s}")
    for k in parts:
        j, b = res["jax"][k], res["bagel"][k]
        print(f"{k:8s} {j['median_s']:9.3f} {b['median_s']:9.3f} {ratios[k]['median']:6.2f} {j['min_s']:9.3f} "
              f"{b['min_s']:9.3f} {ratios[k]['min']:6.2f} {js.flops[k] / 1e9:9.1f} {torch_flops[k] / 1e9:11.1f}")
    print(f"first-step CE: JAX {js.first_ce:.6f}  BAGEL {torch_ce:.6f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
