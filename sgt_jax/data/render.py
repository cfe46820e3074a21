"""Class-agnostic mask rendering: COCO RLE codec and the seeded pseudo-colour renderer.

SGT's segmentation target is an image in which every instance mask is painted in its own colour
(``../shared/reference/sgt_and_related.md`` §4.3; the official renderer is not public). Ours:

* masks are painted **largest first** (area descending, ties by input order), so a small mask
  inside a big one stays visible on top -- the order of SAM's ``show_anns``;
* colours are **distinct**: best-candidate sampling in RGB keeps every colour far from the others
  and from the background (default black, the colour of unlabelled pixels);
* colours are **deterministic per (run seed, image id)**: ``render_seed`` hashes both with BLAKE2
  (stable across processes, hosts and Python versions -- never ``hash()``), so an image gets the
  same colours in every epoch and worker of a run, and new colours in a run with another seed.

COCO RLE (the format of SA-1B's ``segmentation`` and COCO's crowd masks) is implemented here
from the format definition: column-major run lengths starting with a run of zeros; the compressed
string form stores each count (from the fourth on, as the difference to the count two places
back) in 5-bit groups, least significant first, offset by 48 ('0'), bit 0x20 = "more groups",
bit 0x10 of the last group = sign. The decoder is vectorised in numpy (no per-character Python
loop); painting works on run indices, so its cost is the total mask area, not masks x pixels.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

RLE = dict  # {"size": [h, w], "counts": str | bytes | list[int]}


# ------------------------------------------------------------------------------------------------
# RLE codec
# ------------------------------------------------------------------------------------------------

def counts_from_string(s: str | bytes) -> np.ndarray:
    """Decode a compressed COCO RLE counts string to run lengths (int64). Raises ValueError."""
    b = np.frombuffer(s.encode("ascii") if isinstance(s, str) else bytes(s), dtype=np.uint8)
    if b.size == 0:
        return np.zeros(0, np.int64)
    v = b.astype(np.int64) - 48
    if v.min() < 0 or v.max() > 0x3F:
        raise ValueError("RLE counts string has characters outside '0'..'o'")
    more = (v & 0x20) != 0
    if more[-1]:
        raise ValueError("RLE counts string ends inside a number")
    ends = np.flatnonzero(~more)                       # last group of every number
    starts = np.concatenate([[0], ends[:-1] + 1])
    number = np.repeat(np.arange(ends.size), ends - starts + 1)
    shift = 5 * (np.arange(v.size) - starts[number])   # group position within its number
    if shift.max() > 55:
        raise ValueError("RLE counts string has an over-long number")
    x = np.zeros(ends.size, np.int64)
    np.add.at(x, number, (v & 0x1F) << shift)
    neg = (v[ends] & 0x10) != 0                        # sign bit of the last group
    x[neg] |= -1 << (shift[ends[neg]] + 5)
    # from the fourth count on (index > 2), each count is stored relative to counts[i - 2]
    if x.size > 3:
        x[3::2] = x[1] + np.cumsum(x[3::2])
        x[4::2] = x[2] + np.cumsum(x[4::2])
    return x


def counts_to_string(counts: Sequence[int] | np.ndarray) -> str:
    """Encode run lengths as a compressed COCO RLE counts string."""
    c = [int(n) for n in counts]
    out = bytearray()
    for i, n in enumerate(c):
        x = n - c[i - 2] if i > 2 else n
        more = True
        while more:
            g = x & 0x1F
            x >>= 5
            more = (x != -1) if (g & 0x10) else (x != 0)
            if more:
                g |= 0x20
            out.append(g + 48)
    return out.decode("ascii")


def rle_counts(rle: RLE) -> tuple[tuple[int, int], np.ndarray]:
    """Validated ``((h, w), run lengths)`` of a COCO RLE dict (compressed or uncompressed)."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError("RLE must be a dict with 'size' and 'counts'")
    size = rle["size"]
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or not all(isinstance(n, (int, np.integer)) and n >= 0 for n in size)):
        raise ValueError(f"RLE size must be [h, w] of non-negative ints, got {size!r}")
    h, w = int(size[0]), int(size[1])
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        c = counts_from_string(counts)
    elif isinstance(counts, (list, tuple, np.ndarray)):
        # checked before any int64 arithmetic: a run of 2**63 (JSON allows it) would overflow
        try:
            a = np.asarray(counts).reshape(-1)
        except (ValueError, TypeError, OverflowError) as e:
            raise ValueError(f"RLE counts are not a flat list of integers: {e}") from None
        if a.size:
            vals = a.tolist() if a.dtype.kind == "O" else None      # Python ints beyond 64 bits
            if (a.dtype.kind not in "iuO" or vals is not None and not all(
                    isinstance(n, int) and not isinstance(n, bool) for n in vals)):
                raise ValueError(f"RLE counts must be integers, got {a.dtype} values")
            lo, hi = (min(vals), max(vals)) if vals is not None else (int(a.min()), int(a.max()))
            if lo < 0 or hi > h * w:
                raise ValueError(f"RLE run lengths must be in [0, {h * w}] for size {h}x{w}, "
                                 f"got [{lo}, {hi}]")
        c = a.astype(np.int64)
    else:
        raise ValueError(f"RLE counts must be a string or a list, got {type(counts).__name__}")
    if c.size and c.min() < 0:
        raise ValueError("RLE has negative run lengths")
    if c.size and c.max() > h * w:     # (string counts: a delta sum past the image)
        raise ValueError(f"RLE run length {int(c.max())} exceeds the {h}x{w} image")
    if int(c.sum()) != h * w:
        raise ValueError(f"RLE run lengths sum to {int(c.sum())}, size {h}x{w} needs {h * w}")
    return (h, w), c


