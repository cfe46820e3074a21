"""Shared test helpers: a deterministic, resumable stream of random PackedBatches satisfying the
routing invariants (``FakeIterator``, for trainer tests that must not depend on the data
pipeline), and the builders of on-disk test data (images, tar shards, SA-1B JSON, LLaVA turns)
and record comparisons the data tests share."""
import io
import json
import os
import struct
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from sgt_jax import batch as B
from sgt_jax.data import render
from sgt_jax.data.records import BadRecord

REPO = Path(__file__).resolve().parents[1]


class FakeIterator:
    def __init__(self, cfg, rows: int, length: int = 48, patches: int = 8, images: int = 1,
                 image_px: int = 32, seed: int = 0, vary: bool = True, nan_at: tuple = ()):
        self.cfg, self.rows, self.length, self.patches = cfg, rows, length, patches
        self.images, self.px, self.seed, self.vary, self.nan_at = images, image_px, seed, vary, nan_at
        self.i = 0
        self.num_gen = int(cfg.data.gen_tokens_per_row)

    def get_state(self):
        return {"i": self.i}

    def set_state(self, s):
        self.i = int(s["i"])

    def __iter__(self):
        return self

    def __next__(self):
        rng = np.random.default_rng((self.seed, self.i))
        self.i += 1
        rows = [self._row(rng) for _ in range(self.rows)]
        batch = B.PackedBatch(**{k: np.stack([r[k] for r in rows]) for k in rows[0]})
        return batch, {"skipped": {"corrupt_image": 0}, "rows": self.i * self.rows}

    def _row(self, rng):
        cfg, L, G = self.cfg, self.length, self.num_gen
        p = cfg.model.bagel.latent_patch_size
        down = 2 ** (len(cfg.model.vae.ch_mult) - 1) * p
        grid = self.px // down
        n_img_tok = grid * grid
        vocab = cfg.model.llm.vocab_size - 4
        # doc 0: ViT image + instruction text + noised latent image (a segmentation sample)
        n_vit = min(self.patches, 4 + (int(rng.integers(0, self.patches - 3)) if self.vary else 0))
        n_text = int(rng.integers(3, 8)) if self.vary else 5
        kinds, pos, doc, split, mode, expert, text, vit_index, vti, lpos, ts, ce_mask, mse_mask = ([] for _ in range(13))
        def add(k, po, sp, mo, ex=0, tid=0, vi=0, vt=0, lp=0, t=0.0, ce=False, mse=False):
            kinds.append(k); pos.append(po); doc.append(0); split.append(sp); mode.append(mo); expert.append(ex)
            text.append(tid); vit_index.append(vi); vti.append(vt); lpos.append(lp); ts.append(t)
            ce_mask.append(ce); mse_mask.append(mse)
        add(B.TEXT, 0, 0, 1, tid=cfg.model.llm.start_of_image)
        for j in range(n_vit):
            add(B.VIT, 0, 0, 1, vi=j)
        add(B.TEXT, 0, 0, 1, tid=cfg.model.llm.end_of_image)
        for j in range(n_text):
            add(B.TEXT, 1 + j, 1, 0, tid=int(rng.integers(0, vocab)), ce=j < n_text - 1)
        raw = float(rng.normal())
        if self.i - 1 in self.nan_at:
            raw = float("nan")
        tpos = 1 + n_text
        add(B.TEXT, tpos, 2, 2, tid=cfg.model.llm.start_of_image)
        for j in range(n_img_tok):
            r, c = divmod(j, grid)
            add(B.VAE_NOISED, tpos, 2, 2, ex=1, vt=j, lp=r * cfg.model.bagel.max_latent_size + c, t=raw, mse=True)
        add(B.TEXT, tpos, 2, 2, tid=cfg.model.llm.end_of_image)
        n = len(kinds)
        assert n <= L and n_img_tok <= G
        pad = L - n
        short = G - n_img_tok
        labels = np.zeros(L, np.int32)
        labels[:n - 1] = np.asarray(text[1:], np.int32)
        out = dict(
            kind=np.array(kinds + [B.PAD] * pad, np.int32), text_ids=np.array(text + [0] * pad, np.int32),
            position_ids=np.array(pos + [0] * pad, np.int32), doc_ids=np.array(doc + [1] * pad, np.int32),
            split_ids=np.array(split + [3] * pad, np.int32), split_mode=np.array(mode + [0] * pad, np.int32),
            expert=np.array(expert + [1] * short + [0] * (pad - short), np.int32),
            ce_mask=np.array(ce_mask + [False] * pad), ce_labels=labels, ce_weights=np.ones(L, np.float32),
            mse_mask=np.array(mse_mask + [False] * pad), vit_index=np.array(vit_index + [0] * pad, np.int32),
            vae_token_index=np.array(vti + [0] * pad, np.int32),
            latent_position_ids=np.array(lpos + [0] * pad, np.int32),
            timesteps=np.array(ts + [0.0] * pad, np.float32),
            vit_patches=rng.uniform(-1, 1, (self.patches, 3 * 14 * 14)).astype(np.float32),
            vit_position_ids=np.array([j if j < n_vit else 0 for j in range(self.patches)], np.int32),
            vit_image_ids=np.array([0 if j < n_vit else -1 for j in range(self.patches)], np.int32),
            vae_images=rng.uniform(-1, 1, (self.images, self.px, self.px, 3)).astype(np.float32),
            latents=None)
        return {k: v for k, v in out.items() if v is not None}


