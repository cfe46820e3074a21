"""COCO panoptic and COCO instances -> seg records.

    coco_panoptic:JSON::PNG_DIR::IMAGE_DIR[?colors=coco|render&max_pixels=N&max_side=N
                                          &subset=N&subset_seed=S]
    coco_instances:JSON::IMAGE_DIR[?by=instance|category&crowd=0|1&background=R,G,B
                                   &max_pixels=N&max_side=N&subset=N&subset_seed=S]

``colors``: the target colours are the panoptic PNG's own, or our renderer's. Instances JSON
(polygons / RLE) is decoded by pycocotools. ``subset=N``: only the N image ids
``base.subset_ids`` ranks first (seeded hash of the COCO image id: the same images in every
reader and every proxy task; ``subset_seed``, default 0, picks another set).
"""
from __future__ import annotations

import collections
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from sgt_jax import fileio
from sgt_jax.data import render
from sgt_jax.data.sources.base import (SEG_OPTIONS, SUBSET_OPTIONS, Spec, _image_size_or_bad, _read_path,
                                       _seg_record, _Source, subset_ids)
from sgt_jax.data.sources.images import DEFAULT_MAX_PIXELS, _fit_size



def decode_segmentation(seg, h: int, w: int) -> np.ndarray:
    """A COCO annotation's ``segmentation`` (polygons, uncompressed or compressed RLE) as an
    (h, w) uint8 mask; ValueError for a size mismatch or an unknown form."""
    from pycocotools import mask as mask_utils

    if isinstance(seg, list):                      # polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):
        rle = mask_utils.frPyObjects(seg, h, w)    # uncompressed RLE
    elif isinstance(seg, dict):
        rle = dict(seg)
        if list(rle.get("size", [])) != [h, w]:
            raise ValueError(f"RLE size {rle.get('size')} != image [{h}, {w}]")
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    else:
        raise ValueError(f"unsupported segmentation {type(seg).__name__}")
    return mask_utils.decode(rle)

class _PanopticRecords:
    """Image bytes + panoptic PNG bytes -> a seg record; shared by ``coco_panoptic`` (files) and
    ``tfds`` (ArrayRecord). Needs ``colors``, ``seed``, ``max_pixels``, ``max_side``."""
    colors: str
    seed: int
    max_pixels: int
    max_side: int | None

    def _panoptic_record(self, key: str, img_bytes: bytes, png_bytes: bytes) -> dict:
        h, w = _image_size_or_bad(self, img_bytes, key)
        ph, pw = _image_size_or_bad(self, png_bytes, key)
        if (ph, pw) != (h, w):
            raise self._bad("bad_annotation", key, f"panoptic PNG {ph}x{pw} != image {h}x{w}")
        oh, ow = _fit_size(h, w, self.max_side)
        image, _ = self._decode(img_bytes, key, max_pixels=self.max_pixels, out_hw=(oh, ow))
        if self.colors == "coco":
            target, _ = self._decode(png_bytes, key, max_pixels=self.max_pixels, out_hw=(oh, ow),
                                     composite=False, resample=Image.NEAREST)
        else:
            rgb, _ = self._decode(png_bytes, key, max_pixels=self.max_pixels, composite=False)
            rgb = rgb.astype(np.int64)
            ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
            uniq = np.unique(ids)
            uniq = uniq[uniq != 0]
            masks = [ids == u for u in uniq]
            target = render.render_masks(masks, (h, w), seed=self.seed, image_id=key,
                                         out_hw=(oh, ow))
        return _seg_record(key, image, target)


