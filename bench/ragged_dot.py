"""``jax.lax.ragged_dot`` (two experts, tokens grouped by expert) vs one dense matmul of the same
shapes, on this machine's backend: the compiled program's cost_analysis FLOPs and the median
time, the two timed interleaved in one run.

    python bench/ragged_dot.py [--tokens 4096 --hidden 1024 --out-dim 1024 --groups 2 --repeats 7]

The dense matmul is (tokens, hidden) @ (hidden, out) -- the work a token routed to one expert
needs. ragged_dot multiplies the same tokens by a (groups, hidden, out) stack, each token by its
group's matrix (here groups of equal size). Ratios ragged / dense printed and written to
bench/results/ragged_dot.json (docs/design.md, "MoT routing").
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--out-dim", type=int, default=1024)
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "ragged_dot.json"))
    args = ap.parse_args()
    dt = jnp.dtype(args.dtype)
    rng = np.random.default_rng(0)
    n, h, o, g = args.tokens, args.hidden, args.out_dim, args.groups
    x = jnp.asarray(rng.standard_normal((n, h)), dt)
    w_dense = jnp.asarray(rng.standard_normal((h, o)), dt)
    w_groups = jnp.asarray(rng.standard_normal((g, h, o)), dt)
    sizes = jnp.asarray([n // g] * (g - 1) + [n - (n // g) * (g - 1)], jnp.int32)

    dense = jax.jit(lambda a, w: a @ w)
    ragged = jax.jit(lambda a, w, s: jax.lax.ragged_dot(a, w, s))
    fns = {"dense": (dense, (x, w_dense)), "ragged_dot": (ragged, (x, w_groups, sizes))}
    compiled, flops = {}, {}
    for k, (fn, a) in fns.items():
        compiled[k] = fn.lower(*a).compile()
        ca = compiled[k].cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        flops[k] = float(ca.get("flops", float("nan")))
    # same numbers: the ragged product of each group equals the dense product with that group's matrix
    ref = jnp.concatenate([x[: n // g] @ w_groups[0]] + [x[(n // g) * i:(n // g) * (i + 1)] @ w_groups[i]
                                                          for i in range(1, g)], axis=0)
    err = float(jnp.max(jnp.abs(compiled["ragged_dot"](x, w_groups, sizes) - ref)))
    times = {k: [] for k in fns}
    for k, (_, a) in fns.items():            # warm-up
        jax.block_until_ready(compiled[k](*a))
    for _ in range(args.repeats):            # interleaved
        for k, (_, a) in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(compiled[k](*a))
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {
        "shapes": {"tokens": n, "hidden": h, "out": o, "groups": g, "dtype": args.dtype},
        "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "jax": jax.__version__,
        "analytic_flops": 2 * n * h * o,
        "xla_flops": flops, "median_s": med, "times_s": times, "repeats": args.repeats,
        "ratio": {"flops": flops["ragged_dot"] / flops["dense"], "time": med["ragged_dot"] / med["dense"]},
        "max_abs_err_vs_per_group_matmuls": err,
        "command": (f"python bench/ragged_dot.py --tokens {n} --hidden {h} --out-dim {o} --groups {g} "
                    f"--repeats {args.repeats} --dtype {args.dtype}"),
    }
    print(f"{jax.default_backend()} ({jax.devices()[0].device_kind}), x ({n}, {h}) @ ({g} x) ({h}, {o}) {args.dtype}; "
          f"analytic 2*n*h*o = {out['analytic_flops']:.4g}")
    for k in fns:
        print(f"  {k:11s} XLA FLOPs {flops[k]:.4g}  median {1e3 * med[k]:.2f} ms")
    print(f"  ratio ragged_dot / dense: FLOPs {out['ratio']['flops']:.2f}x, time {out['ratio']['time']:.2f}x "
          f"(max |err| vs per-group matmuls {err:.2g})")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
