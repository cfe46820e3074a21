"""Load an ``export --arch omnigen2`` output in the PyTorch originals and reproduce the golden
fixtures: transformer/ with OmniGen2's ``OmniGen2Transformer2DModel.from_pretrained`` (velocity of
tests/fixtures/omnigen2_golden/dit_tiny.npz) and vae/ with diffusers' ``AutoencoderKL.from_pretrained``
(moments and decoded output of vae_tiny.npz). Needs diffusers + an OmniGen2 checkout (see
scripts/make_omnigen2_golden.py), e.g.
    /tmp/og2_venv/bin/python scripts/check_omnigen2_loader.py --exported OUT --omnigen2 /tmp/OmniGen2
(mllm/ is checked inside the test suite: tests/test_qwen25_vl.py::test_export_loads_unchanged_in_transformers).
"""
import argparse
import os
import sys

import numpy as np

FIX = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "omnigen2_golden")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--exported", required=True)
    ap.add_argument("--omnigen2", required=True)
    args = ap.parse_args()
    sys.path.insert(0, args.omnigen2)
    import torch
    from diffusers import AutoencoderKL
    from omnigen2.models.transformers.repo import OmniGen2RotaryPosEmbed
    from omnigen2.models.transformers.transformer_omnigen2 import OmniGen2Transformer2DModel

    worst = 0.0
    dit = OmniGen2Transformer2DModel.from_pretrained(os.path.join(args.exported, "transformer")).float().eval()
    g = np.load(os.path.join(FIX, "dit_tiny.npz"))
    freqs = OmniGen2RotaryPosEmbed.get_freqs_cis(dit.config.axes_dim_rope, dit.config.axes_lens, theta=10000)
    for b in (0, 1):
        n = len(g[f"b{b}_text"])
        refs = [[torch.tensor(g[f"b{b}_ref{i}_{j}"]) for j in range(5) if f"b{b}_ref{i}_{j}" in g] or None
                for i in range(n)]
        with torch.no_grad():
            out = dit(hidden_states=[torch.tensor(g[f"b{b}_latent{i}"]) for i in range(n)],
                      timestep=torch.tensor(g[f"b{b}_t"]), text_hidden_states=torch.tensor(g[f"b{b}_text"]),
                      freqs_cis=freqs, text_attention_mask=torch.tensor(g[f"b{b}_mask"]),
                      ref_image_hidden_states=None if all(r is None for r in refs) else refs)
        for i in range(n):
            d = float(np.abs(out[i].numpy() - g[f"b{b}_out{i}"]).max())
            worst = max(worst, d)
            print(f"transformer batch {b} sample {i}: max |diff| {d:.3g}")
    vae = AutoencoderKL.from_pretrained(os.path.join(args.exported, "vae")).float().eval()
    v = np.load(os.path.join(FIX, "vae_tiny.npz"))
    with torch.no_grad():
        for name, got in [("moments", vae.encoder(torch.tensor(v["x"]))),
                          ("decoded", vae.decode(torch.tensor(v["z"])).sample)]:
            d = float(np.abs(got.numpy() - v[name]).max())
            worst = max(worst, d)
            print(f"vae {name}: max |diff| {d:.3g}")
    print("OK" if worst == 0.0 else f"worst max |diff| {worst:.3g}")
    return 0 if worst == 0.0 else 1


if __name__ == "__main__":
    sys.exit(main())
