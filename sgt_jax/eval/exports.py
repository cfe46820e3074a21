"""Outputs laid out for the official PyTorch scorers (docs/evaluation.md):

* **GenEval** (``evaluation/evaluate_images.py`` of djghosh13/geneval reads a folder per prompt):
  ``OUT/<index:05d>/metadata.jsonl`` -- the prompt's line of GenEval's
  ``evaluation_metadata.jsonl``, written back as one JSON object -- and
  ``OUT/<index:05d>/samples/<k:05d>.png``, the k-th image of the prompt (k-th seed of ``seeds``,
  as GenEval's own generation script numbers them). ``OUT/seeds.json`` records the seeds.
* **VLMEvalKit-style answers** for multiple-choice benchmarks (CV-Bench, MMVP): a TSV with the
  columns ``index``, ``question``, the option letters present (``A``, ``B``, ...), ``answer`` and
  ``prediction`` (the model's raw text), one row per question, plus the same rows as JSONL.
"""
from __future__ import annotations

import csv
import json
import os
from typing import Sequence

import numpy as np
from PIL import Image

OPTION_LETTERS = tuple("ABCDEFGHIJ")


def read_jsonl(path: str) -> list[dict]:
    """The objects of a JSONL file; a line that is not a JSON object raises ValueError naming it."""
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from None
            if not isinstance(r, dict):
                raise ValueError(f"{path}:{n}: not a JSON object")
            out.append(r)
    return out


def geneval_dir(out: str, index: int) -> str:
    return os.path.join(out, f"{index:05d}")


def write_geneval_prompt(out: str, index: int, metadata: dict, images: Sequence[np.ndarray]) -> list[str]:
    """One prompt's folder: ``metadata.jsonl`` and ``samples/<k:05d>.png``; returns the PNG paths."""
    d = geneval_dir(out, index)
    os.makedirs(os.path.join(d, "samples"), exist_ok=True)
    with open(os.path.join(d, "metadata.jsonl"), "w") as f:
        json.dump(metadata, f)
    paths = []
    for k, im in enumerate(images):
        p = os.path.join(d, "samples", f"{k:05d}.png")
        Image.fromarray(np.asarray(im, np.uint8)).save(p)
        paths.append(p)
    return paths


def write_seeds(out: str, seeds: Sequence[int]) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "seeds.json"), "w") as f:
        json.dump({"seeds": [int(s) for s in seeds], "samples": "samples/<k:05d>.png is the k-th seed"}, f)


def mc_prompt(question: str, options: dict, suffix: str = "Answer with the option's letter from the given choices directly.") -> str:
    """The question with its options as VLMEvalKit's multiple-choice prompt lays them out."""
    lines = [question] + [f"{k}. {v}" for k, v in options.items()]
    return "\n".join(lines + [suffix])


def options_of(record: dict) -> dict:
    """{"A": text, ...} from the option-letter columns of a benchmark row."""
    return {k: str(record[k]) for k in OPTION_LETTERS
            if k in record and record[k] is not None and str(record[k]).strip() not in ("", "nan")}


def write_answers(path: str, rows: Sequence[dict]) -> tuple[str, str]:
    """``path`` (.tsv) and ``path`` with .jsonl: columns index, question, the option letters used,
    answer, prediction. Returns both paths."""
    letters = [k for k in OPTION_LETTERS if any(k in r for r in rows)]
    cols = ["index", "question", *letters, "answer", "prediction"]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(cols)
        for r in rows:
            w.writerow(["" if r.get(c) is None else str(r.get(c)).replace("\t", " ").replace("\n", "\\n")
                        for c in cols])
    jl = os.path.splitext(path)[0] + ".jsonl"
    with open(jl, "w") as f:
        for r in rows:
            f.write(json.dumps({c: r.get(c) for c in cols}) + "\n")
    return path, jl
