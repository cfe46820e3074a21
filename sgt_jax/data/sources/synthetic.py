"""The built-in synthetic scenes (``sgt_jax.data.synthetic``), generated on first use, read as
SA-1B (seg) or as LLaVA-format VQA about the same scenes (``DIR/vqa.jsonl``).

    synthetic_seg:[DIR][?n=N&gen_seed=S&size=LO-HI&shapes=LO-HI&background=R,G,B&max_pixels=N&max_side=N]
    synthetic_vqa:[DIR][?n=N&gen_seed=S&size=LO-HI&shapes=LO-HI&max_pixels=N]

DIR defaults to WORKDIR/synthetic; a finished DIR is used as it is unless generation options are
given (then they must match what DIR holds). Defaults: n=1000 images, gen_seed=0, size=64-128,
shapes=1-6. The scenes depend on ``gen_seed`` only, not on the run seed.
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np

from sgt_jax import fileio
from sgt_jax.data import synthetic as scenes
from sgt_jax.data.sources.base import SEG_OPTIONS, Kind, Spec, _parse_range
from sgt_jax.data.sources.llava import LlavaSource
from sgt_jax.data.sources.sa1b import SA1BSource

log = logging.getLogger(__name__)

GENERATION_OPTIONS = frozenset({"n", "gen_seed", "size", "shapes"})


def _synthetic_dir(out: str, gen: dict, *, given: bool) -> str:
    """The directory to read synthetic scenes from. A finished set there (its stamp) is used as it
    is unless generation options were given (then they must match). Otherwise the set is generated
    there -- or, for a URL, into the local cache (``fileio.local_cache_dir('synthetic', <key of the
    parameters>)``): generation is deterministic, so every host builds the same set locally, and
    nothing has to be uploaded or coordinated between hosts."""
    stamp = scenes.read_stamp(out)
    if stamp is not None and (not given or stamp == scenes.generation_params(**gen)):
        return out
    if not fileio.is_remote(out):
        scenes.ensure_generated(out, **gen)
        return out
    if stamp is not None:
        raise ValueError(f"{out} holds synthetic data generated with {stamp}, asked for "
                         f"{scenes.generation_params(**gen)}: use another directory")
    if fileio.listdir(out):
        raise ValueError(f"{out} is not empty and has no {scenes.STAMP_FILE}: it is not a "
                         f"synthetic data directory; choose an empty or new directory")
    params = scenes.generation_params(**gen)
    local = os.path.join(fileio.local_cache_dir("synthetic"),
                         fileio.url_key(json.dumps(params, sort_keys=True)))
    log.info("synthetic data for %s: generated locally in %s (a URL is not written to)", out, local)
    return scenes.ensure_generated(local, **gen)


def _scenes_dir(spec: Spec) -> str:
    out = (spec.body if fileio.is_remote(spec.body) else os.path.expanduser(spec.body)) \
        if spec.body else None
    if out is None:
        if not spec.workdir:
            raise spec.error("give a directory or a workdir")
        out = fileio.join(spec.workdir, "synthetic")
    gen = {"num_images": int(spec.opts.get("n", 1000)), "seed": int(spec.opts.get("gen_seed", 0))}
    if "size" in spec.opts:
        gen["size"] = _parse_range(spec.opts["size"], "size")
    if "shapes" in spec.opts:
        gen["num_shapes"] = _parse_range(spec.opts["shapes"], "shapes")
    return _synthetic_dir(out, gen, given=bool(GENERATION_OPTIONS & set(spec.opts)))


class SyntheticScenes(SA1BSource):
    """The generated scenes read as SA-1B (``__getitem__``: seg records, today's behaviour) and as
    scene records for every proxy task (``scene``): each shape a thing of its kind's class
    (``label_ids`` = index in ``synthetic.KINDS``), the background one stuff segment (class
    ``len(KINDS)``, named 'background'), ``depth`` from ``synthetic.scene_depth``."""

    def scene(self, i) -> dict:
        rec, meta = self._scene(i)
        info = (meta.get("synthetic") or {}).get("shapes") if isinstance(meta, dict) else None
        masks = rec["masks"]
        if not isinstance(info, list) or len(info) != len(masks):
            raise self._bad("bad_annotation", rec["id"], "no 'synthetic' block matching the masks")
        kinds = [str(p.get("kind")) for p in info]
        if any(k not in scenes.KINDS for k in kinds):
            raise self._bad("bad_annotation", rec["id"], f"unknown shape kinds {kinds}")
        h, w = rec["image"].shape[:2]
        background = ~np.logical_or.reduce(masks) if masks else np.ones((h, w), bool)
        rec.update(masks=masks + [background],
                   labels=kinds + ["background"],
                   label_ids=[scenes.KINDS.index(k) for k in kinds] + [len(scenes.KINDS)],
                   isthing=[True] * len(masks) + [False],
                   depth=scenes.scene_depth(masks, h, w))
        return rec


class SyntheticSeg(Kind):
    """``synthetic_seg``: a ``SyntheticScenes`` (an ``SA1BSource``) over the generated scenes."""
    name = "synthetic_seg"
    options = SEG_OPTIONS | {"background"} | GENERATION_OPTIONS
    usage = "synthetic_seg:[/dir][?n=1000&gen_seed=0&size=64-128]"

    @classmethod
    def from_spec(cls, spec: Spec) -> SA1BSource:
        kw = {**spec.seg(), **spec.background()}
        return SyntheticScenes([_scenes_dir(spec)], seed=spec.seed, cache_dir=spec.cache_dir, **kw)


class SyntheticVqa(Kind):
    """``synthetic_vqa``: a ``LlavaSource`` over ``DIR/vqa.jsonl``."""
    name = "synthetic_vqa"
    options = frozenset({"max_pixels"}) | GENERATION_OPTIONS
    usage = "synthetic_vqa:[/dir][?n=1000&gen_seed=0&size=64-128]"

    @classmethod
    def from_spec(cls, spec: Spec) -> LlavaSource:
        seg = spec.seg()
        out = _scenes_dir(spec)
        return LlavaSource(fileio.join(out, scenes.VQA_FILE), out, **seg)
