"""One target builder per proxy task of the SGT study (paper Sec. 3.3, Table 4, supplementary).

    pair = build(task, record, rng, seed=run_seed, index=stream_position)
    pair.input, pair.target, pair.instruction        # uint8 (H, W, 3), uint8 (H, W, 3), str

A builder is a pure function of the record and a ``numpy.random.Generator`` (the sample builder
hands it ``samples.sample_rng(seed, stream, index, n=4)[3]``: the same (seed, stream position)
gives the same bytes in every run, Grain worker and resume). The pair then goes through the
ordinary generation plan -- ViT(input), instruction (CFG), noised VAE(target) -- exactly like a
segmentation sample (``samples.SampleBuilder.proxy_items``).

A *scene record* (``records.py``) carries what the tasks need; every field but ``image`` is optional
and a task missing its field raises ``BadRecord`` (counted, skipped):

  image      uint8 (H, W, 3)                    every task
  masks      [bool (H, W), ...]                 segmentation (all variants), detection (boxes)
  labels     [str, ...] per mask                detection (the drawn names)
  label_ids  [int, ...] per mask                semantic / panoptic / detection colours
  isthing    [bool, ...] per mask (default all True): instance / SA-1B use things only,
             panoptic paints things per instance and stuff per class
  boxes      float (N, 4) COCO [x, y, w, h]     detection (else derived from the masks)
  depth      float (H, W), larger = nearer      depth (Depth Anything V2's relative inverse depth)
  target     uint8 (H, W, 3)                    a seg rendering made by the source (today's SA-1B /
             COCO records): used as is by the segmentation tasks when the record has no masks

Tasks (``TASKS``; the names the experiment presets use):
  high   semantic_seg, instance_seg, panoptic_seg, sa1b_seg, detection
  mid    edge (Canny 100 / 200), depth
  low    denoise, derain, dehaze, deblur_motion, deblur_defocus, lowlight, super_resolution,
         inpainting, reconstruction (RecA: target = input)
  mixed  panoptic_seg, reconstruction, edge in equal thirds: stream position mod 3 (exact thirds
         in every 3 consecutive samples, so at any total volume)
  a+b+.. one of the named tasks per sample, uniformly (the paper's "Derain-Dehaze" row:
         ``derain+dehaze``; its restoration mix: ``denoise+deblur_motion+lowlight``)

Colours: instance / SA-1B / panoptic segments get ``render.render_masks``'s distinct colours seeded
per (run seed, image id) -- today's renderer; semantic classes (and detection boxes) get one colour
per class id for the whole run (``class_palette``), so a class is the same colour in every image.
"""
from __future__ import annotations

import dataclasses
import functools

import cv2
import numpy as np

from sgt_jax.data import render
from sgt_jax.data.proxy import degrade
from sgt_jax.data.proxy.instructions import BY_TASK
from sgt_jax.data.records import BadRecord

SEG_TASKS = ("semantic_seg", "instance_seg", "panoptic_seg", "sa1b_seg")
LOW_LEVEL = ("denoise", "derain", "dehaze", "deblur_motion", "deblur_defocus", "lowlight",
             "super_resolution", "inpainting", "reconstruction")
MIXED = ("panoptic_seg", "reconstruction", "edge")
TASKS = SEG_TASKS + ("detection", "edge", "depth") + LOW_LEVEL + ("mixed",)


def check_task(task: str) -> None:
    """Raise ValueError unless ``task`` is a task of ``TASKS`` or ``a+b+..`` of them (not mixed)."""
    parts = task.split("+") if isinstance(task, str) else [task]
    if not all(p in TASKS for p in parts) or (len(parts) > 1 and "mixed" in parts):
        raise ValueError(f"{task!r} is not a proxy task: one of {', '.join(TASKS)}, or several "
                         "joined by '+' (one drawn per sample)")


@dataclasses.dataclass
class ProxyPair:
    input: np.ndarray            # uint8 (H, W, 3): the ViT condition
    target: np.ndarray           # uint8 (H, W, 3): the generation target
    instruction: str
    task: str                    # the task that built it ("mixed" resolves to its member)
    info: dict = dataclasses.field(default_factory=dict)   # what was drawn (factor, fill, ...)


# ------------------------------------------------------------------------------------------------
# record access

def _key(record: dict) -> str:
    return str(record.get("id", ""))


def _masks(record: dict, things_only: bool = False) -> tuple[list[np.ndarray], list[int], list[bool]]:
    masks = record.get("masks")
    if not masks:
        return [], [], []
    n = len(masks)
    ids = list(record.get("label_ids") or [0] * n)
    thing = list(record.get("isthing") or [True] * n)
    if len(ids) != n or len(thing) != n:
        raise BadRecord("bad_annotation", key=_key(record),
                        detail=f"{n} masks but {len(ids)} label_ids / {len(thing)} isthing")
    shape = record["image"].shape[:2]
    for m in masks:
        if np.shape(m) != shape:
            raise BadRecord("bad_annotation", key=_key(record),
                            detail=f"mask {np.shape(m)} != image {shape}")
    if things_only:
        keep = [i for i in range(n) if thing[i]]
        return [masks[i] for i in keep], [ids[i] for i in keep], [True] * len(keep)
    return list(masks), ids, thing


