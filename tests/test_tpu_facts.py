"""The TPU chip table (sgt_jax.parallel.tpu) is the one source of the chip facts: the trainer's
MFU peak and the AOT topologies read it, and launch/lib.sh's shell copy of its columns agrees."""
import pathlib
import subprocess

import pytest

from sgt_jax.aot import topology as aot_topology
from sgt_jax.parallel import tpu

LIB = pathlib.Path(__file__).resolve().parents[1] / "launch" / "lib.sh"


def _sh(fn: str, acc: str) -> str:
    return subprocess.run(["bash", "-c", f"source {LIB}; {fn} {acc}"], capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.parametrize("family", sorted(tpu.CHIPS))
def test_launch_scripts_agree_with_the_chip_table(family):
    c = tpu.CHIPS[family]
    for chips in (4, 8, 16, 64):
        acc = f"{c['accelerator']}-{chips * c['per_chip']}"
        topo = aot_topology.parse_topology(acc)
        assert _sh("slice_type", acc) == topo.accelerator_type == acc
        assert int(_sh("chips_per_slice", acc)) == topo.chips_per_slice == chips
        assert int(_sh("hosts_per_slice", acc)) == topo.hosts_per_slice
        assert _sh("default_runtime", acc) == c["runtime"] == topo.to_dict()["runtime_version"]


def test_peak_by_device_kind():
    # device_kind strings as jax reports them on each chip
    for kind, fam in (("TPU v4", "v4"), ("TPU v5 lite", "v5e"), ("TPU v5p", "v5p"), ("TPU v6 lite", "v6e"),
                      ("TPU v5e", "v5e")):
        assert tpu.peak_tflops(kind) == tpu.CHIPS[fam]["peak_tflops"]
    assert tpu.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and tpu.peak_tflops("cpu") is None
    assert aot_topology.parse_topology("v6e-8").peak_tflops == tpu.CHIPS["v6e"]["peak_tflops"]
