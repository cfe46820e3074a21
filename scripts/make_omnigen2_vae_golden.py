"""Write tests/fixtures/omnigen2_golden/vae_tiny.{safetensors,npz}: diffusers' ``AutoencoderKL``
with the FLUX layout (OmniGen2's vae/: no quant convs, scaling 0.3611, shift 0.1159) at a tiny
size, random weights, run on CPU in fp32: encoder moments of an image and the decoder output of a
latent. Run it in the venv with diffusers (see scripts/make_omnigen2_golden.py):
    /tmp/og2_venv/bin/python scripts/make_omnigen2_vae_golden.py
The tiny shapes are repeated in tests/test_omnigen2_vae.py (VAE dict) and checked there.
"""
import os

import numpy as np

VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": (16, 32),
       "layers_per_block": 1, "norm_num_groups": 8}


def main():
    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611,
                        shift_factor=0.1159, mid_block_add_attention=True, **VAE).float().eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 3, 16, 24)).astype(np.float32)
    z = rng.standard_normal((2, 4, 8, 12)).astype(np.float32)
    with torch.no_grad():
        moments = vae.encoder(torch.tensor(x)).numpy()
        dec = vae.decode(torch.tensor(z)).sample.numpy()
    out = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "omnigen2_golden")
    os.makedirs(out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, os.path.join(out, "vae_tiny.safetensors"))
    np.savez_compressed(os.path.join(out, "vae_tiny.npz"), x=x, z=z, moments=moments, decoded=dec)
    print("wrote", out)


if __name__ == "__main__":
    main()
