"""MoT vs dense decoder cost: forward+backward time and XLA FLOPs, measured side by side.

    python bench/mot_cost.py [--hidden 512 --layers 4 --length 1024 --rows 2 --gen-frac 0.5 --repeats 5]

Both stacks get the same packed rows (random documents of causal text + image splits, ~gen-frac of
the tokens routed to the gen expert). A naive MoT that runs both experts and masks would give a
FLOP ratio of 2; the target is <= 1.05 (FLOPs) and <= 1.15 (time). Writes bench/results/mot_cost.json.
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
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from sgt_jax.models import attention as A  # noqa: E402
from sgt_jax.models import config as C  # noqa: E402
from sgt_jax.models.qwen2_mot import Qwen2MoT  # noqa: E402


def packed_rows(rows, length, gen_frac, seed=0):
    """Documents of [text (causal), image (full or noise, gen)] until the row is full."""
    rng = np.random.default_rng(seed)
    num_gen = int(length * gen_frac)
    out = {k: np.zeros((rows, length), np.int32) for k in ("doc", "split", "mode", "expert", "pos")}
    for r in range(rows):
        gen_left, i, d, s = num_gen, 0, 0, 0
        while i < length:
            n_text = int(rng.integers(16, 96))
            n_img = min(int(rng.integers(64, 256)), gen_left)
            for n, mode, e in ((n_text, A.CAUSAL, 0), (n_img, rng.choice([A.FULL, A.NOISE]), 1)):
                n = min(n, length - i)
                if n <= 0:
                    continue
                out["doc"][r, i:i + n], out["split"][r, i:i + n] = d, s
                out["mode"][r, i:i + n], out["expert"][r, i:i + n] = mode, e
                out["pos"][r, i:i + n] = np.arange(n) if mode == A.CAUSAL else 0
                gen_left -= n if e else 0
                i, s = i + n, s + 1
            d += 1
        # exact quota: flip the last und tokens to gen if short (padding-like), never over
        short = num_gen - out["expert"][r].sum()
        if short > 0:
            idx = np.where(out["expert"][r] == 0)[0][-short:]
            out["expert"][r, idx] = 1
    return out, num_gen


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--gen-frac", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "mot_cost.json"))
    a = ap.parse_args()

    rows, num_gen = packed_rows(a.rows, a.length, a.gen_frac)
    seg = A.Segments(*(jnp.asarray(rows[k]) for k in ("doc", "split", "mode")),
                     jnp.broadcast_to(jnp.arange(a.length, dtype=jnp.int32), (a.rows, a.length)))
    pos, expert = jnp.asarray(rows["pos"]), jnp.asarray(rows["expert"])
    x = jax.random.normal(jax.random.key(0), (a.rows, a.length, a.hidden))

    results = {}
    fns = {}
    for kind in ("dense", "mot"):
        cfg = C.tiny()
        cfg.llm.update(dict(hidden_size=a.hidden, intermediate_size=a.intermediate, num_layers=a.layers,
                            num_heads=a.heads, num_kv_heads=a.kv_heads, vocab_size=256, layer_module=kind))
        model = Qwen2MoT(cfg, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model)

        def loss(p, x, graphdef=graphdef):
            m = nnx.merge(graphdef, p)
            return jnp.mean(m(x, pos, seg, expert, num_gen) ** 2)

        step = jax.jit(jax.value_and_grad(loss))
        compiled = step.lower(params, x).compile()
        flops = compiled.cost_analysis().get("flops")
        jax.block_until_ready(compiled(params, x))
        fns[kind] = (compiled, params)
        results[kind] = {"flops": flops, "times": []}
    for _ in range(a.repeats):          # interleaved, so both see the same machine load
        for kind, (f, p) in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(f(p, x))
            results[kind]["times"].append(time.perf_counter() - t)
    for r in results.values():
        r["median_s"] = float(np.median(r["times"]))
    report = {
        "config": {k: v for k, v in vars(a).items() if k != "out"} | {"num_gen_per_row": num_gen},
        "dense": results["dense"], "mot": results["mot"],
        "time_ratio_mot_over_dense": results["mot"]["median_s"] / results["dense"]["median_s"],
        "flop_ratio_mot_over_dense": results["mot"]["flops"] / results["dense"]["flops"],
        "machine": {"backend": jax.default_backend(), "devices": len(jax.devices()),
                    "cpu_count": os.cpu_count(), "platform": platform.platform()},
        "targets": {"time_ratio": 1.15, "flop_ratio": 1.05},
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"dense fwd+bwd {results['dense']['median_s']*1e3:.1f} ms, {results['dense']['flops']:.3e} FLOPs")
    print(f"mot   fwd+bwd {results['mot']['median_s']*1e3:.1f} ms, {results['mot']['flops']:.3e} FLOPs")
    print(f"time ratio {report['time_ratio_mot_over_dense']:.3f} (target <= 1.15), "
          f"FLOP ratio {report['flop_ratio_mot_over_dense']:.3f} (target <= 1.05); wrote {a.out}")


if __name__ == "__main__":
    main()
