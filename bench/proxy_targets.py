"""Throughput of every proxy-task target builder (issue 16) vs what the trainer consumes per host.

    python bench/proxy_targets.py [--images 12] [--rounds 3] [--size 480x640]
                                  [--out bench/results/proxy_targets.json]

Data: ``--images`` synthetic scenes at COCO size (default 480x640, the study's images are COCO
train2017's, typically 480x640) with 2-8 shapes, their masks, classes and depth
(``synthetic.make_scene`` / ``scene_depth``; the scene records the proxy tasks read).

Per task, interleaved in ``--rounds`` rounds (every task on the same images in each round, so a
load spike on this shared machine hits all tasks alike):

* ``target``: ``proxy.tasks.build`` alone (degradation / rendering / drawing);
* ``sample``: the whole ``SampleBuilder`` on the proxy record with ``default_data_config()``
  (the target, ViT 224 resize + patchify, VAE 512-1024 resize, layout) -- the CPU work of one
  sample after the image is decoded (JPEG decode is the source's, the same for every task).

Both as CPU ms per sample (``time.process_time``, this process only) and samples/s per CPU core
(1000 / ms), plus the ratio to ``reconstruction`` (no target work) measured in the same rounds.
Demand: docs/data_throughput.md's per-host figure for the 7B recipe at the plan's step-time
bracket (4.49-7.32 s, 8 rows per host per step): 4.0-6.5 samples/s per host, 7.3 samples/s at
the upper bound (v6e, 45 % MFU); the cores a host needs for a task = demand / (samples/s per core).
Writes ``--out`` (JSON) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

from sgt_jax.data import config as config_lib  # noqa: E402
from sgt_jax.data import synthetic  # noqa: E402
from sgt_jax.data.proxy import tasks  # noqa: E402
from sgt_jax.data.samples import SampleBuilder  # noqa: E402
from sgt_jax.data.tokenizer import Tokenizer, build_tiny_tokenizer  # noqa: E402

DEMAND = {"plan_bracket_samples_per_s": [4.0, 6.5], "upper_bound_samples_per_s": 7.3,
          "source": "docs/data_throughput.md, 'Demand: rows/s the trainer consumes per host'"}


def scene_records(n: int, h: int, w: int, seed: int = 0) -> list[dict]:
    out = []
    for k in range(n):
        rng = np.random.default_rng([seed, k])
        sc = synthetic.make_scene(rng, h, w, int(rng.integers(2, 9)))
        masks = [p["visible"] for p in sc["shapes"]]
        bg = ~np.logical_or.reduce(masks)
        kinds = [p["kind"] for p in sc["shapes"]]
        out.append({"task": "proxy", "id": str(k), "image": sc["image"], "masks": masks + [bg],
                    "labels": kinds + ["background"],
                    "label_ids": [synthetic.KINDS.index(x) for x in kinds] + [len(synthetic.KINDS)],
                    "isthing": [True] * len(masks) + [False],
                    "depth": synthetic.scene_depth(masks, h, w)})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", default="480x640")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench/results/proxy_targets.json"))
    args = ap.parse_args(argv)
    h, w = (int(v) for v in args.size.split("x"))
    recs = scene_records(args.images, h, w)
    cfg = config_lib.default_data_config()
    with tempfile.TemporaryDirectory() as tmp:
        builder = SampleBuilder(cfg, Tokenizer(build_tiny_tokenizer(os.path.join(tmp, "tok"))))
        order = [t for t in tasks.TASKS]
        cpu = {t: {"target": 0.0, "sample": 0.0} for t in order}
        n = {t: 0 for t in order}
        load0 = os.getloadavg()
        for r in range(args.rounds):
            for t in order:                      # interleaved: every task on the same images per round
                for i, rec in enumerate(recs):
                    g = r * len(recs) + i
                    rr = dict(rec, proxy=t)
                    c0 = time.process_time()
                    tasks.build(t, rr, np.random.default_rng(g), index=g)
                    c1 = time.process_time()
                    builder(rr, stream="seg", index=g)
                    c2 = time.process_time()
                    cpu[t]["target"] += c1 - c0
                    cpu[t]["sample"] += c2 - c1
                    n[t] += 1
        load1 = os.getloadavg()
    rows = {}
    base = cpu["reconstruction"]["sample"] / n["reconstruction"]
    for t in order:
        tgt_ms = 1000 * cpu[t]["target"] / n[t]
        smp_ms = 1000 * cpu[t]["sample"] / n[t]
        rows[t] = {"target_ms": round(tgt_ms, 3), "sample_ms": round(smp_ms, 3),
                   "samples_per_s_per_core": round(1000 / smp_ms, 1),
                   "targets_per_s_per_core": round(1000 / max(tgt_ms, 1e-6), 1),
                   "sample_cost_vs_reconstruction": round(smp_ms / (1000 * base), 2),
                   "cores_for_upper_bound_demand": round(DEMAND["upper_bound_samples_per_s"] * smp_ms / 1000, 3)}
    res = {"images": args.images, "size": [h, w], "rounds": args.rounds, "samples_per_task": n["edge"],
           "config": "default_data_config() (ViT 224, VAE 512-1024 / 16)", "demand": DEMAND,
           "tasks": rows, "loadavg_before_after": [load0, load1], "cpu": platform.processor() or platform.machine(),
           "nproc": os.cpu_count()}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"{'task':18s} {'target ms':>9s} {'sample ms':>9s} {'samples/s/core':>14s} {'x recon':>7s} {'cores @7.3/s':>12s}")
    for t, r in rows.items():
        print(f"{t:18s} {r['target_ms']:9.2f} {r['sample_ms']:9.2f} {r['samples_per_s_per_core']:14.1f} "
              f"{r['sample_cost_vs_reconstruction']:7.2f} {r['cores_for_upper_bound_demand']:12.3f}")
    print(f"load average {load0[0]:.1f} -> {load1[0]:.1f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
