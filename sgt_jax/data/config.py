"""Data configs (ml_collections): every knob of sources -> samples -> packer -> Grain pipeline.

``default_data_config(model)`` has SGT-BAGEL's sizes (ViT 224, VAE long edge 512-1024 stride 16, VQA
ViT 378-980, Seg:VQA = 2:1 by samples in every batch) with static row shapes for a 16k-token row;
``tiny_data_config(model)`` shrinks the images and the rows to the tiny CPU model
(``models.config.tiny``: ViT and latent position tables of 8 per side). Both read the built-in
synthetic data generated into the workdir unless ``sources`` says otherwise. ``validate`` raises a
clear error naming the key.

The model constants the data lays batches out with (``MODEL_KEYS``: ViT patch size and position
table, latent downsample and table) are derived once from the model config (``from_model``), as
references: a command-line override of the model key (``--config.model.bagel.max_latent_size=16``)
changes the data key with it, and setting the data key sets the model's. Without a model the
defaults are those of ``bagel_7b()`` / ``tiny()``. ``check_consistency`` catches a data config put
beside another model.

Strings in ``sources`` and ``tokenizer_path`` may contain ``{workdir}``.
"""
from __future__ import annotations

import ml_collections

from sgt_jax.data.proxy import tasks as proxy_tasks
from sgt_jax.models import config as model_config

BAGEL_MAX_PIXELS = 14 * 14 * 9 * 1024          # ImageTransform default (1,806,336)
VLM_MAX_PIXELS = 2_007_040                      # BAGEL / SGT VLM config
MIX_MODES = ("samples", "tokens", "weights")
RESAMPLE = ("bicubic", "bilinear", "nearest")

# The generative proxy tasks of the paper's study (issue 16; Table 4 + reconstruction + Mixed):
# the values ``data.proxy`` accepts (or ``a+b``: one of them per sample). The one list lives
# with the builders (data/proxy/tasks.py); presets and docs read it here.
PROXY_TASKS = proxy_tasks.TASKS

# data key -> where it comes from in the model config
MODEL_KEYS = {
    "vit_patch_size": "model.vit.patch_size",
    "vit_max_patches_per_side": "model.bagel.vit_max_num_patch_per_side",   # the ViT position table
    "vae_downsample": "VAE downsample x model.bagel.latent_patch_size",     # pixels per latent token
    "max_latent_size": "model.bagel.max_latent_size",                        # the latent position table
}


def from_model(model: ml_collections.ConfigDict) -> dict:
    """The ``MODEL_KEYS`` of a data config, derived from ``model``: references into it (the VAE's
    downsample factor is fixed here: ``vae.ch_mult`` is a tuple)."""
    return {
        "vit_patch_size": model.vit.get_ref("patch_size"),
        "vit_max_patches_per_side": model.bagel.get_ref("vit_max_num_patch_per_side"),
        "vae_downsample": model.bagel.get_ref("latent_patch_size") * model_config.vae_downsample(model),
        "max_latent_size": model.bagel.get_ref("max_latent_size"),
    }


def check_consistency(cfg) -> None:
    """A run config's ``data`` must describe the tables and patch sizes of its ``model``: true of
    configs built with ``from_model`` (unless a derived key was overridden on its own, such as
    ``data.vae_downsample``); raises ValueError naming both keys."""
    m, d = cfg.model, cfg.data
    want = {"vit_patch_size": m.vit.patch_size,
            "vit_max_patches_per_side": m.bagel.vit_max_num_patch_per_side,
            "vae_downsample": model_config.vae_downsample(m) * m.bagel.latent_patch_size,
            "max_latent_size": m.bagel.max_latent_size}
    for k, vb in want.items():
        va = d.get(k)
        if va is not None and va != vb:
            raise ValueError(f"config mismatch: data.{k}={va} but {MODEL_KEYS[k]}={vb}; set them equal "
                             f"(data.{k} is derived from the model: set the model's key only)")


