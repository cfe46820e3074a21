"""A prepared TFDS dataset (ArrayRecord random access) -> seg records.

    tfds:NAME:SPLIT[?data_dir=DIR&target=FEATURE&max_side=N]

Needs an ``image`` and a target image feature (``target``, default ``panoptic_image``: e.g.
``tfds:coco/2017_panoptic:train``) and ``tensorflow_datasets`` (not a dependency).
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from sgt_jax.data.sources.base import Spec, _seg_record, _Source
from sgt_jax.data.sources.images import _fit_size


class TfdsSource(_Source):
    """A prepared TFDS dataset read through ``tfds.data_source`` (ArrayRecord random access).

    Records with an ``image`` feature and a target image feature (``panoptic_image`` by default:
    ``coco/2017_panoptic``) become seg records. Needs ``tensorflow_datasets`` (not a dependency).
    """
    name = "tfds"
    options = frozenset({"data_dir", "target", "max_side"})
    usage = "tfds:coco/2017_panoptic:train[?data_dir=/tfds]"

    @classmethod
    def from_spec(cls, spec: Spec) -> "TfdsSource":
        seg = spec.seg()
        name, _, split = spec.body.partition(":")
        if not name or not split:
            raise spec.error("tfds needs NAME:SPLIT")
        kw = {k: spec.opts[k] for k in ("data_dir", "target") if k in spec.opts}
        try:
            return cls(name, split, **kw, **seg)
        except ImportError:
            raise
        except Exception as e:  # noqa: BLE001 -- tfds raises its own types
            raise spec.error(f"{type(e).__name__}: {e}; prepare the dataset first (`tfds build "
                             f"{name}` or download_and_prepare into data_dir)") from e

    def __init__(self, dataset: str, split: str, *, data_dir: str | None = None,
                 target: str = "panoptic_image", max_side: int | None = None):
        try:
            import tensorflow_datasets as tfds
        except ImportError:
            raise ImportError("tfds sources need tensorflow_datasets (pip install "
                              "tensorflow-datasets) and a prepared copy of the dataset") from None
        self.dataset, self.split, self.data_dir = dataset, split, data_dir
        self.target, self.max_side = target, max_side
        self._ds = tfds.data_source(dataset, split=split, data_dir=data_dir)
        self._keys = range(len(self._ds))

    def _describe(self) -> str:
        return f"{self.dataset}:{self.split}, target={self.target!r}"

    def __getitem__(self, i) -> dict:
        i = self._index(i)
        key = f"{self.dataset}:{self.split}:{i}"
        try:
            ex = self._ds[i]
        except Exception as e:  # noqa: BLE001
            raise self._bad("read_error", key, f"{type(e).__name__}: {e}") from None
        if "image" not in ex or self.target not in ex:
            raise self._bad("unsupported", key, f"needs features 'image' and {self.target!r}, "
                                                f"has {sorted(ex)}")
        fname = ex.get("image/filename")
        if isinstance(fname, bytes):
            key = os.path.splitext(fname.decode())[0]
        image, target = np.asarray(ex["image"], np.uint8), np.asarray(ex[self.target], np.uint8)
        if image.ndim != 3 or target.shape[:2] != image.shape[:2]:
            raise self._bad("bad_annotation", key, f"image {image.shape} vs target {target.shape}")
        if target.ndim == 2 or target.shape[-1] == 1:
            target = np.repeat(target.reshape(*target.shape[:2], 1), 3, -1)
        h, w = image.shape[:2]
        oh, ow = _fit_size(h, w, self.max_side)
        if (oh, ow) != (h, w):
            image = np.asarray(Image.fromarray(image).resize((ow, oh), Image.BICUBIC))
            target = np.asarray(Image.fromarray(target).resize((ow, oh), Image.NEAREST))
        return _seg_record(key, np.ascontiguousarray(image), np.ascontiguousarray(target))

