"""The analysis inputs (``--data``): labelled images, VQA items, generation prompts.

Labelled images (``features``):
  ``synthetic:N[?size=S&seed=K&label=kind|color]``  N one-shape synthetic scenes (data/synthetic.py
                                                   ``make_scene``) of S x S px, labelled by the
                                                   shape's kind (5 classes) or colour (8)
  ``coco:INSTANCES_JSON::IMAGE_DIR[?categories=a,b&per_class=N&min_area=A]``
                                                   COCO instances: the box crop of each non-crowd
                                                   instance of area >= A (default 1024 px),
                                                   labelled by its category name, N per category
  ``FILE.jsonl``                                   {"image": path (relative to the file), "label"}
VQA items (``attention``):
  ``synthetic:N[?size=S&seed=K]``  N synthetic scenes with their generated questions and answers
  ``FILE.jsonl``                   {"image" or "images", "question", optional "answer"} (the
                                   ``python -m sgt_jax.generate answer --jsonl`` format)
Prompts (``prompt_attention``): ``default`` (``DEFAULT_PROMPTS``), a ``.txt`` (one per line) or a
``.jsonl`` ({"prompt"}).

Unreadable images are skipped and counted (``Skipped``), never a crash mid-run.
"""
from __future__ import annotations

import json
import os
import urllib.parse

import numpy as np

from sgt_jax import fileio

# 20 GenEval-style prompts with explicit position and colour constraints (the paper's Sec. 7.5
# diagnostic set is not published; these follow its description)
DEFAULT_PROMPTS = (
    "a photo of a red apple left of a green cup",
    "a photo of a blue car right of a yellow dog",
    "a photo of a white cat above a black chair",
    "a photo of a tie right of a baseball bat",
    "a photo of a purple umbrella below an orange clock",
    "a photo of a brown horse left of a white bench",
    "a photo of a green bottle above a red book",
    "a photo of a pink vase right of a blue laptop",
    "a photo of a yellow banana below a black phone",
    "a photo of an orange bus left of a gray truck",
    "a red circle left of a blue square",
    "a green triangle above a yellow circle",
    "a purple rectangle right of a cyan ellipse",
    "a blue square below a pink triangle",
    "a photo of a black dog next to a white sheep",
    "a photo of a red bicycle behind a green bench",
    "a photo of a white toilet left of a blue sink",
    "a photo of a yellow kite above a brown bird",
    "a photo of a gray elephant right of a red bowl",
    "a photo of a blue cup in front of an orange pizza",
)


