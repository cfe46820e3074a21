"""One declarative table between BAGEL's PyTorch key names and this port's parameters.

A ``KeyEntry`` says: BAGEL key -> (path of the nnx.Param in ``nnx.state(model)``, how to convert
the array, which layer slice of a stacked parameter it fills). ``bagel_table`` is the LLM part
(here) plus the rows the ViT and the AE list beside their modules (``siglip.torch_key_table``,
``vae.torch_key_table``, plain tuples: the module owns its names); loading (``load_state``,
``load_vit``, ``load_vae``), exporting and the checkpoint converter (sgt_jax/convert) all go
through this module -- nothing else converts BAGEL's names.

Conversions: ``linear`` (torch (out, in) <-> kernel (in, out)), ``copy``, ``conv`` (torch
(out, in, kh, kw) <-> (kh, kw, in, out)). The fixed sin-cos tables ``latent_pos_embed.pos_embed`` /
``vit_pos_embed.pos_embed`` are regenerated, never loaded (BAGEL's own loader pops them too);
``FIXED_KEYS`` lists them so an export can write them back.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from flax import nnx

from sgt_jax.keydiff import key_diff, listing
from sgt_jax.models import siglip, vae

FIXED_KEYS = {"latent_pos_embed.pos_embed": ("latent_pos_embed",),
              "vit_pos_embed.pos_embed": ("vit_pos_embed",)}


class KeyEntry(NamedTuple):
    key: str                 # BAGEL / FLUX key
    path: tuple              # nnx state path
    kind: str                # "linear" | "copy" | "conv"
    layer: int | None = None  # slice of a stacked (scanned) parameter


def to_torch(kind: str, a: np.ndarray) -> np.ndarray:
    if kind == "linear":
        return np.ascontiguousarray(a.T)
    if kind == "conv":
        return np.ascontiguousarray(a.transpose(3, 2, 0, 1))
    return a


def from_torch(kind: str, a: np.ndarray) -> np.ndarray:
    if kind == "linear":
        return np.ascontiguousarray(a.T)
    if kind == "conv":
        return np.ascontiguousarray(a.transpose(2, 3, 1, 0))
    return a


def _linear(key, path, bias=True, layer=None):
    out = [KeyEntry(f"{key}.weight", path + ("kernel",), "linear", layer)]
    if bias:
        out.append(KeyEntry(f"{key}.bias", path + ("bias",), "copy", layer))
    return out


def llm_table(cfg, prefix: str = "language_model.", root: tuple = ("language_model",)) -> list[KeyEntry]:
    """Qwen2 MoT (or dense) LLM keys."""
    mot = cfg.llm.layer_module == "mot"
    t = [KeyEntry(f"{prefix}model.embed_tokens.weight", root + ("embed_tokens", "embedding"), "copy"),
         KeyEntry(f"{prefix}model.norm.weight", root + ("norm", "scale"), "copy"),
         KeyEntry(f"{prefix}lm_head.weight", root + ("lm_head", "kernel"), "linear")]
    if mot:
        t.append(KeyEntry(f"{prefix}model.norm_moe_gen.weight", root + ("norm_gen", "scale"), "copy"))
    for i in range(cfg.llm.num_layers):
        base = f"{prefix}model.layers.{i}."
        experts = [("", "und")] + ([("_moe_gen", "gen")] if mot else [])
        for sfx, e in experts:
            lp = root + ("layers", e)
            for proj, bias in (("q_proj", True), ("k_proj", True), ("v_proj", True), ("o_proj", False)):
                t += _linear(f"{base}self_attn.{proj}{sfx}", lp + (proj,), bias, i)
            if cfg.llm.qk_norm:
                t.append(KeyEntry(f"{base}self_attn.q_norm{sfx}.weight", lp + ("q_norm", "scale"), "copy", i))
                t.append(KeyEntry(f"{base}self_attn.k_norm{sfx}.weight", lp + ("k_norm", "scale"), "copy", i))
            mlp = "mlp_moe_gen" if sfx else "mlp"
            for proj in ("gate_proj", "up_proj", "down_proj"):
                t += _linear(f"{base}{mlp}.{proj}", lp + (proj,), False, i)
            t.append(KeyEntry(f"{base}input_layernorm{sfx}.weight", lp + ("input_layernorm", "scale"), "copy", i))
            t.append(KeyEntry(f"{base}post_attention_layernorm{sfx}.weight",
                           lp + ("post_attention_layernorm", "scale"), "copy", i))
    return t


def bagel_table(cfg) -> list[KeyEntry]:
    """Every trainable tensor of BAGEL's ``Bagel.state_dict()`` (the VAE is separate: vae.py)."""
    t = llm_table(cfg)
    if cfg.bagel.visual_gen:
        t += _linear("time_embedder.mlp.0", ("time_embedder", "fc1"))
        t += _linear("time_embedder.mlp.2", ("time_embedder", "fc2"))
        t += _linear("vae2llm", ("vae2llm",))
        t += _linear("llm2vae", ("llm2vae",))
    if cfg.bagel.visual_und:
        t += _linear("connector.fc1", ("connector", "fc1"))
        t += _linear("connector.fc2", ("connector", "fc2"))
        t += [KeyEntry(siglip.BAGEL_VIT_PREFIX + key, ("vit_model",) + tuple(path), kind, layer)
              for key, path, kind, layer in siglip.torch_key_table(cfg)]
    return t


