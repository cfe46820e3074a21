"""Ahead-of-time compile of the real train step for a Cloud TPU topology, on any machine.

    python -m sgt_jax.aot --config configs/sgt_bagel_7b.py --topology v5p-64 [--out report.json] \
        [--config.model.llm.remat_policy=save_qkv_proj ...] [--serialize step.bin]

Needs the TPU PJRT plugin (``pip install -r requirements-tpu.txt``: libtpu matching jax), no TPU:
``jax.experimental.topologies`` describes the slice's devices, ``train.loop.Setup`` builds the
abstract parameters, optimizer state, EMA and shardings on a mesh of those devices exactly as the
trainer does, and ``Setup.step_fn`` (the trainer's jitted step, donation included) is lowered on
abstract inputs and compiled by the TPU compiler. The report (printed, and JSON with ``--out``):

* per-chip memory from the compiled program (arguments, outputs, temporaries, aliased donations,
  total = arg + out + temp - alias + code) against the chip's HBM, and the sharded state per chip
  by part (params, optimizer state, EMA, frozen, VAE, batch);
* FLOPs per step: the compiler's count and the model FLOPs as the trainer counts them
  (``train.metrics.step_flops``, on a fully packed nominal batch);
* the compiler's step-time estimate (``optimal_seconds``) and the MFU it implies;
* HBM exhaustion: the compiler's own RESOURCE_EXHAUSTED error is caught and parsed, and the
  report names the knob to turn (remat policy, mesh, tokens per row, grad accumulation, ...).

XLA's cost analysis counts the body of a ``while`` loop once: the scanned decoder / ViT layers,
the chunked CE and the gradient-accumulation loop would be under-counted. FLOPs and time are
therefore measured on cost probes -- the same step with unrolled layers, unchunked CE and one
micro-batch at 1 and 2 decoder / ViT layers -- and extrapolated linearly to the real depth
(exact: the unrolled cost is affine in the layer count). Memory always comes from the real,
scanned program.

Topologies: ``v4-N``, ``v5p-N`` (N = TensorCores, 2 per chip), ``v5e-N`` / ``v5litepod-N`` and
``v6e-N`` (N = chips); ``KxNAME`` for K slices over DCN (e.g. ``2xv5p-64``). On several slices
the ``data`` mesh axis spans the slices (it must be a multiple of K; the default data=1 becomes K)
-- pass the same ``--config.mesh.data`` to the trainer.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import sys
import time

GiB = float(1 << 30)

# per chip: HBM (GiB, nominal), bf16 peak TFLOP/s (train.metrics.PEAK_TFLOPS), how the
# accelerator-type number counts (cores for v4/v5p: 2 TensorCores per chip), topology prefix,
# chip config, gcloud accelerator-type prefix, the TPU VM runtime version to create with.
FAMILIES = {
    "v4": dict(hbm_gib=32, peak_tflops=275.0, per_chip=2, prefix="v4", chip_config="megacore", dims=3,
               accelerator="v4", runtime="tpu-ubuntu2204-base"),
    "v5e": dict(hbm_gib=16, peak_tflops=197.0, per_chip=1, prefix="v5e", chip_config="default", dims=2,
                accelerator="v5litepod", runtime="v2-alpha-tpuv5-lite"),
    "v5p": dict(hbm_gib=95, peak_tflops=459.0, per_chip=2, prefix="v5", chip_config="megacore", dims=3,
                accelerator="v5p", runtime="v2-alpha-tpuv5"),
    "v6e": dict(hbm_gib=32, peak_tflops=918.0, per_chip=1, prefix="v6e", chip_config="default", dims=2,
                accelerator="v6e", runtime="v2-alpha-tpuv6e"),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}
_2D_SHAPES = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
              256: (16, 16)}
_3D_SMALL = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4)}


class AotError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------
# topologies


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str                       # as given, e.g. "2xv5p-64"
    family: str                     # v4 | v5e | v5p | v6e
    num_slices: int
    chips_per_slice: int
    shape: tuple[int, ...]          # chips per dimension of one slice
    chips_per_host_bounds: tuple[int, int, int]
    wrap: tuple[bool, bool, bool]

    @property
    def spec(self) -> dict:
        return FAMILIES[self.family]

    @property
    def topology_name(self) -> str:
        return f"{self.spec['prefix']}:{'x'.join(map(str, self.shape))}"

    @property
    def chips(self) -> int:
        return self.chips_per_slice * self.num_slices

    @property
    def hosts_per_slice(self) -> int:
        return max(1, self.chips_per_slice // math.prod(self.chips_per_host_bounds))

    @property
    def accelerator_type(self) -> str:
        """gcloud --accelerator-type of one slice."""
        return f"{self.spec['accelerator']}-{self.chips_per_slice * self.spec['per_chip']}"

    @property
    def hbm_gib(self) -> float:
        return float(self.spec["hbm_gib"])

    @property
    def peak_tflops(self) -> float:
        return float(self.spec["peak_tflops"])

    def to_dict(self) -> dict:
        return {"name": self.name, "family": self.family, "slices": self.num_slices,
                "chips": self.chips, "chips_per_slice": self.chips_per_slice,
                "hosts": self.hosts_per_slice * self.num_slices, "topology_name": self.topology_name,
                "accelerator_type": self.accelerator_type, "runtime_version": self.spec["runtime"],
                "chip_config": self.spec["chip_config"], "chips_per_host_bounds": list(self.chips_per_host_bounds),
                "wrap": list(self.wrap), "hbm_per_chip_gib": self.hbm_gib,
                "peak_tflops_per_chip": self.peak_tflops}


def _shape_3d(chips: int) -> tuple[int, int, int]:
    if chips in _3D_SMALL:
        return _3D_SMALL[chips]
    # full-cube slices: every dimension a multiple of 4; the most cube-like factorisation
    best = None
    for a in range(4, chips + 1, 4):
        for b in range(a, chips + 1, 4):
            if chips % (a * b):
                continue
            c = chips // (a * b)
            if c < b or c % 4:
                continue
            key = (c, -a)
            if best is None or key < best[0]:
                best = (key, (a, b, c))
    if best is None:
        raise AotError(f"{chips} chips is not a valid 3-D slice (4, 8, 16, 32, or a product of multiples of 4)")
    return best[1]


def parse_topology(name: str) -> Topology:
    """``v5p-64``, ``v6e-16``, ``v5litepod-8``, ``v4-32``, ``2xv5p-64`` -> Topology."""
    m = re.fullmatch(r"(?:(\d+)x)?([a-z0-9]+)-(\d+)", name.strip().lower())
    if not m:
        raise AotError(f"topology {name!r}: expected e.g. v5p-64, v6e-16, v5e-8, v4-32 or 2xv5p-64")
    slices = int(m.group(1) or 1)
    family = ALIASES.get(m.group(2), m.group(2))
    if family not in FAMILIES:
        raise AotError(f"topology {name!r}: unknown TPU family {m.group(2)!r}; known: "
                       f"{sorted(FAMILIES) + sorted(ALIASES)}")
    spec = FAMILIES[family]
    n = int(m.group(3))
    if n % spec["per_chip"]:
        raise AotError(f"topology {name!r}: {family}-N counts TensorCores ({spec['per_chip']} per chip); "
                       f"N must be even")
    chips = n // spec["per_chip"]
    if slices < 1:
        raise AotError(f"topology {name!r}: number of slices must be >= 1")
    if spec["dims"] == 2:
        if chips not in _2D_SHAPES:
            raise AotError(f"topology {name!r}: {family} slices have {sorted(_2D_SHAPES)} chips")
        shape = _2D_SHAPES[chips]
        # one host holds 1, 4 or 8 chips (v5litepod-8 / v6e-8 are single-host); larger slices 4 per host
        bounds = (1, 1, 1) if chips == 1 else (2, 4, 1) if chips == 8 else (2, 2, 1)
        wrap = (shape[0] == 16, shape[1] == 16, False)
    else:
        shape = _shape_3d(chips)
        bounds = (2, 2, 1)
        wrap = (True, True, True) if chips >= 64 else (False, False, False)
    return Topology(name=name, family=family, num_slices=slices, chips_per_slice=chips, shape=shape,
                    chips_per_host_bounds=bounds, wrap=wrap)


def libtpu_available() -> tuple[bool, str]:
    """(available, reason): the TPU compiler is the ``libtpu`` package (requirements-tpu.txt)."""
    if importlib.util.find_spec("libtpu") is None:
        return False, "libtpu is not installed (pip install -r requirements-tpu.txt; jax[tpu] pins its version)"
    return True, ""


def topology_devices(topo: Topology):
    """The TPU devices of ``topo`` as the compiler sees them (no hardware needed)."""
    ok, why = libtpu_available()
    if not ok:
        raise AotError(why)
    import os

    # only compiling: several processes may load libtpu at once (its lockfile guards a real TPU)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental.topologies import get_topology_desc

    return get_topology_desc(platform="tpu", topology_name=topo.topology_name,
                             chip_config_name=topo.spec["chip_config"],
                             chips_per_host_bounds=topo.chips_per_host_bounds,
                             num_slices=topo.num_slices, wrap=topo.wrap).devices


def resolve_mesh_spec(spec: dict, topo: Topology) -> dict:
    """The config's mesh {data, fsdp, tensor} resolved against the topology; on several slices
    ``data`` spans them (default data=1 becomes the slice count)."""
    from sgt_jax.parallel.mesh import MESH_AXES, mesh_shape

    try:
        return dict(zip(MESH_AXES, mesh_shape(spec, topo.chips, topo.num_slices)))
    except ValueError as e:
        raise AotError(str(e)) from None


def make_topology_mesh(spec: dict, topo: Topology, devices):
    """The trainer's mesh (``parallel.mesh.make_mesh``: hybrid ICI x DCN on several slices) over
    the topology's devices."""
    from sgt_jax.parallel.mesh import make_mesh

    resolve_mesh_spec(spec, topo)    # the topology's own errors first
    return make_mesh(spec, devices=devices)


