"""OmniGen2's model configs (ml_collections) and their validation: the Qwen2.5-VL understanding
model (``llm`` + ``vision``) and -- later -- the OmniGen2 diffusion transformer.

``qwen25_vl_tiny()`` is the CPU preset of the parity tests; ``qwen25_vl_3b()`` has the shapes of
Qwen/Qwen2.5-VL-3B-Instruct's published ``config.json``; ``from_hf_qwen25_vl(config_json)`` reads
any Qwen2.5-VL ``config.json``. ``validate_qwen25_vl`` raises a clear error on inconsistent shapes;
``Qwen25VL`` calls it.

``llm`` carries the same keys as BAGEL's (config._llm), so the dense Qwen2 decoder layer of
qwen2_mot.py (``layer_module="dense"``, biased q/k/v, no qk-norm) is the Qwen2.5-VL text layer.
"""
from __future__ import annotations

import ml_collections

from sgt_jax.models.config import ATTENTION_IMPLS, REMAT_POLICIES, _llm


def _vision(**kw) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(dict(
        depth=4, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
        in_channels=3, patch_size=14, temporal_patch_size=2, spatial_merge_size=2,
        window_size=56,                    # pixels; window = window_size // merge // patch merged tokens a side
        fullatt_block_indexes=(1, 3),      # the layers with full (per-image) attention; the rest: windows
        rope_theta=10000.0, rms_norm_eps=1e-6,
        remat_policy="none", scan_layers=True,
    ))
    c.update(kw)
    return c


def qwen25_vl_tiny() -> ml_collections.ConfigDict:
    """CPU preset (the parity tests' shapes)."""
    return ml_collections.ConfigDict(dict(
        llm=_llm(vocab_size=160, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                 num_kv_heads=2, rope_theta=1e6, qk_norm=False, layer_module="dense",
                 tie_word_embeddings=False, mrope_section=(2, 3, 3),
                 image_token_id=151, vision_start_token_id=152, vision_end_token_id=153),
        vision=_vision(),
        compute_dtype="float32",
    ))


def qwen25_vl_3b() -> ml_collections.ConfigDict:
    """Qwen/Qwen2.5-VL-3B-Instruct (the understanding model of OmniGen2)."""
    return ml_collections.ConfigDict(dict(
        llm=_llm(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_layers=36,
                 num_heads=16, num_kv_heads=2, rope_theta=1e6, rms_norm_eps=1e-6, qk_norm=False,
                 layer_module="dense", remat_policy="full", tie_word_embeddings=True,
                 mrope_section=(16, 24, 24), image_token_id=151655, vision_start_token_id=151652,
                 vision_end_token_id=151653, bos_token_id=151643, eos_token_id=151645),
        vision=_vision(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                       out_hidden_size=2048, window_size=112, fullatt_block_indexes=(7, 15, 23, 31),
                       remat_policy="full"),
        compute_dtype="bfloat16",
    ))


