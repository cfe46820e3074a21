"""AOT compile of forward + backward of the full OmniGen2 pair (Qwen2.5-VL-3B -> OmniGen2 DiT)
for a TPU topology from a CPU host; prints per-chip memory and compile time as JSON.

    python scripts/aot_omnigen2.py --topology v5p-32 [--rows 32] [--out bench/results/aot_omnigen2_v5p-32.json]

The step: the Qwen2.5-VL hidden states of a packed row (text + one image) condition the DiT
(caption embedder input) on a noisy latent with one reference image; loss = MSE of the velocity
(a stand-in for issue 21's flow-matching loss; the shapes and the trained parameters are the
real ones: both models, vision tower included). Parameters are fp32 masters sharded by
parallel/mesh.py RULES (fsdp over all chips); compute in bf16; remat "full" as in the presets.
No optimizer state (Adam's two fp32 moments would add 2x the parameter bytes per chip).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--topology", default="v5p-32")
    ap.add_argument("--rows", type=int, default=0, help="batch rows (default: one per chip)")
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--patches", type=int, default=1024, help="vision patch slots per row (1024 = a 448x448 image)")
    ap.add_argument("--latent-tokens", type=int, default=1024, help="noisy-image and reference token slots (1024 = 512x512 px)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sgt_jax.aot.topology import make_topology_mesh, parse_topology, topology_devices
    from sgt_jax.models import omnigen2_config, omnigen2_dit, qwen25_vl
    from sgt_jax.parallel.mesh import RULES, batch_sharding, state_shardings

    topo = parse_topology(args.topology)
    mesh = make_topology_mesh({"data": 1, "fsdp": -1, "tensor": 1}, topo, topology_devices(topo))
    mcfg, dcfg = omnigen2_config.qwen25_vl_3b(), omnigen2_config.dit_omnigen2()
    mcfg.llm.attention_impl = "auto"     # the Pallas flash kernel for the LLM when compiling for TPU
    b = args.rows or topo.chips
    lt, p, ln = args.text_len, args.patches, args.latent_tokens
    v, pc = mcfg.vision, dcfg.patch_size ** 2 * dcfg.in_channels

    def build():
        return (qwen25_vl.Qwen25VL(mcfg, rngs=nnx.Rngs(0), rules=RULES), omnigen2_dit.OmniGen2DiT(dcfg, rngs=nnx.Rngs(1)))

    abstract = nnx.eval_shape(build)
    graphdef, state, rest = nnx.split(abstract, nnx.Param, ...)
    sh = state_shardings(state, mesh)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, sh)
    bs = batch_sharding(mesh)
    S = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=bs)  # noqa: E731
    feat = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    batch = dict(
        patches=S((b, p, feat), jnp.float32), pos_hw=S((b, p, 2), jnp.int32), image_ids=S((b, p), jnp.int32),
        window_ids=S((b, p), jnp.int32), input_ids=S((b, lt), jnp.int32), image_index=S((b, lt), jnp.int32),
        doc=S((b, lt), jnp.int32), t=S((b,), jnp.float32), text_valid=S((b, lt), jnp.bool_),
        ref_tokens=S((b, ln, pc), jnp.float32), ref_ids=S((b, ln), jnp.int32), x_tokens=S((b, ln, pc), jnp.float32),
        x_valid=S((b, ln), jnp.bool_), dit_positions=S((b, lt + 2 * ln, 3), jnp.int32), target=S((b, ln, pc), jnp.float32))
    positions = jax.ShapeDtypeStruct((3, b, lt), jnp.int32,
                                     sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp"))))

    def loss_fn(st, batch, positions):
        mllm, dit = nnx.merge(graphdef, st, rest)
        vision = {k: batch[k] for k in ("patches", "pos_hw", "image_ids", "window_ids")}
        text = dict(input_ids=batch["input_ids"], image_index=batch["image_index"], doc=batch["doc"], positions=positions)
        h = mllm(vision, text)
        vel = dit(batch["t"], h, batch["text_valid"], batch["ref_tokens"], batch["ref_ids"], batch["x_tokens"],
                  batch["x_valid"], batch["dit_positions"])
        err = jnp.square(vel.astype(jnp.float32) - batch["target"]) * batch["x_valid"][..., None]
        return jnp.sum(err) / jnp.maximum(jnp.sum(batch["x_valid"]), 1)

    step = jax.jit(jax.value_and_grad(loss_fn), out_shardings=(None, sh))
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = step.lower(state, batch, positions).compile()
    sec = time.perf_counter() - t0
    m = compiled.memory_analysis()
    gib = 2 ** 30
    params = sum(int(x.size) for x in jax.tree.leaves(state))
    report = {"topology": args.topology, "chips": topo.chips, "hbm_per_chip_gib": topo.hbm_gib,
              "rows": b, "text_len": lt, "vision_patches": p, "latent_tokens": ln, "params": params,
              "compile_seconds": round(sec, 1),
              "memory_per_chip_gib": {"argument": m.argument_size_in_bytes / gib, "output": m.output_size_in_bytes / gib,
                                      "temp": m.temp_size_in_bytes / gib, "alias": m.alias_size_in_bytes / gib,
                                      "total": (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                                                - m.alias_size_in_bytes) / gib}}
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
