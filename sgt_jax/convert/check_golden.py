"""Run the port on a BAGEL golden fixture set and report the error of every compared quantity.

    python -m sgt_jax.convert.check_golden DIR [--factor 4] [--no-grads] [--json OUT]

DIR is a fixture set produced by running the unmodified BAGEL PyTorch code: the ``tiny_v1``
format (``meta.json``, ``model.safetensors``, ``ae.safetensors``, ``batch.safetensors``,
``grads.safetensors``, ``vit_single.safetensors``) or an AE-only set like ``ae_wide_v1``
(``meta.json``, ``ae.safetensors``, ``batch.safetensors``). Everything the model needs is read
from ``meta.json`` (sizes, GQA ratio, timestep shift, latent channels, CE reweighting, loss weights).

Tolerances mean "as accurate as the original": per quantity, ``factor`` x the fixture's own fp32
error of it (``meta.json`` -> ``self_check``, recorded in the set's README), never below a few fp32
ulps of the reference's magnitude (see ``limits``); where the set stores a float64 answer, the
port's error against it must stay within 2x the original's. Each is printed with its result.
Exit status 1 when any error exceeds its tolerance.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from sgt_jax import batch as B
from sgt_jax.models import attention as attn_lib
from sgt_jax.models import config as config_lib
from sgt_jax.models import siglip
import sgt_jax.convert.keymap as keymap

MODES = {"causal": B.CAUSAL, "full": B.FULL, "noise": B.NOISE}


def config_from_meta(meta: dict, compute_dtype: str = "float32") -> ml_collections.ConfigDict:
    c = meta["config"]
    cfg = config_lib.tiny()
    cfg.compute_dtype = compute_dtype
    ae = c["ae"]
    cfg.vae.update(dict(
        in_channels=ae["in_channels"], out_ch=ae["out_ch"], ch=ae["ch"], ch_mult=tuple(ae["ch_mult"]),
        num_res_blocks=ae["num_res_blocks"], z_channels=ae["z_channels"],
        scale_factor=ae["scale_factor"], shift_factor=ae["shift_factor"],
        groupnorm_groups=ae.get("groupnorm_groups", 32), eps=ae.get("groupnorm_eps", 1e-6),
    ))
    if "llm" not in c:                          # an AE-only set (ae_wide_v1): the rest stays tiny()
        return config_lib.validate(cfg)
    llm, vit, bagel = c["llm"], c["vit"], c["bagel"]
    cfg.llm.update(dict(
        vocab_size=llm["vocab_size"], hidden_size=llm["hidden_size"],
        intermediate_size=llm["intermediate_size"], num_layers=llm["num_hidden_layers"],
        num_heads=llm["num_attention_heads"], num_kv_heads=llm["num_key_value_heads"],
        rope_theta=float(llm["rope_theta"]), rms_norm_eps=float(llm["rms_norm_eps"]),
        qk_norm=bool(llm.get("qk_norm", True)),
        layer_module={"Qwen2MoTDecoderLayer": "mot", "Qwen2DecoderLayer": "dense"}[llm["layer_module"]],
    ))
    st = c.get("special_tokens", {})
    for k in ("bos_token_id", "eos_token_id", "start_of_image", "end_of_image"):
        if k in st:
            cfg.llm[k] = st[k]
    cfg.vit.update(dict(
        hidden_size=vit["hidden_size"], intermediate_size=vit["intermediate_size"],
        num_layers=vit["num_hidden_layers_used"], num_heads=vit["num_attention_heads"],
        patch_size=vit["patch_size"], layer_norm_eps=float(vit["layer_norm_eps"]),
        max_patches_per_side=vit["image_size"] // vit["patch_size"],
    ))
    cfg.bagel.update(dict(
        latent_patch_size=bagel["latent_patch_size"], max_latent_size=bagel["max_latent_size"],
        vit_max_num_patch_per_side=bagel["vit_max_num_patch_per_side"],
        timestep_shift=float(bagel["timestep_shift"]),
        visual_gen=bool(bagel.get("visual_gen", True)), visual_und=bool(bagel.get("visual_und", True)),
    ))
    return config_lib.validate(cfg)


def packed_batch_from_golden(meta: dict, gb: dict, cfg, pad_to: int | None = None):
    """BAGEL's flat packed batch (one sequence) -> a one-row PackedBatch, the flow noise in
    packing order (1, L, p*p*C), and num_gen. ``pad_to`` appends padding tokens."""
    mb = meta["batch"]
    n = int(mb["sequence_length"])
    length = pad_to or n
    flex_pad = int(mb.get("flex_padding_tokens", 0))
    sample_lens = list(mb["sample_lens"])[: len(mb["sample_lens"]) - (1 if flex_pad else 0)]
    split_lens = list(mb["split_lens"])[: len(mb["split_lens"]) - (1 if flex_pad else 0)]
    modes = list(mb["attn_modes"])[: len(split_lens)]
    assert sum(sample_lens) == n and sum(split_lens) == n, "inconsistent golden packing lists"

    z = lambda dt=np.int32: np.zeros(length, dt)
    kind, text_ids, pos, expert = z(), z(), z(), z()
    doc = np.full(length, len(sample_lens), np.int32)   # padding: one extra document
    split = np.full(length, len(split_lens), np.int32)
    mode = z()
    doc[:n] = np.repeat(np.arange(len(sample_lens)), sample_lens)
    split[:n] = np.repeat(np.arange(len(split_lens)), split_lens)
    mode[:n] = np.repeat([MODES[m] for m in modes], split_lens)
    pos[:n] = gb["packed_position_ids"]
    ti = gb["packed_text_indexes"]
    kind[ti] = B.TEXT
    text_ids[ti] = gb["packed_text_ids"]
    vi = gb["packed_vit_token_indexes"]
    kind[vi] = B.VIT
    vit_index = z()
    vit_index[vi] = np.arange(len(vi))
    gi = gb["packed_vae_token_indexes"]
    raw = gb["packed_timesteps"]
    kind[gi] = np.where(np.isfinite(raw), B.VAE_NOISED, B.VAE_CLEAN)
    expert[gi] = 1
    ce_mask, mse_mask = z(bool), z(bool)
    ce_labels, ce_weights = z(), np.ones(length, np.float32)
    ce_mask[gb["ce_loss_indexes"]] = True
    ce_labels[gb["ce_loss_indexes"]] = gb["packed_label_ids"]
    if "ce_loss_weights" in gb:
        ce_weights[gb["ce_loss_indexes"]] = gb["ce_loss_weights"]
    mse_mask[gb["mse_loss_indexes"]] = True
    timesteps = np.zeros(length, np.float32)
    timesteps[gi] = raw
    latent_pos = z()
    latent_pos[gi] = gb["packed_latent_position_ids"]

    p = cfg.bagel.latent_patch_size
    lat = np.asarray(gb["padded_latent"]).transpose(0, 2, 3, 1)          # NCHW -> NHWC
    hp, wp = lat.shape[1] // p, lat.shape[2] // p
    vae_index = []
    for img, (h, w) in enumerate(np.asarray(gb["patchified_vae_latent_shapes"]).tolist()):
        rr, cc = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        vae_index.append(img * hp * wp + rr.reshape(-1) * wp + cc.reshape(-1))
    vae_token_index = z()
    vae_token_index[gi] = np.concatenate(vae_index)
    d = p * p * cfg.vae.z_channels
    noise = np.zeros((length, d), np.float32)
    noise[gi] = gb["noise"]

    seqlens = np.asarray(gb["vit_token_seqlens"])
    batch = B.PackedBatch(
        kind=kind, text_ids=text_ids, position_ids=pos, doc_ids=doc, split_ids=split,
        split_mode=mode, expert=expert, ce_mask=ce_mask, ce_labels=ce_labels, ce_weights=ce_weights,
        mse_mask=mse_mask, vit_index=vit_index, vae_token_index=vae_token_index,
        latent_position_ids=latent_pos, timesteps=timesteps,
        vit_patches=np.asarray(gb["packed_vit_tokens"], np.float32),
        vit_position_ids=np.asarray(gb["packed_vit_position_ids"], np.int32),
        vit_image_ids=siglip.image_ids_from_lengths(seqlens),
        vae_images=np.asarray(gb["padded_images"], np.float32).transpose(0, 2, 3, 1),
        latents=lat.astype(np.float32))
    batch = jax.tree.map(lambda a: jnp.asarray(a)[None], batch)
    return batch, jnp.asarray(noise)[None], len(gi)


def load_fixture(path: str) -> dict:
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    files = {k: load_file(os.path.join(path, f"{k}.safetensors"))
             for k in ("model", "ae", "batch", "grads", "vit_single")
             if os.path.exists(os.path.join(path, f"{k}.safetensors"))}
    if "ae_weight_exponents" in meta:       # AE weights stored as int8 codes * 2**e (exact in fp32)
        exps = meta["ae_weight_exponents"]
        files["ae"] = {k: v.astype(np.float32) * np.float32(2.0 ** exps[k]) for k, v in files["ae"].items()}
    return {"meta": meta, **files}


def build_model(cfg, model_tensors: dict, seed: int = 0):
    from sgt_jax.models.bagel import Bagel

    model = Bagel(cfg, rngs=nnx.Rngs(seed))
    keymap.load_state(model, model_tensors, keymap.bagel_table(cfg), ignore=tuple(keymap.FIXED_KEYS),
                      what="golden model.safetensors")
    return model


def reduced_loss(out: dict, batch, cfg_train: dict) -> jax.Array:
    """BAGEL's world-size-1 reduction: token-mean CE (or weighted) + channel-mean, token-mean MSE."""
    ce_mask = batch.ce_mask
    if cfg_train.get("ce_loss_reweighting", False):
        w = jnp.where(ce_mask, batch.ce_weights, 0.0)
        ce = jnp.sum(out["ce"] * w) / jnp.sum(w)
    else:
        ce = jnp.sum(out["ce"]) / jnp.maximum(jnp.sum(ce_mask), 1)
    mse = jnp.sum(jnp.mean(out["mse"], axis=-1)) / jnp.maximum(jnp.sum(batch.mse_mask), 1)
    return cfg_train.get("ce_weight", 1.0) * ce + cfg_train.get("mse_weight", 1.0) * mse, ce, mse


