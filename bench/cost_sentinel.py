"""What a negative ``optimal_seconds`` from the TPU compiler means: tiny programs compiled
ahead-of-time for one TPU topology (no TPU needed), each differing in one thing -- while loops,
Pallas calls with and without a ``pl.CostEstimate`` -- and ``compiled.cost_analysis()`` of each.

    python bench/cost_sentinel.py [--topology v5p-8] [--n 1024]

XLA's ``HloCostAnalysis::HandleCustomCall`` (xla/service/hlo_cost_analysis.cc) marks a custom call
it knows nothing about as "unknown": -1 for its flops, bytes accessed and optimal_seconds, summed
into the program's totals like any other instruction. A Pallas kernel is a custom call. This
checks whether libtpu's analysis does the same, whether it reads the kernel's cost estimate, and
what a while loop does. Writes bench/results/cost_sentinel.json. Compiles only small programs.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402

from sgt_jax.aot.topology import parse_topology, topology_devices  # noqa: E402


def _kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...] * 2.0 + 1.0


def pallas_double(x, cost: pl.CostEstimate | None):
    n, m = x.shape
    return pl.pallas_call(_kernel, grid=(n // 256,),
                          in_specs=[pl.BlockSpec((256, m), lambda i: (i, 0))],
                          out_specs=pl.BlockSpec((256, m), lambda i: (i, 0)),
                          out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), cost_estimate=cost)(x)


def programs(n: int):
    """name -> (fn of (a, b)); a, b are (n, n) f32."""
    big = pl.CostEstimate(flops=10 ** 15, transcendentals=0, bytes_accessed=10 ** 12)   # ~2 s at v5p peak

    def loop(a, b, k):
        return jax.lax.fori_loop(0, k, lambda i, x: jnp.tanh(x @ b), a)

    return {
        "matmul": lambda a, b: a @ b,
        "matmul + while(8)": lambda a, b: loop(a, b, 8),
        "matmul + while(64)": lambda a, b: loop(a, b, 64),
        "matmul + 2 while": lambda a, b: loop(loop(a, b, 8), b, 8),
        "matmul + pallas(no estimate)": lambda a, b: pallas_double(a @ b, None),
        "matmul + pallas(1e15 flops estimate)": lambda a, b: pallas_double(a @ b, big),
        "matmul + 2 pallas(estimate)": lambda a, b: pallas_double(pallas_double(a @ b, big), big),
        "matmul + 3 pallas(estimate)": lambda a, b: pallas_double(pallas_double(pallas_double(a @ b, big), big), big),
        "matmul + pallas inside while(8)": lambda a, b: jax.lax.fori_loop(
            0, 8, lambda i, x: pallas_double(x @ b, big), a),
        "matmul + switch(pallas 1e15 | pallas 3e15)": lambda a, b: jax.lax.switch(
            (a[0, 0] > 0).astype(jnp.int32), [lambda x: pallas_double(x, big),
                                              lambda x: pallas_double(pallas_double(pallas_double(x, big), big), big)],
            a @ b),
        "matmul + switch(pallas 3e15 | pallas 1e15)": lambda a, b: jax.lax.switch(
            (a[0, 0] > 0).astype(jnp.int32), [lambda x: pallas_double(pallas_double(pallas_double(x, big), big), big),
                                              lambda x: pallas_double(x, big)],
            a @ b),
        "matmul + sort": lambda a, b: jnp.sort(a @ b, axis=1),
        "matmul + argsort": lambda a, b: (a @ b)[0, jnp.argsort(a[0])],
        "matmul + 2 argsort": lambda a, b: (a @ b)[0, jnp.argsort(jnp.argsort(a[0]))],
        "matmul + argsort(int32, rows)": lambda a, b: (a @ b) + jnp.argsort(
            (a > 0).astype(jnp.int32), axis=1, stable=True).astype(jnp.float32),
        "matmul + cond": lambda a, b: jax.lax.cond(a[0, 0] > 0, lambda x: x @ b, lambda x: x, a),
        "matmul + random.normal": lambda a, b: a @ b + jax.random.normal(jax.random.key(0), a.shape),
    }


def sharded_programs(n: int, mesh):
    """name -> (fn, in_specs, out_spec) over a 1-D mesh ``x`` of every chip of the topology."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    rows = NamedSharding(mesh, P("x", None))
    rep = NamedSharding(mesh, P())
    cols = NamedSharding(mesh, P(None, "x"))
    c = jax.lax.with_sharding_constraint
    return {
        "sharded: local matmul (no collective)": (lambda a, b: a @ b, (rows, rep), rows),
        "sharded: all-gather then matmul": (lambda a, b: c(a, rep) @ b, (rows, rep), rep),
        "sharded: contraction -> all-reduce": (lambda a, b: c(a, cols) @ c(b, rows), (cols, rows), rep),
        "sharded: contraction -> reduce-scatter": (lambda a, b: c(c(a, cols) @ c(b, rows), rows),
                                                   (cols, rows), rows),
        "sharded: 2 all-gathers": (lambda a, b: c(a, rep) @ c(b, rep), (rows, rows), rep),
    }


