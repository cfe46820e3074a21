"""Qwen2.5-VL checkpoint keys <-> this port's parameters, through ``qwen25_vl.torch_key_table``
(the module owns its names). ``load_qwen25_vl`` refuses missing / unexpected / mis-shaped keys
(reported by sgt_jax/keydiff.py) before changing anything; ``export_qwen25_vl`` writes the
released checkpoint's names and layouts (fp32 numpy)."""
from __future__ import annotations

import numpy as np
from flax import nnx

from sgt_jax.convert.keymap import set_staged
from sgt_jax.keydiff import key_diff, listing
from sgt_jax.models import omnigen2_dit, qwen25_vl

# transformers >= 5 names the modules model.visual / model.language_model; the released files
# (and transformers 4.x) use visual.* / model.*. Both are accepted on load.
_V5_PREFIXES = (("model.visual.", "visual."), ("model.language_model.", "model."))


def released_name(key: str) -> str:
    """A transformers-5 state-dict key -> the released checkpoint's key (others unchanged)."""
    for new, old in _V5_PREFIXES:
        if key.startswith(new):
            return old + key[len(new):]
    return key


def _params(model) -> dict:
    return {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _torch_shape(cfg, kind: str, shape) -> tuple:
    if kind == "linear":
        return tuple(shape)[::-1]
    if kind == "patch":
        return qwen25_vl.patch_torch_shape(cfg)
    return tuple(shape)


def expected_shapes(model) -> dict[str, tuple]:
    """torch key -> torch-layout shape, for every key the model's config expects."""
    params = _params(model)
    out = {}
    for key, path, kind, layer in qwen25_vl.torch_key_table(model.cfg):
        shape = params[path].shape if layer is None else params[path].shape[1:]
        out[key] = _torch_shape(model.cfg, kind, shape)
    return out


def _load(model, tensors: dict, table, expected: dict, what: str, fix: str):
    diff = key_diff(expected, {k: np.shape(v) for k, v in tensors.items()})
    bad = [f"{k}: {np.asarray(tensors[k]).dtype}" for k in expected if k in tensors
           and not np.issubdtype(np.asarray(tensors[k]).dtype, np.floating)
           and np.asarray(tensors[k]).dtype.name != "bfloat16"]
    if diff or bad:
        msg = [f"{what} does not match the model config:"]
        msg += ["  " + line for line in diff.lines(limit=20, layout="torch layout", shape=tuple)]
        if bad:
            msg.append(f"  {len(bad)} non-float tensors: {listing(bad, 20)}")
        msg.append(f"  fix: {fix}")
        raise ValueError("\n".join(msg))
    params = _params(model)
    staged: dict[tuple, list] = {}
    for key, path, kind, layer in table:
        staged.setdefault(path, []).append((layer, qwen25_vl.torch_to_jax(kind, np.asarray(tensors[key], np.float32))))
    set_staged(params, staged)
    return model


def _export(model, table, patch_shape=None) -> dict[str, np.ndarray]:
    params = _params(model)
    out = {}
    for key, path, kind, layer in table:
        a = np.asarray(params[path].get_value())
        out[key] = qwen25_vl.jax_to_torch(kind, a if layer is None else a[layer], patch_shape)
    return out


def load_qwen25_vl(model, tensors: dict, what: str = "Qwen2.5-VL checkpoint"):
    """Assign ``tensors`` (released or transformers-5 key names -> arrays) into ``model``."""
    tensors = {released_name(k): v for k, v in tensors.items()}
    if model.cfg.llm.tie_word_embeddings and "lm_head.weight" in tensors:
        # tied checkpoints may still carry the head; it must equal the embedding.
        head = np.asarray(tensors.pop("lm_head.weight"))
        emb = tensors.get("model.embed_tokens.weight")
        if emb is not None and not np.array_equal(np.asarray(emb), head):
            raise ValueError(f"{what}: tie_word_embeddings=true but lm_head.weight differs from "
                             "model.embed_tokens.weight")
    return _load(model, tensors, qwen25_vl.torch_key_table(model.cfg), expected_shapes(model), what,
                 "build the config from the checkpoint's config.json (omnigen2_config.from_hf_qwen25_vl)")


def export_qwen25_vl(model) -> dict[str, np.ndarray]:
    """The model's parameters under the released checkpoint's names (fp32 numpy), table order."""
    return _export(model, qwen25_vl.torch_key_table(model.cfg), qwen25_vl.patch_torch_shape(model.cfg))


def dit_expected_shapes(model) -> dict[str, tuple]:
    params = _params(model)
    return {key: _torch_shape(model.cfg, kind, params[path].shape if layer is None else params[path].shape[1:])
            for key, path, kind, layer in omnigen2_dit.torch_key_table(model.cfg)}


def load_dit(model, tensors: dict, what: str = "OmniGen2 transformer checkpoint"):
    """Assign a diffusers-layout ``transformer/`` state (key -> array) into an OmniGen2DiT."""
    return _load(model, tensors, omnigen2_dit.torch_key_table(model.cfg), dit_expected_shapes(model), what,
                 "build the DiT config from the checkpoint's transformer/config.json")


def export_dit(model) -> dict[str, np.ndarray]:
    """The DiT's parameters under the diffusers names (fp32 numpy), table order."""
    return _export(model, omnigen2_dit.torch_key_table(model.cfg))


# ------------------------------------------------------------------------------------------------
# The FLUX VAE in diffusers layout (OmniGen2's vae/: AutoencoderKL, no quant convs)


def diffusers_vae_name(flux_key: str, num_levels: int) -> tuple[str, bool]:
    """A FLUX (BFL) AE key of ``vae.torch_key_table`` -> (diffusers AutoencoderKL key, is the
    attention's 1x1 conv stored as a diffusers Linear). The decoder's levels are numbered in
    reverse there (up_blocks.0 is the FLUX up.{n-1})."""
    import re

    k = flux_key
    attn = False
    m = re.match(r"(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)$", k)
    if m:
        part, name, wb = m.groups()
        new = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}[name]
        return f"{part}.mid_block.attentions.0.{new}.{wb}", name != "norm" and wb == "weight"
    k = re.sub(r"^(encoder|decoder)\.mid\.block_1\.", r"\1.mid_block.resnets.0.", k)
    k = re.sub(r"^(encoder|decoder)\.mid\.block_2\.", r"\1.mid_block.resnets.1.", k)
    k = re.sub(r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2.", k)
    k = re.sub(r"^encoder\.down\.(\d+)\.downsample\.conv\.", r"encoder.down_blocks.\1.downsamplers.0.conv.", k)
    k = re.sub(r"^decoder\.up\.(\d+)\.block\.(\d+)\.",
               lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m.group(1))}.resnets.{m.group(2)}.", k)
    k = re.sub(r"^decoder\.up\.(\d+)\.upsample\.conv\.",
               lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m.group(1))}.upsamplers.0.conv.", k)
    k = k.replace(".nin_shortcut.", ".conv_shortcut.")
    k = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", k)
    return k, attn


