#!/usr/bin/env python3
"""Make the ``ae_wide_v1`` golden set: BAGEL's own FLUX autoencoder on a wider config, fp32 and float64.

    python scripts/make_vae_golden.py --bagel-src BAGEL_CHECKOUT --out tests/fixtures/bagel_golden/ae_wide_v1

BAGEL's ``modeling/autoencoder.py`` is imported from ``--bagel-src`` (a checkout of
https://github.com/ByteDance-Seed/Bagel, ``056b5fd`` for the shipped set) as a lone file, so its
package ``__init__`` (LLM / ViT, GPU-only imports) is never run; nothing of it is copied here. Needs
torch, einops and safetensors only; nothing from sgt_jax is imported.

What it builds (every tensor is produced by the unmodified BAGEL classes):

* ``AutoEncoderParams(ch=32, ch_mult=[1, 2, 2, 2], num_res_blocks=1, z_channels=16, ...)``: BAGEL
  hard-codes ``GroupNorm(32, C)``, so the 64-channel levels have two channels per group (the
  ``tiny_v1`` AE has one, which is why it never saw the reduction error of issue 12).
* weights: torch's default init as BAGEL constructs it (``torch.manual_seed(seed)``), GroupNorm
  affine re-drawn as ``1 + 0.1 N(0,1)`` / ``0.1 N(0,1)``; then every tensor is rounded to
  ``int8 * 2**e`` (one power-of-two ``e`` per tensor). The rounded values are exact in fp32 and
  float64 and are what BAGEL runs; ``ae.safetensors`` stores the int8 codes and ``meta.json``
  ``ae_weight_exponents`` the ``e`` (1.3 MB instead of 5 MB of fp32).
* nine non-square images of different sizes (multiples of 16 = latent_patch_size 2 x downsample 8),
  uint8 pixels through BAGEL's ToTensor + Normalize(0.5, 0.5) arithmetic, zero-padded bottom/right
  onto one canvas exactly as ``PackedDataset`` builds ``padded_images`` (data/dataset_base.py).
* ``AutoEncoder.encoder`` (moments), ``AutoEncoder.encode`` (``torch.randn_like`` in the module
  handed the stored ``vae_eps``), ``AutoEncoder.decode(padded_latent)``, in fp32; the same model
  ``.double()`` on the same inputs gives the float64 answers (``*_f64``) and, per GroupNorm, the
  yardstick: BAGEL's own fp32 error against float64 (``meta.json`` -> ``self_check``); and the
  encoder under BAGEL's train-loop bf16 autocast (CUDA op lists emulated on CPU) vs float64.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import torch

CONFIG = dict(resolution=256, in_channels=3, downsample=8, ch=32, out_ch=3, ch_mult=[1, 2, 2, 2],
              num_res_blocks=1, z_channels=16, scale_factor=0.3611, shift_factor=0.1159)
# (H, W) of the nine images: all different, none square, canvas 48 x 80
SIZES = [(48, 80), (32, 80), (48, 64), (16, 80), (32, 64), (48, 32), (16, 48), (32, 48), (48, 16)]
EPS_SEED, IMAGE_SEED = 1000, 3000


def load_bagel_autoencoder(src: str):
    path = os.path.join(src, "modeling", "autoencoder.py")
    if not os.path.exists(path):
        raise SystemExit(f"--bagel-src {src}: no modeling/autoencoder.py (a checkout of ByteDance-Seed/Bagel?)")
    spec = importlib.util.spec_from_file_location("bagel_autoencoder", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def bagel_commit(src: str) -> str:
    try:
        return subprocess.check_output(["git", "-C", src, "rev-parse", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def int8_pow2(w: torch.Tensor) -> tuple[np.ndarray, int]:
    """codes (int8), e with codes * 2**e the nearest such value to w (|codes| <= 127)."""
    m = float(w.abs().max())
    e = int(np.ceil(np.log2(m / 127.0))) if m > 0 else 0
    codes = torch.clamp(torch.round(w.double() / 2.0 ** e), -127, 127).to(torch.int8)
    return codes.numpy(), e


def random_scene(g: torch.Generator, h: int, w: int) -> torch.Tensor:
    """uint8 (3, h, w): smooth gradients + a few blobs + pixel noise (an image-like histogram)."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    img = torch.zeros(3, h, w)
    for c in range(3):
        a, b, d = (torch.rand(3, generator=g) * 2 - 1).tolist()
        img[c] = 0.5 + 0.35 * (a * yy + b * xx) + 0.1 * d
        for _ in range(3):
            cy, cx, r, amp = torch.rand(4, generator=g).tolist()
            img[c] += (amp - 0.5) * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (0.02 + 0.1 * r))
    img += 0.03 * torch.randn(3, h, w, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def to_bagel_tensor(u8: torch.Tensor) -> torch.Tensor:
    """torchvision ToTensor (x / 255 in fp32) then Normalize(mean=0.5, std=0.5), as BAGEL's
    ImageTransform (data/transforms.py) applies them; the same fp32 ops in the same order."""
    x = u8.to(torch.float32).div(255)
    return x.sub_(0.5).div_(0.5)


class _TorchWithEps:
    """Stands for the autoencoder module's global ``torch``: ``randn_like`` returns the stored eps."""

    def __init__(self, eps):
        self.eps, self.calls = eps, 0

    def randn_like(self, t, *a, **kw):
        assert tuple(t.shape) == tuple(self.eps.shape), (t.shape, self.eps.shape)
        self.calls += 1
        return self.eps.to(t.dtype).clone()

    def __getattr__(self, name):
        return getattr(torch, name)


class CudaAutocastBf16(torch.overrides.TorchFunctionMode):
    """BAGEL's train loop encodes under ``torch.amp.autocast("cuda", dtype=torch.bfloat16)``. CPU
    autocast has other op lists (its group_norm runs in bf16), so this emulates the CUDA lists on
    CPU: conv2d and scaled_dot_product_attention take bf16-rounded inputs, accumulate in fp32 and
    return bf16; group_norm runs in fp32 and returns fp32; the rest follows type promotion."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in ("conv2d", "scaled_dot_product_attention"):
            bf = lambda a: a.to(torch.bfloat16).float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            return func(*map(bf, args), **{k: bf(v) for k, v in kwargs.items()}).to(torch.bfloat16)
        if name == "group_norm":
            f32 = lambda a: a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            return func(*map(f32, args), **{k: f32(v) for k, v in kwargs.items()})
        return func(*args, **kwargs)


def groupnorm_outputs(model, fn):
    """Run fn(); return {module name: output} of every nn.GroupNorm, in call order."""
    out, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.GroupNorm):
            hooks.append(m.register_forward_hook(lambda _m, _i, o, name=name: out.__setitem__(name, o.detach())))
    try:
        res = fn()
    finally:
        for h in hooks:
            h.remove()
    return res, out


def run(mod, ae, images, eps):
    """moments, latent, decoded (+ GroupNorm outputs of the encoder and decoder passes)."""
    shim = _TorchWithEps(eps)
    orig = mod.torch
    mod.torch = shim
    try:
        with torch.no_grad():
            moments, gn_enc = groupnorm_outputs(ae, lambda: ae.encoder(images))
            latent = ae.encode(images)
            decoded, gn_dec = groupnorm_outputs(ae, lambda: ae.decode(latent))
    finally:
        mod.torch = orig
    assert shim.calls == 1, shim.calls
    return moments, latent, decoded, {**gn_enc, **gn_dec}


def maxabs(a) -> float:
    return float(a.abs().max())


def readme(meta: dict, batch: dict) -> str:
    c, sc = meta["config"]["ae"], meta["self_check"]
    shape = lambda a: "x".join(map(str, a.shape)) or "scalar"
    rows = "\n".join(f"| `{k}` | {shape(batch[k])} | {batch[k].dtype} | {d} |" for k, d in meta["tensors"].items())
    gn = "\n".join(f"| `{k}` | {'x'.join(map(str, v['shape']))} | {v['values_per_group']} | "
                   f"{v['max_abs_f64']:.2f} | {v['bagel_fp32_vs_f64']:.2e} |" for k, v in sc["groupnorm"].items())
    q = lambda k: f"{sc[k]['bagel_fp32_vs_f64']:.2e} (max \\|value\\| {sc[k]['max_abs_f64']:.2f})"
    return f"""# BAGEL golden fixture: `{meta['preset']}` (seed {meta['seed']})

BAGEL's FLUX autoencoder alone, produced by running the **unmodified** public BAGEL code
({meta['bagel_repo']} @ `{meta['bagel_commit']}`, `modeling/autoencoder.py`) on CPU with torch
{meta['torch_version']}, in fp32 and in float64 on the same weights and inputs. Made by

    python scripts/make_vae_golden.py --bagel-src BAGEL_CHECKOUT --out tests/fixtures/bagel_golden/{meta['preset']}

Why it exists (issue 12): `tiny_v1`'s AE has ch_mult (1, 1, 1, 1), i.e. one channel per GroupNorm
group, and a small canvas. Here ch {c['ch']}, ch_mult {c['ch_mult']}, num_res_blocks {c['num_res_blocks']},
z {c['z_channels']}: BAGEL hard-codes `GroupNorm(32, C)`, so the 64-channel levels have **two channels
per group** and the statistics reduce over up to {max(v['values_per_group'] for v in sc['groupnorm'].values())} values, on
**nine non-square images of different sizes** {meta['batch']['image_sizes']} (H, W) zero-padded
bottom/right onto one {meta['batch']['canvas'][0]}x{meta['batch']['canvas'][1]} canvas exactly as BAGEL's
`PackedDataset` builds `padded_images`; the encoder (convs, GroupNorm statistics, mid attention)
sees the padding.

## Files

| file | content |
| --- | --- |
| `ae.safetensors` | the AE state dict under the FLUX key names ({len(meta['ae_weight_exponents'])} tensors) as **int8 codes**: the fp32 weight is `float32(code) * 2**meta.json["ae_weight_exponents"][key]` (exact; `sgt_jax.convert.check_golden.load_fixture` decodes it). The weights are torch's default init as BAGEL constructs the model, GroupNorm affine `1 + 0.1 N(0,1)` / `0.1 N(0,1)`, each tensor rounded to int8 x a power of two before BAGEL ran: 1.3 MB instead of 5 MB. |
| `batch.safetensors` | inputs and BAGEL's outputs (below). |
| `meta.json` | config (`config.ae`), the weight exponents, RNG recipe, image sizes, `tensors` (one line each), `self_check`. |

## Tensors of `batch.safetensors` (NCHW as BAGEL)

| tensor | shape | dtype | meaning |
| --- | --- | --- | --- |
{rows}

Images are uint8 scenes put through BAGEL's ToTensor + Normalize(0.5, 0.5) arithmetic; `vae_eps`
is fed to `DiagonalGaussian` by handing the module's `torch.randn_like` the stored tensor.
`decoded` = `AutoEncoder.decode(padded_latent)` (z / {c['scale_factor']} + {c['shift_factor']}, then the decoder).

## Self-check = the yardstick (BAGEL's fp32 run vs its float64 run)

A port is "as accurate as the original" when its own fp32 error against the float64 answer is about
BAGEL's. BAGEL fp32 vs float64, max \\|diff\\|:

* `vae_moments`: {q('vae_moments')}
* `padded_latent`: {q('padded_latent')}
* `decoded` (float64 decoder on the fp32 `padded_latent`): {q('decoded')}
* `vae_moments` in bf16 under BAGEL's train-loop autocast (CUDA op lists emulated on CPU, see
  `CudaAutocastBf16` in the generator) vs float64: {sc['vae_moments_bf16_autocast']['bagel_bf16_vs_f64']:.2e}
