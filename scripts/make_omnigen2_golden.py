"""Write tests/fixtures/omnigen2_golden/dit_tiny.{safetensors,npz}: the UNMODIFIED OmniGen2
transformer (VectorSpaceLab/OmniGen2 @ 0f72fa9, ``OmniGen2Transformer2DModel``) run on CPU in
fp32 with the tiny config of ``omnigen2_config.dit_tiny()`` and random weights: velocities for
a batch of differently sized latents with reference images (two refs in one sample, none in the
other) and a batch without any, plus the gradient of a fixed linear loss of both outputs w.r.t.
every parameter.

Needs diffusers (not a dependency of this repo); run it in a separate venv, e.g.
    python3 -m venv --system-site-packages /tmp/og2_venv
    /tmp/og2_venv/bin/pip install diffusers==0.35.1 einops
    git clone https://github.com/VectorSpaceLab/OmniGen2 /tmp/OmniGen2 && git -C /tmp/OmniGen2 checkout 0f72fa9
    /tmp/og2_venv/bin/python scripts/make_omnigen2_golden.py --omnigen2 /tmp/OmniGen2
The tiny config is repeated below as plain numbers (this script must not import sgt_jax's jax
stack); tests/test_omnigen2_dit.py checks it equals dit_tiny().
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

CFG = {"patch_size": 2, "in_channels": 4, "out_channels": 4, "hidden_size": 48, "num_layers": 2,
       "num_refiner_layers": 1, "num_attention_heads": 4, "num_kv_heads": 2, "multiple_of": 16,
       "ffn_dim_multiplier": 0.5, "norm_eps": 1e-5, "axes_dim_rope": (4, 4, 4), "axes_lens": (64, 64, 64),
       "text_feat_dim": 32, "timestep_scale": 1000.0}

# batch 1: (latent C,H,W ; refs ; text tokens) -- batch 2 has no reference images at all
BATCH1 = [dict(latent=(4, 8, 12), refs=[(4, 6, 6), (4, 8, 4)], text=7),
          dict(latent=(4, 10, 6), refs=None, text=5)]
BATCH2 = [dict(latent=(4, 6, 8), refs=None, text=6), dict(latent=(4, 4, 4), refs=None, text=3)]
TIMESTEPS = ([0.3, 0.8], [0.55, 0.1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--omnigen2", required=True, help="a checkout of VectorSpaceLab/OmniGen2")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures",
                                                   "omnigen2_golden"))
    args = ap.parse_args()
    sys.path.insert(0, args.omnigen2)
    import torch
    from safetensors.torch import save_file
    from omnigen2.models.transformers.repo import OmniGen2RotaryPosEmbed
    from omnigen2.models.transformers.transformer_omnigen2 import OmniGen2Transformer2DModel

    torch.manual_seed(0)
    model = OmniGen2Transformer2DModel(**CFG).float().train()
    with torch.no_grad():   # move every weight (zero-initialised gates and heads included) off its init
        for name, p in model.named_parameters():
            base = 1.0 if p.ndim == 1 and "norm" in name and "linear" not in name else 0.0
            p.copy_(base + 0.15 * torch.randn_like(p) if base else 0.15 * torch.randn_like(p))
    freqs_cis = OmniGen2RotaryPosEmbed.get_freqs_cis(CFG["axes_dim_rope"], CFG["axes_lens"], theta=10000)
    rng = np.random.default_rng(0)
    arrays, total = {}, 0.0
    for b, (batch, ts) in enumerate(zip((BATCH1, BATCH2), TIMESTEPS)):
        lt = max(s["text"] for s in batch)
        text = rng.standard_normal((len(batch), lt, CFG["text_feat_dim"])).astype(np.float32)
        mask = np.zeros((len(batch), lt), bool)
        latents, refs = [], []
        for i, s in enumerate(batch):
            mask[i, :s["text"]] = True
            latents.append(rng.standard_normal(s["latent"]).astype(np.float32))
            refs.append(None if s["refs"] is None else [rng.standard_normal(r).astype(np.float32) for r in s["refs"]])
        out = model(hidden_states=[torch.tensor(z) for z in latents], timestep=torch.tensor(ts),
                    text_hidden_states=torch.tensor(text), freqs_cis=freqs_cis,
                    text_attention_mask=torch.tensor(mask),
                    ref_image_hidden_states=None if all(r is None for r in refs) else
                    [None if r is None else [torch.tensor(z) for z in r] for r in refs])
        for i, o in enumerate(out):
            w = rng.standard_normal(tuple(o.shape)).astype(np.float32)
            total = total + (o * torch.tensor(w)).sum()
            arrays[f"b{b}_out{i}"] = o.detach().numpy()
            arrays[f"b{b}_w{i}"] = w
            arrays[f"b{b}_latent{i}"] = latents[i]
            for j, z in enumerate(refs[i] or []):
                arrays[f"b{b}_ref{i}_{j}"] = z
        arrays[f"b{b}_text"] = text
        arrays[f"b{b}_mask"] = mask
        arrays[f"b{b}_t"] = np.asarray(ts, np.float32)
    total.backward()
    arrays["loss"] = np.asarray(float(total.detach()), np.float64)
    for name, p in model.named_parameters():
        arrays[f"grad/{name}"] = p.grad.numpy()
    os.makedirs(args.out, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
              os.path.join(args.out, "dit_tiny.safetensors"))
    np.savez_compressed(os.path.join(args.out, "dit_tiny.npz"), **arrays)
    print("wrote", args.out, "loss", float(arrays["loss"]))


if __name__ == "__main__":
    main()
