"""``ProxyRecords``: a stream's source read for a proxy task (``data.proxy``).

Each record becomes ``{**scene, "task": "proxy", "proxy": TASK}``, where ``scene`` is the source's
scene record (``source.scene(i)``: masks, classes, depth, ...; the synthetic scenes and SA-1B have
one; for a task that reads only the image, ``source.image_record(i)`` when the source has it) or,
for a source without one, its ordinary record (an image-only task needs only ``image``; a
segmentation task uses the record's rendered ``target``). With ``depth_dir`` the depth map of a
record is read from ``DEPTH_DIR/<key>.npy`` (float, any scale) or ``DEPTH_DIR/<key>.png`` (8- or
16-bit grey), ``<key>`` being the record's file key (``key``, else ``id``); a missing or unreadable
map is a counted skip (``skipped/no_depth`` / ``skipped/bad_depth``).
"""
from __future__ import annotations

import io

import cv2
import numpy as np

from sgt_jax import fileio
from sgt_jax.data.proxy.tasks import MIXED, SEG_TASKS, check_task
from sgt_jax.data.records import BadRecord


def read_depth(depth_dir: str, key: str) -> np.ndarray:
    """The depth map of ``key`` in ``depth_dir`` (.npy first, then .png) as float32 (H, W)."""
    for ext in (".npy", ".png"):
        path = fileio.join(depth_dir, key + ext)
        if not fileio.exists(path):
            continue
        data = fileio.read_bytes(path)
        try:
            if ext == ".npy":
                d = np.load(io.BytesIO(data), allow_pickle=False)
            else:
                d = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
                if d is None:
                    raise ValueError("not a PNG")
            d = np.asarray(d, np.float32)
        except (ValueError, OSError) as e:
            raise BadRecord("bad_depth", key=key, detail=f"{path}: {e}") from None
        if d.ndim == 3:
            d = d[..., 0]
        return d
    raise BadRecord("no_depth", key=key, detail=f"no {key}.npy / {key}.png in {depth_dir}")


class ProxyRecords:
    """Random-access records of ``source`` for proxy ``task`` (picklable for Grain workers)."""

    def __init__(self, source, task: str, depth_dir: str = ""):
        check_task(task)
        self.source, self.task, self.depth_dir = source, task, depth_dir
        parts = task.split("+") if task != "mixed" else list(MIXED)
        self.needs_scene = any(p in SEG_TASKS or p == "detection" or (p == "depth" and not depth_dir)
                               for p in parts)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i) -> dict:
        read = getattr(self.source, "scene", None) or self.source.__getitem__
        if not self.needs_scene and hasattr(self.source, "image_record"):
            read = self.source.image_record           # SA-1B: skip decoding ~100 masks
        rec = dict(read(i))
        if self.depth_dir and "depth" in self.task.split("+"):
            rec["depth"] = read_depth(self.depth_dir, str(rec.get("key", rec.get("id", i))))
        rec["task"], rec["proxy"] = "proxy", self.task
        return rec

    def index_counts(self) -> dict[str, int]:
        fn = getattr(self.source, "index_counts", None)
        return fn() if fn is not None else {}

    def __repr__(self) -> str:
        return f"ProxyRecords({self.task!r}, {self.source!r})"