def run(path: str, compute_dtype: str = "float32", with_grads: bool = True) -> dict:
    """All comparisons; returns {quantity: max |error|} (grads: max |d| / max |g| per tensor).
    A set without ``model.safetensors`` (``ae_wide_v1``) checks the AE only."""
    fx = load_fixture(path)
    meta, gb = fx["meta"], fx["batch"]
    cfg = config_from_meta(meta, compute_dtype)
    err = {}
    if "model" in fx:
        err.update(_check_model(fx, cfg, with_grads))
    if "ae" in fx:
        err.update(_check_ae(fx["ae"], gb, cfg, compute_dtype))
    return err


def _check_model(fx: dict, cfg, with_grads: bool) -> dict:
    meta, gb = fx["meta"], fx["batch"]
    model = build_model(cfg, fx["model"])
    batch, noise, num_gen = packed_batch_from_golden(meta, gb, cfg)
    train = meta["config"].get("train", {})
    n = int(meta["batch"]["sequence_length"])
    err = {}
    f32 = lambda a: np.asarray(a, np.float32)

    out = nnx.jit(lambda m, b, e: m(b, num_gen=num_gen, noise=e))(model, batch, noise)
    ce_idx, mse_idx = gb["ce_loss_indexes"], gb["mse_loss_indexes"]
    err["input_embeds"] = np.abs(f32(out["input_embeds"][0, :n]) - gb["input_embeds"]).max()
    err["last_hidden_state"] = np.abs(f32(out["hidden"][0, :n]) - gb["last_hidden_state"]).max()
    err["ce_tok"] = np.abs(f32(out["ce"][0, ce_idx]) - gb["ce_tok"]).max()
    err["mse_tok"] = np.abs(f32(out["mse"][0, mse_idx]) - gb["mse_tok"]).max()
    loss, ce, mse = reduced_loss(out, batch, train)
    err["loss"] = abs(float(loss) - float(gb["loss"]))

    # the mask, from the per-token vectors
    seg = B.Segments(batch.doc_ids, batch.split_ids, batch.split_mode,
                     jnp.arange(batch.kind.shape[1])[None])
    mask = np.asarray(attn_lib.bagel_mask(seg)[0])
    err["mask_mismatches"] = float((mask != gb["attn_mask_dense"][:n, :n]).sum())

    # ViT alone
    if "vit_single" in fx:
        v = fx["vit_single"]
        pids = jnp.asarray(v["packed_flattened_position_ids"], jnp.int32)[None]
        patches = jnp.asarray(v["packed_pixel_values"])[None]
        vo = model.vit_model(patches, pids, jnp.zeros_like(pids))
        err["vit_output"] = np.abs(f32(vo[0]) - v["vit_output"]).max()
        co = model.connector(vo) + jnp.take(model.vit_pos_embed[...], pids, axis=0)
        err["connector_output"] = np.abs(f32(co[0]) - v["connector_output"]).max()

    if with_grads and "grads" in fx:
        def loss_fn(m):
            o = m(batch, num_gen=num_gen, noise=noise)
            return reduced_loss(o, batch, train)[0]
        grads = nnx.jit(nnx.grad(loss_fn))(model)
        gmodel = nnx.merge(nnx.graphdef(model), grads, nnx.state(model, nnx.Not(nnx.Param)))
        ours = keymap.export_state(gmodel, keymap.bagel_table(cfg))
        gmax = max(np.abs(g).max() for g in fx["grads"].values())
        worst = 0.0
        for k, g in fx["grads"].items():
            d = np.abs(ours[k] - g).max()
            # exactly-zero true gradients are stored as fp32 round-off: compare absolutely
            worst = max(worst, d / max(np.abs(g).max(), 1e-6 * gmax))
        err["grads_rel"] = worst
        err["grads_missing"] = float(len(set(fx["grads"]) - set(ours)))
    return err