def default_data_config(model: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """SGT-BAGEL sizes (paper recipe / official code), rows of 16k tokens; the ``MODEL_KEYS`` from
    ``model`` (default ``bagel_7b()``)."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    # ---- static shapes of a PackedBatch (part of the compiled program) ----
    c.rows_per_batch = 8               # B of the GLOBAL batch; each process yields B / process_count rows
    c.tokens_per_row = 16384           # L
    c.gen_tokens_per_row = 10240       # num_gen: exactly this many gen-routed positions per row
                                       # (match the stream's gen share: ~0.65 for SGT 2:1, bench/packing.py)
    c.vit_patches_per_row = 6144       # P  (<= L - num_gen: ViT tokens are und tokens)
    c.vae_images_per_row = 6           # N
    c.ce_tokens_per_row = 0            # > 0: at most this many CE tokens per row (a packer budget); the
                                       # model runs lm_head at that many gathered positions, not at all
                                       # L - num_gen und positions. 0: no budget, lm_head everywhere
    c.vae_image_size = 1024            # static padded (H, W) of vae_images; int (square) or (H, W)
    c.vae_images_dtype = "float32"     # "float32" or "bfloat16" (halves host memory / transfer)
    c.max_tokens_per_sample = 16384    # BAGEL's max_num_tokens_per_sample: longer samples are dropped

    # ---- the model's constants (MODEL_KEYS), references into the model config ----
    c.update(from_model(model if model is not None else model_config.bagel_7b()))

    # ---- image transforms (BAGEL's MaxLongEdgeMinShortEdgeResize) ----
    t = ml_collections.ConfigDict()
    t.vit_image_size = 224             # seg / recon ViT input: ImageTransform(224, 224, 14) as in SGT
    t.vit_stride = c.get_ref("vit_patch_size")   # the ViT patch size (one reference)
    t.vae_min = 512                    # generation target: short edge >= 512 ...
    t.vae_max = 1024                   # ... long edge <= 1024
    t.vae_stride = 16
    t.vae_max_pixels = BAGEL_MAX_PIXELS
    t.vqa_vit_min = 378
    t.vqa_vit_max = 980
    t.vqa_vit_max_pixels = VLM_MAX_PIXELS   # divided by the number of images of the record
    t.seg_vit_max_pixels = BAGEL_MAX_PIXELS
    t.sqrt_max_pixels = False          # True: fix BAGEL's quirk (it scales each side by the AREA ratio)
    t.resample = "bicubic"             # images (BAGEL: PIL bicubic, antialiased)
    t.target_resample = "bicubic"      # seg target masks: bicubic as SGT does; "nearest" keeps colours pure
    c.transforms = t

    # ---- samples ----
    s = ml_collections.ConfigDict()
    s.text_cond_dropout_prob = 0.1     # BAGEL/SGT visual_gen training values
    s.vit_cond_dropout_prob = 0.3
    s.vae_cond_dropout_prob = 0.3
    s.timestep_mean = 0.0              # raw timestep ~ N(mean, std), one draw per noised image
    s.timestep_std = 1.0
    s.ce_weighting = "square"          # BAGEL's len2weight for ce_weights: "square" | "token" | "sample"
    s.instruction = "paraphrase"       # seg instruction: "paraphrase" (>=100 variants) | "fixed"
    s.strict_image_placeholders = True  # VQA: <image> count != image count -> BadRecord
    c.samples = s

    # ---- mixing ----
    m = ml_collections.ConfigDict()
    m.mode = "samples"                 # "samples": exact ratio in every batch; "tokens": token shares
                                       # (low-discrepancy); "weights": i.i.d. draws (official SGT code)
    m.ratios = ml_collections.ConfigDict({"seg": 2, "vqa": 1})
    m.weights = ml_collections.ConfigDict({"seg": 1.0, "vqa": 5.0})   # SGT high_mixed_sam.yaml
    c.mix = m

    # ---- sources: stream name -> spec (sources.make_source); ';' joins several specs ----
    # (the synthetic scenes are generated into the workdir on first use; both specs must agree on n)
    c.sources = ml_collections.ConfigDict({
        "seg": "synthetic_seg:{workdir}/synthetic?n=1000",
        "vqa": "synthetic_vqa:{workdir}/synthetic?n=1000",
    })
    # ---- proxy task (issue 16; docs/proxy_tasks.md): the generation stream's records become
    # (degraded / plain input, task target, task instruction) pairs of one of the SGT study's tasks ----
    c.proxy = ""                       # "" = off (today's behaviour); else a task of proxy.tasks.TASKS
                                       # or "a+b" (one of them per sample)
    c.proxy_stream = "seg"             # the stream whose source is read for the task
    c.proxy_options = ml_collections.ConfigDict({
        "depth_dir": "",               # depth: DEPTH_DIR/<key>.npy|.png per image (else the record's)
    })
    c.tokenizer_path = "{workdir}/tokenizer"   # a Qwen2 checkpoint dir; built tiny if absent here
    c.tiny_tokenizer_vocab_size = 1024

    # ---- packer ----
    p = ml_collections.ConfigDict()
    p.max_buffer = 16                  # deferred groups kept before a batch is closed (best fit over
                                       # all B rows, atomic mixing groups; see packer.py)
    p.max_consecutive_errors = 1000    # a source failing this often in a row is a bug: raise
    c.packer = p

    # ---- Grain ----
    g = ml_collections.ConfigDict()
    g.num_workers = 0                  # worker processes (mp_prefetch); 0 = in the main process
    g.worker_buffer_size = 2
    g.read_threads = 0                 # threads building samples ahead inside each worker
    c.grain = g
    return c


def tiny_data_config(model: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """CPU sizes for ``models.config.tiny()`` (8x8 ViT and latent position tables): the
    ``MODEL_KEYS`` from ``model`` (default ``tiny()``)."""
    c = default_data_config(model if model is not None else model_config.tiny())
    c.rows_per_batch = 4
    c.tokens_per_row = 512
    c.gen_tokens_per_row = 128
    c.vit_patches_per_row = 256
    c.vae_images_per_row = 4
    c.vae_image_size = 128
    c.max_tokens_per_sample = 512
    t = c.transforms
    t.vit_image_size = 112
    t.vae_min, t.vae_max = 64, 128
    t.vqa_vit_min, t.vqa_vit_max = 56, 112
    c.tiny_tokenizer_vocab_size = 512
    return c


def vae_hw(cfg) -> tuple[int, int]:
    s = cfg.vae_image_size
    return (int(s), int(s)) if isinstance(s, int) else (int(s[0]), int(s[1]))


def validate(cfg, process_count: int = 1) -> ml_collections.ConfigDict:
    """Raise ValueError naming the offending key and the fix; return cfg."""
    def need(cond, msg):
        if not cond:
            raise ValueError(f"invalid data config: {msg}")

    L, G, P, N = cfg.tokens_per_row, cfg.gen_tokens_per_row, cfg.vit_patches_per_row, cfg.vae_images_per_row
    for k, v in [("tokens_per_row", L), ("rows_per_batch", cfg.rows_per_batch)]:
        need(isinstance(v, int) and v > 0, f"{k} must be a positive int, got {v!r}")
    C = cfg.get("ce_tokens_per_row", 0)
    for k, v in [("gen_tokens_per_row", G), ("vit_patches_per_row", P), ("vae_images_per_row", N),
                 ("ce_tokens_per_row", C)]:
        need(isinstance(v, int) and v >= 0, f"{k} must be an int >= 0, got {v!r}")
    need(C <= L - G, f"ce_tokens_per_row={C} exceeds the und budget tokens_per_row - gen_tokens_per_row = "
         f"{L - G} (CE tokens are und tokens): lower it, or 0 for no budget")
    need(G < L, f"gen_tokens_per_row={G} must be < tokens_per_row={L} (text needs und tokens)")
    need(P <= L - G, f"vit_patches_per_row={P} exceeds the und budget tokens_per_row - "
         f"gen_tokens_per_row = {L - G}: lower it")
    need(cfg.rows_per_batch % process_count == 0,
         f"rows_per_batch={cfg.rows_per_batch} is not divisible by process_count={process_count}")
    h, w = vae_hw(cfg)
    d = cfg.vae_downsample
    need(h % d == 0 and w % d == 0, f"vae_image_size={cfg.vae_image_size} must be a multiple of "
         f"vae_downsample={d}")
    need(max(h, w) // d <= cfg.max_latent_size,
         f"vae_image_size={cfg.vae_image_size} gives {max(h, w) // d} latent tokens per side, more than "
         f"max_latent_size={cfg.max_latent_size} (the latent position table): lower vae_image_size")
    t = cfg.transforms
    need(t.vae_max <= min(h, w), f"transforms.vae_max={t.vae_max} exceeds vae_image_size="
         f"{cfg.vae_image_size}: every resized target must fit the static padded image")
    need(t.vae_stride % d == 0, f"transforms.vae_stride={t.vae_stride} must be a multiple of "
         f"vae_downsample={d}")
    need(t.vit_stride == cfg.vit_patch_size, f"transforms.vit_stride={t.vit_stride} must equal "
         f"vit_patch_size={cfg.vit_patch_size}")
    side = cfg.vit_max_patches_per_side * cfg.vit_patch_size
    need(t.vit_image_size <= side and t.vqa_vit_max <= side,
         f"ViT images up to {max(t.vit_image_size, t.vqa_vit_max)} px exceed vit_max_patches_per_side="
         f"{cfg.vit_max_patches_per_side} x {cfg.vit_patch_size} px: lower transforms.vit_image_size / "
         "transforms.vqa_vit_max")
    need(t.resample in RESAMPLE and t.target_resample in RESAMPLE, f"resample must be one of {RESAMPLE}")
    need(cfg.mix.mode in MIX_MODES, f"mix.mode={cfg.mix.mode!r} must be one of {MIX_MODES}")
    streams = set(cfg.sources.keys())
    table = cfg.mix.ratios if cfg.mix.mode != "weights" else cfg.mix.weights
    key = "mix.ratios" if cfg.mix.mode != "weights" else "mix.weights"
    need(set(table.keys()) == streams, f"{key} has streams {sorted(table.keys())} but sources has "
         f"{sorted(streams)}: give every source a ratio (0 disables it)")
    need(all(v >= 0 for v in table.values()) and sum(table.values()) > 0,
         f"{key} must be >= 0 with a positive sum")
    need(cfg.packer.max_buffer >= 1, "packer.max_buffer must be >= 1")
    proxy = cfg.get("proxy", "")
    if proxy:
        try:
            proxy_tasks.check_task(proxy)
        except ValueError as e:
            need(False, f"proxy={e} ('' for off)")
        need(cfg.proxy_stream in streams, f"proxy_stream={cfg.proxy_stream!r} is not a stream of "
             f"sources ({sorted(streams)})")
    need(cfg.vae_images_dtype in ("float32", "bfloat16"), "vae_images_dtype: float32 or bfloat16")
    need(cfg.samples.ce_weighting in ("square", "token", "sample"), "samples.ce_weighting: square|token|sample")
    return cfg
