"""Sample builders: records -> BAGEL sequence plans -> per-sample token layouts.

A sample is BAGEL's ``sequence_plan`` idea (data/dataset_base.py ``pack_sequence``): a list of
``Item``s -- ``text`` (``<|im_start|> ids <|im_end|>``, causal, CE on the shifted ids if ``loss``),
``vit_image`` (``<|vision_start|> SigLIP patches <|vision_end|>``, full) and ``vae_image``
(``<|vision_start|> latent tokens <|vision_end|>``: noised + MSE if ``loss``, else clean
conditioning). ``layout`` turns the plan into per-token arrays exactly as ``pack_sequence`` does
(RoPE position per item, a noised image does not advance it, CFG-dropped text does not advance it
while a dropped image does, CE label shift, ``len2weight`` weights); the packer only concatenates
layouts into rows. Deviations from BAGEL exist only as config options.

Builders (``SampleBuilder``), one per record task (records.py):
  seg    [vit_image(RGB, 224 rule), text(instruction, cfg), vae_image(target mask, loss)]   (SGT)
  vqa    human turns split at <image> into text(no loss) + vit_image; gpt turns text(loss)  (BAGEL VLM SFT)
  t2i    [text(caption, cfg), vae_image(image, loss)]                                      (BAGEL T2I)
  recon  [vit_image(RGB), text(recon instruction, cfg), vae_image(same RGB, loss)]         (RecA)
  proxy  [vit_image(task input), text(task instruction, cfg), vae_image(task target, loss)] (issue 16)

All randomness of a sample (instruction choice, CFG dropout, timesteps) comes from
``sample_rng(seed, stream, index)``: a sample is a pure function of its record and (seed, stream,
position in the stream), which is what makes the pipeline state small and exactly resumable.

Images stay uint8 (the resized PIL output) until the packer writes them into a batch, where
``normalize`` applies BAGEL's ToTensor + Normalize(0.5, 0.5) bit for bit; float inputs (already in
[-1, 1], e.g. the golden fixture's tensors) pass through unchanged.
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any

import numpy as np
from PIL import Image

from sgt_jax.batch import CAUSAL, FULL, NOISE, PAD, TEXT, VAE_CLEAN, VAE_NOISED, VIT  # noqa: F401  (PAD, CAUSAL re-exported)
from sgt_jax.data.instructions import RECON_INSTRUCTIONS, SEGMENT_INSTRUCTION, SEGMENT_INSTRUCTIONS
from sgt_jax.data.proxy import tasks as proxy_tasks
from sgt_jax.data.records import BadRecord
from sgt_jax.data.tokenizer import SpecialTokens
from sgt_jax.models.siglip import patchify, position_ids


_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}
TOKEN_KEYS = ("kind", "text_ids", "position_ids", "split_ids", "split_mode", "ce_mask", "ce_labels",
              "ce_weights", "mse_mask", "vit_index", "vae_image", "vae_row", "vae_col",
              "latent_position_ids", "timesteps")


# ------------------------------------------------------------------------------------------------
# image transforms (BAGEL data/transforms.py)

def make_divisible(value: float, stride: int) -> int:
    """BAGEL's ``_make_divisible``: Python ``round`` (banker's rounding), at least one stride."""
    return max(stride, int(round(value / stride) * stride))


def resize_hw(width: int, height: int, max_size: int, min_size: int, stride: int, max_pixels: int,
              img_num: int = 1, sqrt_max_pixels: bool = False) -> tuple[int, int]:
    """BAGEL's ``MaxLongEdgeMinShortEdgeResize`` size rule -> (new_width, new_height).

    The max_pixels step scales each side by the AREA ratio (BAGEL's quirk: it over-shrinks);
    ``sqrt_max_pixels=True`` scales by its square root instead (documented deviation)."""
    def apply(w, h, scale):
        return make_divisible(round(w * scale), stride), make_divisible(round(h * scale), stride)

    scale = min(max_size / max(width, height), 1.0)
    scale = max(scale, min_size / min(width, height))
    w, h = apply(width, height, scale)
    if w * h > max_pixels / img_num:
        scale = max_pixels / img_num / (w * h)
        w, h = apply(w, h, math.sqrt(scale) if sqrt_max_pixels else scale)
    if max(w, h) > max_size:
        w, h = apply(w, h, max_size / max(w, h))
    return w, h


def resize(image: np.ndarray, width: int, height: int, resample: str = "bicubic") -> np.ndarray:
    """PIL resize of a uint8 HWC image (torchvision's F.resize on a PIL image does exactly this;
    PIL's bicubic is antialiased)."""
    if image.shape[0] == height and image.shape[1] == width:
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), _RESAMPLE[resample]))


