"""Ahead-of-time compile of the real train step for a Cloud TPU topology, on any machine.

    python -m sgt_jax.aot --config configs/sgt_bagel_7b.py --topology v5p-64 [--out report.json] \
        [--config.model.llm.remat_policy=save_qkv_proj ...] [--serialize step.bin]

Needs the TPU PJRT plugin (``pip install -r requirements-tpu.txt``: libtpu matching jax), no TPU:
``jax.experimental.topologies`` describes the slice's devices, ``train.loop.Program`` builds the
abstract parameters, optimizer state, EMA and shardings on a mesh of those devices exactly as the
trainer does, and ``Program.step_fn`` (the trainer's jitted step, donation included) is lowered on
abstract inputs and compiled by the TPU compiler. The report (printed, and JSON with ``--out``):

* per-chip memory from the compiled program (arguments, outputs, temporaries, aliased donations,
  total = arg + out + temp - alias + code) against the chip's HBM, and the sharded state per chip
  by part (params, optimizer state, EMA, frozen, VAE, batch);
* FLOPs per step: the compiler's count and the model FLOPs as the trainer counts them
  (``train.metrics.step_flops``, on a fully packed nominal batch);
* a roofline step-time bracket (compute at peak from the compiler's and the model's FLOP counts,
  HBM bytes at bandwidth, FSDP collectives at ICI bandwidth) and the MFU it implies, the flash
  kernels' share of the compiler's FLOPs, and beside them the compiler's own ``optimal_seconds``
  (marked unverified when decoded from the negative values it returns for the probes);
* HBM exhaustion: the compiler's own RESOURCE_EXHAUSTED error is caught and parsed, and the
  report names the knob to turn (remat policy, mesh, tokens per row, grad accumulation, ...).

XLA's cost analysis counts the body of a ``while`` loop once: the scanned decoder / ViT layers,
the chunked CE and the gradient-accumulation loop would be under-counted. FLOPs and time are
therefore taken from cost probes -- the same step with unrolled layers, unchunked CE and one
micro-batch at 1 and 2 decoder / ViT layers -- and extrapolated linearly to the real depth
(exact for an unrolled program; the probes still hold loops the partitioner creates, whose
bodies also count once: docs/tpu_plan.md). Memory always comes from the real, scanned program.
Nothing here is measured on a TPU.

Topologies: ``v4-N``, ``v5p-N`` (N = TensorCores, 2 per chip), ``v5e-N`` / ``v5litepod-N`` and
``v6e-N`` (N = chips); ``KxNAME`` for K slices over DCN (e.g. ``2xv5p-64``). On several slices
the ``data`` mesh axis spans the slices (it must be a multiple of K; the default data=1 becomes K)
-- pass the same ``--config.mesh.data`` to the trainer.

Modules: ``topology`` (slice names -> chips, shape, hosts, devices, mesh), ``compile`` (the step
lowered + compiled, memory, OOM parsing, phases alone), ``costs`` (cost probes, FLOPs, step-time
estimate), ``advice`` (the knob to turn), ``report`` (``analyse``, text, the docs table), ``cli``
(``python -m sgt_jax.aot``). The chip facts are ``parallel.tpu``; saving / loading the executable
is ``train.executable`` (the trainer loads it without importing aot).
"""
from __future__ import annotations

from sgt_jax.aot.advice import advise, attention_scores_gib, vae_attention_gib
from sgt_jax.aot.compile import (GiB, abstract_batch, component_memory, loop_free_seconds, parse_oom,
                                 vae_encode_phase)
from sgt_jax.aot.costs import (combine_probes, cost_probe, estimate, flash_kernel_cost, nominal_batch, reestimate,
                               roofline)
from sgt_jax.aot.report import analyse, format_report, table
from sgt_jax.aot.topology import (FAMILIES, AotError, Topology, libtpu_available, make_topology_mesh,
                                  parse_topology, resolve_mesh_spec, topology_devices)
from sgt_jax.train.executable import LoadedStep, load_compiled, save_compiled

__all__ = ["FAMILIES", "GiB", "AotError", "LoadedStep", "Topology", "abstract_batch", "advise", "analyse",
           "attention_scores_gib", "combine_probes", "component_memory", "cost_probe", "estimate",
           "flash_kernel_cost", "format_report", "libtpu_available", "load_compiled", "loop_free_seconds", "make_topology_mesh",
           "nominal_batch", "parse_oom", "parse_topology", "reestimate", "resolve_mesh_spec", "roofline",
           "save_compiled",
           "table", "topology_devices", "vae_attention_gib", "vae_encode_phase"]
