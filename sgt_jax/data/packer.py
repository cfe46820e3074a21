"""Packer: laid-out samples -> rows of a static-shape numpy ``PackedBatch``.

Every row has four budgets, all from the config: und tokens <= L - num_gen (text, the four special
tokens and ViT tokens), gen tokens <= num_gen (VAE latent tokens), ViT patches <= P, VAE images
<= N (each zero-padded bottom/right into the static (H, W)); and a fifth when
``ce_tokens_per_row`` > 0: CE tokens <= that (the model then computes ``lm_head`` at that many
gathered positions per row instead of at every und position). A sample that can never fit an empty
row is dropped (``fit_reason`` names why); one that does not fit now is deferred (buffered) and
placed first in the next batch. After the documents, padding fills the row: it is its own
document, and ``num_gen - gen_used`` of its positions are routed to the gen expert so every row
has exactly ``num_gen`` gen-routed positions (``batch.check_routing``). Rows without any ViT or
VAE image are ordinary rows.

Policy (``BestFitPacker``): all B rows of a batch are open at once; each sample goes to the row
where it leaves the least free space (best fit over the two token budgets, subject to all four);
a *group* (one period of the mixing pattern, e.g. seg, seg, vqa) is placed atomically or not at
all, so every batch holds whole groups and the mixture ratio is exact per batch. Groups that do not
fit are buffered (``max_buffer``); the batch closes when the buffer is full. ``bagel_pack`` is
BAGEL's one-sequence greedy loop (dataset_base.py ``PackedDataset.__iter__``) over the same
samples, for the benchmark.
"""
from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from sgt_jax.batch import CAUSAL, PAD, TEXT, VAE_CLEAN, VAE_NOISED, VIT, TOKEN_FIELDS, PackedBatch, batch_spec
from sgt_jax.data.samples import Sample, normalize

