"""A deterministic, resumable stream of random PackedBatches satisfying the routing invariants
(for trainer tests that must not depend on the data pipeline)."""
import numpy as np

from sgt_jax import batch as B


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