def vae_diffusers_table(cfg) -> list[tuple[str, tuple, str, None]]:
    """(diffusers key, nnx path, kind, None) for every AE parameter; kind "conv" (torch OIHW <->
    HWIO), "attn" (diffusers Linear (out, in) <-> the 1x1 conv kernel (1, 1, in, out)), "copy"."""
    from sgt_jax.models import vae

    n = len(vae.vae_config(cfg).ch_mult)
    out = []
    for key, path, kind in vae.torch_key_table(cfg):
        name, attn = diffusers_vae_name(key, n)
        out.append((name, tuple(path), "attn" if attn else kind, None))
    return out


def vae_to_jax(kind: str, w: np.ndarray) -> np.ndarray:
    w = np.asarray(w)
    if kind == "conv":
        return np.ascontiguousarray(w.transpose(2, 3, 1, 0))
    if kind == "attn":
        return np.ascontiguousarray(w.T[None, None])
    return w


def vae_to_torch(kind: str, w: np.ndarray) -> np.ndarray:
    w = np.asarray(w)
    if kind == "conv":
        return np.ascontiguousarray(w.transpose(3, 2, 0, 1))
    if kind == "attn":
        return np.ascontiguousarray(w[0, 0].T)
    return w


def vae_torch_shape(kind: str, shape) -> tuple:
    shape = tuple(shape)
    if kind == "conv":
        kh, kw, cin, cout = shape
        return (cout, cin, kh, kw)
    if kind == "attn":
        return (shape[3], shape[2])
    return shape


def load_vae_diffusers(model, tensors: dict, what: str = "FLUX VAE (diffusers) checkpoint"):
    """Assign a diffusers AutoencoderKL state (FLUX layout, no quant convs) into ``vae.AutoEncoder``."""
    table = vae_diffusers_table(model.config)
    params = _params(model)
    expected = {k: vae_torch_shape(kind, params[p].shape) for k, p, kind, _ in table}
    diff = key_diff(expected, {k: np.shape(v) for k, v in tensors.items()})
    if diff:
        raise ValueError("\n".join([f"{what} does not match the VAE config:"] +
                                   ["  " + x for x in diff.lines(limit=20, layout="torch layout", shape=tuple)]))
    for k, p, kind, _ in table:
        params[p].set_value(np.asarray(vae_to_jax(kind, np.asarray(tensors[k], np.float32)), np.float32))
    return model


def export_vae_diffusers(model) -> dict[str, np.ndarray]:
    params = _params(model)
    return {k: vae_to_torch(kind, np.asarray(params[p].get_value()))
            for k, p, kind, _ in vae_diffusers_table(model.config)}
