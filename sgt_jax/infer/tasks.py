"""The four tasks over an ``Engine``, batched over many requests (results in input order):

    answer(eng, [(images, question), ...])     VQA: ViT-only images then the question, text out
    text_to_image(eng, prompts, height, width) T2I: the prompt; CFG against the empty context
    edit(eng, images, instructions)            the image as VAE + ViT blocks, then the instruction
    segment(eng, images)                       SGT: the image as a ViT block, then the trained
                                               instruction (data/samples.py ``seg_items``); the
                                               pseudo-colour mask comes out at the VAE-transformed
                                               size of the image, as the training target had it

Images are uint8 HWC and are resized with the data config's transforms (data/samples.py
``ImageTransform``, BAGEL's MaxLongEdgeMinShortEdgeResize rule): answers use the VQA ViT
transform, segmentation the seg ViT transform (SGT's 224 rule) and the VAE transform for the
output size, editing resizes with the VAE transform first and gives the ViT that image resized
again (as ``interleave_inference`` does). Requests are cut into batches of ``batch_size`` rows
(the last one padded by repeating a request, its outputs dropped), image tasks grouped by output
size, so a run compiles each function a bounded number of times. ``seeds`` (one per request)
make every random draw of a request independent of its batch and position.

Think mode (BAGEL): a system-prompt text block starts the context (and the ``cfg_img`` one);
``answer`` then returns the whole generation, ``text_to_image`` generates the planning text,
appends it to the conditional context and generates the image. The system prompts below are
this project's wording; BAGEL's (``inferencer.py``: ``VLM_THINK_SYSTEM_PROMPT``,
``GEN_THINK_SYSTEM_PROMPT``) can be passed as ``think_prompt``.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from sgt_jax.data.instructions import SEGMENT_INSTRUCTION
from sgt_jax.data.samples import ImageTransform, layout, resize
from sgt_jax.infer.cache import bucket
from sgt_jax.infer.context import Image, Text, cfg_contexts, layout_spec, to_items
from sgt_jax.infer.image import FlowConfig
from sgt_jax.infer.text import rewind

THINK_UND = ("Think the question through step by step before answering: write the reasoning inside "
             "<think> </think> tags, then the answer after them.")
THINK_GEN = ("Plan the image step by step before drawing it: write the plan inside <think> </think> "
             "tags, then generate the image.")
# BAGEL's settings (inference.ipynb / interleave_inference); segmentation: the editing ones
T2I_FLOW = FlowConfig(cfg_text_scale=4.0, cfg_img_scale=1.0, cfg_interval=(0.4, 1.0), cfg_renorm_type="global")
EDIT_FLOW = FlowConfig(cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0),
                       cfg_renorm_type="text_channel")
SEGMENT_FLOW = EDIT_FLOW


class PromptTooLong(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Transforms:
    vit_und: ImageTransform      # VQA / editing ViT input
    vit_seg: ImageTransform      # segmentation ViT input (SGT's 224 rule)
    vae: ImageTransform          # VAE input / generated image size


def transforms_for(cfg, data_cfg=None) -> Transforms:
    """The data config's transforms (a run's, or the default one matching the model's position
    tables: ``tiny_data_config`` for tables of < 70 ViT patches per side)."""
    if data_cfg is None or "transforms" not in data_cfg:
        from sgt_jax.data.config import default_data_config, tiny_data_config

        data_cfg = default_data_config() if cfg.bagel.vit_max_num_patch_per_side >= 70 else tiny_data_config()
    t = data_cfg.transforms
    return Transforms(
        vit_und=ImageTransform(t.vqa_vit_max, t.vqa_vit_min, t.vit_stride, t.vqa_vit_max_pixels,
                               t.sqrt_max_pixels, t.resample),
        vit_seg=ImageTransform(t.vit_image_size, t.vit_image_size, t.vit_stride, t.seg_vit_max_pixels,
                               t.sqrt_max_pixels, t.resample),
        vae=ImageTransform(t.vae_max, t.vae_min, t.vae_stride, t.vae_max_pixels, t.sqrt_max_pixels, t.resample))


def context_tokens(eng, context) -> int:
    """Tokens a context occupies in the cache."""
    return layout(to_items(context, eng.tokenizer), layout_spec(eng.cfg, eng.special)).num_tokens


def _check_length(eng, contexts, extra: int, max_context_tokens: int, what: str):
    n = max(context_tokens(eng, c) for c in contexts)
    if n + extra > max_context_tokens:
        raise PromptTooLong(f"{what}: {n} context tokens + {extra} to generate > max_context_tokens="
                            f"{max_context_tokens}; shorten the prompt / use smaller images, or raise the limit")
    return n


def _batches(n: int, batch_size: int):
    for s in range(0, n, batch_size):
        idx = list(range(s, min(n, s + batch_size)))
        yield idx, idx + [idx[-1]] * (batch_size - len(idx))       # padded to a static row count


def _seeds(seeds, n):
    seeds = list(range(n)) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} requests")
    return seeds


def _decode_text(eng, toks):
    return eng.tokenizer.decode(toks) if eng.tokenizer is not None else None


def _generate(eng, contexts, seeds, *, max_new_tokens, temperature, top_k, top_p, max_context_tokens, what):
    """Prefill ``contexts`` (one per row) and decode; returns (cache, host outputs, rows' lengths)."""
    n = _check_length(eng, contexts, max_new_tokens, max_context_tokens, what)
    cb = eng.pack(contexts)
    keys = eng.keys(seeds)
    cache = eng.prefill(eng.new_cache(len(contexts), bucket(max(cb.length, n + max_new_tokens), 64)), cb, keys)
    length, rope = np.asarray(cache.length), np.asarray(cache.rope)
    cache, out = eng.generate_text(cache, keys, max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_k=top_k, top_p=top_p)
    return cache, {k: np.asarray(v) for k, v in out.items()}, (length, rope)


def _answers(eng, out, rows):
    res = []
    for r in rows:
        k = int(out["num_tokens"][r])
        toks = out["tokens"][r, :k].tolist()
        res.append({"text": _decode_text(eng, toks), "tokens": toks,
                    "logprobs": out["logprobs"][r, :k].tolist(),
                    "sampling_logprobs": out["sampling_logprobs"][r, :k].tolist(),
                    "stopped": bool(out["stopped"][r])})
    return res


def answer_context(eng, images: Sequence[np.ndarray], question: str, *, think: bool = False,
                   think_prompt: str | None = None) -> list:
    """[system?] + ViT-only images (VQA transform, max pixels shared by the images) + question."""
    k = len(images)
    system = [Text(think_prompt or THINK_UND)] if think else []
    return system + [Image(eng.transforms.vit_und(np.asarray(im), img_num=k), vae=False) for im in images] \
        + [Text(question)]


def answer(eng, requests: Sequence[tuple[Sequence[np.ndarray], str]], *, max_new_tokens: int = 256,
           temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, think: bool = False,
           think_prompt: str | None = None, seeds=None, batch_size: int = 8,
           max_context_tokens: int = 8192, progress=None) -> list[dict]:
    """VQA. ``requests``: (images (uint8 HWC, any number), question). Returns per request
    {"text", "tokens", "logprobs", "sampling_logprobs", "stopped"} (text None without a tokenizer)."""
    seeds = _seeds(seeds, len(requests))
    ctxs = [answer_context(eng, ims, q, think=think, think_prompt=think_prompt) for ims, q in requests]
    out = [None] * len(requests)
    for idx, rows in _batches(len(requests), batch_size):
        _, o, _ = _generate(eng, [ctxs[i] for i in rows], [seeds[i] for i in rows], max_new_tokens=max_new_tokens,
                            temperature=temperature, top_k=top_k, top_p=top_p,
                            max_context_tokens=max_context_tokens, what=f"answer requests {idx[0]}..{idx[-1]}")
        for i, a in zip(idx, _answers(eng, o, range(len(idx)))):
            out[i] = a
        if progress is not None:
            progress.update(len(idx))
    return out


def t2i_inputs(prompt: str) -> list:
    return [Text(prompt)]


def edit_inputs(eng, image: np.ndarray, instruction: str):
    """([VAE + ViT image, instruction], output (H, W)): the VAE-transformed image, its ViT copy
    resized again with the ViT transform (as interleave_inference)."""
    v = eng.transforms.vae(np.asarray(image))
    return [Image(v, vae=True, vit=True, vit_image=eng.transforms.vit_und(v)), Text(instruction)], v.shape[:2]


def segment_inputs(eng, image: np.ndarray, instruction: str = SEGMENT_INSTRUCTION, vae_condition: bool = False):
    """([ViT image (seg transform) (+ VAE block), instruction], output (H, W) = the VAE-transformed
    size, as the training target)."""
    im = np.asarray(image)
    w, h = eng.transforms.vae.size(im.shape[1], im.shape[0])
    vit = eng.transforms.vit_seg(im)
    img = Image(resize(im, w, h), vae=True, vit=True, vit_image=vit) if vae_condition else \
        Image(vit, vae=False, vit=True)
    return [img, Text(instruction)], (h, w)


def image_request_tokens(eng, inputs, hw, flow: FlowConfig, *, think: bool = False, think_prompt=None,
                         think_tokens: int = 256) -> int:
    """Cache entries a request needs (its largest context + the image block + a plan)."""
    system = [Text(think_prompt or THINK_GEN)] if think else []
    d = eng.cfg.bagel.latent_patch_size * 2 ** (len(eng.cfg.vae.ch_mult) - 1)
    n = max(context_tokens(eng, c) for c in cfg_contexts(inputs, system)[:flow.num_contexts])
    return n + (hw[0] // d) * (hw[1] // d) + 2 + ((think_tokens + 2) if think else 0)


def _image_batch(eng, inputs, seeds, hw, flow: FlowConfig, *, think=False, think_prompt=None,
                 think_tokens=256, temperature=0.0, max_context_tokens=8192, what=""):
    """Generate one batch of images of size ``hw`` from input lists (BAGEL's interleave rules);
    returns (uint8 images (B, H, W, 3), think texts or None)."""
    d = eng.cfg.bagel.latent_patch_size * 2 ** (len(eng.cfg.vae.ch_mult) - 1)
    H, W = hw
    if H % d or W % d:
        raise ValueError(f"{what}: image size {H}x{W} must be a multiple of {d} px")
    h, w = H // d, W // d
    system = [Text(think_prompt or THINK_GEN)] if think else []
    per = [cfg_contexts(x, system) for x in inputs]
    n_ctx = flow.num_contexts
    rows = [p[c] for c in range(n_ctx) for p in per]          # context-major: [gen; cfg_text; cfg_img]
    extra = (think_tokens + 2) if think else 0
    n = _check_length(eng, rows, h * w + 2 + extra, max_context_tokens, what)
    cb = eng.pack(rows)
    # room for the context block, the decoded plan, and the plan's own (bucketed) block
    cap = bucket(max(cb.length, n + (max(think_tokens, bucket(think_tokens + 2)) if think else 0)), 64)
    keys = eng.keys(list(seeds) * n_ctx)
    cache = eng.prefill(eng.new_cache(len(rows), cap), cb, keys)
    thoughts = None
    if think:
        b = len(inputs)
        length, rope = np.asarray(cache.length), np.asarray(cache.rope)
        cache, out = eng.generate_text(cache, keys, max_new_tokens=think_tokens, temperature=temperature)
        cache = rewind(cache, length, rope)
        out = {k: np.asarray(v) for k, v in out.items()}
        plans = [out["tokens"][r, :int(out["num_tokens"][r])].tolist() for r in range(b)]
        thoughts = [_decode_text(eng, p) for p in plans]
        # the plan is appended to the conditional context only (as interleave_inference does)
        cache = eng.prefill(cache, eng.pack([[Text(p)] for p in plans] + [[] for _ in range(len(rows) - b)]), keys)
    lat = eng.sample_latents(cache, h, w, flow, keys=eng.keys(seeds))
    _, u8 = eng.decode_latents(lat, h, w)
    return np.asarray(u8), thoughts


def _run_images(eng, inputs, sizes, seeds, flow, batch_size, progress, **kw):
    out = [None] * len(inputs)
    thoughts = [None] * len(inputs)
    for hw in sorted(set(sizes)):
        group = [i for i, s in enumerate(sizes) if s == hw]
        for sub, rows in _batches(len(group), batch_size):
            ids = [group[j] for j in rows]
            imgs, th = _image_batch(eng, [inputs[i] for i in ids], [seeds[i] for i in ids], hw, flow,
                                    what=f"requests {group[sub[0]]}..{group[sub[-1]]}", **kw)
            for j, i in enumerate(group[k] for k in sub):
                out[i] = imgs[j]
                thoughts[i] = th[j] if th else None
            if progress is not None:
                progress.update(len(sub))
    return out, thoughts


def generate_images(eng, inputs: Sequence[list], sizes: Sequence[tuple[int, int]], *, flow: FlowConfig,
                    seeds=None, batch_size: int = 4, think: bool = False, think_prompt: str | None = None,
                    think_tokens: int = 256, temperature: float = 0.0, max_context_tokens: int = 8192,
                    progress=None):
    """Images (uint8 (H, W, 3)) and think texts (None unless ``think``) for input lists
    (``t2i_inputs`` / ``edit_inputs`` / ``segment_inputs``) and output sizes."""
    seeds = _seeds(seeds, len(inputs))
    return _run_images(eng, list(inputs), [tuple(s) for s in sizes], seeds, flow, batch_size, progress,
                       think=think, think_prompt=think_prompt, think_tokens=think_tokens, temperature=temperature,
                       max_context_tokens=max_context_tokens)


def text_to_image(eng, prompts: Sequence[str], *, height: int, width: int, flow: FlowConfig = T2I_FLOW,
                  seeds=None, batch_size: int = 4, think: bool = False, **kw):
    """T2I: uint8 (height, width, 3) per prompt."""
    return generate_images(eng, [t2i_inputs(p) for p in prompts], [(height, width)] * len(prompts), flow=flow,
                           seeds=seeds, batch_size=batch_size, think=think, **kw)[0]


def edit(eng, images: Sequence[np.ndarray], instructions: Sequence[str], *, flow: FlowConfig = EDIT_FLOW,
         seeds=None, batch_size: int = 4, **kw):
    """Editing (BAGEL's f(x, [z_vit, z_vae, z_noise])): uint8 image per request at the VAE-
    transformed size of its input."""
    if len(images) != len(instructions):
        raise ValueError(f"{len(images)} images for {len(instructions)} instructions")
    ins = [edit_inputs(eng, im, t) for im, t in zip(images, instructions)]
    return generate_images(eng, [i for i, _ in ins], [s for _, s in ins], flow=flow, seeds=seeds,
                           batch_size=batch_size, **kw)[0]


def segment(eng, images: Sequence[np.ndarray], *, instruction: str = SEGMENT_INSTRUCTION,
            flow: FlowConfig = SEGMENT_FLOW, seeds=None, batch_size: int = 4, vae_condition: bool = False,
            resize_to_input: bool = False, **kw):
    """SGT's task: image -> pseudo-colour instance mask (uint8 HWC), conditioned as the training
    samples are (ViT image + instruction; ``vae_condition=True`` adds the VAE block, as editing).
    The mask has the VAE-transformed size of the image (``resize_to_input``: nearest-resized back
    to the input size)."""
    ins = [segment_inputs(eng, im, instruction, vae_condition) for im in images]
    masks = generate_images(eng, [i for i, _ in ins], [s for _, s in ins], flow=flow, seeds=seeds,
                            batch_size=batch_size, **kw)[0]
    if resize_to_input:
        masks = [resize(m, np.asarray(im).shape[1], np.asarray(im).shape[0], "nearest")
                 for m, im in zip(masks, images)]
    return masks
