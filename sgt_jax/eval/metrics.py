"""Scores of generated outputs, in numpy: pseudo-colour masks -> instances -> Hungarian matching
on IoU -> mIoU and a PQ-style score; VQA answers -> exact match after normalisation.

Instances of a mask image. A target (``render.render_masks``) paints every instance in its own
exact colour on a background colour: ``instances(target, exact=True)`` gives one instance per
distinct non-background colour. A generated mask has no exact colours: ``instances(mask)``
quantises colours into cubes of ``bin`` levels per channel, takes the most frequent cubes (each
holding at least ``min_frac`` of the pixels) as cluster colours unless they lie within
``radius`` (Euclidean RGB) of a colour already taken (the background colour is taken first),
and gives every pixel its nearest cluster colour when that is within ``radius`` (else
unlabelled). Background and unlabelled pixels belong to no instance.

Matching is invariant to the colours: the IoU of every (target instance, predicted instance)
pair, a one-to-one assignment maximising the summed IoU (``scipy.optimize.linear_sum_assignment``),
then

* per image, mIoU = mean over target instances of the IoU of its assigned prediction (0 when it
  has none); the data set's mIoU is the mean over images;
* PQ-style (class-agnostic panoptic quality): a pair is a true positive when its IoU > 0.5 (such
  a pair is unique, whatever the assignment); over the whole set, SQ = mean IoU of the true
  positives, RQ = TP / (TP + FP / 2 + FN / 2), PQ = SQ x RQ.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from sgt_jax.data.synthetic import answer_tokens

ARTICLES = frozenset({"a", "an", "the"})


# ------------------------------------------------------------------------------------------------
# masks -> instances


def instances(mask: np.ndarray, background: Sequence[int] = (0, 0, 0), *, exact: bool = False,
              bin: int = 16, radius: float = 48.0, min_frac: float = 0.005) -> np.ndarray:
    """A label map (H, W) int32 of a uint8 (H, W, 3) mask image: 0 = background / unlabelled,
    1..K = instances (see the module docstring)."""
    m = np.asarray(mask)
    if m.ndim != 3 or m.shape[-1] != 3:
        raise ValueError(f"mask of shape {m.shape}: expected (H, W, 3)")
    px = m.reshape(-1, 3).astype(np.int64)
    bg = np.asarray(background, np.int64).reshape(1, 3)
    if exact:
        colors, inv = np.unique(px, axis=0, return_inverse=True)
        is_bg = (colors == bg).all(1)
        ids = np.cumsum(~is_bg) * ~is_bg          # background 0, the other colours 1..K
        return ids[inv.reshape(-1)].reshape(m.shape[:2]).astype(np.int32)
    q = px // bin
    codes, inv, counts = np.unique(q, axis=0, return_inverse=True, return_counts=True)
    inv = inv.reshape(-1)
    sums = np.zeros((len(codes), 3))
    np.add.at(sums, inv, px)
    means = sums / counts[:, None]
    centers = [bg[0].astype(np.float64)]
    for j in np.argsort(-counts, kind="stable"):
        if counts[j] < min_frac * px.shape[0]:
            break
        if min(np.linalg.norm(means[j] - c) for c in centers) > radius:
            centers.append(means[j])
    c = np.stack(centers)
    d = np.linalg.norm(px[:, None, :] - c[None, :, :], axis=-1)
    lab = np.argmin(d, axis=1)
    lab[d[np.arange(len(lab)), lab] > radius] = 0
    # clusters left with fewer than min_frac of the pixels are noise
    area = np.bincount(lab, minlength=len(c))
    keep = area >= min_frac * px.shape[0]
    keep[0] = False
    new = np.cumsum(keep) * keep
    return new[lab].reshape(m.shape[:2]).astype(np.int32)


def iou_matrix(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """IoU (G, P) of every target instance 1..G with every predicted instance 1..P."""
    if gt.shape != pred.shape:
        raise ValueError(f"label maps of shapes {gt.shape} and {pred.shape}")
    g, p = int(gt.max()), int(pred.max())
    joint = np.bincount(gt.reshape(-1).astype(np.int64) * (p + 1) + pred.reshape(-1),
                        minlength=(g + 1) * (p + 1)).reshape(g + 1, p + 1)
    inter = joint[1:, 1:].astype(np.float64)
    area_g, area_p = joint[1:, :].sum(1), joint[:, 1:].sum(0)
    union = area_g[:, None] + area_p[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


@dataclasses.dataclass
class ImageScore:
    ious: list          # per target instance: IoU of its assigned prediction (0: none)
    tp: int
    fp: int
    fn: int
    tp_iou: float       # summed IoU of the true positives

    @property
    def miou(self) -> float:
        return float(np.mean(self.ious)) if self.ious else 0.0


def match(gt: np.ndarray, pred: np.ndarray) -> ImageScore:
    """Colour-permutation-invariant matching of two label maps (module docstring)."""
    iou = iou_matrix(gt, pred)
    g, p = iou.shape
    per_gt = np.zeros(g)
    if g and p:
        r, c = linear_sum_assignment(-iou)
        per_gt[r] = iou[r, c]
    hit = iou > 0.5
    tp = int(hit.sum())
    return ImageScore(ious=per_gt.tolist(), tp=tp, fp=p - tp, fn=g - tp, tp_iou=float(iou[hit].sum()))


def score_mask(target: np.ndarray, generated: np.ndarray, background: Sequence[int] = (0, 0, 0)) -> ImageScore:
    """A generated pseudo-colour mask against its rendered target (both uint8 HWC, same size)."""
    return match(instances(target, background, exact=True), instances(generated, background))


def summarize(scores: Sequence[ImageScore]) -> dict:
    """{"miou", "pq", "sq", "rq", "images"} over a set of images (module docstring)."""
    if not scores:
        return {"miou": float("nan"), "pq": float("nan"), "sq": float("nan"), "rq": float("nan"), "images": 0}
    tp = sum(s.tp for s in scores)
    fp = sum(s.fp for s in scores)
    fn = sum(s.fn for s in scores)
    sq = sum(s.tp_iou for s in scores) / tp if tp else 0.0
    denom = tp + fp / 2 + fn / 2
    rq = tp / denom if denom else 0.0
    return {"miou": float(np.mean([s.miou for s in scores])), "pq": sq * rq, "sq": sq, "rq": rq,
            "images": len(scores)}


# ------------------------------------------------------------------------------------------------
# VQA


def normalize_answer(text: str) -> str:
    """Lower case, punctuation dropped, number words as digits ('Three.' -> '3'), articles
    dropped, single spaces."""
    return " ".join(t for t in answer_tokens(text) if t not in ARTICLES)


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)
