"""Pre-rendered SGT pairs: an image + a colour-mask PNG with the same key -> seg records.

    sgt_pairs:PATHS[?mask_suffix=.png&image_dir=sam_selection&mask_dir=sam_mask
                    &image_exts=.jpg,.jpeg,.webp&list=FILE&max_pixels=N&max_side=N
                    &subset=N&subset_seed=S]

Released SAM-SGT layout ``sam_selection/X.jpg`` + ``sam_mask/X.png``; flat layout ``X.jpg`` +
``X.png``, or ``X_mask.png`` with ``mask_suffix=_mask.png``. ``list=FILE`` keeps only the stems
listed there (e.g. ``file_names/sam_190k_new.txt``). ``subset=N``: the N keys
``base.subset_ids`` ranks first (nested across N: the data-scaling sweep of the paper's Fig. 5b).
"""
from __future__ import annotations

import os
from collections.abc import Sequence

from PIL import Image

from sgt_jax import fileio
from sgt_jax.data.sources.base import (SEG_OPTIONS, SUBSET_OPTIONS, Spec, _image_size_or_bad,
                                       _seg_record, _Source, subset_ids)
from sgt_jax.data.sources.files import FileSet, _KeyedFiles, _strip_ext, _tar_targets, expand_paths
from sgt_jax.data.sources.images import DEFAULT_MAX_PIXELS, _fit_size


class SgtPairsSource(_Source):
    """Pre-rendered SGT pairs: an RGB image and a colour-mask PNG under the same key -> seg.

    Layouts (folders or tar shards, pairing is global across shards):
      * released SAM-SGT: ``.../sam_selection/X.jpg`` + ``.../sam_mask/X.png`` (``image_dir`` /
        ``mask_dir`` name the two directory components that are dropped from the key);
      * flat: ``X.jpg`` + ``X<mask_suffix>`` (``.png`` by default, e.g. ``_mask.png``).
    The mask is resized to the image size with nearest neighbour if they differ (SGT resizes it
    with PIL's default bicubic, which blends colours at boundaries: documented deviation).
    """
    name = "sgt_pairs"
    options = SEG_OPTIONS | SUBSET_OPTIONS | {"mask_suffix", "image_dir", "mask_dir", "image_exts",
                                              "list"}
    usage = "sgt_pairs:/path/SAM-SGT[?mask_suffix=.png]"

    @classmethod
    def from_spec(cls, spec: Spec) -> "SgtPairsSource":
        seg, opts = spec.seg(), spec.opts
        if not spec.body:
            raise spec.error("no path")
        kw = {k: opts[k] for k in ("mask_suffix", "image_dir", "mask_dir") if k in opts}
        if "image_exts" in opts:
            kw["image_exts"] = tuple(opts["image_exts"].split(","))
        if "list" in opts:
            kw["list_file"] = opts["list"]
        return cls(expand_paths(spec.body), cache_dir=spec.cache_dir, **kw, **seg, **spec.subset())

    @classmethod
    def index_targets(cls, spec: Spec) -> list[tuple[str, str]]:
        return _tar_targets(spec.body)

    def __init__(self, paths: Sequence[str], *, mask_suffix: str = ".png",
                 image_dir: str | None = "sam_selection", mask_dir: str | None = "sam_mask",
                 image_exts: Sequence[str] = (".jpg", ".jpeg", ".webp"),
                 list_file: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_side: int | None = None, cache_dir: str | None = None,
                 subset: int | None = None, subset_seed: int = 0):
        self.paths, self.mask_suffix = list(paths), mask_suffix.lower()
        self.image_dir, self.mask_dir = image_dir or None, mask_dir or None
        self.image_exts = tuple(e.lower() if e.startswith(".") else "." + e.lower()
                                for e in image_exts)
        if self.mask_suffix in self.image_exts:
            raise ValueError(f"mask_suffix {mask_suffix!r} is also an image extension: use "
                             f"another mask_suffix (e.g. _mask.png) or image_exts")
        self.max_pixels, self.max_side = int(max_pixels), max_side
        keep = None
        if list_file:
            keep = {os.path.splitext(os.path.basename(ln.strip()))[0]
                    for ln in fileio.read_text(list_file).splitlines() if ln.strip()}

        def drop_dir(parts: list[str], d: str | None) -> list[str] | None:
            if d is None or d not in parts[:-1]:
                return None
            j = len(parts) - 2 - parts[:-1][::-1].index(d)
            return parts[:j] + parts[j + 1:]

        def classify(name: str):
            parts = name.split("/")
            in_mask = drop_dir(parts, self.mask_dir)
            in_image = drop_dir(parts, self.image_dir)
            if in_mask is not None:
                stem = _strip_ext("/".join(in_mask), (self.mask_suffix,))
                kr = (stem, "mask") if stem is not None else None
            elif in_image is not None:
                stem = _strip_ext("/".join(in_image), self.image_exts)
                kr = (stem, "image") if stem is not None else None
            else:
                stem = _strip_ext(name, (self.mask_suffix,))
                if stem is not None:
                    kr = (stem, "mask")
                else:
                    stem = _strip_ext(name, self.image_exts)
                    kr = (stem, "image") if stem is not None else None
            if kr is not None and keep is not None and kr[0].rsplit("/", 1)[-1] not in keep:
                return None
            return kr

        self._kf = _KeyedFiles(FileSet(self.paths, cache_dir=cache_dir), classify,
                               ("image", "mask"), required="image", source=self.name)
        self._rows = None                  # the pairs a subset keeps (indexes into self._kf)
        self._keys = self._kf.keys
        if subset is not None:
            keep = subset_ids(self._kf.keys, subset, subset_seed)
            self._rows = [j for j, k in enumerate(self._kf.keys) if k in keep]
            self._keys = [self._kf.keys[j] for j in self._rows]

    def _describe(self) -> str:
        return (f"paths={self.paths!r}, mask_suffix={self.mask_suffix!r}, "
                f"image_dir={self.image_dir!r}, mask_dir={self.mask_dir!r}, max_side={self.max_side}")

    def __getitem__(self, i) -> dict:
        i = self._index(i)
        key, kf = self._keys[i], self._kf
        if self._rows is not None:
            i = self._rows[i]
        img_bytes = self._read(kf.files, kf.refs["image"][i], key, "image")
        mask_bytes = self._read(kf.files, kf.refs["mask"][i], key, "colour-mask")
        h, w = _image_size_or_bad(self, img_bytes, key)
        oh, ow = _fit_size(h, w, self.max_side)
        image, _ = self._decode(img_bytes, key, max_pixels=self.max_pixels, out_hw=(oh, ow))
        target, _ = self._decode(mask_bytes, key, max_pixels=self.max_pixels, out_hw=(oh, ow),
                                 composite=False, resample=Image.NEAREST)
        return _seg_record(key, image, target)

