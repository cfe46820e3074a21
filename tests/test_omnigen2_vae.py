"""OmniGen2's VAE (the FLUX AutoencoderKL in diffusers layout) through models/vae.py: the diffusers
key names map onto the FLUX AE (``omnigen2_keymap.vae_diffusers_table``) and reproduce diffusers'
own encoder moments and decoder output (fixture from scripts/make_omnigen2_vae_golden.py)."""
from __future__ import annotations

import ast
import os

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from sgt_jax.convert import omnigen2_keymap
from sgt_jax.models import vae

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "omnigen2_golden")
SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "make_omnigen2_vae_golden.py")


def tiny_cfg():
    return ml_collections.ConfigDict(dict(in_channels=3, out_ch=3, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                                          z_channels=4, scale_factor=0.3611, shift_factor=0.1159,
                                          groupnorm_groups=8, eps=1e-6))


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def test_generator_shapes_match():
    tree = ast.parse(open(SCRIPT).read())
    gen = ast.literal_eval(next(n.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "VAE"))
    c = tiny_cfg()
    assert gen["block_out_channels"] == tuple(c.ch * m for m in c.ch_mult)
    assert (gen["latent_channels"], gen["layers_per_block"], gen["norm_num_groups"]) == \
        (c.z_channels, c.num_res_blocks, c.groupnorm_groups)


def test_diffusers_vae_parity_and_round_trip():
    state = load_file(os.path.join(FIX, "vae_tiny.safetensors"))
    g = np.load(os.path.join(FIX, "vae_tiny.npz"))
    model = omnigen2_keymap.load_vae_diffusers(vae.AutoEncoder(tiny_cfg(), rngs=nnx.Rngs(0)), state)
    run = nnx.jit(lambda m, x, z: (m.encode_moments(x), m.decoder(z)))
    moments, decoded = (np.asarray(a) for a in run(model, jnp.asarray(g["x"].transpose(0, 2, 3, 1)),
                                                      jnp.asarray(g["z"].transpose(0, 2, 3, 1))))
    errs = (rel(moments.transpose(0, 3, 1, 2), g["moments"]), rel(decoded.transpose(0, 3, 1, 2), g["decoded"]))
    print(errs)
    assert max(errs) <= 1e-5, errs
    out = omnigen2_keymap.export_vae_diffusers(model)
    assert set(out) == set(state)
    for k in state:
        assert out[k].tobytes() == state[k].tobytes(), k
    bad = dict(state)
    bad.pop("decoder.up_blocks.0.upsamplers.0.conv.bias")
    with pytest.raises(ValueError, match="1 missing keys: decoder.up_blocks.0.upsamplers.0.conv.bias"):
        omnigen2_keymap.load_vae_diffusers(vae.AutoEncoder(tiny_cfg(), rngs=nnx.Rngs(0)), bad)
