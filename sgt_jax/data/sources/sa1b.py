"""Raw SA-1B: ``sa_*.jpg`` + ``sa_*.json`` (COCO RLE masks), in folders or tar shards -> seg
records with a rendered target.

    sa1b:PATHS[?max_pixels=N&max_side=N&background=R,G,B]

``background``: the colour of unlabelled pixels (default 0,0,0); ``max_side``: downscale image and
target so the long side <= N (target by nearest neighbour, colours stay exact).
"""
from __future__ import annotations

import json
from collections.abc import Sequence

from sgt_jax.data import render
from sgt_jax.data.sources.base import SEG_OPTIONS, Spec, _image_size_or_bad, _seg_record, _Source
from sgt_jax.data.sources.files import FileSet, _KeyedFiles, _strip_ext, _tar_targets, expand_paths
from sgt_jax.data.sources.images import DEFAULT_MAX_PIXELS, _fit_size


class SA1BSource(_Source):
    """Raw SA-1B: ``X.jpg`` + ``X.json`` (SA-1B per-image JSON, COCO RLE masks) -> seg records.

    The target is rendered by ``render.render_masks`` (largest first, distinct colours, seed from
    ``(seed, image.image_id)``; the key when the JSON has no image id).
    """
    name = "sa1b"
    options = SEG_OPTIONS | {"background"}
    usage = "sa1b:/path/dir_or_tar[,more][?max_side=1024]"

    @classmethod
    def from_spec(cls, spec: Spec) -> "SA1BSource":
        kw = {**spec.seg(), **spec.background()}
        if not spec.body:
            raise spec.error("no path")
        return cls(expand_paths(spec.body), seed=spec.seed, cache_dir=spec.cache_dir, **kw)

    @classmethod
    def index_targets(cls, spec: Spec) -> list[tuple[str, str]]:
        return _tar_targets(spec.body)

    def __init__(self, paths: Sequence[str], *, seed: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_side: int | None = None, background: Sequence[int] = (0, 0, 0),
                 cache_dir: str | None = None):
        self.paths, self.seed = list(paths), int(seed)
        self.max_pixels, self.max_side = int(max_pixels), max_side
        self.background = tuple(int(c) for c in background)
        files = FileSet(self.paths, cache_dir=cache_dir)

        def classify(name: str):
            stem = _strip_ext(name, (".jpg", ".jpeg"))
            if stem is not None:
                return stem, "image"
            stem = _strip_ext(name, (".json",))
            return (stem, "ann") if stem is not None else None

        self._kf = _KeyedFiles(files, classify, ("image", "ann"), required="image", source=self.name)
        self._keys = self._kf.keys

    def _describe(self) -> str:
        return f"paths={self.paths!r}, seed={self.seed}, max_side={self.max_side}"

    def __getitem__(self, i) -> dict:
        key, info, rles, (h, w), image, (oh, ow), _ = self._load(i)
        try:
            target = render.render_masks(rles, (h, w), seed=self.seed,
                                         image_id=info.get("image_id", key),
                                         background=self.background, out_hw=(oh, ow))
        except (ValueError, TypeError) as e:
            raise self._bad("bad_annotation", key, str(e)) from None
        return _seg_record(key, image, target)

    def scene(self, i) -> dict:
        """A scene record (``records.py``) for the proxy tasks: the image and its masks as bool
        arrays (resized like the image, nearest), all things, class id 0."""
        return self._scene(i)[0]

    def image_record(self, i) -> dict:
        """The image alone (no mask decoding): what the image-only proxy tasks read."""
        key, info, _, _, image, _, _ = self._load(i)
        return {"task": "scene", "id": str(info.get("image_id", key)), "key": key, "image": image}

    def _scene(self, i) -> tuple[dict, dict]:
        key, info, rles, (h, w), image, (oh, ow), meta = self._load(i)
        try:
            masks = [render.rle_decode(r) if isinstance(r, dict) else None for r in rles]
            if any(m is None or m.shape != (h, w) for m in masks):
                raise ValueError("a mask is not a COCO RLE of the image size")
        except (ValueError, TypeError, KeyError) as e:
            raise self._bad("bad_annotation", key, str(e)) from None
        if (oh, ow) != (h, w):
            masks = [render.resize_labels(m, (oh, ow)) for m in masks]
        masks = [m.astype(bool) for m in masks]
        return {"task": "scene", "id": str(info.get("image_id", key)), "key": key, "image": image,
                "masks": masks,
                "label_ids": [0] * len(masks), "isthing": [True] * len(masks),
                "labels": ["object"] * len(masks)}, meta

    def _load(self, i):
        i = self._index(i)
        key, kf = self._keys[i], self._kf
        img_bytes = self._read(kf.files, kf.refs["image"][i], key, "image")
        ann_bytes = self._read(kf.files, kf.refs["ann"][i], key, "annotation (.json)")
        try:
            meta = json.loads(ann_bytes)
            info = meta.get("image", {}) if isinstance(meta, dict) else None
            anns = meta.get("annotations") if isinstance(meta, dict) else None
            if not isinstance(info, dict) or not isinstance(anns, list):
                raise ValueError("expected {'image': {...}, 'annotations': [...]}")
            rles = [a["segmentation"] for a in anns]
        except (ValueError, KeyError, TypeError, RecursionError) as e:   # JSONDecodeError: ValueError
            raise self._bad("bad_annotation", key, f"{type(e).__name__}: {e}") from None
        h, w = _image_size_or_bad(self, img_bytes, key)
        if ("height" in info and "width" in info) and (info["height"], info["width"]) != (h, w):
            raise self._bad("bad_annotation", key, f"JSON image size {info['height']}x"
                                                   f"{info['width']} != image {h}x{w}")
        if not rles:
            raise self._bad("no_masks", key)
        oh, ow = _fit_size(h, w, self.max_side)
        image, _ = self._decode(img_bytes, key, max_pixels=self.max_pixels, out_hw=(oh, ow))
        return key, info, rles, (h, w), image, (oh, ow), meta

