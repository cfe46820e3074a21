"""The device mesh and the one table mapping logical axis names to mesh axes.

Mesh axes: ``data`` (pure data parallel: replicas), ``fsdp`` (parameters, gradients and optimizer
state sharded; the batch too), ``tensor`` (heads / mlp / vocab split inside a layer). Sizes come
from the config; -1 takes the remaining devices. Model code only names logical axes (layers.py);
``RULES`` below is the only place they meet the mesh.

Several TPU slices (multislice, devices carry ``slice_index``): ``data`` spans the slices over
DCN (only the gradient all-reduce crosses it; ``fsdp`` / ``tensor`` stay inside a slice, on ICI),
so ``data`` must be a multiple of the slice count and its default 1 becomes the slice count. The
mesh is then built with ``mesh_utils.create_hybrid_device_mesh`` (ICI x DCN).
"""
from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or None = replicated). One table, MaxText style.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vit_embed", None),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("head_dim", None),
    ("norm", None),
    ("vit_pos", None),
    ("conv_h", None), ("conv_w", None), ("conv_in", None), ("conv_out", None),
)

log = logging.getLogger(__name__)


def num_slices(devices) -> int:
    """TPU slices among ``devices`` (1 for CPU / a single slice)."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def mesh_shape(spec: dict, num_devices: int, slices: int = 1) -> tuple[int, ...]:
    """Resolve {'data': d, 'fsdp': f, 'tensor': t} with at most one -1 against the device count
    (and, on several slices, make ``data`` span them; see the module doc)."""
    sizes = [int(spec.get(a, 1)) for a in MESH_AXES]
    if slices > 1:
        if sizes[0] == 1:
            sizes[0] = slices
        if sizes[0] != -1 and sizes[0] % slices:
            raise ValueError(f"mesh.data={sizes[0]} must be a multiple of the {slices} slices "
                             "(the data axis spans the slices over DCN)")
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not a "
                             f"multiple of the fixed axes' product {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                         f"{num_devices} are present; set one axis to -1 to take the rest")
    if sizes[0] % slices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: data must be a multiple of the {slices} slices "
                         "(the data axis spans the slices over DCN)")
    return tuple(sizes)


def make_mesh(spec: dict, devices=None) -> Mesh:
    """The (data, fsdp, tensor) mesh over ``devices`` (default: all); hybrid ICI x DCN when the
    devices span several slices."""
    devices = jax.devices() if devices is None else devices
    k = num_slices(devices)
    shape = mesh_shape(spec, len(devices), k)
    from jax.experimental import mesh_utils

    if k > 1:
        ici = (shape[0] // k,) + shape[1:]
        dev = mesh_utils.create_hybrid_device_mesh(ici, (k, 1, 1), devices)
    else:
        try:
            dev = mesh_utils.create_device_mesh(shape, devices=devices)
        except Exception:   # CPU / odd topologies: plain order
            dev = np.asarray(devices).reshape(shape)
    return Mesh(np.asarray(dev), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _mesh_axes_for(name, rules):
    for logical, axes in rules:
        if logical == name:
            return axes
    if name is not None:
        raise KeyError(f"logical axis {name!r} has no rule in sgt_jax/parallel/mesh.py RULES")
    return None


def logical_to_spec(names, shape, mesh: Mesh, rules=RULES) -> P:
    """PartitionSpec for a parameter with logical ``names``; a mesh axis that does not divide
    the dimension (or is already used) is dropped for that dimension (replicated)."""
    used, out = set(), []
    for name, dim in zip(names, shape):
        axes = _mesh_axes_for(name, rules)
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        keep = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        size = int(np.prod([mesh.shape[a] for a in keep])) if keep else 1
        if keep and dim % size:
            keep = ()
        used.update(keep)
        out.append(None if not keep else keep[0] if len(keep) == 1 else keep)
    return P(*out)


def state_shardings(abstract_state, mesh: Mesh, rules=RULES):
    """NamedShardings for a pytree of nnx Variables (or arrays carrying no names -> replicated)."""
    from flax import nnx

    def one(x):
        if isinstance(x, nnx.Variable):
            names = x.get_metadata().get("out_sharding")
            v = x.get_value()
            spec = logical_to_spec(names, v.shape, mesh, rules) if names else P()
            return x.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows of the batch over RULES' ``batch`` axes (data, fsdp); everything else in a row is local."""
    return NamedSharding(mesh, P(dict(RULES)["batch"]))


def initialize_distributed() -> bool:
    """Multi-host setup on pods: ``jax.distributed.initialize()`` when the environment names
    several workers (Cloud TPU VMs set TPU_WORKER_HOSTNAMES; elsewhere set
    JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID -- jax reads only the first,
    this passes the other two). Must run before any other JAX call. Returns True when it
    initialised."""
    if os.environ.get("SGT_SINGLE_PROCESS") or jax.distributed.is_initialized():
        return False
    hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if "JAX_COORDINATOR_ADDRESS" in os.environ or len(hosts) > 1:
        given = {k: int(os.environ[v]) for k, v in (("num_processes", "JAX_NUM_PROCESSES"),
                                                    ("process_id", "JAX_PROCESS_ID")) if v in os.environ}
        jax.distributed.initialize(**given)
        log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
        return True
    return False


def global_batch(local: dict | object, mesh: Mesh):
    """Assemble the global batch from each process's slice (rows), sharded over (data, fsdp)."""
    def one(x):
        x = np.asarray(x)
        spec = NamedSharding(mesh, P(dict(RULES)["batch"], *([None] * (x.ndim - 1))))
        return jax.make_array_from_process_local_data(spec, x)

    return jax.tree.map(one, local)
