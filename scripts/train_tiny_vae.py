"""Train the tiny preset's frozen VAE: the FLUX AE of ``sgt_jax/models/vae.py`` at the tiny
preset's VAE config (``configs/tiny.py``), on the built-in synthetic scenes -- RGB images AND their
pseudo-colour segmentation targets, both at the preset's 64 px -- with a pixel reconstruction loss
plus FLUX's small KL term. Deterministic for a seed on one machine (same jax / numpy / Pillow).

    python3 scripts/train_tiny_vae.py --out sgt_jax/assets/tiny_vae.safetensors

writes the weights shipped with the repo (FLUX state-dict names and torch layouts, fp32; the
latent statistics in the file's metadata). Then set ``model.vae.scale_factor`` /
``shift_factor`` in configs/tiny.py to the values the script prints (docs/training.md,
"The tiny preset's VAE"). The training scenes use ``--gen_seed`` (default 7): neither the main
job's training scenes (gen_seed 0) nor its held-out scenes (``eval.scene_seed`` 1000).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from sgt_jax.data.samples import resize  # noqa: E402
from sgt_jax.data.sources.registry import make_source  # noqa: E402
from sgt_jax.models.vae import AutoEncoder  # noqa: E402
from sgt_jax.train import vae_init  # noqa: E402


def tiny_config():
    spec = importlib.util.spec_from_file_location("configs_tiny", os.path.join(ROOT, "configs", "tiny.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def scenes(n: int, gen_seed: int, size: str, side: int, workdir: str) -> np.ndarray:
    """(2n, side, side, 3) float32 in [-1, 1]: n RGB scenes (bicubic) and their n pseudo-colour
    targets (nearest, as the preset resizes targets), rendered by the seg source itself."""
    src = make_source(f"synthetic_seg:{workdir}/scenes?n={n}&gen_seed={gen_seed}&size={size}",
                      seed=gen_seed, workdir=workdir)
    out = []
    for i in range(len(src)):
        r = src[i]
        out.append(resize(np.asarray(r["image"], np.uint8), side, side, "bicubic"))
        out.append(resize(np.asarray(r["target"], np.uint8), side, side, "nearest"))
    return np.stack(out).astype(np.float32) / 127.5 - 1.0


def train(cfg, *, steps: int, batch: int, seed: int, n: int, gen_seed: int, lr: float, kl_weight: float,
          log=print) -> tuple[dict, dict]:
    """Returns (FLUX state dict of the trained AE, metadata)."""
    side = int(cfg.data.vae_image_size)
    size = cfg.data.sources.seg.split("size=")[1].split("&")[0] if "size=" in cfg.data.sources.seg else "64-128"
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        data = scenes(n, gen_seed, size, side, tmp)
        log(f"{len(data)} images ({n} scenes + their targets) at {side} px in {time.time() - t0:.1f}s")
    model = AutoEncoder(cfg.model, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)
    warmup = min(50, steps // 10 + 1)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adam(optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1),
                                                                   lr * 0.05)))
    opt = tx.init(params)
    zc = cfg.model.vae.z_channels

    def loss_fn(p, x, key):
        ae = nnx.merge(graphdef, p)
        mean, logvar = jnp.split(ae.encode_moments(x).astype(jnp.float32), 2, axis=-1)
        logvar = jnp.clip(logvar, -30.0, 20.0)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        y = ae.decoder(z)
        rec = jnp.mean(jnp.abs(y - x)) + jnp.mean(jnp.square(y - x))
        kl = 0.5 * jnp.mean(jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=-1))
        return rec + kl_weight * kl, (rec, kl)

    @jax.jit
    def step(p, o, x, key):
        (loss, (rec, kl)), g = jax.value_and_grad(loss_fn, has_aux=True)(p, x, key)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, rec, kl

    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    t0 = time.time()
    for i in range(steps):
        idx = rng.choice(len(data), batch, replace=False)
        x = data[idx]
        if rng.random() < 0.5:
            x = x[:, :, ::-1]                         # horizontal flip (a scene stays a scene)
        params, opt, rec, kl = step(params, opt, jnp.asarray(x), jax.random.fold_in(key, i))
        if (i + 1) % max(1, steps // 20) == 0 or i == 0:
            log(f"step {i + 1}/{steps}: reconstruction {float(rec):.4f} KL {float(kl):.2f} "
                f"({time.time() - t0:.0f}s)")
    # latent statistics over the training images at the posterior mean: FLUX's shift / scale
    # factors make the scaled latent zero-mean, unit-variance for the flow
    ae = nnx.merge(graphdef, params)
    moments = jax.jit(lambda p, x: nnx.merge(graphdef, p).encode_moments(x))
    means = np.concatenate([np.asarray(moments(params, jnp.asarray(data[i:i + 64])))[..., :zc]
                            for i in range(0, len(data), 64)])
    shift = float(np.round(means.mean(), 4))
    scale = float(np.round(1.0 / means.std(), 4))
    meta = {"shift_factor": f"{shift:.4f}", "scale_factor": f"{scale:.4f}", "steps": str(steps),
            "batch": str(batch), "seed": str(seed), "scenes": str(n), "gen_seed": str(gen_seed),
            "lr": str(lr), "kl_weight": str(kl_weight), "image_size": str(side),
            "final_reconstruction": f"{float(rec):.5f}"}
    return vae_init.to_flux(ae), meta


def ceiling_miou(cfg, tensors: dict, workdir: str, num_scenes: int = 32) -> dict:
    """The VAE-ceiling mIoU of an AE (FLUX state dict) on the main job's held-out masks, as the
    evaluation computes it (``eval.runner.Evaluator.vae_ceiling``): the first ``num_scenes``
    held-out synthetic targets (``eval.scene_seed``) resized to the preset's VAE size, encoded at
    the posterior mean, decoded, resized back and scored by ``eval.metrics``. Returns
    ``metrics.summarize``'s dict (miou, pq, ...)."""
    from sgt_jax.data.samples import ImageTransform
    from sgt_jax.eval import metrics
    from sgt_jax.eval.runner import heldout_specs, read_heldout

    seg_spec, _ = heldout_specs(cfg, workdir)
    src = make_source(seg_spec.format(workdir=workdir), seed=int(cfg.data.get("seed", 0)), workdir=workdir)
    data = read_heldout(src, None, num_scenes, 0)
    t = cfg.data.transforms
    size = ImageTransform(t.vae_max, t.vae_min, t.vae_stride, t.vae_max_pixels, t.sqrt_max_pixels).size
    ae = AutoEncoder(cfg.model, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(ae, nnx.Param)
    path = os.path.join(workdir, "ae.safetensors")
    vae_init.save(path, tensors)
    nnx.replace_by_pure_dict(state, vae_init.load(path, cfg.model))
    zc, f = cfg.model.vae.z_channels, ae.downsample_factor

    @jax.jit
    def roundtrip(p, x):
        v = nnx.merge(graphdef, p)
        return v.decode(v.encode(x, eps=jnp.zeros((x.shape[0], x.shape[1] // f, x.shape[2] // f, zc))))

    scores = []
    for s in data.seg:
        tgt = s["target"]
        w, h = size(tgt.shape[1], tgt.shape[0])
        x = resize(tgt, w, h, "nearest").astype(np.float32) / 127.5 - 1.0
        y = np.asarray(roundtrip(state, jnp.asarray(x)[None]), np.float32)[0]
        u8 = resize(np.clip((y + 1.0) * 127.5, 0, 255).astype(np.uint8), tgt.shape[1], tgt.shape[0], "nearest")
        scores.append(metrics.score_mask(tgt, u8, s["background"]))
    return metrics.summarize(scores)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "sgt_jax", "assets", "tiny_vae.safetensors"))
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scenes", type=int, default=1024, help="synthetic scenes (each gives 2 images)")
    p.add_argument("--gen_seed", type=int, default=7)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--kl_weight", type=float, default=1e-6)
    p.add_argument("--ceiling_scenes", type=int, default=32, help="held-out targets for the VAE-ceiling mIoU")
    a = p.parse_args(argv)
    cfg = tiny_config()
    sd, meta = train(cfg, steps=a.steps, batch=a.batch, seed=a.seed, n=a.scenes, gen_seed=a.gen_seed, lr=a.lr,
                     kl_weight=a.kl_weight)
    with tempfile.TemporaryDirectory() as tmp:
        c = ceiling_miou(cfg, sd, tmp, a.ceiling_scenes)
    print(f"VAE-ceiling mIoU on {a.ceiling_scenes} held-out synthetic targets: {c['miou']:.4f} (PQ {c['pq']:.4f})")
    meta["heldout_ceiling_miou"] = f"{c['miou']:.4f}"
    vae_init.save(a.out, sd, meta)
    digest = hashlib.sha256(open(a.out, "rb").read()).hexdigest()
    print(f"wrote {a.out} ({os.path.getsize(a.out)} bytes) sha256 {digest}")
    print(f"latent statistics: model.vae.shift_factor={meta['shift_factor']} "
          f"model.vae.scale_factor={meta['scale_factor']}")


if __name__ == "__main__":
    main()