class CocoPanopticSource(_PanopticRecords, _Source):
    """COCO panoptic: ``images/X.jpg`` + the panoptic PNG -> seg (target = the PNG's colours).

    ``colors='render'`` re-colours the segments (id = R + 256 G + 256^2 B, 0 = void) with our
    renderer instead (largest first, distinct, seeded per image) -- class-agnostic like SA-1B.
    """
    name = "coco_panoptic"
    options = SEG_OPTIONS | SUBSET_OPTIONS | {"colors"}
    usage = "coco_panoptic:/ann/panoptic_train2017.json::/ann/panoptic_train2017::/train2017"

    @classmethod
    def from_spec(cls, spec: Spec) -> "CocoPanopticSource":
        seg = spec.seg()
        js, png_dir, img_dir = spec.paths(3, 3)
        return cls(js, png_dir, img_dir, seed=spec.seed, colors=spec.opts.get("colors", "coco"),
                   **seg, **spec.subset())

    def __init__(self, json_path: str, png_dir: str, image_dir: str, *, seed: int = 0,
                 colors: str = "coco", max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_side: int | None = None, subset: int | None = None, subset_seed: int = 0):
        if colors not in ("coco", "render"):
            raise ValueError(f"colors must be 'coco' or 'render', got {colors!r}")
        self.json_path, self.png_dir, self.image_dir = json_path, png_dir, image_dir
        self.seed, self.colors = int(seed), colors
        self.max_pixels, self.max_side = int(max_pixels), max_side
        meta = fileio.read_json(json_path)
        if not isinstance(meta, dict) or "annotations" not in meta or "images" not in meta:
            raise ValueError(f"{json_path}: not a COCO panoptic JSON (needs 'images' and "
                             f"'annotations')")
        files = {im["id"]: im["file_name"] for im in meta["images"]}
        keep = subset_ids([a.get("image_id") for a in meta["annotations"]], subset, subset_seed)
        self._entries = []    # (image file, png file, number of segments)
        for a in meta["annotations"]:
            if a.get("image_id") in keep:
                self._entries.append((files.get(a.get("image_id")), a.get("file_name"),
                                      len(a.get("segments_info") or [])))
        self._keys = [os.path.splitext(png or "")[0] or f"ann{j}"
                      for j, (_, png, _) in enumerate(self._entries)]

    def _describe(self) -> str:
        return f"json={self.json_path!r}, colors={self.colors!r}, max_side={self.max_side}"

    def __getitem__(self, i) -> dict:
        i = self._index(i)
        key = self._keys[i]
        image_file, png_file, n_segments = self._entries[i]
        if image_file is None or png_file is None:
            raise self._bad("bad_annotation", key, "annotation without image entry / file_name")
        if n_segments == 0:
            raise self._bad("no_masks", key)
        img_bytes = _read_path(self, self.image_dir, image_file, key)
        png_bytes = _read_path(self, self.png_dir, png_file, key)
        return self._panoptic_record(key, img_bytes, png_bytes)


class _InstancesRecords:
    """An instances JSON indexed per image (``_load_instances``) and image bytes + that image's
    annotations -> a seg record (``_instances_record``); shared by ``coco_instances`` (files) and
    ``tfds`` (images from ArrayRecord: TFDS's ``coco/2017`` keeps boxes, not masks). Needs ``by``,
    ``crowd``, ``seed``, ``background``, ``max_pixels``, ``max_side``."""
    by: str
    crowd: bool
    seed: int
    background: tuple[int, int, int]
    max_pixels: int
    max_side: int | None

    def _load_instances(self, json_path: str) -> list[tuple]:
        """The JSON's images as ``(id, file_name, height, width, annotations as JSON text)``, in
        file order; sets the category colours (``by='category'``)."""
        try:
            from pycocotools import mask as _  # noqa: F401
        except ImportError:
            raise ImportError("COCO instances need pycocotools (pip install -r requirements.txt)")
        meta = fileio.read_json(json_path)
        if not isinstance(meta, dict) or "images" not in meta or "annotations" not in meta:
            raise ValueError(f"{json_path}: not a COCO instances JSON (needs 'images' and "
                             f"'annotations')")
        per_image: dict[Any, list] = collections.defaultdict(list)
        for a in meta["annotations"]:
            if not self.crowd and a.get("iscrowd", 0):
                continue
            per_image[a.get("image_id")].append(
                [a.get("segmentation"), a.get("category_id", 0), a.get("id"), a.get("bbox")])
        self._cat_names = {c["id"]: str(c.get("name", c["id"])) for c in meta.get("categories", [])}
        cats = sorted({c["id"] for c in meta.get("categories", [])} |
                      {a[1] for anns in per_image.values() for a in anns})
        self._cat_index = {c: j for j, c in enumerate(cats)}
        self._cat_colors = render.distinct_colors(len(cats), render.render_seed(self.seed, "categories"),
                                                  background=self.background)
        return [(im.get("id"), im.get("file_name"), im.get("height"), im.get("width"),
                 json.dumps(per_image.get(im.get("id"), []), separators=(",", ":")))
                for im in meta["images"]]

    def _instances_masks(self, key: str, jh, jw, anns_json: str, img_bytes: bytes):
        """(h, w), the decoded masks, their category ids and JSON boxes (x, y, w, h)."""
        h, w = _image_size_or_bad(self, img_bytes, key)
        if (jh, jw) != (h, w):
            raise self._bad("bad_annotation", key, f"JSON size {jh}x{jw} != image {h}x{w}")
        masks, cats, boxes = [], [], []
        try:
            for seg, cat, _, box in json.loads(anns_json):
                masks.append(decode_segmentation(seg, h, w))
                cats.append(cat)
                boxes.append([float(v) for v in box] if isinstance(box, list) and len(box) == 4
                             else None)
        except Exception as e:  # noqa: BLE001 -- pycocotools raises assorted types
            raise self._bad("bad_annotation", key, f"{type(e).__name__}: {e}") from None
        return (h, w), masks, cats, boxes

    def _instances_scene(self, key: str, jh, jw, anns_json: str, img_bytes: bytes) -> dict:
        """A scene record (the proxy tasks' contract, ``records.py``): the image, each
        annotation's mask (bool, resized like the image: nearest), category id and name, box
        (COCO x, y, w, h in the output pixels; from the mask where the JSON has none)."""
        (h, w), masks, cats, boxes = self._instances_masks(key, jh, jw, anns_json, img_bytes)
        oh, ow = _fit_size(h, w, self.max_side)
        image, _ = self._decode(img_bytes, key, max_pixels=self.max_pixels, out_hw=(oh, ow))
        sy, sx = oh / h, ow / w
        out_boxes = []
        for m, b in zip(masks, boxes):
            if b is None:
                b = [float(v) for v in render.mask_bbox(m)]
            out_boxes.append([b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy])
        if (oh, ow) != (h, w):
            masks = [render.resize_labels(m, (oh, ow)) for m in masks]
        return {"task": "scene", "id": key, "key": key, "image": image,
                "masks": [np.asarray(m, bool) for m in masks], "label_ids": [int(c) for c in cats],
                "labels": [self._cat_names.get(c, str(c)) for c in cats],
                "isthing": [True] * len(masks),
                "boxes": np.asarray(out_boxes, np.float32).reshape(-1, 4)}

    def _instances_record(self, key: str, image_id, jh, jw, anns_json: str,
                          img_bytes: bytes) -> dict:
        (h, w), masks, cats, _ = self._instances_masks(key, jh, jw, anns_json, img_bytes)
        oh, ow = _fit_size(h, w, self.max_side)
        image, _ = self._decode(img_bytes, key, max_pixels=self.max_pixels, out_hw=(oh, ow))
        if self.by == "instance":
            target = render.render_masks(masks, (h, w), seed=self.seed, image_id=image_id,
                                         background=self.background, out_hw=(oh, ow))
        else:
            merged: dict[int, np.ndarray] = {}
            for m, c in zip(masks, cats):
                merged[c] = merged[c] | (m != 0) if c in merged else (m != 0)
            order_cats = list(merged)
            labels, order = render.label_map([merged[c] for c in order_cats], (h, w))
            if (oh, ow) != (h, w):
                labels = render.resize_labels(labels, (oh, ow))
            colors = np.stack([self._cat_colors[self._cat_index[order_cats[j]]] for j in order])
            target = render.colorize(labels, colors, self.background)
        return _seg_record(key, image, target)


