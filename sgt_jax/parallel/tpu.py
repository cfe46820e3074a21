"""TPU chip facts per generation: the one table the trainer's MFU, the AOT report and the launch
scripts read (launch/lib.sh mirrors its per-chip / runtime columns; tests/test_launch.py checks it).

Per chip (Cloud TPU system-architecture pages, docs.cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e}):
bf16 dense peak TFLOP/s, HBM capacity (GiB, nominal), HBM bandwidth (GB/s), bidirectional ICI
bandwidth (GB/s; None where the page does not state it per chip), how the accelerator-type number
counts (TensorCores for v4 / v5p: 2 per chip), the topology prefix and chip config libtpu knows,
the number of torus dimensions, the gcloud accelerator-type prefix and the TPU VM runtime version
to create with. ``device_kinds``: substrings of ``jax.Device.device_kind`` that name the chip.
Below ``train`` and ``aot`` in the import order: plain data, no jax.
"""
from __future__ import annotations

CHIPS = {
    "v4": dict(peak_tflops=275.0, hbm_gib=32, hbm_gbps=1200.0, ici_gbps=None, per_chip=2, prefix="v4",
               chip_config="megacore", dims=3, accelerator="v4", runtime="tpu-ubuntu2204-base",
               device_kinds=("v4",)),
    "v5e": dict(peak_tflops=197.0, hbm_gib=16, hbm_gbps=819.0, ici_gbps=400.0, per_chip=1, prefix="v5e",
                chip_config="default", dims=2, accelerator="v5litepod", runtime="v2-alpha-tpuv5-lite",
                device_kinds=("v5e", "v5 lite", "v5litepod")),
    "v5p": dict(peak_tflops=459.0, hbm_gib=95, hbm_gbps=2765.0, ici_gbps=1200.0, per_chip=2, prefix="v5",
                chip_config="megacore", dims=3, accelerator="v5p", runtime="v2-alpha-tpuv5",
                device_kinds=("v5p",)),
    "v6e": dict(peak_tflops=918.0, hbm_gib=32, hbm_gbps=1640.0, ici_gbps=800.0, per_chip=1, prefix="v6e",
                chip_config="default", dims=2, accelerator="v6e", runtime="v2-alpha-tpuv6e",
                device_kinds=("v6e", "v6 lite")),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}
# bf16 dense peak TFLOP/s of the GPUs BAGEL reports on (MFU of a GPU run; not TPU facts)
GPU_PEAK_TFLOPS = {"a100": 312.0, "h100": 989.0}


def peak_tflops(device_kind: str) -> float | None:
    """bf16 peak TFLOP/s of a device named ``device_kind`` (``jax.Device.device_kind``), None if unknown."""
    kind = device_kind.lower()
    names = {k: c["peak_tflops"] for c in CHIPS.values() for k in c["device_kinds"]} | GPU_PEAK_TFLOPS
    for name, peak in sorted(names.items(), key=lambda kv: -len(kv[0])):
        if name in kind:
            return peak
    return None