def _check_ae(ae_tensors: dict, gb: dict, cfg, compute_dtype: str) -> dict:
    """VAE encoder moments, sampling, decoder, compiled (jit) as the trainer runs them."""
    from sgt_jax.models.vae import AutoEncoder

    ae = nnx.eval_shape(lambda: AutoEncoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.dtype(compute_dtype)))
    keymap.load_vae(ae, ae_tensors)
    nhwc = lambda a: jnp.asarray(a).transpose(0, 2, 3, 1)
    nchw = lambda a: np.asarray(a, np.float64).transpose(0, 3, 1, 2)
    mom, lat, dec = nnx.jit(lambda m, x, e, z: (m.encode_moments(x), m.encode(x, eps=e), m.decode(z)))(
        ae, nhwc(gb["padded_images"]), nhwc(gb["vae_eps"]), nhwc(gb["padded_latent"]))
    err = {"vae_moments": np.abs(nchw(mom) - gb["vae_moments"]).max(),
           "padded_latent": np.abs(nchw(lat) - gb["padded_latent"]).max(),
           "decoded": np.abs(nchw(dec) - gb["decoded"]).max()}
    if "vae_moments_f64" in gb:                # the exact answer: our error next to BAGEL's own
        err["vae_moments_vs_f64"] = np.abs(nchw(mom) - gb["vae_moments_f64"]).max()
    return err


