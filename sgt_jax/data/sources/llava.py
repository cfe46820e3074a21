"""LLaVA(-OneVision) SFT records -> vqa records.

    llava:FILE[::IMAGE_ROOT][?fix_placeholders=0|1&max_pixels=N]

FILE is a .jsonl (indexed by byte offset; a remote one's index cached, ``jsonl.py``), a .json
list or a .parquet; IMAGE_ROOT defaults to FILE's directory. ``fix_placeholders=1`` prepends the
missing ``<image>`` placeholders to the first human turn when a record has images but none.
"""
from __future__ import annotations

import json
import os

import numpy as np

from sgt_jax import fileio
from sgt_jax.data.sources.base import Spec, _read_path, _Source
from sgt_jax.data.sources.images import DEFAULT_MAX_PIXELS
from sgt_jax.data.sources.jsonl import JSONL_BUFFER, _jsonl_index

IMAGE_PLACEHOLDER = "<image>"
_ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


class LlavaSource(_Source):
    """LLaVA(-OneVision) SFT records -> vqa records.

    Files: ``.jsonl`` (one object a line; indexed by byte offset), ``.json`` (a list of objects),
    ``.parquet`` (needs pyarrow). Fields: ``id``; ``image``: a path relative to ``image_root``,
    a list of them, ``{"bytes": ..., "path": ...}`` (HF parquet), or absent / null / "" / "None"
    for text-only; ``conversations``: alternating human / gpt turns (``user`` / ``assistant``
    accepted), starting with human and ending with gpt, ``<image>`` placeholders only in human
    turns and exactly one per image.
    """
    name = "llava"
    options = frozenset({"fix_placeholders", "max_pixels"})
    usage = "llava:/data/all_data.jsonl::/data/images"

    @classmethod
    def from_spec(cls, spec: Spec) -> "LlavaSource":
        seg = spec.seg()
        ps = spec.paths(1, 2)
        return cls(ps[0], ps[1] if len(ps) > 1 else None, cache_dir=spec.cache_dir,
                   fix_placeholders=spec.flag("fix_placeholders"), **seg)

    @classmethod
    def index_targets(cls, spec: Spec) -> list[tuple[str, str]]:
        p = spec.body.split("::")[0].strip() if spec.body else ""
        return [("jsonl", p)] if p and fileio.is_remote(p) and p.lower().endswith(".jsonl") else []

    def __init__(self, path: str, image_root: str | None = None, *,
                 fix_placeholders: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
                 cache_dir: str | None = None):
        self.path = path
        self.image_root = image_root if image_root is not None else (
            fileio.dirname(path) if fileio.is_remote(path) else os.path.dirname(path))
        self.fix_placeholders, self.max_pixels = bool(fix_placeholders), int(max_pixels)
        low = path.lower()
        self._rows = None
        self._table = None
        if low.endswith(".jsonl"):
            self._offsets, self._lengths = _jsonl_index(path, cache_dir)
            n = len(self._offsets)
        elif low.endswith(".json"):
            rows = fileio.read_json(path)
            if not isinstance(rows, list):
                raise ValueError(f"{path}: a LLaVA .json file must hold a list of records "
                                 f"(got {type(rows).__name__}); use .jsonl for one per line")
            self._rows = rows
            n = len(rows)
        elif low.endswith(".parquet"):
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise ImportError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)")
            if fileio.is_remote(path):
                with fileio.open_read(path, JSONL_BUFFER) as f:
                    self._table = pq.read_table(f)
            else:
                self._table = pq.read_table(path)
            n = self._table.num_rows
        else:
            raise ValueError(f"{path}: LLaVA data must be .jsonl, .json or .parquet")
        stem = os.path.splitext(fileio.basename(path))[0]
        self._keys = [f"{stem}:{j}" for j in range(n)]

    def _describe(self) -> str:
        return f"path={self.path!r}, image_root={self.image_root!r}"

    def raw(self, i) -> dict:
        """The i-th record as stored (a dict); raises BadRecord('bad_json')."""
        i = self._index(i)
        key = self._keys[i]
        if self._rows is not None:
            row = self._rows[i]
        elif self._table is not None:
            row = self._table.slice(i, 1).to_pylist()[0]
        else:
            try:
                if fileio.is_remote(self.path):
                    line = fileio.read_bytes(self.path, int(self._offsets[i]),
                                             int(self._lengths[i]))
                else:
                    with open(self.path, "rb") as f:
                        f.seek(int(self._offsets[i]))
                        line = f.read(int(self._lengths[i]))
            except Exception as e:  # noqa: BLE001 -- OSError, or a remote backend's own
                raise self._bad("read_error", key, f"{type(e).__name__}: {e}") from None
            try:
                row = json.loads(line)
            except (ValueError, RecursionError) as e:
                raise self._bad("bad_json", key, f"{type(e).__name__}: {e}") from None
        if not isinstance(row, dict):
            raise self._bad("bad_json", key, f"record is a {type(row).__name__}, not an object")
        return row

    def __getitem__(self, i) -> dict:
        i = self._index(i)
        row = self.raw(i)
        key = str(row["id"]) if row.get("id") not in (None, "") else self._keys[i]
        if row.get("video") not in (None, "", "None"):
            raise self._bad("unsupported", key, "video records are not supported")
        images = row.get("image", row.get("images"))
        if images is None or (isinstance(images, str) and images.strip() in ("", "None")):
            images = []
        elif not isinstance(images, list):
            images = [images]
        convs = self._conversations(row, key)
        n_ph = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in convs if t["from"] == "human")
        if any(IMAGE_PLACEHOLDER in t["value"] for t in convs if t["from"] == "gpt"):
            raise self._bad("placeholder_mismatch", key, "<image> in a gpt turn")
        if n_ph != len(images):
            if self.fix_placeholders and n_ph == 0:
                convs[0]["value"] = (IMAGE_PLACEHOLDER + "\n") * len(images) + convs[0]["value"]
            else:
                raise self._bad("placeholder_mismatch", key,
                                f"{n_ph} <image> placeholders, {len(images)} images")
        arrays = [self._load(im, key) for im in images]
        return {"task": "vqa", "id": key, "images": arrays, "conversations": convs}

    def _conversations(self, row: dict, key: str) -> list[dict]:
        convs = row.get("conversations")
        if not isinstance(convs, list) or not convs:
            raise self._bad("bad_conversation", key, "missing or empty 'conversations'")
        out = []
        for j, t in enumerate(convs):
            if not isinstance(t, dict) or not isinstance(t.get("value"), str):
                raise self._bad("bad_conversation", key, f"turn {j} is not {{from, value: str}}")
            try:
                t["value"].encode("utf-8")
            except UnicodeEncodeError as e:
                raise self._bad("bad_text", key, f"turn {j}: {e}") from None
            role = _ROLES.get(str(t.get("from", "")).lower())
            want = "human" if j % 2 == 0 else "gpt"
            if role != want:
                raise self._bad("bad_conversation", key,
                                f"turn {j} is from {t.get('from')!r}, expected {want!r} "
                                f"(turns must alternate human, gpt, ...)")
            out.append({"from": role, "value": t["value"]})
        if out[-1]["from"] != "gpt":
            raise self._bad("bad_conversation", key, "the last turn must be from gpt")
        return out

    def _load(self, im, key: str) -> np.ndarray:
        data = None
        if isinstance(im, dict):
            data, im = im.get("bytes"), im.get("path")
        elif isinstance(im, (bytes, bytearray)):
            data, im = bytes(im), None
        if data is None:
            if not isinstance(im, str) or not im:
                raise self._bad("bad_annotation", key, f"image entry {im!r} is not a path")
            data = _read_path(self, self.image_root, im, key)
        arr, _ = self._decode(data, key, max_pixels=self.max_pixels)
        return arr