class Skipped:
    """Counted skips by reason (``counts``) and the first few with their file (``details``)."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.details: list[str] = []

    def add(self, reason: str, detail: str):
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.details) < 20:
            self.details.append(f"{reason}: {detail}")


def _spec(s: str):
    head, _, query = s.partition("?")
    return head, {k: v[-1] for k, v in urllib.parse.parse_qs(query).items()}


def _read_image(path: str, skipped: Skipped):
    from PIL import Image, UnidentifiedImageError

    try:
        with fileio.open_read(path) as f, Image.open(f) as im:
            return np.asarray(im.convert("RGB"))
    except (FileNotFoundError, IsADirectoryError, UnidentifiedImageError, OSError, ValueError) as e:
        skipped.add("bad_image", f"{path}: {type(e).__name__}: {e}")
        return None


def _jsonl(path: str, skipped: Skipped) -> list[dict]:
    out = []
    for n, line in enumerate(fileio.read_text(path).splitlines()):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            if not isinstance(r, dict):
                raise ValueError("not an object")
        except ValueError as e:
            skipped.add("bad_record", f"{path}:{n + 1}: {e}")
            continue
        out.append(r)
    return out


def _rel(base: str, p: str) -> str:
    return p if os.path.isabs(p) or "://" in p else fileio.join(base, p)


def synthetic_labelled(n: int, *, size: int = 64, seed: int = 0, label: str = "kind"):
    from sgt_jax.data import synthetic

    if label not in ("kind", "color"):
        raise ValueError(f"label={label!r}: 'kind' or 'color'")
    images, labels = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        scene = synthetic.make_scene(rng, size, size, 1)
        images.append(scene["image"])
        labels.append(scene["shapes"][0][label])
    return images, labels


def coco_labelled(json_path: str, image_dir: str, *, categories=None, per_class: int = 50, min_area: float = 1024.0,
                  skipped: Skipped):
    meta = fileio.read_json(json_path)
    if not isinstance(meta, dict) or not {"images", "annotations", "categories"} <= set(meta):
        raise ValueError(f"{json_path}: not a COCO instances JSON (needs images, annotations, categories)")
    names = {c["id"]: c["name"] for c in meta["categories"]}
    want = set(categories) if categories else set(names.values())
    unknown = want - set(names.values())
    if unknown:
        raise ValueError(f"{json_path}: no categories {sorted(unknown)}")
    files = {im["id"]: im["file_name"] for im in meta["images"]}
    count: dict[str, int] = {}
    picked = []
    for a in meta["annotations"]:
        name = names.get(a.get("category_id"))
        if name not in want or a.get("iscrowd", 0) or a.get("area", 0) < min_area or count.get(name, 0) >= per_class:
            continue
        count[name] = count.get(name, 0) + 1
        picked.append((files.get(a.get("image_id")), a.get("bbox"), name))
    images, labels = [], []
    cache: dict[str, np.ndarray | None] = {}
    for fname, box, name in picked:
        if fname not in cache:
            cache = {fname: _read_image(fileio.join(image_dir, fname or ""), skipped)}
        im = cache[fname]
        if im is None:
            continue
        x, y, w, h = (int(round(v)) for v in box)
        crop = im[max(y, 0):y + h, max(x, 0):x + w]
        if min(crop.shape[:2]) < 8:
            skipped.add("tiny_crop", f"{fname} {box}")
            continue
        images.append(crop)
        labels.append(name)
    return images, labels


def labelled_images(spec: str, skipped: Skipped):
    """(uint8 HWC images, labels) of a ``--data`` spec (module docstring)."""
    head, opts = _spec(spec)
    if head.startswith("synthetic:"):
        return synthetic_labelled(int(head.split(":", 1)[1]), size=int(opts.get("size", 64)),
                                  seed=int(opts.get("seed", 0)), label=opts.get("label", "kind"))
    if head.startswith("coco:"):
        js, _, img_dir = head[len("coco:"):].partition("::")
        cats = [c for c in opts.get("categories", "").split(",") if c]
        return coco_labelled(js, img_dir, categories=cats, per_class=int(opts.get("per_class", 50)),
                             min_area=float(opts.get("min_area", 1024)), skipped=skipped)
    if head.endswith(".jsonl"):
        base = fileio.dirname(head)
        images, labels = [], []
        for r in _jsonl(head, skipped):
            if "image" not in r or "label" not in r:
                skipped.add("bad_record", f"{head}: a record without 'image' and 'label'")
                continue
            im = _read_image(_rel(base, r["image"]), skipped)
            if im is not None:
                images.append(im)
                labels.append(str(r["label"]))
        return images, labels
    raise ValueError(f"--data {spec!r}: synthetic:N, coco:JSON::IMAGE_DIR or a .jsonl of image/label records")


def vqa_items(spec: str, skipped: Skipped) -> list[dict]:
    """[{"images": [uint8 HWC], "question", "answer" (or None)}] of a ``--data`` spec."""
    head, opts = _spec(spec)
    if head.startswith("synthetic:"):
        from sgt_jax.data import synthetic

        n, size, seed = int(head.split(":", 1)[1]), int(opts.get("size", 64)), int(opts.get("seed", 0))
        out = []
        for i in range(n):
            rng = np.random.default_rng([seed, i])
            scene = synthetic.make_scene(rng, size, size, int(rng.integers(1, 5)))
            qs = synthetic.scene_questions(scene, rng)
            if qs:
                q = qs[int(rng.integers(len(qs)))]
                out.append({"images": [scene["image"]], "question": q["question"], "answer": q["answer"]})
        return out
    if head.endswith(".jsonl"):
        base = fileio.dirname(head)
        out = []
        for r in _jsonl(head, skipped):
            paths = r.get("images", [r["image"]] if "image" in r else [])
            if not paths or not isinstance(r.get("question"), str):
                skipped.add("bad_record", f"{head}: a record without image(s) and question")
                continue
            ims = [_read_image(_rel(base, p), skipped) for p in paths]
            if any(im is None for im in ims):
                continue
            out.append({"images": ims, "question": r["question"], "answer": r.get("answer")})
        return out
    raise ValueError(f"--data {spec!r}: synthetic:N or a .jsonl of VQA records")


def prompts(spec: str, skipped: Skipped) -> list[str]:
    if spec in ("", "default"):
        return list(DEFAULT_PROMPTS)
    if spec.endswith(".jsonl"):
        out = []
        for r in _jsonl(spec, skipped):
            if isinstance(r.get("prompt"), str) and r["prompt"].strip():
                out.append(r["prompt"])
            else:
                skipped.add("bad_record", f"{spec}: a record without 'prompt'")
        return out
    return [line.strip() for line in fileio.read_text(spec).splitlines() if line.strip()]
