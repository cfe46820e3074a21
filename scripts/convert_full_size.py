"""Full-size check (not CI): a random 28-layer BAGEL-7B-MoT-shaped checkpoint (14.6B parameters,
~29 GB bf16, sharded with an index json) -> import -> export, verified bit for bit, with the peak
RSS of each phase.

    python scripts/convert_full_size.py [--workdir $TMPDIR/sgt_convert_full] [--dtype bf16] [--keep]

Needs ~60 GB of free disk (source, then model dir + export; the source weights are deleted after
the import) and ~15-30 min on 2 cores. Same code path as bench/convert.py (synthetic.round_trip);
prints a JSON summary and exits 1 unless bit-exact and within peak RSS <= 4 GB + the largest tensor.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sgt_jax.convert import synthetic  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "sgt_convert_full"))
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)
    cfg = synthetic.reduced_bagel_7b(28, 26)
    need = sum(t.nbytes for t in synthetic.bagel_plan(cfg, args.dtype))
    os.makedirs(args.workdir, exist_ok=True)
    free = shutil.disk_usage(args.workdir).free
    print(f"full size: {need / 1e9:.1f} GB of weights; ~{2 * need / 1e9:.0f} GB disk needed, {free / 1e9:.0f} GB free")
    if 2 * need + 5e9 > free:
        print("not enough disk")
        return 1
    res = synthetic.round_trip(cfg, args.workdir, dtype=args.dtype, keep=args.keep)
    print(json.dumps(res, indent=1))
    return 0 if res["bit_exact"] and res["rss_within_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