KIND_NAMES = {PAD: "pad", TEXT: "text", VIT: "vit", VAE_CLEAN: "vae_clean", VAE_NOISED: "vae_noised"}


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """Static shapes of one row."""
    tokens_per_row: int
    gen_tokens_per_row: int
    vit_patches_per_row: int
    vae_images_per_row: int
    vae_hw: tuple[int, int]
    vae_downsample: int = 16
    vit_patch_size: int = 14
    max_tokens_per_sample: int | None = None
    vae_images_dtype: str = "float32"
    ce_tokens_per_row: int = 0           # > 0: at most this many CE tokens per row (0: no budget)

    @classmethod
    def from_config(cls, cfg) -> "RowSpec":
        from sgt_jax.data.config import vae_hw

        return cls(cfg.tokens_per_row, cfg.gen_tokens_per_row, cfg.vit_patches_per_row,
                   cfg.vae_images_per_row, vae_hw(cfg), cfg.vae_downsample, cfg.vit_patch_size,
                   cfg.max_tokens_per_sample, cfg.vae_images_dtype, int(cfg.get("ce_tokens_per_row", 0)))

    @property
    def und_budget(self) -> int:
        return self.tokens_per_row - self.gen_tokens_per_row

    @property
    def latent_cells(self) -> int:
        h, w = self.vae_hw
        return (h // self.vae_downsample) * (w // self.vae_downsample)


def sizes(s: Sample) -> tuple[int, int, int, int, int]:
    """(und tokens, gen tokens, ViT patches, VAE images, CE tokens), cached on the sample."""
    z = getattr(s, "_sizes", None)
    if z is None:
        z = (s.num_und, s.num_gen, s.num_vit_patches, s.num_vae_images, int(s.tokens["ce_mask"].sum()))
        s._sizes = z
    return z


def fit_reason(s: Sample, spec: RowSpec) -> str | None:
    """Why ``s`` can never fit an empty row (a drop reason), or None."""
    und, gen, vit, vae, ce = sizes(s)
    if spec.max_tokens_per_sample is not None and und + gen > spec.max_tokens_per_sample:
        return "over_max_tokens_per_sample"
    if und > spec.und_budget:
        return "over_und_budget"
    if gen > spec.gen_tokens_per_row:
        return "over_gen_budget"
    if vit > spec.vit_patches_per_row:
        return "over_vit_patches"
    if vae > spec.vae_images_per_row:
        return "over_vae_images"
    if spec.ce_tokens_per_row and ce > spec.ce_tokens_per_row:
        return "over_ce_tokens"
    h, w = spec.vae_hw
    if any(im.shape[0] > h or im.shape[1] > w for im in s.vae_images):
        return "vae_image_over_static_size"
    return None


class Row:
    __slots__ = ("und", "gen", "vit", "vae", "ce", "samples")

    def __init__(self):
        self.und = self.gen = self.vit = self.vae = self.ce = 0
        self.samples: list[Sample] = []

    def fits(self, z, spec: RowSpec) -> bool:
        return (self.und + z[0] <= spec.und_budget and self.gen + z[1] <= spec.gen_tokens_per_row
                and self.vit + z[2] <= spec.vit_patches_per_row and self.vae + z[3] <= spec.vae_images_per_row
                and (not spec.ce_tokens_per_row or self.ce + z[4] <= spec.ce_tokens_per_row))

    def add(self, s: Sample, z):
        self.und += z[0]; self.gen += z[1]; self.vit += z[2]; self.vae += z[3]; self.ce += z[4]   # noqa: E702
        self.samples.append(s)

    def remove_last(self, z):
        self.und -= z[0]; self.gen -= z[1]; self.vit -= z[2]; self.vae -= z[3]; self.ce -= z[4]   # noqa: E702
        self.samples.pop()


def place_group(rows: list[Row], group: Sequence[Sample], spec: RowSpec) -> bool:
    """Best-fit every sample of ``group`` into ``rows``; all or nothing."""
    placed = []
    for s in group:
        z = sizes(s)
        best, best_free = None, None
        for r in rows:
            if r.fits(z, spec):
                free = spec.tokens_per_row - (r.und + r.gen + z[0] + z[1])
                if best is None or free < best_free:
                    best, best_free = r, free
        if best is None:
            for r, zz in reversed(placed):
                r.remove_last(zz)
            return False
        best.add(s, z)
        placed.append((best, z))
    return True


class BestFitPacker:
    """Multi-row best fit with atomic groups and a FIFO buffer of deferred groups.

    ``pack(next_group)`` returns the rows of one batch (lists of samples in packing order) and a
    Counter of events (``deferred``, ``dropped/<reason>``). ``buffer`` is the deferred groups (the
    pipeline saves them as (stream, index) descriptors and rebuilds them on restore)."""

    def __init__(self, spec: RowSpec, rows: int, max_buffer: int = 16, max_dropped_in_a_row: int = 100):
        if max_buffer < 1:
            raise ValueError("packer.max_buffer must be >= 1")
        self.spec, self.rows, self.max_buffer = spec, rows, max_buffer
        self.max_dropped_in_a_row = max_dropped_in_a_row
        self.buffer: list[list[Sample]] = []

    def pack(self, next_group: Callable[[], list[Sample]]) -> tuple[list[list[Sample]], collections.Counter]:
        ev = collections.Counter()
        rows = [Row() for _ in range(self.rows)]
        keep = []
        for g in self.buffer:
            if not place_group(rows, g, self.spec):
                keep.append(g)
        self.buffer = keep
        dropped = 0
        while len(self.buffer) < self.max_buffer:
            g = next_group()
            if place_group(rows, g, self.spec):
                dropped = 0
                continue
            if not place_group([Row() for _ in range(self.rows)], g, self.spec):
                ev["dropped/group_over_batch"] += len(g)
                dropped += 1
                if dropped >= self.max_dropped_in_a_row:
                    raise RuntimeError(
                        f"{dropped} mixing groups in a row ({[s.stream for s in g]}) do not fit an empty batch "
                        f"of {self.rows} rows x {self.spec.tokens_per_row} tokens: raise rows_per_batch / "
                        "tokens_per_row or the per-row budgets, or lower mix.ratios")
                continue
            self.buffer.append(g)
            ev["deferred"] += len(g)
        return [r.samples for r in rows], ev


# ------------------------------------------------------------------------------------------------
# rows -> PackedBatch

def assemble(rows: Sequence[Sequence[Sample]], spec: RowSpec) -> PackedBatch:
    """Concatenate each row's documents, pad, route padding to fill the gen quota -> numpy PackedBatch."""
    B, L, G = len(rows), spec.tokens_per_row, spec.gen_tokens_per_row
    P, N = spec.vit_patches_per_row, spec.vae_images_per_row
    W = spec.vae_hw[1]
    zeros = {k: np.zeros(x.shape, x.dtype) for k, x in vars(batch_spec(spec, rows=B)).items() if x is not None}
    zeros["ce_weights"][:] = 1.0
    zeros["vit_image_ids"][:] = -1
    f = {k: zeros.pop(k) for k in TOKEN_FIELDS}
    vit_patches, vit_pos, vit_ids, vae_images = (zeros.pop(k) for k in ("vit_patches", "vit_position_ids",
                                                                        "vit_image_ids", "vae_images"))
    cells = spec.latent_cells
    grid_w = W // spec.vae_downsample
    for r, docs in enumerate(rows):
        o = split_off = vit_off = vit_img_off = vae_off = 0
        for d, s in enumerate(docs):
            t = s.tokens
            n = s.num_tokens
            sl = slice(o, o + n)
            for k in ("kind", "text_ids", "position_ids", "split_mode", "ce_mask", "ce_labels",
                      "ce_weights", "mse_mask", "latent_position_ids", "timesteps"):
                f[k][r, sl] = t[k]
            f["doc_ids"][r, sl] = d
            f["split_ids"][r, sl] = t["split_ids"] + split_off
            is_vit = t["kind"] == VIT
            f["vit_index"][r, sl] = np.where(is_vit, t["vit_index"] + vit_off, 0)
            lat = t["vae_image"] >= 0
            f["vae_token_index"][r, sl] = np.where(lat, (t["vae_image"] + vae_off) * cells
                                                 + t["vae_row"] * grid_w + t["vae_col"], 0)
            f["expert"][r, sl] = lat
            nv = s.num_vit_patches
            if nv:
                vit_patches[r, vit_off:vit_off + nv] = normalize(s.vit_patches)
                vit_pos[r, vit_off:vit_off + nv] = s.vit_position_ids
                vit_ids[r, vit_off:vit_off + nv] = s.vit_image_ids + vit_img_off
                vit_img_off += int(s.vit_image_ids.max()) + 1
            for j, im in enumerate(s.vae_images):
                vae_images[r, vae_off + j, :im.shape[0], :im.shape[1]] = normalize(im)
            o += n
            split_off += s.num_splits
            vit_off += nv
            vae_off += s.num_vae_images
        if o > L or vit_off > P or vae_off > N:
            raise ValueError(f"row {r} overflows: {o}/{L} tokens, {vit_off}/{P} patches, {vae_off}/{N} images")
        gen_used = int(f["expert"][r].sum())
        und_used = o - gen_used
        if gen_used > G or und_used > L - G:
            raise ValueError(f"row {r}: {und_used} und / {gen_used} gen tokens exceed {L - G} / {G}")
        # padding: one more document, one causal split; route the last (G - gen_used) positions to gen
        f["doc_ids"][r, o:] = len(docs)
        f["split_ids"][r, o:] = split_off
        f["split_mode"][r, o:] = CAUSAL
        if G > gen_used:
            f["expert"][r, L - (G - gen_used):] = 1
    return PackedBatch(**f, vit_patches=vit_patches, vit_position_ids=vit_pos, vit_image_ids=vit_ids,
                       vae_images=vae_images)


def batch_stats(batch: PackedBatch, rows: Sequence[Sequence[Sample]]) -> dict[str, float]:
    """Per-batch numbers: tokens by kind, CE/MSE tokens, fill, samples by stream and task."""
    kind = np.asarray(batch.kind)
    st = {f"tokens/{name}": int((kind == k).sum()) for k, name in KIND_NAMES.items()}
    st["tokens/ce"] = int(np.asarray(batch.ce_mask).sum())
    st["tokens/mse"] = int(np.asarray(batch.mse_mask).sum())
    st["fill"] = float((kind != PAD).mean())
    st["rows"] = int(kind.shape[0])
    st["vit_patches"] = int((np.asarray(batch.vit_image_ids) >= 0).sum())
    st["vae_images"] = sum(s.num_vae_images for docs in rows for s in docs)
    for docs in rows:
        for s in docs:
            st[f"samples/{s.stream}"] = st.get(f"samples/{s.stream}", 0) + 1
    st["samples"] = sum(len(d) for d in rows)
    return st


# ------------------------------------------------------------------------------------------------
# BAGEL's greedy loop (reference for the benchmark)

def row_budgets(spec: RowSpec) -> Callable[[list[Sample], Sample], bool]:
    """``fits(seq, s)`` for ``bagel_pack``: our row budgets on top of BAGEL's token check."""
    def fits(seq: list[Sample], s: Sample) -> bool:
        r = Row()
        for x in seq:
            r.add(x, sizes(x))
        return r.fits(sizes(s), spec)
    return fits


def bagel_pack(samples: Iterable[Sample], *, max_num_tokens: int, expected_num_tokens: int,
               max_num_tokens_per_sample: int, prefer_buffer_before: int | None = None,
               max_buffer_size: int = 50, fits: Callable[[list[Sample], Sample], bool] | None = None,
               num_sequences: int = 100) -> Iterator[tuple[list[Sample], int]]:
    """BAGEL's ``PackedDataset.__iter__`` over one pre-mixed sample stream (mandatory groups and the
    weighted group choice are replaced by the stream order). Yields (samples of a sequence, dropped
    count) -- the sample that triggers a flush while the buffer is full is dropped, as in BAGEL.
    ``fits(seq, s)`` adds extra budgets (ours) to BAGEL's token check."""
    it = iter(samples)
    if prefer_buffer_before is None:
        prefer_buffer_before = expected_num_tokens // 2
    buffer: list[Sample] = []
    seq: list[Sample] = []
    curr = dropped = made = 0
    ntok = lambda s: s.num_tokens   # noqa: E731  (exact; BAGEL's estimate is num_tokens + 2*len(plan))
    while made < num_sequences:
        if curr < prefer_buffer_before and buffer:
            s, from_buffer = buffer.pop(0), True
        else:
            s, from_buffer = next(it), False
        n = ntok(s)
        if n > max_num_tokens_per_sample:
            dropped += 1
            continue
        if curr + n > max_num_tokens or (fits is not None and not fits(seq, s)):
            if len(buffer) < max_buffer_size and not from_buffer:
                buffer.append(s)
            else:
                dropped += 1
                yield seq, dropped
                made += 1
                seq, curr, dropped = [], 0, 0
            continue
        seq.append(s)
        curr += n
        if curr >= expected_num_tokens:
            yield seq, dropped
            made += 1
            seq, curr, dropped = [], 0, 0
