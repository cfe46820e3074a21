"""A prepared TFDS dataset (ArrayRecord, random access) -> seg records: COCO 2017 panoptic and
instances, or any dataset with an image and a pre-rendered target image.

    tfds:NAME:SPLIT[?data_dir=DIR&version=V&max_pixels=N&max_side=N
                    &colors=coco|render                        (panoptic)
                    &instances=JSON&by=instance|category&crowd=0|1&background=R,G,B   (instances)
                    &target=FEATURE                            (any other target image)
                    &subset=N&subset_seed=S]                   (N images, as coco.py's)

    tfds:coco/2017_panoptic:train?data_dir=/tfds                   COCO panoptic
    tfds:coco/2017:train?data_dir=/tfds&instances=/ann/instances_train2017.json

Read with ``tfds.data_source`` (Grain's random access over the ArrayRecord files): the JPEG and
PNG bytes come out undecoded (``tfds.decode.SkipDecoding``) and are decoded, checked and rendered
by the same code as the COCO-JSON reader (``coco.py``), so both give the same records (same
keys, same image and target bytes) for the same images. TFDS's ``coco/2017`` keeps boxes and
labels but no masks: ``instances=`` names the COCO instances JSON whose polygons / RLE are
joined to the TFDS images by ``image/id``.

Reading needs no TensorFlow: the dataset is opened from its prepared files (``NAME:VERSION``,
``version`` default ``*.*.*`` = the newest prepared; TFDS loads a versioned name from its files,
not from the dataset's code, which imports TensorFlow). Preparing the dataset (``tfds build
coco/2017_panoptic --file_format=array_record``) runs TFDS's COCO code and needs TensorFlow, once,
on any machine (docs/data_sources.md). ``data_dir`` must be a local (or mounted) directory.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading

import numpy as np
from PIL import Image

from sgt_jax.data.sources.base import (SEG_OPTIONS, SUBSET_OPTIONS, Spec, _image_size_or_bad,
                                       _seg_record, _Source, subset_ids)
from sgt_jax.data.sources.cache import _cache_put, _cached
from sgt_jax.data.sources.coco import _InstancesRecords, _PanopticRecords
from sgt_jax.data.sources.images import DEFAULT_MAX_PIXELS, _fit_size


def _text(v) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


class TfdsSource(_PanopticRecords, _InstancesRecords, _Source):
    """A prepared TFDS dataset read through ``tfds.data_source`` (ArrayRecord random access).

    Mode ``instances`` (``instances=JSON``): masks from the JSON, images from TFDS (``image``,
    ``image/id``, ``image/filename``), as ``coco_instances``. Mode ``panoptic`` (the target
    feature is ``panoptic_image``, the default): as ``coco_panoptic``, segments counted from
    ``panoptic_objects``. Mode ``target``: ``target=FEATURE`` is a pre-rendered colour target.
    """
    name = "tfds"
    options = SEG_OPTIONS | SUBSET_OPTIONS | {"data_dir", "version", "target", "colors",
                                              "instances", "by", "crowd", "background"}
    usage = "tfds:coco/2017_panoptic:train?data_dir=/tfds"

    @classmethod
    def from_spec(cls, spec: Spec) -> "TfdsSource":
        name, _, split = spec.body.partition(":")
        if not name or not split:
            raise spec.error("tfds needs NAME:SPLIT")
        kw = {k: spec.opts[k] for k in ("data_dir", "version", "target", "colors", "instances",
                                         "by") if k in spec.opts}
        if "crowd" in spec.opts:
            kw["crowd"] = spec.flag("crowd")
        return cls(name, split, seed=spec.seed, cache_dir=spec.cache_dir, **kw, **spec.seg(),
                   **spec.background(), **spec.subset())

    def __init__(self, dataset: str, split: str, *, data_dir: str | None = None,
                 version: str = "*.*.*", target: str = "panoptic_image", seed: int = 0,
                 colors: str = "coco", instances: str | None = None, by: str = "instance",
                 crowd: bool = False, background=(0, 0, 0),
                 max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int | None = None,
                 subset: int | None = None, subset_seed: int = 0, cache_dir: str | None = None):
        try:
            import tensorflow_datasets  # noqa: F401
        except ImportError:
            raise ImportError("tfds sources need tensorflow_datasets (pip install -r "
                              "requirements.txt) and a prepared copy of the dataset") from None
        if colors not in ("coco", "render"):
            raise ValueError(f"colors must be 'coco' or 'render', got {colors!r}")
        if by not in ("instance", "category"):
            raise ValueError(f"by must be 'instance' or 'category', got {by!r}")
        self.dataset, self.split, self.version = dataset, split, version
        self.data_dir = os.path.expanduser(data_dir) if data_dir else None
        self.target, self.seed, self.colors, self.by, self.crowd = target, int(seed), colors, by, crowd
        self.background = tuple(int(c) for c in background)
        self.max_pixels, self.max_side = int(max_pixels), max_side
        self.instances = instances
        self.mode = ("instances" if instances else
                     "panoptic" if target == "panoptic_image" else "target")
        # the image features read as encoded bytes (decoded by the COCO readers' code)
        self._encoded = {"instances": ("image",), "panoptic": ("image", "panoptic_image"),
                         "target": ("image", target)}[self.mode]
        self._lock = threading.Lock()
        self._ds = None
        try:
            ds = self._source()
        except Exception as e:  # noqa: BLE001 -- tfds raises its own types
            msg = str(e).splitlines()[0] if str(e) else ""
            raise ValueError(
                f"no prepared TFDS dataset {dataset}:{version} split {split!r} under data_dir="
                f"{self.data_dir or '(TFDS default)'} ({type(e).__name__}: {msg}); prepare the "
                f"dataset first: `tfds build {dataset} --file_format=array_record --data_dir=DIR` "
                f"(docs/data_sources.md)") from e
        feats = set(ds.dataset_info.features.keys())
        need = set(self._encoded) | ({"image/id"} if self.mode == "instances" else set())
        if not need <= feats:
            raise ValueError(f"tfds {dataset}:{split} ({self.mode}) needs features {sorted(need)}, "
                             f"has {sorted(feats)}" + ("; COCO instances: tfds:coco/2017:SPLIT?"
                                                       "instances=JSON" if self.mode != "instances"
                                                       else ""))
        self._by_id: dict = {}
        if instances:
            for im in self._load_instances(instances):
                self._by_id[im[0]] = im
        self._rows: list[int] | None = None        # the TFDS indexes a subset keeps
        if subset is not None:
            if "image/id" not in feats:
                raise ValueError(f"subset= needs an 'image/id' feature; {dataset} has {sorted(feats)}")
            ids = self._record_ids(ds, cache_dir)
            keep = subset_ids(ids, subset, subset_seed)
            self._rows = [j for j, v in enumerate(ids) if v in keep]
        self.subset, self.subset_seed = subset, subset_seed
        self._keys = range(len(ds) if self._rows is None else len(self._rows))

    def _record_ids(self, ds, cache_dir: str | None) -> list[int]:
        """``image/id`` of every record, in TFDS order: one pass over the split (the JPEG bytes
        are read, not decoded), cached in ``cache_dir`` (``WORKDIR/index_cache``) keyed by the
        prepared dataset's directory, version, split size and shard lengths."""
        info = ds.dataset_info
        split = info.splits[self.split]
        tag = hashlib.sha256(json.dumps([str(info.data_dir), str(info.version), self.split, len(ds),
                                         int(split.num_bytes), list(split.shard_lengths)])
                             .encode()).hexdigest()[:20]
        cache = os.path.join(cache_dir, f"tfds_ids_{tag}.json") if cache_dir else None
        if cache:
            hit = _cached([(cache_dir, cache)], json.loads, True)
            if isinstance(hit, list) and len(hit) == len(ds):
                return hit
        ids = []
        for lo in range(0, len(ds), 256):
            for ex in ds.__getitems__(range(lo, min(lo + 256, len(ds)))):
                ids.append(int(ex["image/id"]))
        if cache:
            _cache_put(cache_dir, cache, json.dumps(ids).encode())
        return ids

    def _source(self):
        """The ``tfds.data_source`` (opened once per process: not pickled)."""
        with self._lock:
            if self._ds is None:
                import tensorflow_datasets as tfds
                skip = {k: tfds.decode.SkipDecoding() for k in self._encoded}
                self._ds = tfds.data_source(f"{self.dataset}:{self.version}", split=self.split,
                                            data_dir=self.data_dir, decoders=skip)
            return self._ds

    def __getstate__(self):
        d = dict(self.__dict__)
        d.pop("_lock")
        d["_ds"] = None
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._lock = threading.Lock()

    def _describe(self) -> str:
        extra = (f", instances={self.instances!r}, by={self.by!r}, crowd={self.crowd}"
                 if self.mode == "instances" else f", target={self.target!r}, colors={self.colors!r}")
        return (f"{self.dataset}:{self.version}:{self.split}, data_dir={self.data_dir!r}, "
                f"mode={self.mode}{extra}, max_side={self.max_side}, subset={self.subset}")

    def key(self, i: int) -> str:
        """The record key (the file name's stem, as the COCO-JSON readers key): read from the
        example, so one read."""
        i = self._row(i)
        try:
            ex = self._source()[i]
        except Exception:  # noqa: BLE001
            return f"{self.dataset}:{self.split}:{i}"
        fname = ex.get("panoptic_image/filename" if self.mode == "panoptic" else "image/filename")
        return os.path.splitext(_text(fname))[0] if fname else f"{self.dataset}:{self.split}:{i}"

    def _row(self, i) -> int:
        i = self._index(i)
        return i if self._rows is None else self._rows[i]

    def _example(self, i) -> tuple[str, dict]:
        i = self._row(i)
        key = f"{self.dataset}:{self.split}:{i}"
        try:
            ex = self._source()[i]
        except Exception as e:  # noqa: BLE001 -- ArrayRecord / proto errors
            raise self._bad("read_error", key, f"{type(e).__name__}: {e}") from None
        if not isinstance(ex.get("image"), bytes):
            raise self._bad("corrupt_image", key, "no encoded 'image' in the example")
        if "image/filename" in ex:
            key = os.path.splitext(_text(ex["image/filename"]))[0] or key
        return key, ex

    def _instances(self, key: str, ex: dict) -> tuple:
        image_id = int(ex["image/id"])
        im = self._by_id.get(image_id)
        if im is None:
            raise self._bad("bad_annotation", key, f"image/id {image_id} is not in {self.instances}")
        _, _, jh, jw, anns_json = im
        if anns_json == "[]":
            raise self._bad("no_masks", key)
        return image_id, jh, jw, anns_json

    def __getitem__(self, i) -> dict:
        key, ex = self._example(i)
        if self.mode == "instances":
            image_id, jh, jw, anns_json = self._instances(key, ex)
            return self._instances_record(key, image_id, jh, jw, anns_json, ex["image"])
        if self.mode == "panoptic":
            if "panoptic_image/filename" in ex:    # the COCO-JSON reader keys by the PNG's name
                key = os.path.splitext(_text(ex["panoptic_image/filename"]))[0] or key
            objects = ex.get("panoptic_objects")
            if isinstance(objects, dict) and len(objects.get("id", ())) == 0:
                raise self._bad("no_masks", key)
            return self._panoptic_record(key, ex["image"], ex["panoptic_image"])
        return self._target_record(key, ex["image"], ex[self.target])

    def scene(self, i) -> dict:
        """The proxy tasks' scene record (masks, category ids and names, boxes: as
        ``coco_instances``'s) in the instances mode; the seg record in the others."""
        if self.mode != "instances":
            return self[i]
        key, ex = self._example(i)
        _, jh, jw, anns_json = self._instances(key, ex)
        return self._instances_scene(key, jh, jw, anns_json, ex["image"])

    def _target_record(self, key: str, img_bytes: bytes, target) -> dict:
        h, w = _image_size_or_bad(self, img_bytes, key)
        oh, ow = _fit_size(h, w, self.max_side)
        image, _ = self._decode(img_bytes, key, max_pixels=self.max_pixels, out_hw=(oh, ow))
        if isinstance(target, bytes):
            target, (th, tw) = self._decode(target, key, max_pixels=self.max_pixels,
                                            composite=False)
        else:
            target = np.asarray(target, np.uint8)
            if target.ndim == 2 or (target.ndim == 3 and target.shape[-1] == 1):
                target = np.repeat(target.reshape(*target.shape[:2], 1), 3, -1)
            th, tw = target.shape[:2]
        if (th, tw) != (h, w) or target.ndim != 3:
            raise self._bad("bad_annotation", key, f"image {h}x{w} vs target {target.shape}")
        if (oh, ow) != (h, w):
            target = np.asarray(Image.fromarray(target).resize((ow, oh), Image.NEAREST))
        return _seg_record(key, image, np.ascontiguousarray(target))