# -------------------------------------------------------------------------------------------------


def _flat_params(model) -> dict:
    return {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def load_state(model, tensors: dict, table: list[KeyEntry], ignore: tuple = (), what: str = "checkpoint"):
    """Assign ``tensors`` (BAGEL names -> arrays) into ``model`` via ``table``.

    Raises ValueError listing every missing, unexpected and mis-shaped key before changing
    anything. Keys in ``ignore`` (e.g. the regenerated sin-cos tables) are skipped.
    """
    params = _flat_params(model)
    for e in table:
        if e.path not in params:
            raise KeyError(f"key table names {e.path} for {e.key}, but the model has no such parameter")
    expected = {e.key: torch_shape(e.kind, params[e.path].shape if e.layer is None else params[e.path].shape[1:])
                for e in table}
    diff = key_diff(expected, {k: np.shape(v) for k, v in tensors.items()}, optional=ignore)
    bad_dtype = [f"{k}: {np.asarray(tensors[k]).dtype}" for k in expected if k in tensors
                 and not np.issubdtype(np.asarray(tensors[k]).dtype, np.floating)
                 and np.asarray(tensors[k]).dtype.name != "bfloat16"]
    if diff or bad_dtype:
        msg = [f"{what} does not match the model config:"]
        msg += ["  " + line for line in diff.lines(limit=20, layout="torch layout", shape=tuple)]
        if bad_dtype:
            msg.append(f"  {len(bad_dtype)} non-float tensors: {listing(bad_dtype, 20)}")
        msg.append("  fix: build the model config from the checkpoint's own llm_config.json / vit_config.json "
                   "(config.from_bagel_dir), or pass the matching preset")
        raise ValueError("\n".join(msg))
    staged = {}
    for e in table:
        if e.key in tensors:
            staged.setdefault(e.path, []).append((e.layer, from_torch(e.kind, np.asarray(tensors[e.key]))))
    set_staged(params, staged)
    return model


def export_state(model, table: list[KeyEntry]) -> dict[str, np.ndarray]:
    """The model's parameters under BAGEL's names (fp32 numpy), in table order."""
    params = _flat_params(model)
    out = {}
    for e in table:
        a = np.asarray(params[e.path].get_value())
        if e.layer is not None:
            a = a[e.layer]
        out[e.key] = to_torch(e.kind, a)
    return out


# -------------------------------------------------------------------------------------------------
# Streaming view of the same tables (used by sgt_jax/convert): entries grouped per parameter.


class ParamGroup(NamedTuple):
    """All table entries that fill one parameter: one entry (``layer`` None) for a plain
    parameter, or one per layer (sorted, covering 0..n-1) for a stacked (scanned) one."""
    path: tuple
    kind: str
    entries: tuple

    @property
    def stacked(self) -> bool:
        return self.entries[0].layer is not None


def vae_entries(cfg) -> list[KeyEntry]:
    """The AE's rows (``vae.torch_key_table``) as KeyEntries (never stacked)."""
    return [KeyEntry(key, tuple(path), kind, None) for key, path, kind in vae.torch_key_table(cfg)]


def group_entries(table: list[KeyEntry]) -> list[ParamGroup]:
    """Group a table per parameter path, in order of first appearance. Raises ValueError when a
    stacked parameter's layer entries are not exactly 0..n-1 or kinds disagree."""
    groups: dict[tuple, list[KeyEntry]] = {}
    for e in table:
        groups.setdefault(tuple(e.path), []).append(e)
    out = []
    for path, es in groups.items():
        kinds = {e.kind for e in es}
        if len(kinds) != 1:
            raise ValueError(f"key table: parameter {path} has entries of kinds {sorted(kinds)}")
        if es[0].layer is None:
            if len(es) != 1:
                raise ValueError(f"key table: {len(es)} unstacked entries for {path}: {[e.key for e in es]}")
        else:
            es = sorted(es, key=lambda e: e.layer)
            if [e.layer for e in es] != list(range(len(es))):
                raise ValueError(f"key table: stacked parameter {path} has layers {[e.layer for e in es]}")
        out.append(ParamGroup(path, es[0].kind, tuple(es)))
    return out


def torch_shape(kind: str, shape) -> tuple:
    """Shape of the torch tensor for a (per-layer) parameter slice of ``shape``."""
    shape = tuple(int(s) for s in shape)
    if kind == "linear":
        return shape[::-1]
    if kind == "conv":
        kh, kw, cin, cout = shape
        return (cout, cin, kh, kw)
    return shape


def fixed_tables(cfg) -> dict[str, np.ndarray]:
    """The regenerated sin-cos tables under BAGEL's names (fp32), for the branches ``cfg`` has."""
    from sgt_jax.models.layers import sincos_2d_table

    out = {}
    if cfg.bagel.visual_gen:
        out["latent_pos_embed.pos_embed"] = sincos_2d_table(cfg.llm.hidden_size, cfg.bagel.max_latent_size)
    if cfg.bagel.visual_und:
        out["vit_pos_embed.pos_embed"] = sincos_2d_table(cfg.llm.hidden_size,
                                                         cfg.bagel.vit_max_num_patch_per_side)
    return out


def fixed_table_shapes(cfg) -> dict[str, tuple]:
    """Shapes of ``fixed_tables(cfg)`` without computing them."""
    h, b = cfg.llm.hidden_size, cfg.bagel
    out = {}
    if b.visual_gen:
        out["latent_pos_embed.pos_embed"] = (b.max_latent_size ** 2, h)
    if b.visual_und:
        out["vit_pos_embed.pos_embed"] = (b.vit_max_num_patch_per_side ** 2, h)
    return out


# -------------------------------------------------------------------------------------------------
# the ViT and the AE on their own (HF / BAGEL SigLIP keys, FLUX AE keys)

def vit_entries(cfg, prefix: str = siglip.BAGEL_VIT_PREFIX) -> list[KeyEntry]:
    """``siglip.torch_key_table`` under ``prefix`` (BAGEL's, or ``siglip.HF_VIT_PREFIX``)."""
    return [KeyEntry(prefix + key, tuple(path), kind, layer) for key, path, kind, layer in siglip.torch_key_table(cfg)]


def load_vit(model, tensors: dict, prefix: str = siglip.BAGEL_VIT_PREFIX) -> None:
    """Load torch-layout tensors (e.g. BAGEL's ``model.safetensors``) into a ``SiglipNaViT`` in
    place. Keys outside ``prefix`` are ignored (a whole BAGEL state dict may be passed); missing,
    unexpected and mis-shaped keys raise a ValueError listing them, and nothing is written then."""
    mine = {k: v for k, v in tensors.items() if k.startswith(prefix)}
    load_state(model, mine, vit_entries(model, prefix), what="SigLIP-NaViT state dict")


def export_vit(model, prefix: str = siglip.BAGEL_VIT_PREFIX) -> dict[str, np.ndarray]:
    """The inverse of ``load_vit``: {prefix + torch key: float32 numpy array} in the torch layout
    (Linear weights (out, in), the patch embedding in BAGEL's Linear form)."""
    return export_state(model, vit_entries(model, prefix))


def load_vae(model, tensors: dict) -> None:
    """Assign a FLUX AE state dict (torch layout, any float dtype) to an ``AutoEncoder`` (fp32
    params): every missing key, unexpected key and shape mismatch is listed in a ValueError before
    anything is assigned. ``model`` may be abstract (``nnx.eval_shape``): every parameter is
    assigned, so the random init can be skipped."""
    load_state(model, tensors, vae_entries(model.config), what="AutoEncoder state dict")


def export_vae(model) -> dict[str, np.ndarray]:
    """The inverse of ``load_vae``: FLUX key -> fp32 numpy array in torch layout."""
    return export_state(model, vae_entries(model.config))


def vae_torch_shapes(model) -> dict[str, tuple[int, ...]]:
    """FLUX key -> the torch-layout shape ``load_vae`` expects (works on abstract models)."""
    params = _flat_params(model)
    return {e.key: torch_shape(e.kind, params[e.path].shape) for e in vae_entries(model.config)}


def set_staged(params: dict, staged: dict) -> None:
    """Write converted tensors into the model's variables: ``staged[path]`` is [(None, array)]
    for a whole parameter or [(layer, array), ...] for rows of a scanned (stacked) one."""
    for path, items in staged.items():
        var = params[path]
        if items[0][0] is None:
            var.set_value(np.asarray(items[0][1], np.float32))
        else:
            full = np.array(var.get_value(), dtype=np.float32)
            for layer, a in items:
                full[layer] = a
            var.set_value(full)