def from_hf_qwen25_vl(cj: dict, base: ml_collections.ConfigDict | None = None,
                      where: str = "config.json") -> ml_collections.ConfigDict:
    """A config from a Qwen2.5-VL ``config.json`` (transformers 4.x flat layout or 5.x
    ``text_config``); training settings (remat, dtype, attention impl) come from ``base``."""
    cfg = ml_collections.ConfigDict((base or qwen25_vl_3b()).to_dict())
    t = dict(cj.get("text_config") or {})
    for k, v in cj.items():
        if k not in ("text_config", "vision_config"):
            t.setdefault(k, v)
    v = cj["vision_config"]
    rope = t.get("rope_scaling") or t.get("rope_parameters") or {}
    try:
        cfg.llm.update(dict(
            vocab_size=t["vocab_size"], hidden_size=t["hidden_size"],
            intermediate_size=t["intermediate_size"], num_layers=t["num_hidden_layers"],
            num_heads=t["num_attention_heads"], num_kv_heads=t.get("num_key_value_heads", t["num_attention_heads"]),
            rope_theta=float(t.get("rope_theta", rope.get("rope_theta", 1e6))),
            rms_norm_eps=float(t.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(t.get("tie_word_embeddings", cj.get("tie_word_embeddings", False))),
            mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
            image_token_id=t.get("image_token_id", 151655),
            vision_start_token_id=t.get("vision_start_token_id", 151652),
        ))
        cfg.vision.update(dict(
            depth=v["depth"], hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
            num_heads=v["num_heads"], out_hidden_size=v["out_hidden_size"],
            in_channels=v.get("in_chans", v.get("in_channels", 3)), patch_size=v["patch_size"],
            temporal_patch_size=v["temporal_patch_size"], spatial_merge_size=v["spatial_merge_size"],
            window_size=v["window_size"], fullatt_block_indexes=tuple(v["fullatt_block_indexes"]),
        ))
    except KeyError as e:
        raise ValueError(f"{where}: missing key {e} in a Qwen2.5-VL config") from None
    if v.get("hidden_act", "silu") != "silu" or t.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: only hidden_act='silu' is implemented")
    return validate_qwen25_vl(cfg)


def validate_qwen25_vl(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Raise ValueError naming the offending key and the fix; return cfg."""
    def need(cond, msg):
        if not cond:
            raise ValueError(f"invalid Qwen2.5-VL config: {msg}")

    llm, vis = cfg.llm, cfg.vision
    for name, val in [("llm.hidden_size", llm.hidden_size), ("llm.num_heads", llm.num_heads),
                      ("llm.num_kv_heads", llm.num_kv_heads), ("llm.num_layers", llm.num_layers),
                      ("llm.vocab_size", llm.vocab_size), ("vision.depth", vis.depth),
                      ("vision.hidden_size", vis.hidden_size), ("vision.num_heads", vis.num_heads)]:
        need(isinstance(val, int) and val > 0, f"{name} must be a positive int, got {val!r}")
    need(llm.hidden_size % llm.num_heads == 0,
         f"llm.num_heads={llm.num_heads} does not divide llm.hidden_size={llm.hidden_size}")
    need(llm.num_heads % llm.num_kv_heads == 0,
         f"llm.num_kv_heads={llm.num_kv_heads} does not divide llm.num_heads={llm.num_heads}")
    hd = llm.hidden_size // llm.num_heads
    need(hd % 2 == 0 and sum(llm.mrope_section) == hd // 2,
         f"llm.mrope_section={tuple(llm.mrope_section)} must sum to head_dim/2={hd // 2} "
         "(the (t, h, w) split of the rotary frequencies)")
    need(len(llm.mrope_section) == 3, "llm.mrope_section needs 3 entries (t, h, w)")
    need(llm.layer_module == "dense" and not llm.qk_norm,
         "Qwen2.5-VL's text layers are dense without qk-norm (llm.layer_module='dense', llm.qk_norm=False)")
    need(0 <= llm.image_token_id < llm.vocab_size,
         f"llm.image_token_id={llm.image_token_id} is outside the vocabulary ({llm.vocab_size})")
    need(vis.hidden_size % vis.num_heads == 0,
         f"vision.num_heads={vis.num_heads} does not divide vision.hidden_size={vis.hidden_size}")
    need((vis.hidden_size // vis.num_heads) % 4 == 0,
         "vision head_dim must be a multiple of 4 (2-D rotary over h and w)")
    need(vis.out_hidden_size == llm.hidden_size,
         f"vision.out_hidden_size={vis.out_hidden_size} must equal llm.hidden_size={llm.hidden_size} "
         "(the merger projects image tokens to the LLM width)")
    unit = vis.spatial_merge_size * vis.patch_size
    need(vis.window_size % unit == 0 and vis.window_size >= unit,
         f"vision.window_size={vis.window_size} must be a positive multiple of "
         f"spatial_merge_size*patch_size={unit}")
    need(all(0 <= i < vis.depth for i in vis.fullatt_block_indexes),
         f"vision.fullatt_block_indexes={tuple(vis.fullatt_block_indexes)} must lie in [0, depth={vis.depth})")
    need(vis.remat_policy in REMAT_POLICIES and llm.remat_policy in REMAT_POLICIES,
         f"remat policies must be one of {REMAT_POLICIES}")
    need(llm.get("attention_impl", "dense") in ATTENTION_IMPLS,
         f"llm.attention_impl must be one of {ATTENTION_IMPLS}")
    need(cfg.compute_dtype in ("float32", "bfloat16"), "compute_dtype must be float32 or bfloat16")
    return cfg


# ------------------------------------------------------------------------------------------------
# The OmniGen2 diffusion transformer (OmniGen2Transformer2DModel)


def dit_tiny() -> ml_collections.ConfigDict:
    """CPU preset of the DiT parity fixture (tests/fixtures/omnigen2_golden)."""
    return ml_collections.ConfigDict(dict(
        patch_size=2, in_channels=4, out_channels=4, hidden_size=48, num_layers=2,
        num_refiner_layers=1, num_heads=4, num_kv_heads=2, multiple_of=16, ffn_dim_multiplier=0.5,
        norm_eps=1e-5, axes_dim_rope=(4, 4, 4), axes_lens=(64, 64, 64), text_feat_dim=32,
        timestep_scale=1000.0, rope_theta=10000.0, max_ref_images=5,
        remat_policy="none", scan_layers=True, compute_dtype="float32",
    ))


def dit_omnigen2() -> ml_collections.ConfigDict:
    """OmniGen2's transformer (reference notes §2.2: hidden 2520, 32 layers, 2+2+2 refiner
    layers, 21 heads / 7 kv heads, rope axes 40/40/40, text features 2048, timestep scale 1000)."""
    return ml_collections.ConfigDict(dict(
        patch_size=2, in_channels=16, out_channels=16, hidden_size=2520, num_layers=32,
        num_refiner_layers=2, num_heads=21, num_kv_heads=7, multiple_of=256, ffn_dim_multiplier=None,
        norm_eps=1e-5, axes_dim_rope=(40, 40, 40), axes_lens=(10000, 10000, 10000), text_feat_dim=2048,
        timestep_scale=1000.0, rope_theta=10000.0, max_ref_images=5,
        remat_policy="full", scan_layers=True, compute_dtype="bfloat16",
    ))


def dit_ffn_dim(cfg) -> int:
    """LuminaFeedForward's inner width: multiple_of * ceil(int(mult * 4 * hidden) / multiple_of)."""
    inner = 4 * cfg.hidden_size
    if cfg.ffn_dim_multiplier is not None:
        inner = int(cfg.ffn_dim_multiplier * inner)
    return cfg.multiple_of * ((inner + cfg.multiple_of - 1) // cfg.multiple_of)


def validate_dit(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Raise ValueError naming the offending key and the fix; return cfg."""
    def need(cond, msg):
        if not cond:
            raise ValueError(f"invalid OmniGen2 DiT config: {msg}")

    for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "patch_size", "in_channels",
                 "text_feat_dim", "multiple_of"):
        val = cfg[name]
        need(isinstance(val, int) and val > 0, f"{name} must be a positive int, got {val!r}")
    need(isinstance(cfg.num_refiner_layers, int) and cfg.num_refiner_layers >= 0,
         "num_refiner_layers must be a non-negative int")
    need(cfg.hidden_size % cfg.num_heads == 0,
         f"num_heads={cfg.num_heads} does not divide hidden_size={cfg.hidden_size}")
    need(cfg.num_heads % cfg.num_kv_heads == 0,
         f"num_kv_heads={cfg.num_kv_heads} does not divide num_heads={cfg.num_heads}")
    hd = cfg.hidden_size // cfg.num_heads
    need(len(cfg.axes_dim_rope) == 3 and sum(cfg.axes_dim_rope) == hd and all(a % 2 == 0 for a in cfg.axes_dim_rope),
         f"axes_dim_rope={tuple(cfg.axes_dim_rope)} must be 3 even sizes summing to head_dim={hd}")
    need(cfg.remat_policy in REMAT_POLICIES, f"remat_policy must be one of {REMAT_POLICIES}")
    need(cfg.compute_dtype in ("float32", "bfloat16"), "compute_dtype must be float32 or bfloat16")
    return cfg
