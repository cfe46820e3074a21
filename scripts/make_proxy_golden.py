#!/usr/bin/env python3
"""Golden fixtures for the proxy-task degradations, made by running the official SGT code.

The official degradations (``song2yu/SGT``, ``BAGEL/data/add_noise.py``) are imported at run time
from ``--sgt-src`` (a checkout of https://github.com/song2yu/SGT; nothing of it is copied here). They
draw their parameters from Python's ``random`` and NumPy's legacy global generator; each case seeds
``np.random.seed(k)`` right before the call and pins every ``random.choice`` to a one-element list,
so a test can redraw the same NumPy values (``np.random.seed(k)`` + the same calls in the same
order) and feed them to our ``*_apply`` functions. Cases, on one 48x64 image:

* ``motion_<size>_<angle>``: ``apply_motion_blur(img, size_list=[size], angle=angle)`` (no draw);
* ``fog_<s>``: ``apply_rain_fog_corruption(img, ['fog'], [s])`` (draws N(0, 0.05) of (h, w));
* ``rain_<s>``: ``apply_rain_fog_corruption(img, ['rain'], [s])`` (draws randint(0, 255) of (h, w));
* ``lowlight``: ``apply_low_light_corruption(img)`` (draws U(.1, .5), U(.01, .04), N(0, sigma) of
  the image shape);
* ``sr_<f>``: ``create_sr_pair(img, [f])`` -> the official low-resolution image (bicubic down;
  the official bicubic upsampling is recorded too, ``sr_up_<f>``: the paper says bilinear).

    python scripts/make_proxy_golden.py --sgt-src SGT_CHECKOUT --out tests/fixtures/proxy_golden.npz
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import numpy as np

SEED = {"fog_0.4": 11, "fog_0.8": 12, "rain_0.4": 13, "rain_0.8": 14, "lowlight": 15}
MOTION = [(10, 0.0), (20, 37.5), (30, 290.0)]


def image(h: int = 48, w: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([120 + 90 * np.sin(x / 5 + c) * np.cos(y / 7 - c) for c in range(3)], -1)
    img[10:30, 20:36] = (230, 40, 60)
    return np.clip(img, 0, 255).astype(np.uint8)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sgt-src", required=True, help="checkout of song2yu/SGT")
    ap.add_argument("--out", default="tests/fixtures/proxy_golden.npz")
    args = ap.parse_args()
    spec = importlib.util.spec_from_file_location(
        "sgt_add_noise", os.path.join(args.sgt_src, "BAGEL", "data", "add_noise.py"))
    an = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(an)
    img = image()
    out = {"image": img}
    for size, angle in MOTION:
        out[f"motion_{size}_{angle}"] = an.apply_motion_blur(img.copy(), size_list=[size], angle=angle)
    for s in (0.4, 0.8):
        for mode in ("fog", "rain"):
            np.random.seed(SEED[f"{mode}_{s}"])
            out[f"{mode}_{s}"] = an.apply_rain_fog_corruption(img.copy(), mode_list=[mode], intensity_list=[s])
    np.random.seed(SEED["lowlight"])
    out["lowlight"] = an.apply_low_light_corruption(img.copy())
    for f in (2, 4, 8):
        lr, up, _ = an.create_sr_pair(img.copy(), scale_factor_list=[f])
        out[f"sr_{f}"], out[f"sr_up_{f}"] = lr, up
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out}: {sorted(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