# What every quantity is compared with (its magnitude scales the tolerance) and its kind:
# "fwd": fp32 forward value, "grad": already relative per tensor, "f64": error vs the float64
# answer, next to the original's own, "zero": must be exactly 0.
QUANTITIES = {"input_embeds": ("batch", "fwd"), "last_hidden_state": ("batch", "fwd"),
              "ce_tok": ("batch", "fwd"), "mse_tok": ("batch", "fwd"), "loss": ("batch", "fwd"),
              "vit_output": ("vit_single", "fwd"), "connector_output": ("vit_single", "fwd"),
              "vae_moments": ("batch", "fwd"), "padded_latent": ("batch", "fwd"),
              "decoded": ("batch", "fwd"), "vae_moments_vs_f64": ("batch", "f64"),
              "mask_mismatches": (None, "zero"), "grads_rel": (None, "grad"),
              "grads_missing": (None, "zero")}
ULP = 2.0 ** -22          # two fp32 ulps at 1.0: the floor of a yardstick that happens to be ~0
FACTOR = 4.0              # port vs golden: |port - exact| + |golden - exact| ~ 2 yardsticks, + margin
F64_FACTOR = 2.0          # port vs float64: within 2x the original's own fp32 error


def yardsticks(meta: dict) -> dict:
    """{quantity: the fixture's own fp32 error of it} from meta.json -> self_check.

    ``tiny_v1``: an independent fp32 re-implementation vs the stored outputs (and the stored grads
    vs float64 autograd). ``ae_wide_v1``: BAGEL's fp32 run vs its float64 run. Either is the size
    of the error an fp32 implementation as accurate as the original has."""
    sc = meta.get("self_check", {})
    y = {}
    for section in ("forward_fp32", "vit_single_fp32", "ae_fp32"):
        for k, v in sc.get(section, {}).items():
            if k.endswith("_max_abs_diff"):
                y[k[:-len("_max_abs_diff")]] = float(v)
    if "loss_abs_diff" in sc.get("forward_fp32", {}):
        y["loss"] = float(sc["forward_fp32"]["loss_abs_diff"])
    for k, v in sc.get("grads_vs_float64_spec_autograd", {}).items():
        if k.startswith("max_over_tensors"):
            y["grads_rel"] = float(v)
    for q in ("vae_moments", "padded_latent", "decoded"):
        if isinstance(sc.get(q), dict):
            y[q] = float(sc[q]["bagel_fp32_vs_f64"])
    if "vae_moments" in y and "padded_latent" not in y:   # tiny_v1: the latent inherits the
        y["padded_latent"] = max(y.get("padded_latent_from_moments_eps", 0.0), y["vae_moments"])  # moments' error
    return y