def _ones_runs(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of the runs of ones, as column-major flat indices."""
    ends = np.cumsum(c)
    starts = ends - c
    return starts[1::2], c[1::2]


def _runs_to_indices(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    keep = lengths > 0
    starts, lengths = starts[keep], lengths[keep]
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    offsets = np.cumsum(lengths) - lengths
    return np.arange(total, dtype=np.int64) + np.repeat(starts - offsets, lengths)


def rle_decode(rle: RLE) -> np.ndarray:
    """COCO RLE -> uint8 mask (h, w) of 0/1 (as ``pycocotools.mask.decode``). Raises ValueError."""
    (h, w), c = rle_counts(rle)
    flat = np.repeat(np.arange(c.size, dtype=np.int64) % 2, c).astype(np.uint8)
    return np.ascontiguousarray(flat.reshape(w, h).T)


def rle_encode(mask: np.ndarray) -> RLE:
    """Binary mask (h, w) -> compressed COCO RLE ``{"size": [h, w], "counts": str}``."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    h, w = m.shape
    flat = (m.T.reshape(-1) != 0).astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds)
    if flat.size and flat[0] == 1:                       # RLE starts with a run of zeros
        counts = np.concatenate([[0], counts])
    return {"size": [int(h), int(w)], "counts": counts_to_string(counts)}


def rle_area(rle: RLE) -> int:
    _, c = rle_counts(rle)
    return int(c[1::2].sum())


