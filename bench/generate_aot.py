"""BAGEL-7B inference compiled ahead of time for a TPU topology from this CPU host (libtpu, no
TPU): per-chip memory and two independent time estimates, for

* **an image**: text-to-image at 1024 x 1024 (64 x 64 latent tokens), ``num_timesteps`` 50 (49
  Euler steps), text + image CFG: every step evaluates the velocity on the 3 contexts in one batch
  (``Engine._velocity`` with n_ctx 3), then the VAE decodes;
* **text decoding**: one token per row at batch 1 / 32 / 256 against a KV cache (the body of
  ``infer/text.generate``: embed, the decoder over the cache, the cache write, lm_head, argmax).

Memory: the real functions at full depth (scanned layers), compiled for the topology. Time: the
compiler's cost analysis does not see through while loops (scanned layers), so the costs come
from 1- and 2-layer probes compiled with the layers unrolled (``llm.scan_layers=False``),
extrapolated linearly to 28 layers (per-layer cost = probe 2 - probe 1). Two estimates:
the compiler's ``optimal_seconds``, and a roofline per chip from the same probes: FLOPs at peak,
HBM bytes at bandwidth, and the FSDP all-gather of the expert's weights the program uses (the und
expert + lm_head for decoding, the gen expert for the velocity; bf16, (n-1)/n of them per chip)
at ICI bandwidth -- ``roofline_low_s`` = the slowest of the three (perfect overlap),
``roofline_high_s`` = their sum (none). Neither was run on a TPU: both are estimates.

    python bench/generate_aot.py --topology v5p-8 [--topology v6e-8] [--out bench/results/generate_aot.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from sgt_jax.aot.compile import _costs, _memory  # noqa: E402
from sgt_jax.aot.topology import make_topology_mesh, parse_topology, topology_devices  # noqa: E402
from sgt_jax.infer import image as image_lib  # noqa: E402
from sgt_jax.infer.cache import KVCache, block_segments, cache_shardings, run_block  # noqa: E402
from sgt_jax.infer.engine import Engine  # noqa: E402
from sgt_jax.infer.text import lm_logits  # noqa: E402
from sgt_jax.models.config import bagel_7b, patch_latent_dim  # noqa: E402
from sgt_jax.parallel.tpu import CHIPS  # noqa: E402
from sgt_jax.batch import CAUSAL  # noqa: E402


def _abstract(x, sharding):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _cache(eng, rows, capacity):
    c = jax.eval_shape(lambda: KVCache.create(eng.cfg, rows, capacity))
    return jax.tree.map(_abstract, c, cache_shardings(c, eng.mesh))


def _rows(eng, shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=eng.row_sharding(shape))


def _rep(eng, shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=jax.sharding.NamedSharding(eng.mesh, jax.sharding.PartitionSpec()))


def _compile(fn, *args, **static):
    t0 = time.perf_counter()
    c = jax.jit(fn, static_argnames=tuple(static)).lower(*args, **static).compile()
    return c, time.perf_counter() - t0


def velocity_program(eng, side, ctx_tokens):
    """(fn, args): one CFG velocity evaluation of a ``side`` x ``side`` latent grid on 3 contexts."""
    h = w = side
    d = patch_latent_dim(eng.cfg)
    cache = _cache(eng, 3, ctx_tokens)
    x_t = _rows(eng, (1, h * w, d), jnp.float32)
    pos = _rep(eng, (h * w,), jnp.int32)
    gd = eng.graphdef

    def infer_velocity(params, fixed, cache, x_t, t, latent_pos):
        model = nnx.merge(gd, params, fixed)
        return image_lib.velocity(model, cache, x_t, t, latent_pos, n_ctx=3)

    return infer_velocity, (eng.params, eng.fixed, cache, x_t, _rep(eng, (), jnp.float32), pos)


def decode_program(eng, rows, capacity):
    """(fn, args): one greedy decoding step of ``rows`` rows against a cache of ``capacity``."""
    gd = eng.graphdef
    cache = _cache(eng, rows, capacity)
    tok = _rows(eng, (rows,), jnp.int32)

    def infer_decode_step(params, fixed, cache, tok):
        lm = nnx.merge(gd, params, fixed).language_model
        seg = block_segments(jnp.full((rows, 1), CAUSAL, jnp.int32), jnp.ones((rows, 1), bool))
        hid, kb, vb = run_block(lm, lm.embed_tokens(tok[:, None]), cache.rope[:, None], seg, 0, cache)
        cache = cache.write(kb, vb, jnp.ones((rows,), jnp.int32)).replace(rope=cache.rope + 1)
        return cache, jnp.argmax(lm_logits(lm, hid[:, 0]), axis=-1)

    return infer_decode_step, (eng.params, eng.fixed, cache, tok)


def decode_vae_program(eng, side):
    gd = eng.vae_graphdef
    lat = _rows(eng, (1, side * side, patch_latent_dim(eng.cfg)), jnp.float32)

    def infer_decode_latents(vae_params, latents):
        return image_lib.decode(nnx.merge(gd, vae_params), eng.cfg, latents, side, side)

    return infer_decode_latents, (eng.vae_params, lat)


def engine(topo, devices, layers: int | None, unroll: bool):
    cfg = bagel_7b()
    cfg.compute_dtype = "bfloat16"
    if layers is not None:
        cfg.llm.num_layers = layers
    cfg.llm.scan_layers = not unroll
    mesh = make_topology_mesh(dict(data=1, fsdp=-1, tensor=1), topo, devices)
    return Engine.abstract(cfg, mesh)


def per_chip(costs: dict, spec: dict) -> dict:
    """Roofline of one compiled program's per-chip costs."""
    compute = costs["flops"] / (spec["peak_tflops"] * 1e12)
    hbm = costs["bytes_accessed"] / (spec["hbm_gbps"] * 1e9)
    return {"flops": costs["flops"], "bytes": costs["bytes_accessed"], "compute_s": compute, "hbm_s": hbm,
            "roofline_s": max(compute, hbm), "compiler_s": costs["optimal_seconds"],
            "compiler_s_raw": costs["optimal_seconds_raw"], "while_loops": costs["while_loops"]}