class CocoInstancesSource(_InstancesRecords, _Source):
    """COCO instances JSON (polygons / RLE / crowd RLE) -> seg, masks via pycocotools.

    ``by='instance'``: every annotation is a mask, rendered like SA-1B (class-agnostic).
    ``by='category'``: masks of a category are merged and coloured with one colour per category,
    fixed for the run (semantic target). Crowd annotations are skipped unless ``crowd=True``.
    """
    name = "coco_instances"
    options = SEG_OPTIONS | SUBSET_OPTIONS | {"background", "by", "crowd"}
    usage = "coco_instances:/ann/instances_train2017.json::/train2017"

    @classmethod
    def from_spec(cls, spec: Spec) -> "CocoInstancesSource":
        kw = {**spec.seg(), **spec.background(), **spec.subset()}
        js, img_dir = spec.paths(2, 2)
        return cls(js, img_dir, seed=spec.seed, by=spec.opts.get("by", "instance"),
                   crowd=spec.flag("crowd"), **kw)

    def __init__(self, json_path: str, image_dir: str, *, seed: int = 0, by: str = "instance",
                 crowd: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_side: int | None = None, background: Sequence[int] = (0, 0, 0),
                 subset: int | None = None, subset_seed: int = 0):
        if by not in ("instance", "category"):
            raise ValueError(f"by must be 'instance' or 'category', got {by!r}")
        self.json_path, self.image_dir, self.seed, self.by = json_path, image_dir, int(seed), by
        self.crowd, self.max_pixels, self.max_side = bool(crowd), int(max_pixels), max_side
        self.background = tuple(int(c) for c in background)
        images = self._load_instances(json_path)
        keep = subset_ids([im[0] for im in images], subset, subset_seed)
        self._images = [im for im in images if im[0] in keep]
        self._keys = [os.path.splitext(im[1] or "")[0] or f"img{im[0]}" for im in self._images]

    def _describe(self) -> str:
        return f"json={self.json_path!r}, by={self.by!r}, crowd={self.crowd}, max_side={self.max_side}"

    def _load(self, i):
        i = self._index(i)
        key = self._keys[i]
        image_id, file_name, jh, jw, anns_json = self._images[i]
        if anns_json == "[]":
            raise self._bad("no_masks", key)
        return key, image_id, jh, jw, anns_json, _read_path(self, self.image_dir, file_name or "", key)

    def __getitem__(self, i) -> dict:
        key, image_id, jh, jw, anns_json, img_bytes = self._load(i)
        return self._instances_record(key, image_id, jh, jw, anns_json, img_bytes)

    def scene(self, i) -> dict:
        """The proxy tasks' scene record of image ``i`` (``_instances_scene``)."""
        key, _, jh, jw, anns_json, img_bytes = self._load(i)
        return self._instances_scene(key, jh, jw, anns_json, img_bytes)
