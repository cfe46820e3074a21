"""Synthetic scenes: coloured shapes with known instance masks, in SA-1B format, plus VQA.

The built-in default data of the main job and a sanity evaluation where learning must show:
``generate(out_dir, n, seed=...)`` writes, per scene ``k`` (image id ``start_id + k``),

* ``sa_<id>.jpg`` -- a flat grey background (with a faint gradient) and 1-6 shapes (square,
  rectangle, circle, ellipse, triangle; rotated, overlapping), each in a different named colour;
* ``sa_<id>.json`` -- real SA-1B format: ``image`` {image_id, width, height, file_name} and one
  annotation per shape with the *visible* mask as compressed COCO RLE (``render.rle_encode``),
  exact ``area``, tight ``bbox``, ``point_coords``, ``crop_box``, ``predicted_iou``,
  ``stability_score``; plus a non-standard ``synthetic`` block (kind, colour name, centroid)
  that SA-1B readers ignore;

and ``vqa.jsonl`` -- LLaVA-format single-turn records about the scenes, each answer computable
from the masks: ``count`` ("How many shapes are there?"), ``largest_color`` ("What colour is the
largest shape?", only when the largest is >= 1.25x the second), ``left_right`` ("Is the red
circle left or right of the blue square?", centroids >= 12% of the width apart), ``exists``
("Is there a green triangle in the image?", yes / no). Each record carries ``qa`` = {type,
answer, choices} for ``evaluate_vqa_answer``.

Shapes are placed so that every shape keeps >= 60% of its area visible. Scene ``k`` depends only
on ``(seed, start_id + k)`` (a prefix of a bigger set is the smaller set). Output is deterministic
for a seed (same numpy / Pillow versions).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from sgt_jax import fileio
from sgt_jax.data import render

log = logging.getLogger(__name__)

VERSION = 1
VQA_FILE = "vqa.jsonl"
STAMP_FILE = "synthetic.stamp"
SHORT_ANSWER = "Answer the question using a single word or phrase."

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 80, 225),
    "yellow": (240, 220, 40), "orange": (245, 140, 25), "purple": (130, 55, 180),
    "cyan": (40, 205, 215), "pink": (245, 125, 195),
}
KINDS = ("square", "rectangle", "circle", "ellipse", "triangle")
_FAMILY = {"square": "quad", "rectangle": "quad", "circle": "round", "ellipse": "round",
           "triangle": "triangle"}
MIN_VISIBLE = 0.6          # every shape keeps this fraction of its own area visible
LARGEST_MARGIN = 1.25      # largest_color only when area(largest) >= margin * area(second)
LEFT_RIGHT_MARGIN = 0.12   # left_right only when centroids differ by >= margin * width
COUNT_CHOICES = [str(i) for i in range(21)]


# ------------------------------------------------------------------------------------------------
# scenes
# ------------------------------------------------------------------------------------------------

def _polygon(kind: str, cx: float, cy: float, r: float, rng: np.random.Generator) -> list:
    """Vertices of a shape of bounding radius ~r around (cx, cy)."""
    ang = rng.uniform(0, np.pi)
    if kind == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float) * r / np.sqrt(2)
    elif kind == "rectangle":
        ratio = rng.uniform(1.7, 2.6)
        a = r / np.sqrt(1 + 1 / ratio ** 2)
        pts = np.array([[-a, -a / ratio], [a, -a / ratio], [a, a / ratio], [-a, a / ratio]])
    elif kind == "circle":
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1) * r
    elif kind == "ellipse":
        ratio = rng.uniform(1.7, 2.6)
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        pts = np.stack([np.cos(t) * r, np.sin(t) * r / ratio], 1)
    elif kind == "triangle":
        t = np.array([0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.25, 0.25, 3)
        pts = np.stack([np.cos(t), np.sin(t)], 1) * r
    else:
        raise ValueError(kind)
    rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    pts = pts @ rot.T + [cx, cy]
    return [tuple(p) for p in pts]


def _draw(poly: list, h: int, w: int) -> np.ndarray:
    canvas = Image.new("L", (w, h), 0)
    ImageDraw.Draw(canvas).polygon(poly, fill=1)
    return np.asarray(canvas, dtype=bool)


def make_scene(rng: np.random.Generator, h: int, w: int, num_shapes: int,
               max_tries: int = 40) -> dict:
    """A scene dict: ``image`` uint8 (h, w, 3), ``background`` rgb, ``shapes`` (drawing order):
    [{kind, color, rgb, visible (bool mask), area, centroid (x, y)}]. Fewer shapes than asked if
    no placement keeps every shape >= MIN_VISIBLE visible."""
    s = min(h, w)
    names = list(COLORS)
    order = rng.permutation(len(names))[:num_shapes]
    shapes: list[dict] = []
    for ci in order:
        for _ in range(max_tries):
            kind = KINDS[rng.integers(len(KINDS))]
            r = rng.uniform(0.12, 0.28) * s
            cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
            amodal = _draw(_polygon(kind, cx, cy, r, rng), h, w)
            full = int(amodal.sum())
            if full < max(12, 0.01 * h * w):
                continue
            if all((p["visible"] & ~amodal).sum() >= MIN_VISIBLE * p["full"] for p in shapes):
                for p in shapes:
                    p["visible"] = p["visible"] & ~amodal
                shapes.append({"kind": kind, "color": names[ci], "rgb": COLORS[names[ci]],
                               "visible": amodal, "full": full})
                break
    gray = int(rng.integers(95, 166))
    grad = np.linspace(-12, 12, w)[None, :] * rng.choice([-1, 1]) + np.zeros((h, 1))
    image = np.clip(gray + grad, 0, 255).astype(np.uint8)[..., None].repeat(3, -1)
    for p in shapes:
        image[p["visible"]] = p["rgb"]
        ys, xs = np.nonzero(p["visible"])
        p["area"] = int(ys.size)
        p["centroid"] = (float(xs.mean()), float(ys.mean()))
        del p["full"]
    return {"image": image, "background": [gray] * 3, "shapes": shapes}


def _desc(p: dict) -> str:
    return f"the {p['color']} {p['kind']}"


def scene_questions(scene: dict, rng: np.random.Generator) -> list[dict]:
    """[{type, question, answer, choices}] about a scene (see module docstring)."""
    shapes, w = scene["shapes"], scene["image"].shape[1]
    qs = [{"type": "count", "question": "How many shapes are there?",
           "answer": str(len(shapes)), "choices": COUNT_CHOICES}]
    areas = sorted((p["area"] for p in shapes), reverse=True)
    if shapes and (len(areas) == 1 or areas[0] >= LARGEST_MARGIN * areas[1]):
        big = max(shapes, key=lambda p: p["area"])
        qs.append({"type": "largest_color", "question": "What colour is the largest shape?",
                   "answer": big["color"].capitalize(), "choices": list(COLORS)})
    pairs = [(a, b) for a in range(len(shapes)) for b in range(len(shapes))
             if a != b and abs(shapes[a]["centroid"][0] - shapes[b]["centroid"][0])
             >= LEFT_RIGHT_MARGIN * w]
    if pairs:
        a, b = pairs[rng.integers(len(pairs))]
        pa, pb = shapes[a], shapes[b]
        side = "left" if pa["centroid"][0] < pb["centroid"][0] else "right"
        qs.append({"type": "left_right",
                   "question": f"Is {_desc(pa)} left or right of {_desc(pb)}?",
                   "answer": side.capitalize(), "choices": ["left", "right"]})
    present = {(p["color"], _FAMILY[p["kind"]]) for p in shapes}
    if shapes and rng.random() < 0.5:
        p = shapes[rng.integers(len(shapes))]
        color, kind, ans = p["color"], p["kind"], "Yes"
    else:
        absent = [(c, k) for c in COLORS for k in KINDS if (c, _FAMILY[k]) not in present]
        color, kind = absent[rng.integers(len(absent))]
        ans = "No"
    qs.append({"type": "exists", "question": f"Is there a {color} {kind} in the image?",
               "answer": ans, "choices": ["yes", "no"]})
    return qs


def _annotation(mask: np.ndarray, ann_id: int, h: int, w: int, centroid) -> dict:
    ys, xs = np.nonzero(mask)
    j = int(np.argmin((xs - centroid[0]) ** 2 + (ys - centroid[1]) ** 2))
    return {"id": ann_id, "segmentation": render.rle_encode(mask), "bbox": render.mask_bbox(mask),
            "area": int(ys.size), "predicted_iou": 1.0, "stability_score": 1.0,
            "crop_box": [0, 0, w, h], "point_coords": [[float(xs[j]), float(ys[j])]]}


def generate(out_dir: str, num_images: int, *, seed: int = 0, size: int | Sequence[int] = (64, 128),
             num_shapes: int | Sequence[int] = (1, 6), start_id: int = 1,
             jpeg_quality: int = 95) -> str:
    """Write ``num_images`` scenes (SA-1B files + ``vqa.jsonl``) to ``out_dir``; returns out_dir.

    ``size``: side length, or an inclusive (lo, hi) range drawn per side; ``num_shapes``: count or
    inclusive (lo, hi) range. Scene k uses ``numpy.random.default_rng([seed, start_id + k])``.
    """
    lo, hi = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    nlo, nhi = ((num_shapes, num_shapes) if isinstance(num_shapes, int)
                else (int(num_shapes[0]), int(num_shapes[1])))
    if not 16 <= lo <= hi:
        raise ValueError(f"size range {(lo, hi)} must satisfy 16 <= lo <= hi")
    if not 1 <= nlo <= nhi <= len(COLORS):
        raise ValueError(f"num_shapes {(nlo, nhi)} must satisfy 1 <= lo <= hi <= {len(COLORS)}")
    os.makedirs(out_dir, exist_ok=True)
    lines = []
    for k in range(num_images):
        image_id = start_id + k
        rng = np.random.default_rng([seed, image_id])
        h, w = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
        scene = make_scene(rng, h, w, int(rng.integers(nlo, nhi + 1)))
        name = f"sa_{image_id}"
        Image.fromarray(scene["image"]).save(os.path.join(out_dir, name + ".jpg"), "JPEG",
                                             quality=jpeg_quality, subsampling=0)
        anns, info = [], []
        for j, p in enumerate(scene["shapes"]):
            ann_id = image_id * 100 + j
            anns.append(_annotation(p["visible"], ann_id, h, w, p["centroid"]))
            info.append({"annotation_id": ann_id, "kind": p["kind"], "color": p["color"],
                         "rgb": list(p["rgb"]), "centroid": list(p["centroid"])})
        meta = {"image": {"image_id": image_id, "width": w, "height": h,
                          "file_name": name + ".jpg"},
                "annotations": anns,
                "synthetic": {"version": VERSION, "background": scene["background"],
                              "shapes": info}}
        with open(os.path.join(out_dir, name + ".json"), "w") as f:
            json.dump(meta, f)
        for q in scene_questions(scene, rng):
            lines.append({"id": f"{name}_{q['type']}", "image": name + ".jpg",
                          "conversations": [
                              {"from": "human",
                               "value": f"<image>\n{q['question']}\n{SHORT_ANSWER}"},
                              {"from": "gpt", "value": q["answer"]}],
                          "qa": {"type": q["type"], "answer": q["answer"],
                                 "choices": q["choices"]}})
    with open(os.path.join(out_dir, VQA_FILE), "w") as f:
        for ln in lines:
            f.write(json.dumps(ln) + "\n")
    return out_dir


def scene_depth(masks: Sequence[np.ndarray], h: int, w: int) -> np.ndarray:
    """A plausible relative inverse depth (larger = nearer, as Depth Anything V2 outputs) for a
    scene: the background a ground plane from 0.1 (top row, far) to 0.35 (bottom row), shape j of n
    (drawing order: a later shape occludes the earlier ones, so it is nearer) a constant
    0.5 + 0.5 (j + 1) / n over its visible mask. float32 (h, w)."""
    d = np.repeat(np.linspace(0.1, 0.35, h, dtype=np.float32)[:, None], w, 1)
    n = len(masks)
    for j, m in enumerate(masks):
        d[np.asarray(m, bool)] = 0.5 + 0.5 * (j + 1) / n
    return d


def read_stamp(out_dir: str) -> dict | None:
    """The generation parameters of a finished synthetic directory (a local path or a URL), or
    None."""
    try:
        return fileio.read_json(fileio.join(out_dir, STAMP_FILE))
    except FileNotFoundError:
        return None


def generation_params(num_images: int = 1000, *, seed: int = 0,
                      size: int | Sequence[int] = (64, 128),
                      num_shapes: int | Sequence[int] = (1, 6)) -> dict:
    """What ``ensure_generated`` writes into the stamp (and compares with it)."""
    return {"version": VERSION, "num_images": int(num_images), "seed": int(seed),
            "size": list(size) if not isinstance(size, int) else [size, size],
            "num_shapes": (list(num_shapes) if not isinstance(num_shapes, int)
                           else [num_shapes, num_shapes])}


def ensure_generated(out_dir: str, num_images: int = 1000, *, seed: int = 0,
                     size: int | Sequence[int] = (64, 128),
                     num_shapes: int | Sequence[int] = (1, 6)) -> str:
    """Generate into ``out_dir`` unless it already holds exactly this data (checked by a stamp).

    Generation goes to a temporary sibling directory renamed into place, so concurrent callers
    (several processes of one host) and interrupted runs never leave a half-written set.
    """
    params = generation_params(num_images, seed=seed, size=size, num_shapes=num_shapes)
    stamp = os.path.join(out_dir, STAMP_FILE)

    def check() -> bool:
        if not os.path.exists(stamp):
            return False
        with open(stamp) as f:
            old = json.load(f)
        if old != params:
            raise ValueError(f"{out_dir} holds synthetic data generated with {old}, asked for "
                             f"{params}: use another directory or delete this one")
        return True

    if check():
        return out_dir
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ValueError(f"{out_dir} exists, is not empty and has no {STAMP_FILE}: it is not a "
                         f"synthetic data directory; choose an empty or new directory")
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("generating %d synthetic scenes into %s", num_images, out_dir)
    generate(tmp, num_images, seed=seed, size=size, num_shapes=num_shapes)
    with open(os.path.join(tmp, STAMP_FILE), "w") as f:
        json.dump(params, f)
    try:
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)            # empty (checked above)
        os.rename(tmp, out_dir)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not check():                  # another process won the race with other params
            raise
    return out_dir


# ------------------------------------------------------------------------------------------------
# answer checking
# ------------------------------------------------------------------------------------------------

_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty".split())}


def answer_tokens(text: str) -> list[str]:
    """Lower-case word tokens with number words mapped to digits ('Three.' -> ['3'])."""
    toks = re.findall(r"[a-z]+|\d+", str(text).lower())
    return [_NUMBER_WORDS.get(t, t) for t in toks]


def evaluate_vqa_answer(question_record: dict, answer_text: str) -> bool:
    """True iff ``answer_text`` names the reference answer and no other choice.

    ``question_record``: a ``vqa.jsonl`` line (uses its ``qa`` block) or any LLaVA-style record
    (the last gpt turn is the reference; choices inferred: yes/no, a number, a colour, left/right).
    'Three shapes.' is right for '3'; 'left or right' is wrong for 'Left'.
    """
    qa = question_record.get("qa")
    if qa:
        ref, choices = qa["answer"], qa["choices"]
    else:
        ref = [t["value"] for t in question_record["conversations"] if t["from"] == "gpt"][-1]
        r = answer_tokens(ref)
        r0 = r[0] if r else ""
        for group in (["yes", "no"], ["left", "right"], list(COLORS), COUNT_CHOICES):
            if r0 in group:
                choices = group
                break
        else:
            return answer_tokens(answer_text) == r
    ref_tok = answer_tokens(ref)
    if not ref_tok:
        return False
    named = {t for t in answer_tokens(answer_text) if t in set(map(str.lower, choices))}
    return named == {ref_tok[0]}


def vqa_accuracy(question_records: Sequence[dict], answers: Sequence[str]) -> float:
    """Fraction of answers judged right by ``evaluate_vqa_answer``."""
    if len(question_records) != len(answers):
        raise ValueError(f"{len(question_records)} questions but {len(answers)} answers")
    if not answers:
        return 0.0
    return sum(map(evaluate_vqa_answer, question_records, answers)) / len(answers)