def gathered_bytes(eng, expert: str) -> int:
    """bf16 bytes of the weights a program over ``expert``'s tokens reads: that expert's layers,
    plus lm_head for decoding (``und``)."""
    total = 0
    for path, v in nnx.to_flat_state(eng._abstract_params):
        name = "/".join(map(str, path))
        if f"layers/{expert}/" in name or (expert == "und" and "lm_head" in name):
            total += int(np.prod(v.shape)) * 2
    return total


def bracket(est: dict, spec: dict, ici_bytes: float, n: int) -> dict:
    """Roofline terms of an extrapolated per-call cost."""
    compute = est["flops"] / (spec["peak_tflops"] * 1e12)
    hbm = est["bytes"] / (spec["hbm_gbps"] * 1e9)
    ici = ici_bytes * (n - 1) / n / (spec["ici_gbps"] * 1e9) if n > 1 and spec["ici_gbps"] else 0.0
    return {"compute_s": compute, "hbm_s": hbm, "ici_s": ici, "roofline_low_s": max(compute, hbm, ici),
            "roofline_high_s": compute + hbm + ici}


def extrapolate(p1: dict, p2: dict, n: int) -> dict:
    """Cost at ``n`` layers from the 1- and 2-layer probes: p1 + (n - 1) * (p2 - p1)."""
    out = {}
    for k in ("flops", "bytes", "compiler_s"):
        a, b = p1.get(k), p2.get(k)
        out[k] = None if a is None or b is None else a + (n - 1) * (b - a)
    return out


