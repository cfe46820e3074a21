"""VAE numerics of issue 12 vs before, compiled and timed side by side in one run: GroupNorm
statistics from row-then-column sums (sgt_jax/models/vae.py) vs the single reduction over
(h, w, channels-in-group); and, in the encoder cases, the fp32-accumulating conv + fp32 GroupNorm
output vs the conv/GroupNorm that rounded to the compute dtype.

    python bench/groupnorm.py [--repeats 5] [--tpu v5p-8]

Cases: lone GroupNorms at FLUX-AE shapes (fp32 and bf16 input), and the encoder of the
``ae_wide_v1`` config (ch 32, ch_mult 1,2,2,2) on a padded canvas, timed on this machine.
``--tpu TOPOLOGY``: also compile the full-size FLUX encoder (bagel_7b preset, bf16 compute) on one
1024 x 1024 image for one device of that TPU topology (no TPU needed, sgt_jax.aot) and report the
compiler's temp memory, FLOPs and bytes accessed, old vs new (slow: minutes per compile).
Writes bench/results/groupnorm.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from sgt_jax.models import vae as V  # noqa: E402

NEW = V.GroupNorm.__call__, V.Conv.__call__


def old_call(self, x):
    """The formulation before issue 12: one reduction over (h, w, channels of the group)."""
    n, h, w, c = x.shape
    g = self.groups
    x32 = x.astype(jnp.float32).reshape(n, h, w, g, c // g)
    mean = jnp.mean(x32, axis=(1, 2, 4), keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=(1, 2, 4), keepdims=True)
    y = ((x32 - mean) * jax.lax.rsqrt(var + self.eps)).reshape(n, h, w, c)
    return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


def old_conv(self, x):
    """The conv before issue 12: output in the compute dtype, bias added in it."""
    p = self.padding
    y = jax.lax.conv_general_dilated(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                                     window_strides=(self.stride, self.stride), padding=((p, p), (p, p)),
                                     dimension_numbers=V._DIMS)
    return y + self.bias[...].astype(self.dtype)


def case(make, args, repeats):
    """Compile both formulations (the GroupNorm in place at trace time), then time them
    interleaved (old, new, old, new, ...) so load on the machine hits both alike."""
    fns = {}
    for name, (gn, conv) in (("old", (old_call, old_conv)), ("new", NEW)):
        V.GroupNorm.__call__, V.Conv.__call__ = gn, conv
        try:
            fns[name] = make()
            jax.block_until_ready(fns[name](*args))      # compile + warm up while patched
        finally:
            V.GroupNorm.__call__, V.Conv.__call__ = NEW
    times = {"old": [], "new": []}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    out = {k: {"median_s": float(np.median(v)), "times": v} for k, v in times.items()}
    out["ratio_new_over_old"] = out["new"]["median_s"] / out["old"]["median_s"]
    return out


def tpu_compile(topology: str, size: int = 1024) -> dict:
    from sgt_jax import aot
    from sgt_jax.models import config as C

    dev = aot.topology_devices(aot.parse_topology(topology))[0]
    sh = jax.sharding.SingleDeviceSharding(dev)
    cfg = C.bagel_7b().vae
    out = {"topology": topology, "image": [1, size, size, 3], "compute_dtype": "bfloat16"}
    for name, (gn, conv) in (("old", (old_call, old_conv)), ("new", NEW)):
        V.GroupNorm.__call__, V.Conv.__call__ = gn, conv
        try:
            ae = nnx.eval_shape(lambda: V.AutoEncoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16))
            gd, st = nnx.split(ae)
            st = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), st)
            x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32, sharding=sh)
            c = jax.jit(lambda s, x: nnx.merge(gd, s).encode_moments(x)).lower(st, x).compile()
        finally:
            V.GroupNorm.__call__, V.Conv.__call__ = NEW
        cost = c.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        out[name] = {"temp_gib": c.memory_analysis().temp_size_in_bytes / 2 ** 30,
                     "flops": cost.get("flops"), "bytes_accessed": cost.get("bytes accessed")}
        print(f"TPU {topology} encoder {size}^2 bf16 {name}: temp {out[name]['temp_gib']:.3f} GiB, "
              f"{out[name]['flops']:.3e} FLOPs, {out[name]['bytes_accessed']:.3e} bytes", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tpu", help="a TPU topology (e.g. v5p-8) to compile the full-size encoder for")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results", "groupnorm.json"))
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    results = {"backend": jax.default_backend(), "machine": platform.machine(),
               "cpu_count": os.cpu_count(), "repeats": args.repeats, "cases": {}}

    for (n, h, w, c), dt in [((2, 256, 256, 128), "float32"), ((2, 256, 256, 128), "bfloat16"),
                             ((2, 128, 128, 512), "float32"), ((2, 128, 128, 512), "bfloat16")]:
        gn = V.GroupNorm(c, 32, 1e-6, rngs=nnx.Rngs(0))
        x = jnp.asarray(rng.standard_normal((n, h, w, c)), dt)
        name = f"groupnorm {n}x{h}x{w}x{c} {dt}"
        results["cases"][name] = case(lambda: nnx.jit(lambda m, a: m(a)), (gn, x), args.repeats)
        print(f"{name:38s} old {results['cases'][name]['old']['median_s'] * 1e3:8.2f} ms  "
              f"new {results['cases'][name]['new']['median_s'] * 1e3:8.2f} ms  "
              f"ratio {results['cases'][name]['ratio_new_over_old']:.3f}", flush=True)

    cfg = ml_collections.ConfigDict(dict(in_channels=3, out_ch=3, ch=32, ch_mult=(1, 2, 2, 2),
                                         num_res_blocks=1, z_channels=16, scale_factor=0.3611,
                                         shift_factor=0.1159, groupnorm_groups=32, eps=1e-6))
    for dt in ("float32", "bfloat16"):
        ae = V.AutoEncoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.dtype(dt))
        x = jnp.asarray(rng.uniform(-1, 1, (4, 256, 384, 3)), jnp.float32)
        name = f"encoder ae_wide 4x256x384 {dt}"
        results["cases"][name] = case(lambda: nnx.jit(lambda m, a: m.encode_moments(a)), (ae, x), args.repeats)
        print(f"{name:38s} old {results['cases'][name]['old']['median_s'] * 1e3:8.2f} ms  "
              f"new {results['cases'][name]['new']['median_s'] * 1e3:8.2f} ms  "
              f"ratio {results['cases'][name]['ratio_new_over_old']:.3f}", flush=True)

    if args.tpu:
        results["tpu"] = tpu_compile(args.tpu)

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