* latent from the stored moments + eps vs `padded_latent`: {sc['latent_from_moments_eps']:.1e}

Per GroupNorm (output of the layer inside the fp32 network vs float64; decoder rows from decoding the fp32 latent):

| GroupNorm | shape | values per group | max \\|y\\| | BAGEL fp32 vs float64 |
| --- | --- | --- | --- | --- |
{gn}

## Tolerances

`python -m sgt_jax.convert.check_golden tests/fixtures/bagel_golden/{meta['preset']}`: port fp32 vs the
stored fp32 outputs within 4x the yardstick above (never below two fp32 ulps of the values'
magnitude); port fp32 `vae_moments` vs `vae_moments_f64` within 2x BAGEL's own error (and the
port in bf16 within 2x BAGEL's bf16 autocast error, tests/test_vae.py). The
per-GroupNorm comparison of the port with these numbers: `scripts/vae_layer_errors.py`, docs/model.md.
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bagel-src", required=True, help="checkout of ByteDance-Seed/Bagel")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from safetensors.numpy import save_file

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    mod = load_bagel_autoencoder(args.bagel_src)
    params = mod.AutoEncoderParams(**CONFIG)
    torch.manual_seed(args.seed)
    ae = mod.AutoEncoder(params).eval()

    # weights: default init, GroupNorm affine re-drawn, everything rounded to int8 * 2**e
    g = torch.Generator().manual_seed(args.seed + 1)
    codes, exps = {}, {}
    with torch.no_grad():
        for name, m in ae.named_modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
        sd = ae.state_dict()
        for k, v in sd.items():
            codes[k], exps[k] = int8_pow2(v)
            v.copy_(torch.from_numpy(codes[k].astype(np.float64) * 2.0 ** exps[k]))
    ae64 = copy.deepcopy(ae).double()

    # images: uint8 scenes -> BAGEL's normalisation -> zero-padded canvas (PackedDataset)
    gi = torch.Generator().manual_seed(IMAGE_SEED)
    pixels = [random_scene(gi, h, w) for h, w in SIZES]
    tensors = [to_bagel_tensor(p) for p in pixels]
    max_size = [max(s) for s in zip(*[t.shape for t in tensors])]
    padded = torch.zeros(size=(len(tensors), *max_size))
    for i, t in enumerate(tensors):
        padded[i, :, :t.shape[1], :t.shape[2]] = t

    f = 2 ** (len(CONFIG["ch_mult"]) - 1)
    lat_shape = (len(SIZES), CONFIG["z_channels"], max_size[1] // f, max_size[2] // f)
    eps = torch.randn(lat_shape, generator=torch.Generator().manual_seed(EPS_SEED))

    mom32, lat32, dec32, gn32 = run(mod, ae, padded, eps)
    with torch.no_grad(), CudaAutocastBf16():
        mom_bf16 = ae.encoder(padded)
    mom64, lat64, dec64, gn64 = run(mod, ae64, padded.double(), eps.double())
    # the decoder of the float64 run sees the float64 latent; for a yardstick of the decoder alone
    # it must see the fp32 latent the fp32 run decoded
    with torch.no_grad():
        dec64_of_lat32, gn64_dec = groupnorm_outputs(ae64, lambda: ae64.decode(lat32.double()))

    def err(a, b):
        return maxabs(a.double() - b.double())

    gn_self = {}
    for k in gn32:
        ref = gn64_dec[k] if k.startswith("decoder.") else gn64[k]
        gn_self[k] = dict(shape=list(gn32[k].shape), channels_per_group=gn32[k].shape[1] // 32,
                          values_per_group=int(gn32[k].shape[1] // 32 * gn32[k].shape[2] * gn32[k].shape[3]),
                          bagel_fp32_vs_f64=err(gn32[k], ref), max_abs_f64=maxabs(ref))
    self_check = {
        "what": "BAGEL's fp32 run vs the float64 run of the same BAGEL model on the same weights and "
                "inputs (the yardstick: a port is as accurate as the original when its own fp32 error "
                "vs float64 is about this size)",
        "vae_moments": dict(bagel_fp32_vs_f64=err(mom32, mom64), max_abs_f64=maxabs(mom64)),
        "padded_latent": dict(bagel_fp32_vs_f64=err(lat32, lat64), max_abs_f64=maxabs(lat64)),
        "decoded": dict(bagel_fp32_vs_f64=err(dec32, dec64_of_lat32), max_abs_f64=maxabs(dec64_of_lat32),
                        note="float64 decoder on the fp32 padded_latent (the decoder's own error)"),
        "vae_moments_bf16_autocast": dict(
            bagel_bf16_vs_f64=err(mom_bf16, mom64),
            note="BAGEL's encoder under its train loop's CUDA bf16 autocast, emulated on CPU "
                 "(CudaAutocastBf16: conv2d / sdpa bf16 in, fp32 accumulate, bf16 out; group_norm fp32)"),
        "latent_from_moments_eps": err(
            CONFIG["scale_factor"] * (mom32[:, :16] + torch.exp(0.5 * mom32[:, 16:]) * eps - CONFIG["shift_factor"]),
            lat32),
        "groupnorm": gn_self,
    }

    os.makedirs(args.out, exist_ok=True)
    save_file(codes, os.path.join(args.out, "ae.safetensors"))
    f32 = lambda t: np.ascontiguousarray(t.detach().to(torch.float32).numpy())
    batch = {
        "padded_images": f32(padded),
        "image_sizes": np.asarray(SIZES, np.int64),
        "vae_moments": f32(mom32), "vae_eps": f32(eps), "padded_latent": f32(lat32), "decoded": f32(dec32),
        "vae_moments_f64": np.ascontiguousarray(mom64.numpy()),
    }
    save_file(batch, os.path.join(args.out, "batch.safetensors"))
    commit = bagel_commit(args.bagel_src)
    meta = {
        "format_version": 1, "preset": os.path.basename(os.path.normpath(args.out)), "seed": args.seed,
        "description": "BAGEL's FLUX autoencoder alone, ch 32, ch_mult [1,2,2,2], z 16 (2 channels per "
                       "GroupNorm group at 64 channels), nine non-square images zero-padded onto one canvas",
        "bagel_repo": "https://github.com/ByteDance-Seed/Bagel", "bagel_commit": commit[:7],
        "bagel_commit_full": commit, "torch_version": torch.__version__,
        "generator": "scripts/make_vae_golden.py: unmodified modeling/autoencoder.py on CPU, fp32 and float64",
        "config": {"ae": {**CONFIG, "groupnorm_groups": 32, "groupnorm_eps": 1e-6}},
        "ae_weight_encoding": "fp32 weight = float32(int8 code) * 2**ae_weight_exponents[key] (exact)",
        "ae_weight_exponents": exps,
        "rng": {"weights": f"torch.manual_seed({args.seed}) (construction), GroupNorm affine from "
                           f"torch.Generator().manual_seed({args.seed + 1})",
                "images": f"random_scene(torch.Generator().manual_seed({IMAGE_SEED})) per size in order",
                "vae_eps": f"torch.randn(vae_eps.shape, generator=torch.Generator().manual_seed({EPS_SEED}))"},
        "batch": {"image_sizes": SIZES, "canvas": max_size[1:], "num_images": len(SIZES)},
        "tensors": {
            "padded_images": "Nx3xHxW fp32 in [-1,1], image i in [:, :h_i, :w_i], zeros elsewhere (PackedDataset)",
            "image_sizes": "(h_i, w_i) of every image",
            "vae_moments": "AutoEncoder.encoder(padded_images) = [mean; logvar] on dim 1, fp32",
            "vae_moments_f64": "the same from the float64 copy of the model (exact to ~1e-15)",
            "vae_eps": "the standard normal eps DiagonalGaussian drew (fed through torch.randn_like)",
            "padded_latent": "AutoEncoder.encode(padded_images) = scale*(mean + exp(logvar/2)*eps - shift), fp32",
            "decoded": "AutoEncoder.decode(padded_latent), fp32",
        },
        "self_check": self_check,
    }
    with open(os.path.join(args.out, "meta.json"), "w") as fh:
        json.dump(meta, fh, indent=1)
    with open(os.path.join(args.out, "README.md"), "w") as fh:
        fh.write(readme(meta, batch))
    for name in ("ae.safetensors", "batch.safetensors", "meta.json", "README.md"):
        os.chmod(os.path.join(args.out, name), 0o644)
    print(json.dumps({k: v for k, v in self_check.items() if k not in ("groupnorm", "what")}, indent=1))
    worst = max(gn_self.items(), key=lambda kv: kv[1]["bagel_fp32_vs_f64"] / kv[1]["max_abs_f64"])
    print("worst GroupNorm (relative):", worst)
    return 0


if __name__ == "__main__":
    sys.exit(main())
