"""COCO instances -> scene records for the proxy tasks (detection, semantic / instance
segmentation, and every image-only task on the same images).

    coco_scene:JSON::IMAGE_DIR[?crowd=0|1&background=R,G,B&max_pixels=N&max_side=N]

``scene(i)`` (what ``data.proxy`` reads): the image, one mask per annotation (pycocotools), its
category id and name (``categories`` of the JSON), and its COCO ``bbox`` (scaled with the image when
``max_side`` shrinks it); crowd annotations are skipped unless ``crowd=1``. ``__getitem__`` (the
source used without a proxy) is an instance-segmentation seg record, as ``coco_instances``.
Stuff classes need the panoptic annotations: ``coco_panoptic`` gives the panoptic targets.
"""
from __future__ import annotations

import collections
import json
import os
from collections.abc import Sequence

import numpy as np

from sgt_jax import fileio
from sgt_jax.data import render
from sgt_jax.data.sources.base import (SEG_OPTIONS, Spec, _image_size_or_bad, _read_path, _seg_record,
                                       _Source)
from sgt_jax.data.sources.coco import decode_segmentation
from sgt_jax.data.sources.images import DEFAULT_MAX_PIXELS, _fit_size


class CocoSceneSource(_Source):
    name = "coco_scene"
    options = SEG_OPTIONS | {"background", "crowd"}
    usage = "coco_scene:/ann/instances_train2017.json::/train2017"

    @classmethod
    def from_spec(cls, spec: Spec) -> "CocoSceneSource":
        kw = {**spec.seg(), **spec.background()}
        js, img_dir = spec.paths(2, 2)
        return cls(js, img_dir, seed=spec.seed, crowd=spec.flag("crowd"), **kw)

    def __init__(self, json_path: str, image_dir: str, *, seed: int = 0, crowd: bool = False,
                 max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int | None = None,
                 background: Sequence[int] = (0, 0, 0)):
        try:
            from pycocotools import mask as _  # noqa: F401
        except ImportError:
            raise ImportError("coco_scene needs pycocotools (pip install -r requirements.txt)")
        self.json_path, self.image_dir, self.seed = json_path, image_dir, int(seed)
        self.crowd, self.max_pixels, self.max_side = bool(crowd), int(max_pixels), max_side
        self.background = tuple(int(c) for c in background)
        meta = fileio.read_json(json_path)
        if not isinstance(meta, dict) or "images" not in meta or "annotations" not in meta:
            raise ValueError(f"{json_path}: not a COCO instances JSON (needs 'images' and 'annotations')")
        self.names = {int(c["id"]): str(c.get("name", c["id"])) for c in meta.get("categories", [])}
        per_image: dict = collections.defaultdict(list)
        for a in meta["annotations"]:
            if not self.crowd and a.get("iscrowd", 0):
                continue
            per_image[a.get("image_id")].append([a.get("segmentation"), a.get("category_id", 0), a.get("bbox")])
        self._images = [(im.get("id"), im.get("file_name"), im.get("height"), im.get("width"),
                         json.dumps(per_image.get(im.get("id"), []), separators=(",", ":")))
                        for im in meta["images"]]
        self._keys = [os.path.splitext(im[1] or "")[0] or f"img{im[0]}" for im in self._images]

    def _describe(self) -> str:
        return f"json={self.json_path!r}, crowd={self.crowd}, max_side={self.max_side}"

    def scene(self, i) -> dict:
        i = self._index(i)
        key = self._keys[i]
        image_id, file_name, jh, jw, anns_json = self._images[i]
        anns = json.loads(anns_json)
        if not anns:
            raise self._bad("no_masks", key)
        img_bytes = _read_path(self, self.image_dir, file_name or "", key)
        h, w = _image_size_or_bad(self, img_bytes, key)
        if (jh, jw) != (h, w):
            raise self._bad("bad_annotation", key, f"JSON size {jh}x{jw} != image {h}x{w}")
        masks, cats, boxes = [], [], []
        try:
            for seg, cat, box in anns:
                m = decode_segmentation(seg, h, w)
                if box is None:
                    box = render.mask_bbox(m)
                if len(box) != 4:
                    raise ValueError(f"bbox {box!r} is not [x, y, w, h]")
                masks.append(m)
                cats.append(int(cat))
                boxes.append([float(v) for v in box])
        except Exception as e:  # noqa: BLE001 -- pycocotools raises assorted types
            raise self._bad("bad_annotation", key, f"{type(e).__name__}: {e}") from None
        oh, ow = _fit_size(h, w, self.max_side)
        image, _ = self._decode(img_bytes, key, max_pixels=self.max_pixels, out_hw=(oh, ow))
        if (oh, ow) != (h, w):
            masks = [render.resize_labels(m, (oh, ow)) for m in masks]
            boxes = [[x * ow / w, y * oh / h, bw * ow / w, bh * oh / h] for x, y, bw, bh in boxes]
        return {"task": "scene", "id": str(image_id), "key": key, "image": image,
                "masks": [np.asarray(m, bool) for m in masks], "label_ids": cats,
                "labels": [self.names.get(c, str(c)) for c in cats], "isthing": [True] * len(masks),
                "boxes": np.asarray(boxes, np.float64).reshape(-1, 4)}

    def __getitem__(self, i) -> dict:
        rec = self.scene(i)
        target = render.render_masks(rec["masks"], rec["image"].shape[:2], seed=self.seed,
                                     image_id=rec["id"], background=self.background)
        return _seg_record(rec["key"], rec["image"], target)