# ------------------------------------------------------------------------------------------------
# on-disk data for the data tests
# ------------------------------------------------------------------------------------------------

def _enc(arr, fmt="JPEG", **kw) -> bytes:
    b = io.BytesIO()
    (arr if isinstance(arr, Image.Image) else Image.fromarray(arr)).save(b, fmt, **kw)
    return b.getvalue()


def _write(path, data: bytes | str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return str(path)


def _sa1b_json(image_id, h, w, masks, **image_extra):
    return json.dumps({"image": {"image_id": image_id, "height": h, "width": w,
                                 "file_name": f"sa_{image_id}.jpg", **image_extra},
                       "annotations": [{"id": k, "segmentation": render.rle_encode(m),
                                        "area": int(m.sum()), "bbox": render.mask_bbox(m)}
                                       for k, m in enumerate(masks)]})


def _huge_png(side=20000) -> bytes:
    """A PNG whose header says side x side (the pixel data is never reached)."""
    png = bytearray(_enc(np.zeros((1, 1, 3), np.uint8), "PNG"))
    ihdr = 8 + 8                                             # signature, chunk length + type
    png[ihdr:ihdr + 8] = struct.pack(">II", side, side)
    png[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(png[ihdr - 4:ihdr + 13])))
    return bytes(png)


def _nested(h=40, w=50):
    big = np.zeros((h, w), np.uint8)
    big[5:35, 5:45] = 1
    small = np.zeros((h, w), np.uint8)
    small[15:20, 20:25] = 1
    return big, small


def _same_record(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
        elif isinstance(a[k], list) and a[k] and isinstance(a[k][0], np.ndarray):
            assert all(np.array_equal(x, y) for x, y in zip(a[k], b[k], strict=True)), k
        else:
            assert a[k] == b[k], k


def _id2rgb(i):
    return [i % 256, (i // 256) % 256, i // 65536]


def _turns(*vals):
    return [{"from": "human" if j % 2 == 0 else "gpt", "value": v} for j, v in enumerate(vals)]


def outcomes(src):
    """[(key, record | reason)] over a whole source."""
    out = []
    for i in range(len(src)):
        try:
            out.append((src.key(i), src[i]))
        except BadRecord as e:
            out.append((e.key, e.reason))
    return out


def same_outcomes(a, b):
    oa, ob = outcomes(a), outcomes(b)
    assert [k for k, _ in oa] == [k for k, _ in ob]
    for (k, x), (_, y) in zip(oa, ob):
        if isinstance(x, dict):
            assert isinstance(y, dict), (k, y)
            _same_record(x, y)
        else:
            assert x == y, k
    return oa


def tiny_run_config():
    """configs/tiny.py's run config (the repo root is not on sys.path in tests)."""
    sys.path.insert(0, str(REPO))
    try:
        from configs.tiny import get_config
    finally:
        sys.path.remove(str(REPO))
    return get_config()