@functools.lru_cache(maxsize=16)
def _palette(seed: int, n: int) -> np.ndarray:
    return render.distinct_colors(n, render.render_seed(seed, "class-palette"))


def class_palette(seed: int, class_ids) -> np.ndarray:
    """One distinct colour per class id for the whole run (prefix-stable: colour k depends only on
    the seed and k), never the black background. Ids must be >= 0."""
    ids = np.asarray(class_ids, np.int64)
    if ids.size and ids.min() < 0:
        raise ValueError("class ids must be >= 0")
    n = 1 << max(6, int(ids.max() + 1 if ids.size else 1).bit_length())   # cache by power of two
    return _palette(int(seed), n)[ids]


# ------------------------------------------------------------------------------------------------
# high level

def _seg_passthrough(record: dict, task: str) -> np.ndarray:
    t = record.get("target")
    if t is None:
        raise BadRecord("no_masks", key=_key(record), detail=f"{task} needs masks or a target")
    return t


def render_instances(record: dict, seed: int, *, things_only: bool) -> np.ndarray:
    masks, _, _ = _masks(record, things_only=things_only)
    if not masks:
        return _seg_passthrough(record, "instance segmentation")
    return render.render_masks(masks, record["image"].shape[:2], seed=seed, image_id=_key(record))


def render_semantic(record: dict, seed: int) -> np.ndarray:
    """Masks merged per class id, each class painted in ``class_palette`` (largest class first)."""
    masks, ids, _ = _masks(record)
    if not masks:
        return _seg_passthrough(record, "semantic_seg")
    classes = sorted(set(ids))
    merged = [np.logical_or.reduce([m for m, c in zip(masks, ids) if c == k]) for k in classes]
    labels, order = render.label_map(merged, record["image"].shape[:2])
    colors = class_palette(seed, [classes[j] for j in order])
    return render.colorize(labels, colors)


def render_panoptic(record: dict, seed: int) -> np.ndarray:
    """Things one segment per instance, stuff one segment per class; distinct colours per image."""
    masks, ids, thing = _masks(record)
    if not masks:
        return _seg_passthrough(record, "panoptic_seg")
    segs = [m for m, t in zip(masks, thing) if t]
    stuff = sorted({c for c, t in zip(ids, thing) if not t})
    segs += [np.logical_or.reduce([m for m, c, t in zip(masks, ids, thing) if c == k and not t])
             for k in stuff]
    return render.render_masks(segs, record["image"].shape[:2], seed=seed,
                               image_id=f"panoptic/{_key(record)}")


def record_boxes(record: dict) -> tuple[np.ndarray, list[int], list[str]]:
    """(N, 4) float [x, y, w, h], class ids, names: the record's ``boxes`` or the thing masks' tight
    boxes."""
    boxes = record.get("boxes")
    if boxes is not None:
        b = np.asarray(boxes, np.float64).reshape(-1, 4)
        n = b.shape[0]
        ids = list(record.get("label_ids") or [0] * n)
        names = list(record.get("labels") or [""] * n)
    else:
        masks, ids, _ = _masks(record, things_only=True)
        thing = list(record.get("isthing") or [True] * len(record.get("masks") or []))
        all_names = list(record.get("labels") or [""] * len(thing))
        names = [nm for nm, t in zip(all_names, thing) if t]
        b = np.array([render.mask_bbox(m) for m in masks], np.float64).reshape(-1, 4)
    if b.shape[0] == 0:
        raise BadRecord("no_boxes", key=_key(record))
    if len(ids) != b.shape[0] or len(names) != b.shape[0]:
        raise BadRecord("bad_annotation", key=_key(record), detail="boxes / labels count mismatch")
    return b, ids, names


def box_geometry(box, h: int, w: int) -> tuple[int, int, int, int, int]:
    """Integer corners (x0, y0, x1, y1) of a COCO box clipped to the image, and the line thickness
    (1 px per 128 px of the short side, at least 1)."""
    x, y, bw, bh = (float(v) for v in box)
    x0, y0 = int(np.clip(np.floor(x), 0, w - 1)), int(np.clip(np.floor(y), 0, h - 1))
    x1 = int(np.clip(np.ceil(x + bw) - 1, 0, w - 1))
    y1 = int(np.clip(np.ceil(y + bh) - 1, 0, h - 1))
    return x0, y0, x1, y1, max(1, round(min(h, w) / 128))