def limits(fx: dict, factor: float = FACTOR) -> dict:
    """{quantity: (tolerance, yardstick, max |reference|)}.

    fwd: factor * max(yardstick, ULP * max(1, max|ref|)) -- relative to the reference's magnitude
    when it is O(1) or larger, never below two fp32 ulps of it; grad: factor * max(yardstick, ULP);
    f64: F64_FACTOR * the original's own fp32 error vs float64 (from the stored tensors); zero: 0.
    A quantity without a yardstick in the fixture gets the former absolute 1e-5 / 1e-4."""
    y = yardsticks(fx["meta"])
    out = {}
    for q, (where, kind) in QUANTITIES.items():
        ref = fx.get(where, {}).get(q) if where else None
        scale = float(np.abs(ref).max()) if ref is not None else 1.0
        if kind == "zero":
            out[q] = (0.0, 0.0, scale)
        elif kind == "f64":
            gb = fx["batch"]
            if "vae_moments_f64" in gb:
                own = float(np.abs(gb["vae_moments"].astype(np.float64) - gb["vae_moments_f64"]).max())
                out[q] = (F64_FACTOR * own, own, float(np.abs(gb["vae_moments_f64"]).max()))
        elif q in y:
            floor = ULP * (max(1.0, scale) if kind == "fwd" else 1.0)
            out[q] = (factor * max(y[q], floor), y[q], scale)
        else:
            out[q] = (1e-4 if kind == "grad" else 1e-5, float("nan"), scale)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--factor", type=float, default=FACTOR,
                    help="tolerance = factor x the fixture's own fp32 error (its yardstick)")
    ap.add_argument("--no-grads", action="store_true")
    ap.add_argument("--json", help="write {quantity: {error, tol, yardstick, scale}} as JSON here")
    args = ap.parse_args(argv)
    jax.config.update("jax_default_matmul_precision", "highest")
    err = run(args.dir, with_grads=not args.no_grads)
    lim = limits(load_fixture(args.dir), args.factor)
    failed, rows = [], {}
    print(f"{'quantity':20s} {'max|err|':>9s} {'max|ref|':>9s} {'yardstick':>9s} {'tol':>9s} {'err/yard':>8s}")
    for k, v in err.items():
        tol, yard, scale = lim[k]
        ok = v <= tol
        failed += [] if ok else [k]
        ratio = f"{v / yard:8.2f}" if yard > 0 else f"{'-':>8s}"
        print(f"{k:20s} {v:9.2e} {scale:9.2e} {yard:9.2e} {tol:9.2e} {ratio}  {'ok' if ok else 'FAIL'}")
        rows[k] = dict(error=float(v), tol=tol, yardstick=yard, scale=scale)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print("PASS" if not failed else f"FAIL: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