def run(topology: str, args, log=print) -> dict:
    topo = parse_topology(topology)
    spec = CHIPS[topo.family]
    devices = topology_devices(topo)
    full = engine(topo, devices, None, unroll=False)
    n_layers = full.cfg.llm.num_layers
    res = {"topology": topo.to_dict(), "model": "bagel_7b (bf16 weights)", "mesh": dict(full.mesh.shape),
           "image": {}, "decode": {}}
    fsdp = int(full.mesh.shape["fsdp"])
    probes = {k: engine(topo, devices, k, unroll=True) for k in (1, 2)}
    side = args.image_px // 16

    def programs(eng):
        out = {"velocity": velocity_program(eng, side, args.context_tokens)}
        for b in args.batches:
            out[f"decode_b{b}"] = decode_program(eng, b, args.cache_tokens)
        return out

    full_progs, probe_progs = programs(full), {k: programs(e) for k, e in probes.items()}
    for name, (fn, fargs) in full_progs.items():
        log(f"[{topology}] {name}: full depth ({n_layers} layers) for memory ...")
        c, secs = _compile(fn, *fargs)
        mem = _memory(c)
        p = {k: per_chip(_costs(_compile(probe_progs[k][name][0], *probe_progs[k][name][1])[0]), spec)
             for k in (1, 2)}
        est = extrapolate(p[1], p[2], n_layers)
        est.update(bracket(est, spec, gathered_bytes(full, "gen" if name == "velocity" else "und"), fsdp))
        row = {"memory_per_chip": mem, "compile_s": secs, "probes": p, "per_call": est}
        log(f"  memory {mem['total_gib']:.2f} GiB/chip; per call: roofline {est['roofline_low_s'] * 1e3:.2f}-"
            f"{est['roofline_high_s'] * 1e3:.2f} ms, compiler "
            f"{est['compiler_s'] * 1e3 if est['compiler_s'] is not None else float('nan'):.2f} ms")
        if name == "velocity":
            res["image"]["velocity_3ctx"] = row
        else:
            b = int(name.split("_b")[1])
            row["tokens_per_s_roofline"] = [b / est["roofline_high_s"], b / est["roofline_low_s"]]
            row["tokens_per_s_compiler"] = b / est["compiler_s"] if est["compiler_s"] else None
            res["decode"][str(b)] = row
    fn, fargs = decode_vae_program(full, side)
    c, _ = _compile(fn, *fargs)
    vae = per_chip(_costs(c), spec)           # no loops over layers: the compiler's costs as they are
    vae["memory_per_chip"] = _memory(c)
    res["image"]["vae_decode"] = vae
    steps = args.num_timesteps - 1
    v = res["image"]["velocity_3ctx"]["per_call"]
    res["image"]["per_image"] = {
        "euler_steps": steps, "px": args.image_px,
        "roofline_s": [steps * v["roofline_low_s"] + vae["roofline_s"], steps * v["roofline_high_s"] + vae["roofline_s"]],
        "compiler_s": (steps * v["compiler_s"] + vae["compiler_s"]) if v["compiler_s"] is not None
        and vae["compiler_s"] is not None else None}
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--topology", action="append", default=None, help="e.g. v5p-8, v6e-8 (repeatable)")
    ap.add_argument("--image-px", type=int, default=1024)
    ap.add_argument("--num-timesteps", type=int, default=50)
    ap.add_argument("--context-tokens", type=int, default=128, help="KV cache rows per CFG context (prompt)")
    ap.add_argument("--cache-tokens", type=int, default=2048, help="KV cache capacity for decoding")
    ap.add_argument("--batches", default="1,32,256")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "generate_aot.json"))
    args = ap.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    out = {"jax": jax.__version__, "note": "AOT compile for the topology on a CPU host; estimates, not TPU "
           "measurements", "settings": {k: v for k, v in vars(args).items() if k != "out"}, "results": {}}
    for t in args.topology or ["v5p-8"]:
        out["results"][t] = run(t, args)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    for t, r in out["results"].items():
        im = r["image"]["per_image"]
        print(f"{t}: 1024^2 image ({im['euler_steps']} steps, 3-way CFG): roofline {im['roofline_s'][0]:.2f}-"
              f"{im['roofline_s'][1]:.2f} s, "
              f"compiler {im['compiler_s'] if im['compiler_s'] is None else round(im['compiler_s'], 2)} s; "
              f"velocity memory {r['image']['velocity_3ctx']['memory_per_chip']['total_gib']:.1f} GiB/chip")
        for b, d in r["decode"].items():
            print(f"  decode batch {b}: {d['tokens_per_s_roofline'][0]:.0f}-{d['tokens_per_s_roofline'][1]:.0f} "
                  f"tok/s (roofline), "
                  f"{d['tokens_per_s_compiler'] or float('nan'):.0f} tok/s (compiler), "
                  f"{d['memory_per_chip']['total_gib']:.1f} GiB/chip")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
