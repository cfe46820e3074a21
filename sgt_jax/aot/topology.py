"""TPU slice topologies by name (``v5p-64``, ``2xv6e-16``, ...): chips, torus shape, hosts, the
devices libtpu describes for them (no TPU needed), and the trainer's mesh over those devices."""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re

from sgt_jax.parallel.mesh import MESH_AXES, make_mesh, mesh_shape
from sgt_jax.parallel.tpu import ALIASES, CHIPS as FAMILIES

_2D_SHAPES = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
              256: (16, 16)}
_3D_SMALL = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4)}


class AotError(RuntimeError):
    pass


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
    try:
        return dict(zip(MESH_AXES, mesh_shape(spec, topo.chips, topo.num_slices)))
    except ValueError as e:
        raise AotError(str(e)) from None

def make_topology_mesh(spec: dict, topo: Topology, devices):
    """The trainer's mesh (``parallel.mesh.make_mesh``: hybrid ICI x DCN on several slices) over
    the topology's devices."""
    resolve_mesh_spec(spec, topo)    # the topology's own errors first
    return make_mesh(spec, devices=devices)
