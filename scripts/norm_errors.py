#!/usr/bin/env python3
"""fp32 error of the port's RMSNorm / LayerNorm (sgt_jax/models/layers.py) vs torch's, against float64.

    python scripts/norm_errors.py [--json OUT]

Issue 12 asked whether the LLM's RMSNorm (3584 values, Qwen2-7B hidden) and the ViT's LayerNorm
(1152, SigLIP-so400m) need GroupNorm's treatment. Rows of Gaussian activations with a per-row
scale and, in the second case, a common offset (a mean the sums must carry); the compiled port
and torch (transformers' Qwen2RMSNorm arithmetic / F.layer_norm) in fp32, both vs float64 torch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from sgt_jax.models.layers import LayerNorm, RMSNorm  # noqa: E402


def torch_norm(kind, x, w, b, dtype):
    x, w, b = x.to(dtype), w.to(dtype), b.to(dtype)
    if kind == "rmsnorm":       # Qwen2RMSNorm: w * (x * rsqrt(mean(x^2) + eps))
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b, 1e-6)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = []
    for kind, dim in (("rmsnorm", 3584), ("layernorm", 1152)):
        for offset in (0.0, 3.0):
            x = (rng.standard_normal((1024, dim)) * (1 + rng.uniform(0, 3, (1024, 1))) + offset).astype(np.float32)
            w = (1 + 0.1 * rng.standard_normal(dim)).astype(np.float32)
            b = (0.1 * rng.standard_normal(dim)).astype(np.float32)
            m = RMSNorm(dim, 1e-6, rngs=nnx.Rngs(0)) if kind == "rmsnorm" else LayerNorm(dim, 1e-6, rngs=nnx.Rngs(0))
            m.scale[...] = jnp.asarray(w)
            if kind == "layernorm":
                m.bias[...] = jnp.asarray(b)
            tx, tw, tb = map(torch.from_numpy, (x, w, b))
            ref = torch_norm(kind, tx, tw, tb, torch.float64).numpy()
            e_torch = float(np.abs(torch_norm(kind, tx, tw, tb, torch.float32).double().numpy() - ref).max())
            e_port = float(np.abs(np.asarray(nnx.jit(lambda mm, a: mm(a))(m, jnp.asarray(x)), np.float64) - ref).max())
            rows.append(dict(norm=kind, dim=dim, offset=offset, port=e_port, torch=e_torch,
                             ratio=e_port / e_torch, max_abs=float(np.abs(ref).max())))
            print(f"{kind:9s} dim {dim:5d} offset {offset:3.1f}: port {e_port:.2e}  torch {e_torch:.2e}  "
                  f"ratio {e_port / e_torch:.2f}  (max |y| {rows[-1]['max_abs']:.2f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"backend": jax.default_backend(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
