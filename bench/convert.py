"""Conversion throughput and peak RSS: BAGEL-7B-shaped random checkpoint -> import -> export.

    python bench/convert.py [--llm-layers 12] [--vit-layers 26] [--dtype bf16] [--shard-size 5GB]
                            [--workdir $TMPDIR/sgt_convert_bench] [--keep]

Real BAGEL-7B-MoT widths (hidden 3584, vocab 152064, intermediate 18944, ViT 1152/4304, FLUX AE),
configurable depth (28 / 26 is the full 14.6B model: ~29 GB in bf16; the source, the model dir
and the export each take that much disk, the source is deleted after the import). Import and
export run as separate CLI processes; each reports its own wall time, GB/s (checkpoint bytes /
wall time, including startup and validation) and peak RSS (the converter's own
``bagel_io.peak_rss_gb``: VmHWM on Linux; runs before 2026-12 recorded ru_maxrss). The export is verified
bit for bit against the generator. Target: peak RSS <= 4 GB + the largest single tensor.
Writes bench/results/convert.json (one entry per depth run, newest last).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import platform
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sgt_jax.convert import synthetic  # noqa: E402


NOTE = ("BAGEL-7B widths at reduced depth; GB = 1e9 bytes; peak RSS of the import / export process "
        "(VmHWM, sgt_jax.convert.bagel_io.peak_rss_gb; the runs dated 2026-11-22 recorded ru_maxrss)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llm-layers", type=int, default=12)
    ap.add_argument("--vit-layers", type=int, default=26)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--shard-size", default="5GB", help="source and export shard size ('' = single file)")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "sgt_convert_bench"))
    ap.add_argument("--keep", action="store_true", help="keep the files")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench/results/convert.json"))
    args = ap.parse_args(argv)
    cfg = synthetic.reduced_bagel_7b(args.llm_layers, args.vit_layers)
    need = sum(t.nbytes for t in synthetic.bagel_plan(cfg, args.dtype)) + 0.34e9
    os.makedirs(args.workdir, exist_ok=True)
    free = shutil.disk_usage(args.workdir).free
    print(f"checkpoint {need / 1e9:.1f} GB; needs ~{2 * need / 1e9:.1f} GB of disk at the peak, "
          f"{free / 1e9:.1f} GB free in {args.workdir}")
    if 2 * need + 5e9 > free:
        print("not enough disk: reduce --llm-layers")
        return 1
    from sgt_jax.convert.safetensors_io import parse_size
    load_before = os.getloadavg()
    res = synthetic.round_trip(cfg, args.workdir, dtype=args.dtype,
                               src_shard_bytes=parse_size(args.shard_size) if args.shard_size else None,
                               export_shard_size=args.shard_size or None, keep=args.keep)
    res.update(command="python bench/convert.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               date=time.strftime("%Y-%m-%d %H:%M:%S"), host=platform.node(), cpus=os.cpu_count(),
               load_average_before=load_before, load_average_after=os.getloadavg())
    runs = []
    if os.path.exists(args.out):
        with open(args.out) as f:
            runs = json.load(f).get("runs", [])
    runs.append(res)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"note": NOTE, "runs": runs}, f, indent=1)
    i, e = res["import"], res["export"]
    print(json.dumps({"llm_layers": res["llm_layers"], "GB": round(res["checkpoint_bytes"] / 1e9, 2),
                      "import_GB_s": round(i["gb_per_s"], 3), "export_GB_s": round(e["gb_per_s"], 3),
                      "import_GB_per_cpu_s": round(i["bytes"] / 1e9 / i["cpu_seconds"], 3),
                      "export_GB_per_cpu_s": round(e["bytes"] / 1e9 / e["cpu_seconds"], 3),
                      "import_peak_rss_GB": round(i["peak_rss_gb"], 2), "export_peak_rss_GB": round(e["peak_rss_gb"], 2),
                      "target_GB": round(res["rss_target_gb"], 2), "bit_exact": res["bit_exact"]}))
    return 0 if res["bit_exact"] and res["rss_within_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