# ------------------------------------------------------------------------------------------------
# abstract inputs


def abstract_batch(cfg, sharding=None):
    """The PackedBatch of ``jax.ShapeDtypeStruct`` the data pipeline yields (``batch.batch_spec``)."""
    from sgt_jax.batch import batch_spec

    return batch_spec(cfg.data, sharding=sharding)


def _with_shardings(tree, shardings):
    import jax

    return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree, shardings)


def _bytes_per_device(tree) -> int:
    """Bytes one device holds of a pytree of sharded ShapeDtypeStructs."""
    import jax
    import numpy as np

    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total


def nominal_batch(cfg, doc_tokens: int = 3000, vit_image_patches: int = 256):
    """A fully packed numpy stand-in (kind, doc_ids, vit_image_ids) for ``step_flops``: every token
    real, documents of ``doc_tokens``, every ViT slot used by images of ``vit_image_patches``.
    The SGT stream's mean sample is ~3.0k tokens (bench/results/packing.json: seg 3.27k, VQA 2.51k
    at 2:1); a seg ViT image at 224 px is 16 x 16 = 256 patches."""
    import types

    import numpy as np

    from sgt_jax import batch as B

    d = cfg.data
    b, length, p = int(d.rows_per_batch), int(d.tokens_per_row), int(d.vit_patches_per_row)
    kind = np.full((b, length), B.TEXT, np.int32)
    docs = np.broadcast_to(np.arange(length) // max(1, doc_tokens), (b, length)).astype(np.int32)
    img = np.broadcast_to(np.arange(p) // max(1, vit_image_patches), (b, p)).astype(np.int32)
    return types.SimpleNamespace(kind=kind, doc_ids=docs, vit_image_ids=img)


# ------------------------------------------------------------------------------------------------
# compile


def _cfg_copy(cfg):
    import ml_collections

    return ml_collections.ConfigDict(copy.deepcopy(cfg.to_dict()))


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    arg, out, alias = m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes
    temp, code = m.temp_size_in_bytes, m.generated_code_size_in_bytes
    total = arg + out + temp - alias + code
    mem = {"argument_gib": arg / GiB, "output_gib": out / GiB, "alias_gib": alias / GiB,
           "temp_gib": temp / GiB, "generated_code_gib": code / GiB, "total_gib": total / GiB,
           "host_temp_gib": m.host_temp_size_in_bytes / GiB}
    peak = getattr(m, "peak_memory_in_bytes", None)
    if peak:
        mem["peak_gib"] = peak / GiB
    return mem


def _costs(compiled) -> dict:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    ca = ca or {}
    opt = float(ca["optimal_seconds"]) if "optimal_seconds" in ca else None
    try:
        loops = len(re.findall(r"\bwhile\(", compiled.as_text()))
    except Exception:
        loops = None
    return {"flops": float(ca.get("flops", 0.0)), "bytes_accessed": float(ca.get("bytes accessed", 0.0)),
            "transcendentals": float(ca.get("transcendentals", 0.0)), "while_loops": loops,
            "optimal_seconds": loop_free_seconds(opt, loops), "optimal_seconds_raw": opt}


def loop_free_seconds(raw: float | None, loops: int | None = None) -> float | None:
    """The compiler's ``optimal_seconds`` without its while-loop sentinel. For a program with
    while loops (scanned layers; loops the SPMD partitioner or a kernel's metadata code creates)
    the compiler returns a negative value, -k + t: a small integer k (2 in every program measured
    here, whatever the number of loops) and t the estimate of the rest, the loops' own time
    unknown. t = raw + ceil(-raw), valid while t < 1 s -- true for the 1-2 layer probes (0.1-0.3 s).
    ``loops`` (the count of while ops) is informational. None when the value cannot be read."""
    del loops
    if raw is None:
        return None
    if raw >= 0:
        return raw
    return raw + math.ceil(-raw)


_SIZE = r"([0-9.]+)\s*([KMGT]?)i?B?"


def _to_gib(num: str, unit: str) -> float:
    return float(num) * {"": 1 / GiB, "K": 1 / (1 << 20), "M": 1 / 1024, "G": 1.0, "T": 1024.0}[unit.upper()]


def parse_oom(message: str) -> dict | None:
    """The compiler's HBM exhaustion error -> {required_gib, available_gib, message} (None if the
    error is something else). Handles 'the total memory required for HLO temporaries (30.00G)
    exceeds available HBM (15.75G)' and 'Used 120.5G of 95.74G hbm'."""
    low = message.lower()
    if "resource_exhausted" not in low and "out of memory" not in low and "hbm" not in low:
        return None
    out = {"message": message.strip().splitlines()[0][:600]}
    m = re.search(r"required for ([a-z ]+?)\s*\(" + _SIZE + r"\)\s*exceeds available hbm\s*\(" + _SIZE + r"\)", low,
                  re.I)
    if m:
        out.update(what=m.group(1), required_gib=_to_gib(m.group(2), m.group(3)),
                   available_gib=_to_gib(m.group(4), m.group(5)))
    m = re.search(r"used\s+" + _SIZE + r"\s+of\s+" + _SIZE + r"\s+hbm", low, re.I)
    if m:
        out.update(required_gib=_to_gib(m.group(1), m.group(2)), available_gib=_to_gib(m.group(3), m.group(4)))
    m = re.search(r"total hbm usage\s*>=\s*" + _SIZE, low, re.I)
    if m and "required_gib" not in out:
        out["required_gib"] = _to_gib(m.group(1), m.group(2))
    return out


def _compile(setup, cfg, compiler_options=None):
    """Lower + compile ``setup.step_fn`` on abstract sharded inputs; returns (compiled, lowered, seconds)."""
    import jax

    state = _with_shardings(setup.abstract_state, setup.state_shardings)
    consts = _with_shardings(setup.abstract_consts, setup.consts_shardings)
    batch = abstract_batch(cfg, setup.batch_sharding)
    t0 = time.perf_counter()
    with jax.set_mesh(setup.mesh):
        lowered = setup.step_fn.lower(state, consts, batch)
        compiled = lowered.compile(compiler_options=compiler_options or None)
    return compiled, lowered, time.perf_counter() - t0, (state, consts, batch)


def _setup(cfg, mesh):
    from sgt_jax.train.loop import Setup, check_micro_batches

    check_micro_batches(cfg, mesh)
    return Setup(cfg, mesh=mesh)


def _vae_cache_path(key: dict) -> str:
    import hashlib
    import os

    d = os.environ.get("SGT_AOT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "sgt_jax_aot"))
    os.makedirs(d, exist_ok=True)
    h = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return os.path.join(d, f"vae_{h}.json")


def vae_encode_phase(setup, cfg, compiler_options=None, log=print) -> dict:
    """Memory and costs per chip of the frozen VAE encoding one micro-batch
    (``train.step.encode_images``, in the VAE's compute dtype) compiled alone with the batch's
    sharding; the step runs it once per micro-batch. The TPU compile of 1024 px convolutions
    takes minutes on a small machine, so the result is cached (``SGT_AOT_CACHE``, default
    ~/.cache/sgt_jax_aot) by topology, mesh, shapes and dtype."""
    import jax

    from sgt_jax.train.step import encode_images

    bsh = setup.batch_sharding
    micro = _cfg_copy(cfg)
    micro.data.rows_per_batch = int(cfg.data.rows_per_batch) // int(cfg.train.grad_accum)
    batch = abstract_batch(micro, bsh)
    vae = _with_shardings(setup.abstract_consts["vae"], setup.consts_shardings["vae"])
    key = {"devices": [str(d) for d in setup.mesh.devices.flat][:2], "n": setup.mesh.devices.size,
           "kind": setup.mesh.devices.flat[0].device_kind, "mesh": dict(setup.mesh.shape),
           "images": [batch.vae_images.shape, str(batch.vae_images.dtype)], "vae": cfg.model.vae.to_dict(),
           "dtype": cfg.model.compute_dtype, "encode": "per micro-batch, compute dtype", "opts": compiler_options or {}, "libtpu": _version("libtpu")}
    path = _vae_cache_path(key)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        pass

    def enc(v, im):
        return encode_images(setup.vae_graphdef, v, im, jax.random.key(0))

    t0 = time.perf_counter()
    try:
        with jax.set_mesh(setup.mesh):
            c = jax.jit(enc, out_shardings=bsh).lower(vae, batch.vae_images).compile(
                compiler_options=compiler_options or None)
        out = {"memory": _memory(c), "costs": _costs(c)}
    except Exception as e:
        oom = parse_oom(str(e))
        if oom is None:
            raise
        out = {"memory": None, "costs": None, "oom": oom}
    out["compile_s"] = time.perf_counter() - t0
    out["rows"] = int(micro.data.rows_per_batch)
    log(f"  VAE encode alone: compiled in {out['compile_s']:.0f} s")
    with open(path, "w") as f:
        json.dump(out, f)
    return out


def cost_probe(cfg, topo: Topology, devices, compiler_options=None, log=print) -> dict:
    """FLOPs / bytes / optimal_seconds per chip of one full step (see the module doc):

    * the model: unrolled probes of the real step at 1-2 decoder / ViT layers, one micro-batch,
      unchunked CE and 32 px VAE images (the LLM's cost does not depend on the latent grid; the
      VAE at full size is counted separately), extrapolated linearly to the real depth and
      multiplied by the micro-batches;
    * the VAE encode of one micro-batch at full size (``vae_encode_phase``), times the micro-batches."""
    llm_n, vit_n = int(cfg.model.llm.num_layers), int(cfg.model.vit.num_layers)
    accum = int(cfg.train.grad_accum)
    rows = int(cfg.data.rows_per_batch)
    probes = {}
    points = [(1, 1)]
    if llm_n > 1:
        points.append((2, 1))
    if vit_n > 1:
        points.append((1, 2))
    for nl, nv in points:
        c = _cfg_copy(cfg)
        c.model.llm.num_layers, c.model.vit.num_layers = nl, nv
        c.model.llm.scan_layers = c.model.vit.scan_layers = False
        c.model.llm.ce_chunk_size = 0
        c.train.grad_accum = 1
        c.data.rows_per_batch = rows // accum
        c.data.vae_image_size = 2 * int(c.data.vae_downsample)
        mesh = make_topology_mesh(c.mesh.to_dict(), topo, devices)
        setup = _setup(c, mesh)
        compiled, _, secs, _ = _compile(setup, c, compiler_options)
        probes[f"llm{nl}_vit{nv}"] = _costs(compiled) | {"compile_s": secs}
        if (nl, nv) == (1, 1):   # the probes' own (small) VAE encode, subtracted below
            small_vae = vae_encode_phase(setup, c, compiler_options, log=log).get("costs") or {}
        log(f"  cost probe llm_layers={nl} vit_layers={nv}: {probes[f'llm{nl}_vit{nv}']['flops']:.4g} FLOPs "
            f"({secs:.1f} s)")
    vae = vae_encode_phase(_setup(cfg, make_topology_mesh(cfg.mesh.to_dict(), topo, devices)), cfg,
                           compiler_options, log=log)
    out = combine_probes(probes, small_vae, vae.get("costs") or {}, llm_n, vit_n, accum, vae_per_micro_batch=True)
    out["method"] = (f"unrolled probes at (llm, vit) layers {points} with 32 px VAE images, linear in depth to "
                     f"({llm_n}, {vit_n}), x{accum} micro-batch(es)"
                     + (" (the optimizer update counted per micro-batch)" if accum > 1 else "")
                     + ", minus the probes' own VAE encode, + the full-size VAE encode of a micro-batch compiled alone"
                     + (f" x{accum}" if accum > 1 else ""))
    return out


def combine_probes(probes: dict, small_vae: dict, vae: dict, llm_n: int, vit_n: int, accum: int,
                   vae_per_micro_batch: bool = False) -> dict:
    """Per-chip totals of one step from the probe costs (see ``cost_probe``). ``vae``: the
    full-size encode of one micro-batch (``vae_per_micro_batch``, the step since the encode moved
    into the micro-batch loop) or of the whole batch (reports written before)."""
    keys = ("flops", "bytes_accessed", "transcendentals", "optimal_seconds")
    for p in probes.values():     # reports written before loop_free_seconds existed
        if "optimal_seconds_raw" in p or p.get("optimal_seconds") is not None:
            p["optimal_seconds"] = loop_free_seconds(p.get("optimal_seconds_raw", p.get("optimal_seconds")),
                                                     p.get("while_loops"))
    base = probes["llm1_vit1"]
    known = {k: all(p.get(k) is not None for p in probes.values()) for k in keys}
    per_llm = {k: (probes["llm2_vit1"][k] - base[k]) if llm_n > 1 and known[k] else 0.0 for k in keys}
    per_vit = {k: (probes["llm1_vit2"][k] - base[k]) if vit_n > 1 and known[k] else 0.0 for k in keys}
    total = {}
    for k in keys:
        if not known[k]:
            total[k] = None
            continue
        model = base[k] + (llm_n - 1) * per_llm[k] + (vit_n - 1) * per_vit[k] - (small_vae.get(k) or 0.0)
        total[k] = accum * model + (accum if vae_per_micro_batch else 1) * (vae.get(k) or 0.0)
    loops = [p.get("while_loops") for p in probes.values()]
    raw = [p.get("optimal_seconds_raw") for p in probes.values()]
    has_loops = any(n for n in loops if n) or any(r is not None and r < 0 for r in raw)
    return {"per_chip": total, "per_llm_layer": per_llm, "per_vit_layer": per_vit, "vae_encode": vae,
            "vae_encode_per_micro_batch": vae_per_micro_batch,
            "small_vae_encode": small_vae, "probes": probes,
            "probe_while_loops": loops,
            "note": ("the probes hold while loops (the SPMD partitioner's collective / windowed-einsum loops "
                     "outside the layers: they cancel in the per-layer differences): the compiler does not "
                     "estimate their time and counts their FLOPs once, so the step time is a lower bound"
                     if has_loops else "")}


def estimate(report: dict) -> dict | None:
    """The step-time estimate and MFU of a report from its combined probe costs."""
    c = report.get("costs") or {}
    pc = c.get("per_chip") or {}
    est = pc.get("optimal_seconds")
    if not est or est <= 0:
        return None
    t, f = report["topology"], report["flops"]
    chips, peak = t["chips"], t["peak_tflops_per_chip"] * 1e12
    return {"step_time_s": est, "source": "compiler cost analysis optimal_seconds of unrolled probes, "
                                          "extrapolated over layers" + ("; " + c["note"] if c.get("note") else ""),
            "mfu": f["model_flops_per_step"] / (est * chips * peak),
            "model_tflops_per_chip": f["model_flops_per_chip"] / est / 1e12,
            "tokens_per_s_per_chip": f["tokens_per_step"] / est / chips,
            "hardware_flops_utilisation": (pc["flops"] / (est * peak)) if pc.get("flops") else None}


def reestimate(report: dict) -> dict:
    """Recompute ``costs`` totals, ``flops.compiler_*`` and ``estimate`` of a saved report."""
    c = report.get("costs")
    if c and "probes" in c:
        cfg = report["config"]
        new = combine_probes(c["probes"], c.get("small_vae_encode") or {}, c.get("vae_encode") or {},
                             cfg["llm_layers"], cfg["vit_layers"], cfg["grad_accum"],
                             vae_per_micro_batch=bool(c.get("vae_encode_per_micro_batch")))
        c.update({k: v for k, v in new.items() if k != "small_vae_encode" or v})
        f = report["flops"]
        f["compiler_flops_per_chip"] = c["per_chip"]["flops"]
        f["compiler_over_model"] = c["per_chip"]["flops"] / f["model_flops_per_chip"]
    report["estimate"] = estimate(report)
    return report


def component_memory(setup, cfg, compiler_options=None, log=print) -> dict:
    """Per-chip memory of the step's two big phases compiled on their own, to attribute the total:
    ``vae_encode`` (one micro-batch, encoded inside the micro-batch loop) and ``model_fwd_bwd``
    (BAGEL forward + backward of one micro-batch, latents given)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sgt_jax.models.config import vae_downsample
    from sgt_jax.train.step import reduce_losses

    rep = jax.sharding.NamedSharding(setup.mesh, jax.sharding.PartitionSpec())
    bsh = setup.batch_sharding
    consts = _with_shardings(setup.abstract_consts, setup.consts_shardings)
    params = _with_shardings(setup.abstract_state.params, setup.state_shardings.params)
    out = {}
    v = vae_encode_phase(setup, cfg, compiler_options, log=log)
    out["vae_encode"] = v["memory"] if v.get("memory") else {"oom": v.get("oom")}

    micro = _cfg_copy(cfg)
    micro.data.rows_per_batch = int(cfg.data.rows_per_batch) // int(cfg.train.grad_accum)
    mb = abstract_batch(micro, bsh)
    n = int(cfg.data.vae_images_per_row)
    f = vae_downsample(cfg.model)
    from sgt_jax.data.config import vae_hw

    h, w = vae_hw(cfg.data)
    lat = jax.ShapeDtypeStruct((micro.data.rows_per_batch, n, h // f, w // f, int(cfg.model.vae.z_channels)),
                               jnp.float32, sharding=bsh)
    t = cfg.train

    def loss_fn(p, cs, b, la):
        model = nnx.merge(setup.graphdef, p, cs["frozen"], cs["fixed"])
        b = b.replace(latents=la, vae_images=None)
        o = model(b, num_gen=setup.num_gen, key=jax.random.key(1))
        return reduce_losses(o, b, t)[0]

    grad = jax.value_and_grad(loss_fn)
    try:
        with jax.set_mesh(setup.mesh):
            c = jax.jit(grad, out_shardings=(rep, setup.state_shardings.params)).lower(
                params, {"frozen": consts["frozen"], "fixed": consts["fixed"]}, mb, lat).compile(
                compiler_options=compiler_options or None)
        out["model_fwd_bwd"] = _memory(c)
    except Exception as e:
        out["model_fwd_bwd"] = {"oom": parse_oom(str(e)) or {"message": str(e).splitlines()[0][:300]}}
    return out


def analyse(cfg, topology: str | Topology, *, costs: bool = True, components: bool | None = None,
            doc_tokens: int = 3000, compiler_options: dict | None = None, serialize: str | None = None,
            log=print) -> dict:
    """Compile the train step of ``cfg`` for ``topology``; return the report dict.
    ``components``: also compile the VAE encode and the model fwd+bwd alone (None: only when the
    step does not fit or uses > 80% of HBM)."""
    import jax

    from sgt_jax.train import metrics as metrics_lib

    topo = parse_topology(topology) if isinstance(topology, str) else topology
    devices = topology_devices(topo)
    if len(devices) != topo.chips:
        raise AotError(f"{topo.name}: the topology has {len(devices)} devices, expected {topo.chips} chips")
    mesh = make_topology_mesh(cfg.mesh.to_dict(), topo, devices)
    sizes = dict(mesh.shape)
    d, m, t = cfg.data, cfg.model, cfg.train
    accum = int(t.grad_accum)
    batch_ways = sizes["data"] * sizes["fsdp"]
    rows = int(d.rows_per_batch)
    if rows % accum or (rows // accum) % batch_ways:
        raise AotError(f"data.rows_per_batch={rows} / train.grad_accum={accum} must be a multiple of "
                       f"mesh data*fsdp = {batch_ways}: every chip needs whole rows; set "
                       f"--config.data.rows_per_batch={batch_ways * accum * max(1, rows // (batch_ways * accum))}")
    report = {
        "topology": topo.to_dict() | {"device_kind": devices[0].device_kind},
        "config": {
            "mesh": sizes, "rows_per_batch": rows, "rows_per_chip": rows / batch_ways,
            "rows_per_chip_per_micro_batch": rows / accum / batch_ways,
            "tokens_per_row": int(d.tokens_per_row), "gen_tokens_per_row": int(d.gen_tokens_per_row),
            "vit_patches_per_row": int(d.vit_patches_per_row), "vae_images_per_row": int(d.vae_images_per_row),
            "vae_image_size": d.vae_image_size, "grad_accum": accum,
            "llm_layers": int(m.llm.num_layers), "vit_layers": int(m.vit.num_layers),
            "llm_remat_policy": m.llm.remat_policy, "vit_remat_policy": m.vit.remat_policy,
            "attention_impl": _attention(m, devices[0].platform), "ce_chunk_size": int(m.llm.ce_chunk_size),
            "compute_dtype": m.compute_dtype, "param_dtype": "float32",   # the master weights, always
        },
        "versions": {"jax": jax.__version__, "libtpu": _version("libtpu")},
        "compiler_options": compiler_options or {},
    }
    log(f"[aot] {topo.name}: {topo.chips} chips ({topo.topology_name} x{topo.num_slices}, "
        f"{devices[0].device_kind}), mesh {sizes}")
    t0 = time.perf_counter()
    setup = _setup(cfg, mesh)
    report["setup_s"] = time.perf_counter() - t0
    state = _with_shardings(setup.abstract_state, setup.state_shardings)
    consts = _with_shardings(setup.abstract_consts, setup.consts_shardings)
    batch = abstract_batch(cfg, setup.batch_sharding)
    report["state_per_chip_gib"] = {
        "params": _bytes_per_device(state.params) / GiB, "opt_state": _bytes_per_device(state.opt_state) / GiB,
        "ema": _bytes_per_device(state.ema) / GiB, "frozen": _bytes_per_device(consts["frozen"]) / GiB,
        "vae": _bytes_per_device(consts["vae"]) / GiB, "fixed": _bytes_per_device(consts["fixed"]) / GiB,
        "batch": _bytes_per_device(batch) / GiB}
    n_train = sum(int(math.prod(x.shape)) for x in jax.tree.leaves(setup.abstract_state.params))
    n_frozen = sum(int(math.prod(x.shape)) for x in jax.tree.leaves(setup.abstract_consts["frozen"]))
    report["parameters"] = {"trainable": n_train, "frozen": n_frozen}
    log(f"[aot] compiling the train step ({n_train / 1e9:.2f} B trainable params) ...")
    report["oom"] = None
    compiled = None
    try:
        compiled, _, secs, _ = _compile(setup, cfg, compiler_options)
        report["compile_s"] = secs
        report["memory_per_chip"] = _memory(compiled)
        report["compiled_costs_as_is"] = _costs(compiled)
    except Exception as e:   # the compiler's OOM is an XlaRuntimeError / JaxRuntimeError
        oom = parse_oom(str(e))
        if oom is None:
            raise
        report["oom"] = oom
        report["memory_per_chip"] = None
        log(f"[aot] HBM exhausted: {oom['message']}")
    mem = report["memory_per_chip"]
    hbm = topo.hbm_gib
    if mem is not None:
        mem["hbm_gib"] = hbm
        mem["fraction_of_hbm"] = mem["total_gib"] / hbm
    report["fits"] = report["oom"] is None
    report["components_per_chip"] = None
    if components or (components is None and (not report["fits"] or mem["fraction_of_hbm"] > 0.8)):
        log("[aot] compiling the VAE encode and the model fwd+bwd alone to attribute the memory ...")
        report["components_per_chip"] = component_memory(setup, cfg, compiler_options, log=log)
    # FLOPs: the trainer's model count on a fully packed nominal batch, and the compiler's
    model_flops = metrics_lib.step_flops(m, nominal_batch(cfg, doc_tokens=doc_tokens))
    real_tokens = rows * int(d.tokens_per_row)
    report["flops"] = {"model_flops_per_step": model_flops, "model_flops_per_chip": model_flops / topo.chips,
                       "model_basis": f"train.metrics.step_flops on a fully packed batch: every token real, "
                                      f"documents of {doc_tokens} tokens, every ViT slot used",
                       "tokens_per_step": real_tokens}
    report["costs"] = None
    if costs == "always" or (costs and report["fits"]):
        try:
            report["costs"] = cost_probe(cfg, topo, devices, compiler_options, log=log)
        except Exception as e:   # a probe that does not fit still leaves the memory report
            report["costs"] = {"error": str(e).splitlines()[0][:400]}
    if report["costs"] and "per_chip" in report["costs"]:
        pc = report["costs"]["per_chip"]
        report["flops"]["compiler_flops_per_chip"] = pc["flops"]
        report["flops"]["compiler_over_model"] = pc["flops"] / report["flops"]["model_flops_per_chip"]
    report["estimate"] = estimate(report)
    report["advice"] = advise(cfg, report)
    report["knob"] = report["advice"][0]["knob"] if report["advice"] else None
    if serialize and compiled is not None:
        from sgt_jax.train.loop import step_fingerprint

        report["serialized"] = save_compiled(compiled, serialize, fingerprint=step_fingerprint(cfg))
        log(f"[aot] serialized executable -> {serialize} ({report['serialized']['bytes'] / 1e6:.1f} MB)")
    return report


def _attention(model_cfg, platform: str) -> str:
    """The attention kernel the step compiles with (``attention.resolve_impl``): "flash (auto)"
    for ``auto`` on a TPU topology."""
    from sgt_jax.models.attention import resolve_impl

    impl = model_cfg.llm.get("attention_impl", "dense")
    got = resolve_impl(impl, model_cfg.llm.hidden_size // model_cfg.llm.num_heads, platform)
    return got if got == impl else f"{got} ({impl})"


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------------------------
# advice


def attention_scores_gib(cfg, mesh_sizes: dict) -> float:
    """fp32 score bytes one dense-attention layer materialises per chip (B_local x heads x L x L)."""
    c = cfg.model.llm
    rows = cfg.data.rows_per_batch / cfg.train.grad_accum / (mesh_sizes["data"] * mesh_sizes["fsdp"])
    heads = c.num_heads / (mesh_sizes["tensor"] if c.num_kv_heads % mesh_sizes["tensor"] == 0 else 1)
    return rows * heads * float(cfg.data.tokens_per_row) ** 2 * 4 / GiB


def vae_attention_gib(cfg, mesh_sizes: dict) -> float:
    """fp32 scores of the VAE encoder's mid attention per chip (one head over (H/f)(W/f) pixels)."""
    from sgt_jax.data.config import vae_hw
    from sgt_jax.models.config import vae_downsample

    h, w = vae_hw(cfg.data)
    f = vae_downsample(cfg.model)
    rows = cfg.data.rows_per_batch / (mesh_sizes["data"] * mesh_sizes["fsdp"])
    return rows * cfg.data.vae_images_per_row * float(h // f * (w // f)) ** 2 * 4 / GiB


def advise(cfg, report: dict) -> list[dict]:
    """Which knob to turn when the step does not fit (or barely does): ordered, most effective first."""
    mem, hbm = report["memory_per_chip"], report["topology"]["hbm_per_chip_gib"]
    over = report["oom"] is not None or (mem is not None and mem["total_gib"] > 0.92 * hbm)
    if not over:
        return []
    sizes = report["config"]["mesh"]
    st = report["state_per_chip_gib"]
    state = st["params"] + st["opt_state"] + st["ema"] + st["frozen"] + st["vae"]
    out = []
    llm, vit = cfg.model.llm, cfg.model.vit
    if state > 0.6 * hbm:
        out.append({"knob": "mesh.fsdp / a larger slice",
                    "why": f"parameters + optimizer state + EMA take {state:.1f} GiB of {hbm:.0f} GiB per chip: "
                           f"shard them over more chips (a larger slice; keep mesh.fsdp=-1, mesh.data=1)"})
    att = attention_scores_gib(cfg, sizes)
    if report["config"]["attention_impl"].startswith("dense") and att > 0.1 * hbm:
        out.append({"knob": "model.llm.attention_impl / mesh.tensor / data.tokens_per_row",
                    "why": f"dense attention materialises B x heads x L x L fp32 scores: {att:.1f} GiB per chip "
                           f"per layer at L={cfg.data.tokens_per_row}; a flash kernel (llm.attention_impl) removes "
                           f"it, mesh.tensor splits the heads (with fewer rows per chip), or lower data.tokens_per_row"})
    rows_chip = report["config"]["rows_per_chip_per_micro_batch"]
    if rows_chip > 1:
        k = int(rows_chip)
        out.append({"knob": "train.grad_accum",
                    "why": f"{rows_chip:g} rows per chip per micro-batch: --config.train.grad_accum="
                           f"{int(cfg.train.grad_accum) * k} runs one row per chip at a time (same global batch)"})
    for part, c in (("llm", llm), ("vit", vit)):
        if c.remat_policy != "full":
            out.append({"knob": f"model.{part}.remat_policy",
                        "why": f"model.{part}.remat_policy={c.remat_policy} saves activations per layer; "
                               f"'full' recomputes them (least HBM, ~+33% FLOPs)"})
    if int(llm.ce_chunk_size) == 0:
        out.append({"knob": "model.llm.ce_chunk_size",
                    "why": "the lm_head logits (tokens x vocab fp32) exist at once: set ce_chunk_size=4096"})
    comp = report.get("components_per_chip") or {}
    vae_mem = comp.get("vae_encode") or {}
    vae_total = vae_mem.get("total_gib") or (vae_mem.get("oom") or {}).get("required_gib") or 0.0
    vae = vae_attention_gib(cfg, sizes)
    if vae_total > 0.3 * hbm:
        out.insert(0, {"knob": "data.vae_images_per_row / data.vae_image_size / mesh (rows per chip)",
                       "why": f"the VAE encode of the whole batch alone needs {vae_total:.1f} GiB per chip "
                              f"({report['config']['rows_per_chip']:g} rows x {cfg.data.vae_images_per_row} images "
                              f"of {cfg.data.vae_image_size} px, fp32; it runs before the micro-batch loop, so "
                              f"grad_accum does not shrink it): fewer / smaller images per row, or more chips "
                              f"on the batch axes (mesh.tensor replicates rows)"})
    elif vae > 0.05 * hbm:
        out.append({"knob": "data.vae_images_per_row / data.vae_image_size",
                    "why": f"the VAE encoder's mid attention holds {vae:.1f} GiB of fp32 scores per chip "
                           f"({cfg.data.vae_images_per_row} images of {cfg.data.vae_image_size} px per row)"})
    out.append({"knob": "data.tokens_per_row",
                "why": "activations grow linearly (attention quadratically) with the row length"})
    return out


# ------------------------------------------------------------------------------------------------
# serialisation


_EXE_MAGIC = b"SGTJAX-EXECUTABLE-1\n"


def save_compiled(compiled, path: str, fingerprint: str | None = None) -> dict:
    """Write the compiled executable to ``path`` (local or URL): a magic line, a JSON header (jax /
    libtpu versions, the run config's ``train.loop.step_fingerprint``, payload size) and jax's
    serialised executable. The in/out pytree structures are not stored: the loader derives them
    from the arguments of the first call (``LoadedStep``)."""
    from jax.experimental.serialize_executable import serialize

    from sgt_jax import fileio

    payload, _, _ = serialize(compiled)
    header = json.dumps({"jax": _version("jax"), "libtpu": _version("libtpu"), "fingerprint": fingerprint,
                         "payload_bytes": len(payload)}).encode()
    with fileio.open_write(path) as f:
        f.write(_EXE_MAGIC + header + b"\n")
        f.write(payload)
    return {"path": path, "bytes": len(_EXE_MAGIC) + len(header) + 1 + len(payload)}


class LoadedStep:
    """A step executable loaded from ``save_compiled``'s file, called like ``Setup.step_fn``.
    ``jit_fn`` (the run's own jitted step) gives the output structure, by ``jax.eval_shape`` on the
    first call's arguments (tracing only, no compile)."""

    def __init__(self, payload: bytes, jit_fn, devices=None):
        self.payload, self.jit_fn, self.devices, self._compiled = payload, jit_fn, devices, None

    def __call__(self, *args):
        if self._compiled is None:
            import jax
            from jax.experimental.serialize_executable import deserialize_and_load

            in_tree = jax.tree.structure((args, {}))
            out_tree = jax.tree.structure(jax.eval_shape(self.jit_fn, *args))
            self._compiled = deserialize_and_load(self.payload, in_tree, out_tree,
                                                  execution_devices=self.devices or jax.devices())
        return self._compiled(*args)


def load_compiled(path: str, jit_fn, devices=None, fingerprint: str | None = None) -> LoadedStep:
    """Load an executable written by ``save_compiled``; call it as ``step(state, consts, batch)``
    in place of ``Setup.step_fn`` (``jit_fn``; the trainer does with ``train.executable``). The jax
    and libtpu versions and, when given, the run config's ``fingerprint`` must match the ones it
    was compiled with (the XLA flags too: not checked). jax deserialises the payload with its own
    unpickler, which can run code: only load files you wrote."""
    from sgt_jax import fileio

    blob = fileio.read_bytes(path)
    if not blob.startswith(_EXE_MAGIC):
        raise AotError(f"{path} is not an executable written by python -m sgt_jax.aot --serialize")
    end = blob.index(b"\n", len(_EXE_MAGIC))
    d = json.loads(blob[len(_EXE_MAGIC):end])
    payload = blob[end + 1:]
    if len(payload) != d["payload_bytes"]:
        raise AotError(f"{path}: truncated ({len(payload)} of {d['payload_bytes']} payload bytes)")
    if d.get("jax") != _version("jax") or d.get("libtpu") != _version("libtpu"):
        raise AotError(f"{path} was compiled with jax {d.get('jax')} / libtpu {d.get('libtpu')}, this is "
                       f"jax {_version('jax')} / libtpu {_version('libtpu')}: recompile")
    if fingerprint is not None and d.get("fingerprint") != fingerprint:
        raise AotError(f"{path} was compiled for another run config (step fingerprint {d.get('fingerprint')}, "
                       f"this run's is {fingerprint}: the model, train, mesh or batch-shape settings differ "
                       "and they are baked into the executable); recompile with python -m sgt_jax.aot "
                       "--serialize, or unset train.executable")
    return LoadedStep(payload, jit_fn, devices)


# ------------------------------------------------------------------------------------------------
# text


def format_report(r: dict) -> str:
    t, c = r["topology"], r["config"]
    lines = [f"== {t['name']}: {t['chips']} x {t['device_kind']} ({t['topology_name']}"
             f"{' x' + str(t['slices']) + ' slices' if t['slices'] > 1 else ''}, {t['hosts']} hosts), "
             f"HBM {t['hbm_per_chip_gib']:.0f} GiB/chip, peak {t['peak_tflops_per_chip']:.0f} TFLOP/s/chip",
             f"   mesh {c['mesh']}; rows {c['rows_per_batch']} x {c['tokens_per_row']} tokens "
             f"({c['rows_per_chip']:g} rows/chip, grad_accum {c['grad_accum']}); remat llm={c['llm_remat_policy']} "
             f"vit={c['vit_remat_policy']}; attention {c['attention_impl']}"]
    st = r["state_per_chip_gib"]
    lines.append("   state per chip (GiB): " + ", ".join(f"{k} {v:.2f}" for k, v in st.items()))
    mem = r["memory_per_chip"]
    if mem:
        lines.append(f"   memory per chip (GiB): arguments {mem['argument_gib']:.2f}, outputs {mem['output_gib']:.2f}, "
                     f"aliased {mem['alias_gib']:.2f}, temporaries {mem['temp_gib']:.2f}, code "
                     f"{mem['generated_code_gib']:.3f} -> total {mem['total_gib']:.2f} of {mem['hbm_gib']:.0f} "
                     f"({100 * mem['fraction_of_hbm']:.0f}%)")
    if r["oom"]:
        o = r["oom"]
        need = f" (needs {o['required_gib']:.1f} GiB of {o.get('available_gib', float('nan')):.2f})" \
            if "required_gib" in o else ""
        lines.append(f"   DOES NOT FIT{need}: {o['message'][:300]}")
    f = r["flops"]
    lines.append(f"   model FLOPs/step {f['model_flops_per_step']:.4g} ({f['model_flops_per_chip']:.4g}/chip; "
                 f"{f['model_basis']})")
    if "compiler_flops_per_chip" in f:
        lines.append(f"   compiler FLOPs/chip {f['compiler_flops_per_chip']:.4g} "
                     f"({f['compiler_over_model']:.2f} x the model count)")
    e = r.get("estimate")
    if e:
        lines.append(f"   compiler-estimated step {e['step_time_s']:.3f} s -> MFU {100 * e['mfu']:.1f}%, "
                     f"{e['model_tflops_per_chip']:.0f} model TFLOP/s/chip, {e['tokens_per_s_per_chip']:.0f} tok/s/chip")
    elif r.get("costs") and "error" in r["costs"]:
        lines.append(f"   cost probes failed: {r['costs']['error']}")
    comp = r.get("components_per_chip") or {}
    for k, v in comp.items():
        if "total_gib" in v:
            lines.append(f"   {k} alone: temporaries {v['temp_gib']:.2f} GiB, total {v['total_gib']:.2f} GiB per chip")
        elif v.get("oom"):
            o = v["oom"]
            lines.append(f"   {k} alone: does not fit either"
                         + (f" (needs {o['required_gib']:.1f} GiB)" if "required_gib" in o else "")
                         + f": {o.get('message', '')[:160]}")
    for a in r["advice"]:
        lines.append(f"   -> {a['knob']}: {a['why']}")
    return "\n".join(lines)


def table(paths) -> str:
    """A markdown table (one row per JSON report) for docs/tpu_plan.md."""
    head = ("| run | topology | mesh d/f/t | rows x tokens | rows/chip (micro) | remat llm/vit | attention | args GiB | "
            "temp GiB | total GiB | "
            "HBM | fits | compiler step s | MFU | knob |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for p in paths:
        with open(p) as f:
            r = json.load(f)
        c, t, m = r["config"], r["topology"], r.get("memory_per_chip")
        mesh = "/".join(str(c["mesh"][a]) for a in ("data", "fsdp", "tensor"))
        if m:
            mem = f"{m['argument_gib']:.1f} | {m['temp_gib']:.1f} | {m['total_gib']:.1f}"
        else:
            o = r["oom"] or {}
            mem = f"- | needs {o.get('required_gib', float('nan')):.1f} | - "
        e = r.get("estimate") or {}
        step = f"{e['step_time_s']:.2f}" if e else "-"
        mfu = f"{100 * e['mfu']:.1f}%" if e else "-"
        name = os.path.splitext(os.path.basename(p))[0]
        lines.append(f"| {name} | {t['name']} | {mesh} | {c['rows_per_batch']} x {c['tokens_per_row']} | "
                     f"{c['rows_per_chip']:g} ({c['rows_per_chip_per_micro_batch']:g}) | "
                     f"{c['llm_remat_policy']}/{c['vit_remat_policy']} | {c['attention_impl']} | {mem} | {t['hbm_per_chip_gib']:.0f} | "
                     f"{'yes' if r['fits'] else 'no'} | {step} | {mfu} | {r.get('knob') or ''} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "a configs/<preset>.py file", lock_config=True)
    flags.DEFINE_string("topology", None, "v5p-64, v6e-64, v5e-16, v4-32, 2xv5p-64, ...")
    flags.DEFINE_string("out", None, "write the report as JSON here")
    flags.DEFINE_string("serialize", None, "write the compiled executable here (local path or gs://)")
    flags.DEFINE_enum("costs", "yes", ["yes", "no", "always"],
                      "the FLOP / step-time probes (3 small compiles + the VAE alone): yes = when the step fits")
    flags.DEFINE_enum("components", "auto", ["auto", "yes", "no"],
                      "compile the VAE encode and the model fwd+bwd alone (auto: when HBM is short)")
    flags.DEFINE_integer("doc_tokens", 3000, "document length of the nominal batch for the model FLOP count")
    flags.DEFINE_multi_string("xla", [], "compiler option key=value (e.g. xla_tpu_enable_...=true)")
    flags.DEFINE_multi_string("table", [], "print a markdown table of these JSON reports and exit")
    flags.DEFINE_multi_string("reestimate", [], "recompute the estimate of these JSON reports in place and exit")
    flags.DEFINE_string("add_costs", None, "run only the cost probes for --config/--topology and add them to "
                        "this existing JSON report (of the same config) in place")

    def run(args):
        del args
        F = flags.FLAGS
        if F.reestimate:
            for p in F.reestimate:
                with open(p) as fh:
                    r = reestimate(json.load(fh))
                with open(p, "w") as fh:
                    json.dump(r, fh, indent=1, default=str)
                print(format_report(r))
            return 0
        if F.table:
            print(table(F.table))
            return 0
        if F.config is None or F.topology is None:
            print("--config and --topology are required", file=sys.stderr)
            return 2
        opts = {}
        for kv in F.xla:
            k, _, v = kv.lstrip("-").partition("=")
            opts[k] = v
        ok, why = libtpu_available()
        if not ok:
            print(f"[aot] {why}", file=sys.stderr)
            return 2
        if F.add_costs:
            with open(F.add_costs) as fh:
                r = json.load(fh)
            topo = parse_topology(F.topology)
            r["costs"] = cost_probe(F.config, topo, topology_devices(topo), opts, log=lambda s: print(s, flush=True))
            r = reestimate(r)
            with open(F.add_costs, "w") as fh:
                json.dump(r, fh, indent=1, default=str)
            print(format_report(r))
            return 0
        comps = {"auto": None, "yes": True, "no": False}[F.components]
        if F.serialize:   # an executable out of the persistent cache may not re-serialise (XLA:CPU does not)
            import jax

            jax.config.update("jax_enable_compilation_cache", False)
        r = analyse(F.config, F.topology, costs={"yes": True, "no": False, "always": "always"}[F.costs], components=comps, doc_tokens=F.doc_tokens, compiler_options=opts,
                    serialize=F.serialize, log=lambda s: print(s, flush=True))
        r["command"] = "python -m sgt_jax.aot " + " ".join(sys.argv[1:])
        print(format_report(r), flush=True)
        if F.out:
            with open(F.out, "w") as fh:
                json.dump(r, fh, indent=1, default=str)
            print(f"[aot] report -> {F.out}")
        return 0 if r["fits"] else 3

    app.run(run, argv=argv)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")   # compile for the topology; never grab a local TPU
    # quiet libtpu's "could not determine TPU accelerator type" warnings on a machine without a TPU
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    main()