def mask_bbox(mask: np.ndarray) -> list[float]:
    """COCO ``[x, y, w, h]`` of the tight box around the nonzero pixels (zeros if empty)."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return [0.0, 0.0, 0.0, 0.0]
    x0, y0 = int(xs.min()), int(ys.min())
    return [float(x0), float(y0), float(xs.max() - x0 + 1), float(ys.max() - y0 + 1)]


# ------------------------------------------------------------------------------------------------
# colours
# ------------------------------------------------------------------------------------------------

def render_seed(run_seed: int, image_id) -> int:
    """A stable 63-bit seed from (run seed, image id); ``image_id`` may be an int or a string."""
    d = hashlib.blake2b(f"sgt-render/{int(run_seed)}/{image_id}".encode(), digest_size=8).digest()
    return int.from_bytes(d, "little") >> 1


def distinct_colors(n: int, seed: int, *, background: Sequence[int] | None = (0, 0, 0),
                    candidates: int = 24) -> np.ndarray:
    """``n`` distinct uint8 RGB colours, spread out by best-candidate sampling.

    Each colour is the one of ``candidates`` uniform random draws that is farthest (Euclidean, RGB)
    from the colours already chosen and from ``background``. Colour k depends only on the seed and
    k (prefix-stable). Every colour differs from every other and from the background.
    """
    rng = np.random.default_rng(seed)
    chosen = np.zeros((n, 3), np.int64)
    taken = [np.asarray(background, np.int64).reshape(1, 3)] if background is not None else []
    fixed = np.concatenate(taken) if taken else np.zeros((0, 3), np.int64)
    # running min squared distance of every candidate is recomputed per colour; n is small
    # (SA-1B: ~100 masks per image), so O(n^2 * candidates) is negligible next to decoding.
    for k in range(n):
        ref = np.concatenate([fixed, chosen[:k]])
        while True:
            cand = rng.integers(0, 256, size=(candidates, 3), dtype=np.int64)
            if ref.shape[0] == 0:
                best = cand[0]
                break
            d2 = ((cand[:, None, :] - ref[None, :, :]) ** 2).sum(-1).min(1)
            i = int(np.argmax(d2))
            if d2[i] > 0:
                best = cand[i]
                break
        chosen[k] = best
    return chosen.astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# rendering
# ------------------------------------------------------------------------------------------------

def _mask_runs(m, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of the runs of ones of a mask (RLE dict or 2-D array), column-major."""
    if isinstance(m, dict):
        size, c = rle_counts(m)
        if size != shape:
            raise ValueError(f"mask size {list(size)} differs from the image size {list(shape)}")
        return _ones_runs(c)
    a = np.asarray(m)
    if a.shape != shape:
        raise ValueError(f"mask shape {list(a.shape)} differs from the image size {list(shape)}")
    flat = (a.T.reshape(-1) != 0).astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [0]])))
    return edges[0::2], edges[1::2] - edges[0::2]


def label_map(masks: Sequence, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Paint masks largest-first into an int32 label map (0 = background, k+1 = k-th painted mask).

    Returns ``(labels (h, w), order)`` where ``order[k]`` is the input index of the mask painted k-th.
    Works on runs: long runs are painted as slices, short ones by one scatter per mask.
    """
    h, w = int(shape[0]), int(shape[1])
    runs = [_mask_runs(m, (h, w)) for m in masks]
    areas = np.array([int(ln.sum()) for _, ln in runs], np.int64)
    order = np.argsort(-areas, kind="stable")
    flat = np.zeros(h * w, np.int32)
    for k, j in enumerate(order):
        starts, lengths = runs[j]
        if lengths.size and areas[j] >= 32 * lengths.size:
            for a, b in zip(starts.tolist(), (starts + lengths).tolist()):
                flat[a:b] = k + 1
        else:
            flat[_runs_to_indices(starts, lengths)] = k + 1
    return np.ascontiguousarray(flat.reshape(w, h).T), order


def resize_labels(labels: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map (pixel centres), so colours stay exact."""
    h, w = labels.shape
    oh, ow = out_hw
    rows = np.minimum(((np.arange(oh) + 0.5) * h / oh).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(ow) + 0.5) * w / ow).astype(np.int64), w - 1)
    return labels[rows[:, None], cols[None, :]]


def colorize(labels: np.ndarray, colors: np.ndarray,
             background: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    palette = np.concatenate([np.asarray(background, np.uint8).reshape(1, 3),
                              np.asarray(colors, np.uint8).reshape(-1, 3)])
    return palette[labels]


def render_masks(masks: Sequence, shape: tuple[int, int], *, seed: int, image_id,
                 background: Sequence[int] = (0, 0, 0),
                 out_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Render class-agnostic masks (RLE dicts or 2-D arrays) as a uint8 (h, w, 3) colour image.

    Larger masks are painted first; the k-th painted mask gets ``distinct_colors(n, s)[k]`` with
    ``s = render_seed(seed, image_id)``. ``out_hw`` resizes the label map (nearest) before colouring.
    Raises ValueError for a broken RLE or a mask whose size differs from ``shape``.
    """
    labels, _ = label_map(masks, shape)
    if out_hw is not None and tuple(out_hw) != labels.shape:
        labels = resize_labels(labels, out_hw)
    colors = distinct_colors(len(masks), render_seed(seed, image_id), background=background)
    return colorize(labels, colors, background)