def draw_detections(record: dict, seed: int) -> tuple[np.ndarray, list[tuple]]:
    """The image with every box (class colour, ``box_geometry``) and its name (white text on a
    filled tag of the class colour, above the box or inside it at the top edge). Returns the
    image and [(x0, y0, x1, y1, thickness, rgb, tag (x0, y0, x1, y1))]."""
    image = record["image"]
    h, w = image.shape[:2]
    boxes, ids, names = record_boxes(record)
    colors = class_palette(seed, ids)
    out = np.ascontiguousarray(image.copy())
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, max(0.25, min(h, w) / 640)
    drawn = []
    for box, rgb, name in zip(boxes, colors, names):
        x0, y0, x1, y1, t = box_geometry(box, h, w)
        c = tuple(int(v) for v in rgb)
        cv2.rectangle(out, (x0, y0), (x1, y1), c, t)
        tag = None
        if name:
            (tw, th), base = cv2.getTextSize(name, font, scale, 1)
            ty1 = y0 - 1 if y0 - th - base - 2 >= 0 else y0 + th + base + 1
            ty0 = ty1 - th - base - 1
            tag = (x0, max(ty0, 0), min(x0 + tw + 2, w - 1), min(ty1, h - 1))
            cv2.rectangle(out, tag[:2], tag[2:], c, -1)
            cv2.putText(out, name, (x0 + 1, ty1 - base), font, scale, (255, 255, 255), 1, cv2.LINE_AA)
        drawn.append((x0, y0, x1, y1, t, c, tag))
    return out, drawn


# ------------------------------------------------------------------------------------------------
# mid level

def depth_target(record: dict) -> np.ndarray:
    """Min-max normalised depth (as given: DA-V2 relative inverse depth, near = bright) -> uint8,
    replicated to 3 channels; resized (bilinear) to the image if its size differs."""
    d = record.get("depth")
    if d is None:
        raise BadRecord("no_depth", key=_key(record))
    d = np.asarray(d, np.float32)
    if d.ndim == 3 and d.shape[2] in (1, 3):
        d = d[..., 0]
    h, w = record["image"].shape[:2]
    if d.ndim != 2 or not np.isfinite(d).all():
        raise BadRecord("bad_depth", key=_key(record), detail=f"shape {d.shape} or non-finite values")
    if d.shape != (h, w):
        d = cv2.resize(d, (w, h), interpolation=cv2.INTER_LINEAR)
    lo, hi = float(d.min()), float(d.max())
    if hi <= lo:
        raise BadRecord("flat_depth", key=_key(record))
    u8 = np.rint((d - lo) / (hi - lo) * 255.0).astype(np.uint8)
    return np.repeat(u8[..., None], 3, axis=2)


# ------------------------------------------------------------------------------------------------
# dispatch

_LOW = {"denoise": degrade.denoise, "derain": degrade.rain, "dehaze": degrade.haze,
        "deblur_motion": degrade.motion_blur, "deblur_defocus": degrade.defocus_blur,
        "lowlight": degrade.low_light}


def instruction(task: str, rng: np.random.Generator) -> str:
    texts = BY_TASK[task]
    return texts[int(rng.integers(len(texts)))]


def build(task: str, record: dict, rng: np.random.Generator, *, seed: int = 0,
          index: int = 0) -> ProxyPair:
    """``record`` -> ProxyPair for ``task`` (see the module docstring). ``seed`` is the run seed
    (segment colours), ``index`` the stream position (``mixed``'s thirds)."""
    if task == "mixed":
        task = MIXED[int(index) % 3]
    elif "+" in task:                    # "a+b": one of them per sample, uniformly (paper's combos)
        parts = task.split("+")
        task = parts[int(rng.integers(len(parts)))]
    if task not in BY_TASK:
        raise ValueError(f"unknown proxy task {task!r}; known: {', '.join(TASKS)}")
    image = record.get("image")
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 \
            or image.shape[2] != 3:
        raise BadRecord("bad_array", key=_key(record), detail="image: expected uint8 (H, W, 3)")
    text = instruction(task, rng)
    info: dict = {}
    inp = image
    if task == "sa1b_seg" or task == "instance_seg":
        target = render_instances(record, seed, things_only=True)
    elif task == "semantic_seg":
        target = render_semantic(record, seed)
    elif task == "panoptic_seg":
        target = render_panoptic(record, seed)
    elif task == "detection":
        target, info["boxes"] = draw_detections(record, seed)
    elif task == "edge":
        target = degrade.canny(image)
    elif task == "depth":
        target = depth_target(record)
    elif task == "reconstruction":
        target = image
    elif task == "super_resolution":
        inp, info["factor"] = degrade.super_resolution(image, rng)
        target = image
    elif task == "inpainting":
        inp, info["mask"], info["fill"] = degrade.inpaint(image, rng)
        target = image
    else:
        inp, target = _LOW[task](image, rng), image
    return ProxyPair(inp, target, text, task, info)
