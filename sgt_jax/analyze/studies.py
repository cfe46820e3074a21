"""The three studies of the paper's Sec. 4.4 over an inference ``Engine`` (infer/engine.py).

* ``features``: ViT features (SigLIP after its post-layernorm) and connector features
  (connector(ViT) + vit_pos_embed, what the LLM receives) of labelled images, pooled per image:
  ``flatten`` (all tokens concatenated, the paper's Fig. 11; needs one patch count for all
  images) or ``mean``.
* ``vqa_attention``: per layer, the attention mass from the text tokens of a VQA context
  (question, and the reference answer when given) to its ViT tokens (Fig. 8a).
* ``prompt_attention``: during T2I sampling (the engine's CFG sampler, BAGEL's schedule), at chosen
  Euler steps, the attention mass from the latent tokens of the conditional context's flow block
  to each prompt token in the KV cache, per layer (Fig. 8b / Fig. 12).

Attention comes from ``capture.attention_pass`` (an analysis forward over the same modules). Each
jitted function is compiled once per static shape (rows, buckets); their names start with
``analyze_`` (``compile_counts``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sgt_jax.analyze import capture
from sgt_jax.batch import TEXT, VIT, NOISE
from sgt_jax.infer.cache import KVCache, block_segments, bucket
from sgt_jax.infer.context import Image, Text, cfg_contexts
from sgt_jax.infer.image import latent_position_ids, schedule
from sgt_jax.train.loop import CompileCounter

_COMPILES = CompileCounter()


def compile_counts() -> dict[str, int]:
    return {k: v for k, v in _COMPILES.by_name.items() if "analyze_" in k}


def _pad_rows(items: list, rows: int) -> list:
    return items + [items[0]] * (rows - len(items))


class Analyzer:
    """The jitted analysis functions over one engine's weights (``query_chunk`` / ``head_block``:
    the attention block size, see capture.py)."""

    def __init__(self, eng, *, query_chunk: int = 0, head_block: int = 0):
        self.eng = eng
        gd = eng.graphdef
        qc, hb = int(query_chunk), int(head_block)

        def analyze_features(params, fixed, batch):
            model = nnx.merge(gd, params, fixed)
            v = model.vit_model(batch.vit_patches, batch.vit_position_ids, batch.vit_image_ids)
            return v.astype(jnp.float32), model.vit_embeddings(batch).astype(jnp.float32)

        def analyze_vqa_attention(params, fixed, batch, query_weight):
            model = nnx.merge(gd, params, fixed)
            x = model.embed_und(batch, batch.text_ids, batch.kind, batch.vit_index)
            return capture.packed_key_profile(model, x, batch, 0, query_weight, query_chunk=qc, head_block=hb)

        def analyze_latent_attention(params, fixed, cache, x_t, t, latent_pos, marks):
            """Per-layer profile (layers, B, C + n + 2) of the latent queries of the flow block."""
            model = nnx.merge(gd, params, fixed)
            lm = model.language_model
            rows, n = x_t.shape[:2]
            gen = model.embed_latents(x_t, jnp.broadcast_to(t, (rows, n)), jnp.broadcast_to(latent_pos, (rows, n)))
            und = lm.embed_tokens(jnp.broadcast_to(marks, (rows, 2)))
            x = jnp.concatenate([und, gen.astype(und.dtype)], axis=1)
            seg = block_segments(jnp.full((rows, n + 2), NOISE, jnp.int32), jnp.ones((rows, n + 2), bool))
            pos = jnp.broadcast_to(cache.rope[:, None], (rows, n + 2))
            qw = jnp.concatenate([jnp.zeros((rows, 2)), jnp.ones((rows, n))], axis=1)
            _, prof = capture.attention_pass(lm, x, pos, seg, n, capture.key_profile(qw), cache=cache,
                                             query_chunk=qc, head_block=hb)
            return prof / (n * model.cfg.llm.num_heads)

        self._features = jax.jit(analyze_features)
        self._vqa = jax.jit(analyze_vqa_attention)
        self._latent = jax.jit(analyze_latent_attention)

    def _put(self, tree):
        return jax.tree.map(self.eng.put_rows, tree)

    # -- features --------------------------------------------------------------------------------

    def features(self, images, *, batch_size: int = 16, pool: str = "auto") -> dict:
        """{"vit": (N, D), "connector": (N, D'), "pool": the pooling used} for uint8 HWC images."""
        eng = self.eng
        if not eng.cfg.bagel.visual_und:
            raise ValueError(f"{eng.source}: the model has no ViT (bagel.visual_und is False)")
        vit, con = [], []
        for s in range(0, len(images), batch_size):
            chunk = images[s:s + batch_size]
            ctxs = _pad_rows([[Image(eng.transforms.vit_und(np.asarray(im)), vae=False)] for im in chunk], batch_size)
            cb = eng.pack(ctxs)
            v, c = self._features(eng.params, eng.fixed, self._put(cb.batch))
            v, c = np.asarray(v), np.asarray(c)
            kind, vidx = np.asarray(cb.batch.kind), np.asarray(cb.batch.vit_index)
            for r in range(len(chunk)):
                idx = vidx[r][kind[r] == VIT]
                vit.append(v[r, idx])
                con.append(c[r, idx])
        counts = {len(a) for a in vit}
        if pool == "auto":
            pool = "flatten" if len(counts) == 1 else "mean"
        if pool == "flatten" and len(counts) != 1:
            raise ValueError(f"--pool flatten needs one patch count for all images, got {sorted(counts)}: use --pool mean")
        f = (lambda a: a.reshape(-1)) if pool == "flatten" else (lambda a: a.mean(0))
        return {"vit": np.stack([f(a) for a in vit]), "connector": np.stack([f(a) for a in con]), "pool": pool}

    # -- text -> ViT attention -------------------------------------------------------------------

    def vqa_attention(self, items, *, batch_size: int = 8, with_answer: bool = True) -> dict:
        """Per item and layer: the mean attention mass (over heads and text queries) on ViT tokens,
        on text tokens and on the image markers. Returns {"vit": (N, layers), "text": ..., "queries": (N,)}."""
        eng = self.eng
        marks = (eng.special.start_of_image, eng.special.end_of_image)
        out = {"vit": [], "text": [], "queries": []}
        for s in range(0, len(items), batch_size):
            chunk = items[s:s + batch_size]
            ctxs = []
            for it in chunk:
                ctx = [Image(eng.transforms.vit_und(np.asarray(im), img_num=len(it["images"])), vae=False)
                       for im in it["images"]] + [Text(it["question"])]
                if with_answer and it.get("answer"):
                    ctx.append(Text(str(it["answer"])))
                ctxs.append(ctx)
            cb = eng.pack(_pad_rows(ctxs, batch_size))
            kind, tid = np.asarray(cb.batch.kind), np.asarray(cb.batch.text_ids)
            text = (kind == TEXT) & ~np.isin(tid, marks)
            prof = np.asarray(self._vqa(eng.params, eng.fixed, self._put(cb.batch),
                                        eng.put_rows(text.astype(np.float32))))          # (layers, B, L)
            for r in range(len(chunk)):
                out["vit"].append(prof[:, r][:, kind[r] == VIT].sum(-1))
                out["text"].append(prof[:, r][:, text[r]].sum(-1))
                out["queries"].append(int(text[r].sum()))
        return {k: np.asarray(v) for k, v in out.items()}

    # -- latent -> prompt-token attention --------------------------------------------------------

    def prompt_attention(self, prompts, *, flow, height: int, width: int, steps=(0, 1, 2), seed: int = 0,
                         batch_size: int = 4) -> list[dict]:
        """Per prompt: the cached context tokens (ids, marker flags) and, per chosen Euler step,
        the per-layer mass from the latent queries to each context token: "mass" (steps, layers, T)."""
        eng = self.eng
        d = eng.cfg.bagel.latent_patch_size * 2 ** (len(eng.cfg.vae.ch_mult) - 1)
        if height % d or width % d:
            raise ValueError(f"image size {height}x{width} must be a multiple of {d} px")
        h, w = height // d, width // d
        steps = sorted(set(int(s) for s in steps))
        if steps and (steps[0] < 0 or steps[-1] >= flow.num_timesteps - 1):
            raise ValueError(f"--steps {steps}: Euler steps are 0 .. {flow.num_timesteps - 2}")
        n_ctx = flow.num_contexts
        marks = jnp.asarray([eng.special.start_of_image, eng.special.end_of_image], jnp.int32)
        lpos = jnp.asarray(latent_position_ids(eng.cfg, h, w))
        res = []
        for s in range(0, len(prompts), batch_size):
            chunk = prompts[s:s + batch_size]
            per = [cfg_contexts([Text(p)]) for p in _pad_rows(list(chunk), batch_size)]
            rows = [p[c] for c in range(n_ctx) for p in per]                 # [gen; cfg_text; cfg_img]
            cb = eng.pack(rows)
            cap = bucket(cb.length + h * w + 2, 64)
            seeds = [seed + s + i for i in range(batch_size)]
            keys = eng.keys(seeds * n_ctx)
            cache = eng.prefill(eng.new_cache(len(rows), cap), cb, keys)
            _, traj = eng.sample_latents(cache, h, w, flow, keys=eng.keys(seeds), return_trajectory=True)
            x_t = np.asarray(traj["x_t"])                                     # (S, B, N, d)
            ts, _ = schedule(flow.num_timesteps, flow.timestep_shift)
            gen_cache = KVCache(cache.k[:, :batch_size], cache.v[:, :batch_size], cache.length[:batch_size],
                                cache.rope[:batch_size])
            masses = []
            for st in steps:
                prof = self._latent(eng.params, eng.fixed, gen_cache, eng.put_rows(x_t[st]), jnp.float32(ts[st]),
                                    lpos, marks)
                masses.append(np.asarray(prof)[:, :, :cap])                   # (layers, B, C): cache keys
            masses = np.stack(masses)                                         # (S, layers, B, C)
            n_valid = np.asarray(cb.n_valid)
            tid = np.asarray(cb.batch.text_ids)
            for r, p in enumerate(chunk):
                k = int(n_valid[r])                     # cache entries of the context = its tokens, in order
                res.append({"prompt": p, "token_ids": tid[r, :k].tolist(), "timesteps": [float(ts[i]) for i in steps],
                            "steps": steps, "mass": masses[:, :, r, :k]})
        return res
