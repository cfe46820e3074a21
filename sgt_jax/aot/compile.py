"""The real train step (``train.loop.Program``) lowered on abstract sharded inputs and compiled for a
topology: the abstract batch, per-chip memory, the compiler's HBM-exhaustion error parsed, and the
step's two big phases (VAE encode, model fwd+bwd) compiled alone to attribute the memory."""
from __future__ import annotations

import copy
import json
import math
import os
import re
import time

from sgt_jax.train.executable import version as _version

GiB = float(1 << 30)


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
    """The compiler's ``optimal_seconds`` read as -k + t for a negative value: t = raw + ceil(-raw).
    UNVERIFIED. The 1-2 layer v5p probes return -2 + 0.1..0.3; but libtpu's cost model is not
    public, tiny programs with while loops, Pallas calls, collectives, sorts, conds or RNG all
    return positive values (bench/cost_sentinel.py), and the v6e probes return -81, -86, -91
    (growing with the layers), where this reading gives nonsense. Reports mark estimates decoded
    this way as unverified. ``loops`` (the count of while ops) is informational. None when the
    value cannot be read."""
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
    from sgt_jax.train.config import check_micro_batches
    from sgt_jax.train.loop import Program

    check_micro_batches(cfg, mesh)
    return Program(cfg, mesh=mesh)

def _vae_cache_path(key: dict) -> str:
    import hashlib

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
    vae = _with_shardings(setup.abstract_consts.vae, setup.consts_shardings.vae)
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
        model = nnx.merge(setup.graphdef, p, cs.frozen, cs.fixed)
        b = b.replace(latents=la, vae_images=None)
        o = model(b, num_gen=setup.num_gen, key=jax.random.key(1), num_ce=setup.num_ce)
        return reduce_losses(o, b, t)[0]

    grad = jax.value_and_grad(loss_fn)
    try:
        with jax.set_mesh(setup.mesh):
            c = jax.jit(grad, out_shardings=(rep, setup.state_shardings.params)).lower(
                params, consts._replace(vae=None), mb, lat).compile(
                compiler_options=compiler_options or None)
        out["model_fwd_bwd"] = _memory(c)
    except Exception as e:
        out["model_fwd_bwd"] = {"oom": parse_oom(str(e)) or {"message": str(e).splitlines()[0][:300]}}
    return out
