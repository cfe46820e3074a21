"""Model configs (ml_collections) and their validation.

A model config has four parts, named as in BAGEL: ``llm`` (Qwen2 MoT), ``vit`` (SigLIP-NaViT),
``vae`` (FLUX autoencoder) and the top-level ``bagel`` settings, plus ``compute_dtype`` (parameters
are always float32 masters). ``tiny()`` is the CPU preset; ``bagel_7b()`` has BAGEL-7B-MoT's
shapes. ``validate`` raises a clear error on inconsistent shapes; every model constructor calls it.
"""
from __future__ import annotations

import json
import os

import ml_collections

# Remat policies (MaxText names), for the LLM and the ViT alike: "none", "full" (save nothing) or
# save only the tensors a layer body tags with these checkpoint_name()s (layers.remat).
REMAT_SAVED_NAMES = {
    "save_dot_except_mlp": ("query_proj", "key_proj", "value_proj", "out_proj"),
    "save_qkv_proj": ("query_proj", "key_proj", "value_proj"),
    "save_out_proj": ("out_proj",),
    "minimal": ("query_proj", "key_proj", "value_proj", "out_proj", "context",
                "mlpwi", "mlpwi_0", "mlpwi_1", "mlpwo"),     # ViT: mlpwi; LLM: mlpwi_0/1 (gate, up)
}
REMAT_POLICIES = ("none", "full") + tuple(REMAT_SAVED_NAMES)
LAYER_MODULES = ("mot", "dense")
ATTENTION_IMPLS = ("dense", "blocked", "flash", "auto")   # "auto": flash when compiling for TPU, else blocked


def _llm(**kw) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(dict(
        vocab_size=160, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2, rope_theta=1e6, rms_norm_eps=1e-6, qk_norm=True,
        layer_module="mot",        # "mot" (und + gen experts) or "dense" (Qwen2DecoderLayer)
        scan_layers=True,          # one compiled layer body (False: a Python loop, for debugging)
        remat_policy="none",       # one of REMAT_POLICIES (names as in MaxText)
        attention_impl="auto",     # one of ATTENTION_IMPLS: "dense" (XLA, whole L x L), "blocked" (XLA,
                                   # live blocks only), "flash" (Pallas), "auto" (flash on TPU, else blocked)
        attention_blocked_block=16,  # blocked: tokens per q / kv block
        attention_blocked_chunk=32,  # blocked: (q block, kv block) pairs per loop step
        attention_block_q=512,     # flash: q / kv block sizes of the forward and dq kernels
        attention_block_kv=512,
        attention_block_q_dkv=512,   # flash: q / kv block sizes of the dk/dv kernel
        attention_block_kv_dkv=512,
        ce_chunk_size=0,           # >0: lm_head + CE in chunks of this many tokens (saves HBM)
        freeze_und=False,          # BAGEL's freeze_und: no gradient through und tokens / into und weights
        bos_token_id=150, eos_token_id=151, start_of_image=152, end_of_image=153,
    ))
    c.update(kw)
    return c


def _vit(**kw) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(dict(
        hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, patch_size=14,
        max_patches_per_side=8, layer_norm_eps=1e-6, remat_policy="none", scan_layers=True,
        attention_impl="auto",     # "dense" (whole P x P mask), "blocked" (the block diagonal only),
                                   # "auto" (dense when compiling for TPU, else blocked)
        attention_blocked_block=16, attention_blocked_chunk=32,   # blocked: as llm.attention_blocked_*
    ))
    c.update(kw)
    return c


def _vae(**kw) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(dict(
        in_channels=3, out_ch=3, ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=4,
        scale_factor=0.3611, shift_factor=0.1159, groupnorm_groups=32, eps=1e-6,
    ))
    c.update(kw)
    return c


def _bagel(**kw) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(dict(
        latent_patch_size=2, max_latent_size=8, vit_max_num_patch_per_side=8, timestep_shift=1.0,
        visual_und=True, visual_gen=True,
    ))
    c.update(kw)
    return c


