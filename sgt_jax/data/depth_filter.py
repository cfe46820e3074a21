"""The depth task's two-estimator filter (paper, supplementary "Depth Estimation"), a one-off command:

    python -m sgt_jax.data.depth_filter --a DA_V2_DIR --b DEPTHPRO_DIR [--invert-b] \
        [--threshold 0.4] [--metric absrel|mae] [--out-dir DEPTH_DIR] [--report filter.json]

The paper estimates every image's depth with Depth Anything V2 and with DepthPro, aligns the two
by least squares and discards an image when the discrepancy after alignment exceeds 0.4. For each
key present in both folders (``<key>.npy`` float maps or ``<key>.png`` 8/16-bit grey maps, as
``data.proxy_options.depth_dir`` reads them) this command

1. fits the scale and shift of map A to map B by least squares over the valid pixels (finite in
   both, and B > 0 for ``absrel``): ``min_{s,t} sum (s a + t - b)^2`` (``align``);
2. scores the aligned pair (``discrepancy``): ``absrel`` (default) = mean |s a + t - b| / b, the
   standard relative depth error; ``mae`` = mean |s a + t - b| with B min-max normalised to [0, 1];
3. keeps the key iff the score is <= ``--threshold`` (0.4).

The paper names neither the discrepancy measure nor the space of the alignment; ours is stated
above (our reading, not the paper's text). Depth Anything V2 outputs relative *inverse* depth
(disparity) while DepthPro outputs metric depth: pass ``--invert-b`` to compare B as 1 / depth.
A is the map the task trains on (the paper: DA-V2, normalised and replicated to 3 channels).

``--out-dir`` copies A's maps of the kept keys there: use it as ``data.proxy_options.depth_dir``;
a dropped image then has no depth map and the pipeline skips it (counted ``skipped/no_depth``) --
the paper replaces discarded images by others of the dataset, which the stream's next record does.
``--report`` writes ``{"kept": [...], "dropped": [...], "scores": {key: score}, ...}``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from sgt_jax import fileio
from sgt_jax.data.proxy.source import read_depth
from sgt_jax.data.records import BadRecord

METRICS = ("absrel", "mae")


def align(a: np.ndarray, b: np.ndarray, valid: np.ndarray | None = None) -> tuple[float, float]:
    """Least-squares (scale, shift) with ``s a + t ~ b`` over ``valid`` pixels (np.linalg.lstsq)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"depth maps differ in shape: {a.shape} vs {b.shape}")
    v = np.isfinite(a) & np.isfinite(b) if valid is None else valid
    if v.sum() < 2:
        raise ValueError("fewer than 2 valid pixels to align")
    x = np.stack([a[v], np.ones(int(v.sum()))], 1)
    (s, t), *_ = np.linalg.lstsq(x, b[v], rcond=None)
    return float(s), float(t)


def discrepancy(a: np.ndarray, b: np.ndarray, metric: str = "absrel") -> tuple[float, float, float]:
    """-> (score, scale, shift) of the pair after aligning A to B (see the module docstring)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    v = np.isfinite(a) & np.isfinite(b)
    if metric == "absrel":
        v &= b > 0
    else:
        lo, hi = float(b[v].min()), float(b[v].max())
        b = (b - lo) / (hi - lo) if hi > lo else np.zeros_like(b)
    s, t = align(a, b, v)
    err = np.abs(s * a[v] + t - b[v])
    score = float((err / b[v]).mean() if metric == "absrel" else err.mean())
    return score, s, t


def _keys(d: str) -> set[str]:
    out = set()
    for name in fileio.listdir(d):
        stem, ext = os.path.splitext(os.path.basename(name.rstrip("/")))
        if ext in (".npy", ".png"):
            out.add(stem)
    return out


def resize_to(b: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    import cv2
    return cv2.resize(b.astype(np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)


def run(a_dir: str, b_dir: str, *, threshold: float = 0.4, metric: str = "absrel", invert_b: bool = False,
        out_dir: str | None = None, log=print) -> dict:
    ka, kb = _keys(a_dir), _keys(b_dir)
    keys = sorted(ka & kb)
    kept, dropped, bad, scores = [], [], {}, {}
    for k in keys:
        try:
            a, b = read_depth(a_dir, k), read_depth(b_dir, k)
        except BadRecord as e:
            bad[k] = e.reason
            continue
        if b.shape != a.shape:
            b = resize_to(b, a.shape)
        if invert_b:
            with np.errstate(divide="ignore"):
                b = np.where(b > 0, 1.0 / b, np.nan)
        try:
            score, _, _ = discrepancy(a, b, metric)
        except ValueError as e:
            bad[k] = str(e)
            continue
        scores[k] = score
        (kept if score <= threshold else dropped).append(k)
    if out_dir:
        if not fileio.is_remote(out_dir):
            os.makedirs(out_dir, exist_ok=True)
        for k in kept:
            for ext in (".npy", ".png"):
                src = fileio.join(a_dir, k + ext)
                if fileio.exists(src):
                    fileio.copy(src, fileio.join(out_dir, k + ext))
                    break
    rep = {"threshold": threshold, "metric": metric, "invert_b": invert_b, "pairs": len(keys),
           "only_in_a": len(ka - kb), "only_in_b": len(kb - ka), "kept": kept, "dropped": dropped,
           "unreadable": bad, "scores": scores}
    log(f"depth_filter: {len(keys)} pairs, kept {len(kept)}, dropped {len(dropped)} "
        f"(score > {threshold}, {metric}), unreadable {len(bad)}; only in A {len(ka - kb)}, "
        f"only in B {len(kb - ka)}")
    return rep


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sgt_jax.data.depth_filter", description=__doc__.split("\n")[0])
    ap.add_argument("--a", required=True, help="maps of estimator A (trained on; Depth Anything V2)")
    ap.add_argument("--b", required=True, help="maps of estimator B (DepthPro)")
    ap.add_argument("--threshold", type=float, default=0.4)
    ap.add_argument("--metric", choices=METRICS, default="absrel")
    ap.add_argument("--invert-b", action="store_true", help="compare 1 / B (B is depth, A disparity)")
    ap.add_argument("--out-dir", help="copy A's kept maps here (the depth_dir to train with)")
    ap.add_argument("--report", help="write the JSON report here")
    args = ap.parse_args(argv)
    rep = run(args.a, args.b, threshold=args.threshold, metric=args.metric, invert_b=args.invert_b,
              out_dir=args.out_dir)
    if args.report:
        fileio.write_json(args.report, rep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