@dataclasses.dataclass(frozen=True)
class ImageTransform:
    """BAGEL's ``ImageTransform(max_image_size, min_image_size, image_stride, max_pixels)`` minus the
    normalisation (applied by the packer, see ``normalize``)."""
    max_size: int
    min_size: int
    stride: int
    max_pixels: int = 14 * 14 * 9 * 1024
    sqrt_max_pixels: bool = False
    resample: str = "bicubic"

    def size(self, width: int, height: int, img_num: int = 1) -> tuple[int, int]:
        return resize_hw(width, height, self.max_size, self.min_size, self.stride, self.max_pixels,
                         img_num, self.sqrt_max_pixels)

    def __call__(self, image: np.ndarray, img_num: int = 1, resample: str | None = None) -> np.ndarray:
        w, h = self.size(image.shape[1], image.shape[0], img_num)
        return resize(image, w, h, resample or self.resample)


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1] exactly as ToTensor (x / 255) + Normalize(0.5, 0.5); float input
    is assumed normalised already."""
    if image.dtype == np.uint8:
        x = image.astype(np.float32) / np.float32(255.0)
        return (x - np.float32(0.5)) / np.float32(0.5)
    return image.astype(np.float32, copy=False)


# ------------------------------------------------------------------------------------------------
# sequence plans and layouts

@dataclasses.dataclass
class Item:
    """One element of a sequence plan (BAGEL's plan dict plus its payload)."""
    type: str                              # "text" | "vit_image" | "vae_image"
    loss: int = 0
    enable_cfg: int = 0
    special_token_loss: int = 0
    special_token_label: int | None = None
    text_ids: list[int] | None = None      # text
    image: np.ndarray | None = None        # images: HWC, uint8 or float in [-1, 1]
    timestep: float | None = None          # noised vae image: raw flow timestep
    dropped: bool = False                  # removed by CFG dropout


@dataclasses.dataclass(frozen=True)
class LayoutSpec:
    """The constants a layout needs (from the data config and the tokenizer)."""
    special: SpecialTokens
    vit_patch_size: int = 14
    vit_max_patches_per_side: int = 70
    vae_downsample: int = 16
    max_latent_size: int = 64
    ce_weighting: str = "square"

    @classmethod
    def from_config(cls, cfg, special: SpecialTokens) -> "LayoutSpec":
        return cls(special=special, vit_patch_size=cfg.vit_patch_size,
                   vit_max_patches_per_side=cfg.vit_max_patches_per_side,
                   vae_downsample=cfg.vae_downsample, max_latent_size=cfg.max_latent_size,
                   ce_weighting=cfg.samples.ce_weighting)


def len2weight(x: int, reduction: str = "square") -> float:
    """BAGEL's data_utils.len2weight."""
    if x == 0:
        return 0.0
    return {"token": 1.0, "sample": 1.0 / x, "square": 1.0 / (x ** 0.5)}[reduction]


@dataclasses.dataclass
class Sample:
    """A laid-out document: per-token arrays (local positions / splits / image indices) plus its
    ViT patches and VAE images. The packer adds row offsets."""
    stream: str
    index: int                             # position in the stream (seeds its randomness)
    key: str                               # record id
    task: str
    tokens: dict[str, np.ndarray]          # TOKEN_KEYS, each (n,)
    vit_patches: np.ndarray                # (n_vit, 3 p^2), uint8 or float32
    vit_position_ids: np.ndarray           # (n_vit,)
    vit_image_ids: np.ndarray              # (n_vit,) local image index
    vae_images: list[np.ndarray]           # HWC, uint8 or float32
    text: str = ""                         # human-readable summary (preview, debugging)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens["kind"].shape[0])

    @property
    def num_gen(self) -> int:
        k = self.tokens["kind"]
        return int(((k == VAE_CLEAN) | (k == VAE_NOISED)).sum())

    @property
    def num_und(self) -> int:
        return self.num_tokens - self.num_gen

    @property
    def num_vit_patches(self) -> int:
        return int(self.vit_position_ids.shape[0])

    @property
    def num_vae_images(self) -> int:
        return len(self.vae_images)

    @property
    def num_splits(self) -> int:
        s = self.tokens["split_ids"]
        return int(s.max()) + 1 if s.size else 0

    def counts(self) -> dict[str, int]:
        k = self.tokens["kind"]
        return {"text": int((k == TEXT).sum()), "vit": int((k == VIT).sum()),
                "vae_clean": int((k == VAE_CLEAN).sum()), "vae_noised": int((k == VAE_NOISED).sum()),
                "ce": int(self.tokens["ce_mask"].sum()), "mse": int(self.tokens["mse_mask"].sum())}


def layout(items: list[Item], spec: LayoutSpec, *, stream: str = "", index: int = 0, key: str = "",
           task: str = "", text: str = "") -> Sample:
    """BAGEL's ``pack_sequence`` for one sample (curr = 0): the per-token arrays of the document.

    CFG dropout must already be decided (``Item.dropped``) and noised images need ``timestep``."""
    sp = spec.special
    cols: dict[str, list] = {k: [] for k in TOKEN_KEYS}
    vit_patches, vit_pos, vit_img, vae_images = [], [], [], []
    rope = split = 0
    n_vit_seen = 0

    def put(n, kind, ids=0, pos=0, mode=CAUSAL, ce=False, labels=0, weights=1.0, mse=False,
            vit_index=0, vae_image=-1, vae_row=0, vae_col=0, latent_pos=0, t=0.0):
        cols["kind"].append(np.full(n, kind, np.int32))
        cols["text_ids"].append(np.broadcast_to(np.asarray(ids, np.int32), (n,)))
        cols["position_ids"].append(np.broadcast_to(np.asarray(pos, np.int32), (n,)))
        cols["split_ids"].append(np.full(n, split, np.int32))
        cols["split_mode"].append(np.full(n, mode, np.int32))
        cols["ce_mask"].append(np.broadcast_to(np.asarray(ce, bool), (n,)))
        cols["ce_labels"].append(np.broadcast_to(np.asarray(labels, np.int32), (n,)))
        cols["ce_weights"].append(np.broadcast_to(np.asarray(weights, np.float32), (n,)))
        cols["mse_mask"].append(np.full(n, mse, bool))
        cols["vit_index"].append(np.broadcast_to(np.asarray(vit_index, np.int32), (n,)))
        cols["vae_image"].append(np.full(n, vae_image, np.int32))
        cols["vae_row"].append(np.broadcast_to(np.asarray(vae_row, np.int32), (n,)))
        cols["vae_col"].append(np.broadcast_to(np.asarray(vae_col, np.int32), (n,)))
        cols["latent_position_ids"].append(np.broadcast_to(np.asarray(latent_pos, np.int32), (n,)))
        cols["timesteps"].append(np.full(n, t, np.float32))

    for item in items:
        if item.type == "text":
            if item.dropped:                    # text CFG dropout: rope NOT advanced
                continue
            ids = [sp.bos_token_id] + list(item.text_ids)
            n = len(ids)
            if item.loss:
                put(n, TEXT, ids, np.arange(rope, rope + n), CAUSAL, ce=True,
                    labels=list(item.text_ids) + [sp.eos_token_id],
                    weights=len2weight(n, spec.ce_weighting))
            else:
                put(n, TEXT, ids, np.arange(rope, rope + n), CAUSAL)
            special_ce = bool(item.special_token_loss)
            put(1, TEXT, sp.eos_token_id, rope + n, CAUSAL, ce=special_ce,
                labels=item.special_token_label if special_ce else 0)
            rope += n + 1
        elif item.type == "vit_image":
            if item.dropped:                    # image CFG dropout: rope advanced
                rope += 1
                continue
            p = spec.vit_patch_size
            img = item.image
            hp, wp = img.shape[0] // p, img.shape[1] // p
            patches = patchify(img, p)
            n_img = patches.shape[0]
            put(1, TEXT, sp.start_of_image, rope, FULL)
            put(n_img, VIT, 0, rope, FULL, vit_index=np.arange(n_vit_seen, n_vit_seen + n_img))
            special_ce = bool(item.special_token_loss)
            put(1, TEXT, sp.end_of_image, rope, FULL, ce=special_ce,
                labels=item.special_token_label if special_ce else 0)
            vit_patches.append(patches)
            vit_pos.append(position_ids(hp, wp, spec.vit_max_patches_per_side))
            vit_img.append(np.full(n_img, len(vit_patches) - 1, np.int32))
            n_vit_seen += n_img
            rope += 1
        elif item.type == "vae_image":
            if item.dropped:
                rope += 1
                continue
            d = spec.vae_downsample
            img = item.image
            h, w = img.shape[0] // d, img.shape[1] // d
            if img.shape[0] % d or img.shape[1] % d:
                raise ValueError(f"VAE image {img.shape[:2]} is not a multiple of {d}")
            rr, cc = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
            rr, cc = rr.reshape(-1), cc.reshape(-1)
            noised = bool(item.loss)
            if noised and (item.timestep is None or not np.isfinite(item.timestep)):
                raise ValueError("a noised vae_image needs a finite timestep")
            mode = NOISE if noised else FULL
            put(1, TEXT, sp.start_of_image, rope, mode)
            put(h * w, VAE_NOISED if noised else VAE_CLEAN, 0, rope, mode, mse=noised,
                vae_image=len(vae_images), vae_row=rr, vae_col=cc,
                latent_pos=rr * spec.max_latent_size + cc,
                t=item.timestep if noised else -np.inf)
            special_ce = bool(item.special_token_loss)
            put(1, TEXT, sp.end_of_image, rope, mode, ce=special_ce,
                labels=item.special_token_label if special_ce else 0)
            vae_images.append(img)
            if not noised:                      # a noised image does not advance rope
                rope += 1
        else:
            raise ValueError(f"unknown sequence-plan item type {item.type!r}")
        split += 1

    tokens = {k: (np.concatenate(v) if v else np.zeros(0, np.float32 if k in ("ce_weights", "timesteps")
                                                       else bool if k in ("ce_mask", "mse_mask") else np.int32))
              for k, v in cols.items()}
    d3 = 3 * spec.vit_patch_size ** 2
    return Sample(
        stream=stream, index=index, key=key, task=task, tokens=tokens,
        vit_patches=np.concatenate(vit_patches) if vit_patches else np.zeros((0, d3), np.uint8),
        vit_position_ids=np.concatenate(vit_pos) if vit_pos else np.zeros(0, np.int32),
        vit_image_ids=np.concatenate(vit_img) if vit_img else np.zeros(0, np.int32),
        vae_images=vae_images, text=text)


# ------------------------------------------------------------------------------------------------
# randomness and CFG dropout

def sample_rng(seed: int, stream: str, index: int, n: int = 3) -> tuple[np.random.Generator, ...]:
    """Independent generators (choice, cfg dropout, timesteps[, proxy target]) for sample ``index``
    of ``stream``. Child k depends only on k, so ``n=4`` adds a generator without changing the
    first three."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(stream.encode()), int(index)])
    return tuple(np.random.default_rng(s) for s in ss.spawn(n))


def apply_cfg_dropout(items: list[Item], rng: np.random.Generator, text_p: float, vit_p: float,
                      vae_p: float) -> list[Item]:
    """BAGEL's condition dropout: one uniform draw per ``enable_cfg`` item, in plan order."""
    probs = {"text": text_p, "vit_image": vit_p, "vae_image": vae_p}
    for item in items:
        if item.enable_cfg:
            item.dropped = bool(rng.random() < probs[item.type])
    return items


def draw_timesteps(items: list[Item], rng: np.random.Generator, mean: float = 0.0, std: float = 1.0):
    """One N(mean, std) raw timestep per noised VAE image (BAGEL: ``np.random.randn()``)."""
    for item in items:
        if item.type == "vae_image" and item.loss and item.timestep is None:
            item.timestep = float(mean + std * rng.standard_normal())
    return items


# ------------------------------------------------------------------------------------------------
# builders

def _rgb(record: dict, field: str, source_key: str) -> np.ndarray:
    a = record.get(field)
    if not isinstance(a, np.ndarray) or a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3 \
            or min(a.shape[:2]) < 1:
        shape = getattr(a, "shape", None)
        raise BadRecord("bad_array", key=source_key,
                        detail=f"{field}: expected uint8 (H, W, 3), got {type(a).__name__} {shape}")
    return a


class SampleBuilder:
    """record -> Sample, per ``record['task']`` (seg / vqa / t2i / recon). Picklable (Grain workers)."""

    def __init__(self, cfg, tokenizer, spec: LayoutSpec | None = None):
        t, s = cfg.transforms, cfg.samples
        self.seed = int(cfg.seed)
        self.tok = tokenizer
        self.spec = spec or LayoutSpec.from_config(cfg, tokenizer.special)
        self.s = dict(text_p=float(s.text_cond_dropout_prob), vit_p=float(s.vit_cond_dropout_prob),
                      vae_p=float(s.vae_cond_dropout_prob), t_mean=float(s.timestep_mean),
                      t_std=float(s.timestep_std), instruction=s.instruction,
                      strict=bool(s.strict_image_placeholders), target_resample=t.target_resample)
        self.vit = ImageTransform(t.vit_image_size, t.vit_image_size, t.vit_stride,
                                  t.seg_vit_max_pixels, t.sqrt_max_pixels, t.resample)
        self.vae = ImageTransform(t.vae_max, t.vae_min, t.vae_stride, t.vae_max_pixels,
                                  t.sqrt_max_pixels, t.resample)
        self.vqa_vit = ImageTransform(t.vqa_vit_max, t.vqa_vit_min, t.vit_stride, t.vqa_vit_max_pixels,
                                      t.sqrt_max_pixels, t.resample)

    def __call__(self, record: dict, *, stream: str, index: int) -> Sample:
        if not isinstance(record, dict):
            raise BadRecord("bad_record", key=str(index), detail=f"not a dict: {type(record).__name__}")
        task = record.get("task")
        key = str(record.get("id", index))
        fn = {"seg": self.seg_items, "vqa": self.vqa_items, "t2i": self.t2i_items,
              "recon": self.recon_items, "proxy": self.proxy_items}.get(task)
        if fn is None:
            raise BadRecord("unknown_task", key=key, detail=repr(task))
        if task == "proxy":
            r_choice, r_cfg, r_t, r_proxy = sample_rng(self.seed, stream, index, n=4)
            items, text = self.proxy_items(record, key, r_proxy, index=index)
        else:
            r_choice, r_cfg, r_t = sample_rng(self.seed, stream, index)
            items, text = fn(record, key, r_choice)
        apply_cfg_dropout(items, r_cfg, self.s["text_p"], self.s["vit_p"], self.s["vae_p"])
        draw_timesteps(items, r_t, self.s["t_mean"], self.s["t_std"])
        return layout(items, self.spec, stream=stream, index=index, key=key, task=task, text=text)

    def _text(self, s: str, key: str = "") -> list[int]:
        try:
            s.encode("utf-8")       # a lone surrogate ("\ud800", valid JSON) breaks the tokenizer
        except UnicodeEncodeError as e:
            raise BadRecord("bad_text", key=key, detail=str(e)) from None
        return self.tok.encode(s)

    def seg_items(self, record, key, rng):
        """SGT (data/sam_190k.py, after e004548): ViT(RGB) + instruction (cfg) + noised VAE(mask)."""
        image, target = _rgb(record, "image", key), _rgb(record, "target", key)
        if target.shape[:2] != image.shape[:2]:   # SGT: mask.resize(image.size) (PIL default: bicubic)
            target = resize(target, image.shape[1], image.shape[0], self.s["target_resample"])
        if self.s["instruction"] == "fixed":
            instr = SEGMENT_INSTRUCTION
        else:
            instr = SEGMENT_INSTRUCTIONS[int(rng.integers(len(SEGMENT_INSTRUCTIONS)))]
        items = [Item("vit_image", image=self.vit(image)),
                 Item("text", enable_cfg=1, text_ids=self._text(instr)),
                 Item("vae_image", loss=1, image=self.vae(target, resample=self.s["target_resample"]))]
        return items, instr

    def proxy_items(self, record, key, rng, index: int = 0):
        """A proxy task (``proxy/tasks.py``, issue 16): ViT(input) + task instruction (cfg) + noised
        VAE(target) -- the plan of a seg sample and of every official per-task dataset. Seg-like
        targets (pseudo-colour, edges, depth, boxes) resize with ``target_resample``, RGB targets
        (the restoration tasks, reconstruction) with ``resample``."""
        pair = proxy_tasks.build(record.get("proxy"), record, rng, seed=self.seed, index=index)
        target = pair.target
        if target.shape[:2] != pair.input.shape[:2]:
            target = resize(target, pair.input.shape[1], pair.input.shape[0], self.s["target_resample"])
        rgb = pair.task in proxy_tasks.LOW_LEVEL
        resample = None if rgb else self.s["target_resample"]
        items = [Item("vit_image", image=self.vit(pair.input)),
                 Item("text", enable_cfg=1, text_ids=self._text(pair.instruction)),
                 Item("vae_image", loss=1, image=self.vae(target, resample=resample))]
        return items, f"[{pair.task}] {pair.instruction}"

    def recon_items(self, record, key, rng):
        """RecA (t2i_dataset.ReconstructionDataset): ViT(RGB) + prompt (cfg) + noised VAE(same RGB)."""
        image = _rgb(record, "image", key)
        instr = RECON_INSTRUCTIONS[int(rng.integers(len(RECON_INSTRUCTIONS)))]
        items = [Item("vit_image", image=self.vit(image)),
                 Item("text", enable_cfg=1, text_ids=self._text(instr)),
                 Item("vae_image", loss=1, image=self.vae(image))]
        return items, instr

    def t2i_items(self, record, key, rng):
        """BAGEL T2I (data/t2i_dataset.py): caption (cfg) + noised VAE(image)."""
        image = _rgb(record, "image", key)
        caption = record.get("caption")
        if not isinstance(caption, str):
            raise BadRecord("bad_caption", key=key)
        ids = self._text(caption, key) or self._text(" ")
        return [Item("text", enable_cfg=1, text_ids=ids), Item("vae_image", loss=1, image=self.vae(image))], caption

    def vqa_items(self, record, key, rng):
        """BAGEL VLM SFT (data/vlm_dataset.py ``change_format``): human turns -> text (no loss) split
        at ``<image>`` into vit_image items, gpt turns -> text (CE). ViT images resized with
        max_pixels divided by the number of images."""
        images = record.get("images") or []
        convs = record.get("conversations")
        if not isinstance(convs, list) or not all(isinstance(c, dict) and isinstance(c.get("value"), str)
                                                   and c.get("from") in ("human", "gpt") for c in convs):
            raise BadRecord("bad_conversation", key=key)
        images = [_rgb({"image": im}, "image", key) for im in images]
        n_ph = sum(c["value"].count("<image>") for c in convs if c["from"] == "human")
        if self.s["strict"] and n_ph != len(images):
            raise BadRecord("placeholder_mismatch", key=key,
                            detail=f"{n_ph} <image> placeholders, {len(images)} images")
        vit_images = [self.vqa_vit(im, img_num=len(images)) for im in images]
        items: list[Item] = []
        used = 0
        for c in convs:
            if c["from"] == "human":
                if "<image>" not in c["value"]:
                    parts, with_images = [c["value"]], False
                else:
                    parts, with_images = c["value"].split("<image>"), True
                for i, part in enumerate(parts):
                    text = part.strip() if with_images else part
                    if not with_images or text != "":
                        ids = self._text(text, key)
                        if ids:
                            items.append(Item("text", text_ids=ids))
                    if with_images and i != len(parts) - 1 and used < len(vit_images):
                        items.append(Item("vit_image", image=vit_images[used]))
                        used += 1
            else:
                ids = self._text(c["value"], key)
                if ids:
                    items.append(Item("text", loss=1, text_ids=ids))
        if not any(it.loss for it in items):
            raise BadRecord("no_loss", key=key, detail="no gpt turn with text")
        summary = " | ".join(c["value"] for c in convs)[:500]
        return items, summary


def build_from_plan(sequence_plan: list[dict], text_ids_list: list[list[int]], images: list[Any],
                    spec: LayoutSpec, timesteps: list[float] | None = None, **meta) -> Sample:
    """A Sample from BAGEL's own sample dict (``sequence_plan``, ``text_ids_list``, images in the order
    ``pack_sequence`` pops them), no CFG dropout; ``timesteps`` (one per noised image, in order)
    are injected -- the packer-equivalence path against BAGEL's golden fixture."""
    texts, imgs = list(text_ids_list), list(images)
    ts = list(timesteps or [])
    items = []
    for p in sequence_plan:
        it = Item(p["type"], loss=int(p.get("loss", 0)), enable_cfg=int(p.get("enable_cfg", 0)),
                  special_token_loss=int(p.get("special_token_loss", 0)),
                  special_token_label=p.get("special_token_label"))
        if it.type == "text":
            it.text_ids = list(texts.pop(0))
        else:
            it.image = imgs.pop(0)
            if it.type == "vae_image" and it.loss:
                it.timestep = float(ts.pop(0))
        items.append(it)
    return layout(items, spec, **meta)