def tiny() -> ml_collections.ConfigDict:
    """The CPU preset: the shapes of the golden fixture ``tiny_v1``."""
    return ml_collections.ConfigDict(dict(
        llm=_llm(), vit=_vit(), vae=_vae(), bagel=_bagel(),
        compute_dtype="float32",
    ))


def bagel_7b() -> ml_collections.ConfigDict:
    """BAGEL-7B-MoT (Qwen2.5-7B MoT + SigLIP so400m/14 with 26 layers + FLUX VAE)."""
    return ml_collections.ConfigDict(dict(
        llm=_llm(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                 num_heads=28, num_kv_heads=4, rope_theta=1e6, rms_norm_eps=1e-6,
                 remat_policy="full", ce_chunk_size=4096,
                 bos_token_id=151644, eos_token_id=151645, start_of_image=151652,
                 end_of_image=151653),
        vit=_vit(hidden_size=1152, intermediate_size=4304, num_layers=26, num_heads=16,
                 patch_size=14, max_patches_per_side=70, remat_policy="full"),
        vae=_vae(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=16),
        bagel=_bagel(max_latent_size=64, vit_max_num_patch_per_side=70),
        compute_dtype="bfloat16",
    ))


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Raise ValueError naming the offending key and the fix; return cfg."""
    def need(cond, msg):
        if not cond:
            raise ValueError(f"invalid model config: {msg}")

    llm, vit, vae, bagel = cfg.llm, cfg.vit, cfg.vae, cfg.bagel
    for name, v in [("llm.hidden_size", llm.hidden_size), ("llm.num_heads", llm.num_heads),
                    ("llm.num_kv_heads", llm.num_kv_heads), ("llm.num_layers", llm.num_layers),
                    ("llm.vocab_size", llm.vocab_size), ("vit.hidden_size", vit.hidden_size),
                    ("vit.num_heads", vit.num_heads), ("vae.z_channels", vae.z_channels)]:
        need(isinstance(v, int) and v > 0, f"{name} must be a positive int, got {v!r}")
    need(llm.hidden_size % llm.num_heads == 0,
         f"llm.num_heads={llm.num_heads} does not divide llm.hidden_size={llm.hidden_size}")
    need(llm.num_heads % llm.num_kv_heads == 0,
         f"llm.num_kv_heads={llm.num_kv_heads} does not divide llm.num_heads={llm.num_heads}")
    need((llm.hidden_size // llm.num_heads) % 2 == 0, "llm head_dim must be even for RoPE")
    need(llm.hidden_size % 4 == 0, "llm.hidden_size must be a multiple of 4 (2-D sin-cos tables)")
    need(vit.hidden_size % vit.num_heads == 0,
         f"vit.num_heads={vit.num_heads} does not divide vit.hidden_size={vit.hidden_size}")
    need(llm.layer_module in LAYER_MODULES, f"llm.layer_module must be one of {LAYER_MODULES}")
    need(llm.remat_policy in REMAT_POLICIES, f"llm.remat_policy must be one of {REMAT_POLICIES}")
    need(llm.get("attention_impl", "auto") in ATTENTION_IMPLS,
         f"llm.attention_impl={llm.get('attention_impl')!r} must be one of {ATTENTION_IMPLS}")
    for n in ("q", "kv", "q_dkv", "kv_dkv"):
        bsz = llm.get(f"attention_block_{n}", 512)
        need(isinstance(bsz, int) and bsz > 0 and bsz % 8 == 0,
             f"llm.attention_block_{n}={bsz!r} must be a positive multiple of 8 (128 on TPU)")
    for n in ("block", "chunk"):
        x = llm.get(f"attention_blocked_{n}", 1)
        need(isinstance(x, int) and x > 0, f"llm.attention_blocked_{n}={x!r} must be a positive int")
    need(vit.get("attention_impl", "auto") in ("dense", "blocked", "auto"),
         f"vit.attention_impl={vit.get('attention_impl')!r} must be one of ('dense', 'blocked', 'auto')")
    for n in ("block", "chunk"):
        x = vit.get(f"attention_blocked_{n}", 1)
        need(isinstance(x, int) and x > 0, f"vit.attention_blocked_{n}={x!r} must be a positive int")
    need(vit.remat_policy in REMAT_POLICIES, f"vit.remat_policy must be one of {REMAT_POLICIES}")
    need(all(vae.ch * m % vae.groupnorm_groups == 0 for m in vae.ch_mult),
         f"vae.groupnorm_groups={vae.groupnorm_groups} must divide every vae.ch*ch_mult")
    need(vit.max_patches_per_side == bagel.vit_max_num_patch_per_side,
         f"vit.max_patches_per_side={vit.max_patches_per_side} (SigLIP image_size/patch_size) must equal "
         f"bagel.vit_max_num_patch_per_side={bagel.vit_max_num_patch_per_side}: both index r*side+c")
    need(bagel.latent_patch_size > 0 and bagel.max_latent_size > 0, "bagel latent sizes must be > 0")
    need(cfg.compute_dtype in ("float32", "bfloat16"), "compute_dtype must be float32 or bfloat16")
    return cfg


def head_dim(cfg) -> int:
    return cfg.llm.hidden_size // cfg.llm.num_heads


def patch_latent_dim(cfg) -> int:
    return cfg.bagel.latent_patch_size ** 2 * cfg.vae.z_channels


def vae_downsample(cfg) -> int:
    """Pixels per latent pixel (2 ** number of downsampling levels)."""
    return 2 ** (len(cfg.vae.ch_mult) - 1)


def from_bagel_dir(path: str, base: ml_collections.ConfigDict | None = None,
                   **bagel_overrides) -> ml_collections.ConfigDict:
    """A model config from BAGEL's ``llm_config.json`` / ``vit_config.json`` in ``path``.

    BAGEL's loaders drop the ViT's last layer (``num_hidden_layers - 1`` are used) and force
    qk_norm, the MoT layer and an untied head; the model-level settings (latent patch size,
    max latent size, ViT grid, timestep shift) are not in the release files: they come from
    ``base`` (default: BAGEL-7B-MoT's) and ``bagel_overrides``.
    """
    with open(os.path.join(path, "llm_config.json")) as f:
        lj = json.load(f)
    with open(os.path.join(path, "vit_config.json")) as f:
        vj = json.load(f)
    return from_bagel_configs(lj, vj, base, where=path, **bagel_overrides)


def from_bagel_configs(lj: dict, vj: dict, base: ml_collections.ConfigDict | None = None, *, where: str = ".",
                       **bagel_overrides) -> ml_collections.ConfigDict:
    """``from_bagel_dir`` on the parsed ``llm_config.json`` (``lj``) and ``vit_config.json``
    (``vj``) of the BAGEL dir ``where`` (named in errors; the converter reads them, possibly
    from a gs:// URL)."""
    cfg = base if base is not None else bagel_7b()
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.llm.update(dict(
        vocab_size=lj["vocab_size"], hidden_size=lj["hidden_size"],
        intermediate_size=lj["intermediate_size"], num_layers=lj["num_hidden_layers"],
        num_heads=lj["num_attention_heads"],
        num_kv_heads=lj.get("num_key_value_heads", lj["num_attention_heads"]),
        rope_theta=float(lj.get("rope_theta", 1e6)), rms_norm_eps=float(lj.get("rms_norm_eps", 1e-6)),
    ))
    if lj.get("tie_word_embeddings", False):
        raise ValueError(f"{where}/llm_config.json: tie_word_embeddings=true is not a BAGEL layout "
                         "(BAGEL always unties lm_head)")
    cfg.vit.update(dict(
        hidden_size=vj["hidden_size"], intermediate_size=vj["intermediate_size"],
        num_layers=vj["num_hidden_layers"] - 1, num_heads=vj["num_attention_heads"],
        patch_size=vj.get("patch_size", 14), layer_norm_eps=float(vj.get("layer_norm_eps", 1e-6)),
        max_patches_per_side=vj.get("image_size", 980) // vj.get("patch_size", 14),
    ))
    cfg.bagel.update(bagel_overrides)
    return validate(cfg)