def costs(compiled) -> dict:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0]
    text = compiled.as_text()
    return {"flops": float(ca.get("flops", 0.0)), "bytes_accessed": float(ca.get("bytes accessed", 0.0)),
            "transcendentals": float(ca.get("transcendentals", 0.0)),
            "optimal_seconds": float(ca["optimal_seconds"]) if "optimal_seconds" in ca else None,
            "while_ops": len(re.findall(r"\bwhile\(", text)),
            "custom_calls": len(re.findall(r"\bcustom-call\(", text)),
            "collectives": len(re.findall(r"\b(?:all-gather|all-reduce|reduce-scatter|all-to-all|"
                                          r"collective-permute)(?:-start)?\(", text))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--topology", default="v5p-8")
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "cost_sentinel.json"))
    args = ap.parse_args()
    topo = parse_topology(args.topology)
    dev = topology_devices(topo)[0]
    sharding = jax.sharding.SingleDeviceSharding(dev)
    spec = jax.ShapeDtypeStruct((args.n, args.n), jnp.float32, sharding=sharding)
    rows = {}
    for name, fn in programs(args.n).items():
        compiled = jax.jit(fn).lower(spec, spec).compile()
        rows[name] = costs(compiled)
        r = rows[name]
        print(f"{name:40s} flops {r['flops']:.6g}  bytes {r['bytes_accessed']:.6g}  optimal_seconds "
              f"{r['optimal_seconds']:.6g}  while {r['while_ops']}  custom-call {r['custom_calls']}", flush=True)
    devices = topology_devices(topo)
    mesh = jax.sharding.Mesh(devices, ("x",))
    for name, (fn, ins, out) in sharded_programs(args.n, mesh).items():
        specs = [jax.ShapeDtypeStruct((args.n, args.n), jnp.float32, sharding=s) for s in ins]
        compiled = jax.jit(fn, out_shardings=out).lower(*specs).compile()
        rows[name] = costs(compiled)
        r = rows[name]
        print(f"{name:40s} flops {r['flops']:.6g}  bytes {r['bytes_accessed']:.6g}  optimal_seconds "
              f"{r['optimal_seconds']:.6g}  while {r['while_ops']}  custom-call {r['custom_calls']}  "
              f"collectives {r['collectives']}", flush=True)
    base = rows["matmul"]
    print(f"matmul flops 2n^3 = {2 * args.n ** 3:.6g}; differences from 'matmul':")
    for name, r in rows.items():
        print(f"  {name:40s} d_flops {r['flops'] - base['flops']:+.6g}  d_seconds "
              f"{r['optimal_seconds'] - base['optimal_seconds']:+.6g}")
    out = {"topology": args.topology, "device_kind": dev.device_kind, "n": args.n, "chips": len(devices),
           "versions": {"jax": jax.__version__, "libtpu": _libtpu_version()}, "programs": rows,
           "command": f"python bench/cost_sentinel.py --topology {args.topology} --n {args.n}"}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", args.out)


def _libtpu_version():
    from importlib.metadata import version
    try:
        return version("libtpu")
    except Exception:
        return None


if __name__ == "__main__":
    main()
