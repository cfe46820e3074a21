"""OmniGen2 release layout <-> an sgt-jax OmniGen2 model dir (``--arch omnigen2``).

Release layout (as published, e.g. the OmniGen2/OmniGen2 repo): ``mllm/`` (Qwen2.5-VL-3B:
config.json + model.safetensors or shards + model.safetensors.index.json) and ``transformer/``
(the DiT in diffusers layout: config.json + diffusion_pytorch_model.safetensors or shards + index)
and, optional, ``vae/`` (the FLUX AutoencoderKL in diffusers layout, mapped onto models/vae.py by
``omnigen2_keymap.vae_diffusers_table``). processor/ and scheduler/ are not converted.

Model dir::

    DIR/model_dir.json       {"format": "sgt-jax omnigen2 model dir", items, dtypes, provenance}; written last
    DIR/model_config.json    {"mllm": Qwen2.5-VL config, "dit": DiT config, "vae": AE config}
    DIR/checkpoint/          Orbax (OCDBT + zarr3) {"mllm": pure dict of Qwen25VL, "dit": pure dict of
                             OmniGen2DiT, "vae": pure dict of vae.AutoEncoder}
    DIR/source_configs/      the config.json files verbatim (an export writes them back)

Streaming: one parameter slice (one source tensor) in memory at a time, both ways; weights keep
their stored dtype (bf16 stays bf16). Refusals (exit 2 in the CLI): pickles, and missing /
unexpected / mis-shaped keys, all listed (sgt_jax/keydiff.py wording) before anything is written.
"""
from __future__ import annotations

import json
import time
from typing import Iterator

import ml_collections
import ml_dtypes
import numpy as np
import tensorstore as ts
from flax import nnx
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

from sgt_jax import fileio
from sgt_jax.convert import model_dir as md
from sgt_jax.convert import omnigen2_keymap
from sgt_jax.convert.omnigen2_keymap import released_name
from sgt_jax.convert.safetensors_io import (PICKLE_SUFFIXES, ConversionError, PlannedTensor,
                                            SafetensorsPlanWriter, SafetensorsSource)
from sgt_jax.keydiff import key_diff
from sgt_jax.models import omnigen2_config, omnigen2_dit, qwen25_vl, vae

FORMAT = "sgt-jax omnigen2 model dir"
SOURCE_CONFIGS = "source_configs"
# item: (subdir, weights stem); vae/ is optional
PARTS = {"mllm": ("mllm", "model"), "dit": ("transformer", "diffusion_pytorch_model"),
         "vae": ("vae", "diffusion_pytorch_model")}


def _tables(cfg):
    out = {"mllm": qwen25_vl.torch_key_table(cfg.mllm), "dit": omnigen2_dit.torch_key_table(cfg.dit)}
    if "vae" in cfg:
        out["vae"] = omnigen2_keymap.vae_diffusers_table(cfg.vae)
    # nnx paths as strings (the VAE's level / block indices are ints in nnx.state)
    return {k: [(key, tuple(str(x) for x in path), kind, layer) for key, path, kind, layer in t] for k, t in out.items()}


def _abstract(cfg) -> dict:
    def shapes(build):
        st = nnx.state(nnx.eval_shape(build), nnx.Param)
        return {tuple(str(k) for k in p): tuple(v.shape) for p, v in nnx.to_flat_state(st)}

    out = {"mllm": shapes(lambda: qwen25_vl.Qwen25VL(cfg.mllm, rngs=nnx.Rngs(0))),
           "dit": shapes(lambda: omnigen2_dit.OmniGen2DiT(cfg.dit, rngs=nnx.Rngs(0)))}
    if "vae" in cfg:
        out["vae"] = shapes(lambda: vae.AutoEncoder(cfg.vae, rngs=nnx.Rngs(0)))
    return out


def _torch_shape(cfg, kind, shape):
    if kind in ("conv", "attn"):
        return omnigen2_keymap.vae_torch_shape(kind, shape)
    if kind == "linear":
        return tuple(shape)[::-1]
    if kind == "patch":
        return qwen25_vl.patch_torch_shape(cfg.mllm)
    return tuple(shape)


def _to_jax(kind, a):
    return omnigen2_keymap.vae_to_jax(kind, a) if kind in ("conv", "attn") else qwen25_vl.torch_to_jax(kind, a)


def _to_torch(kind, a, patch_shape):
    if kind in ("conv", "attn"):
        return omnigen2_keymap.vae_to_torch(kind, a)
    return qwen25_vl.jax_to_torch(kind, a, patch_shape)


def vae_config_from_json(j: dict, where: str) -> ml_collections.ConfigDict:
    """FLUX AutoencoderKL config.json (diffusers) -> the vae config of models/vae.py."""
    if j.get("use_quant_conv", True) or j.get("use_post_quant_conv", True):
        raise ConversionError(f"{where}: only the FLUX layout without quant convs is supported "
                              "(use_quant_conv / use_post_quant_conv must be false)")
    boc = list(j["block_out_channels"])
    c = ml_collections.ConfigDict(dict(
        in_channels=j.get("in_channels", 3), out_ch=j.get("out_channels", 3), ch=boc[0],
        ch_mult=tuple(b // boc[0] for b in boc), num_res_blocks=j.get("layers_per_block", 2),
        z_channels=j["latent_channels"], scale_factor=float(j.get("scaling_factor", 0.3611)),
        shift_factor=float(j.get("shift_factor") or 0.0), groupnorm_groups=j.get("norm_num_groups", 32), eps=1e-6))
    if any(b % boc[0] for b in boc):
        raise ConversionError(f"{where}: block_out_channels {boc} are not multiples of the first")
    try:
        vae.vae_config(c)
    except ValueError as e:
        raise ConversionError(f"{where}: {e}") from None
    return c


def _weights(d: str, stem: str) -> str:
    names = set(fileio.listdir(d)) if fileio.isdir(d) else set()
    pick = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    for cand in (f"{stem}.safetensors.index.json", f"{stem}.safetensors"):
        if cand in names:
            return fileio.join(d, cand)
    if pick:
        raise ConversionError(f"{d}: only pickle weights {pick}; convert them to safetensors first "
                              "(pickles can run code when loaded and are refused)")
    raise ConversionError(f"{d}: no {stem}.safetensors or {stem}.safetensors.index.json")


def dit_config_from_json(j: dict, base=None) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict((base or omnigen2_config.dit_omnigen2()).to_dict())
    keys = dict(patch_size="patch_size", in_channels="in_channels", hidden_size="hidden_size",
                num_layers="num_layers", num_refiner_layers="num_refiner_layers", num_heads="num_attention_heads",
                num_kv_heads="num_kv_heads", multiple_of="multiple_of", ffn_dim_multiplier="ffn_dim_multiplier",
                norm_eps="norm_eps", text_feat_dim="text_feat_dim", timestep_scale="timestep_scale")
    for ours, theirs in keys.items():
        if theirs in j:
            cfg[ours] = j[theirs]
    cfg.out_channels = j.get("out_channels") or cfg.in_channels
    for k in ("axes_dim_rope", "axes_lens"):
        if k in j:
            cfg[k] = tuple(j[k])
    return omnigen2_config.validate_dit(cfg)


def import_omnigen2(src: str, dst: str, *, overwrite: bool = False, progress: bool = False) -> dict:
    t0 = time.time()
    src = fileio.abspath(src)
    sources, raw = {}, {}
    for item, (sub, stem) in PARTS.items():
        d = fileio.join(src, sub)
        cj = fileio.join(d, "config.json")
        if item == "vae" and not fileio.isdir(d):
            continue
        if not fileio.exists(cj):
            raise ConversionError(f"{src}: no {sub}/config.json (expected the OmniGen2 release layout: mllm/, transformer/)")
        raw[item] = fileio.read_json(cj)
        sources[item] = SafetensorsSource(_weights(d, stem))
    try:
        cfg = ml_collections.ConfigDict(dict(mllm=omnigen2_config.from_hf_qwen25_vl(raw["mllm"], where=f"{src}/mllm/config.json"),
                                             dit=dit_config_from_json(raw["dit"])))
        if "vae" in raw:
            cfg.vae = vae_config_from_json(raw["vae"], f"{src}/vae/config.json")
    except ValueError as e:
        raise ConversionError(str(e)) from None
    abstract, tables = _abstract(cfg), _tables(cfg)
    problems = []
    for item, table in tables.items():
        srcs = sources[item]
        names = {released_name(k): k for k in srcs.keys()} if item == "mllm" else {k: k for k in srcs.keys()}
        if item == "mllm" and cfg.mllm.llm.tie_word_embeddings:
            names.pop("lm_head.weight", None)
        expected = {}
        for key, path, kind, layer in table:
            shape = abstract[item][path]
            expected[key] = _torch_shape(cfg, kind, shape if layer is None else shape[1:])
        diff = key_diff(expected, {k: srcs.tensors[v].shape for k, v in names.items()})
        bad = sorted(k for k in expected if k in names and srcs.tensors[names[k]].dtype not in ("F32", "BF16", "F16"))
        problems += diff.lines(f"{sub_of(item)}", layout="torch layout")
        if bad:
            problems.append(f"{sub_of(item)}: non-float tensors: {bad}")
        sources[item] = (srcs, names)
    if problems:
        raise ConversionError(f"{src} does not match its config.json files:\n  " + "\n  ".join(problems))

    dst = fileio.abspath(dst)
    if fileio.isdir(dst) and fileio.listdir(dst):
        if not overwrite:
            raise ConversionError(f"{dst} exists and is not empty (pass --overwrite)")
        fileio.rmtree(dst)
    fileio.makedirs(dst)
    tree, dtypes = {}, {}
    nbytes = 0
    for item, table in tables.items():
        srcs, names = sources[item]
        groups: dict[tuple, list] = {}
        for row in table:
            groups.setdefault(row[1], []).append(row)
        sub = {}
        for path, rows in groups.items():
            shape = abstract[item][path]
            kinds = {srcs.tensors[names[r[0]]].dtype for r in rows}
            dtype = np.dtype(ml_dtypes.bfloat16) if kinds == {"BF16"} else np.dtype(np.float32)
            dtypes.setdefault(item, set()).add(np.dtype(dtype).name)
            stacked = rows[0][3] is not None
            nbytes += sum(srcs.tensors[names[r[0]]].nbytes for r in rows)
            md._set(sub, path, md.StreamedArray(shape, dtype, ((1,) + shape[1:]) if stacked else shape,
                                                _producer(srcs, names, rows, dtype)))
        tree[item] = sub
    md._write_checkpoint(fileio.join(dst, md.CHECKPOINT_DIR), tree)
    fileio.makedirs(fileio.join(dst, SOURCE_CONFIGS))
    for item in tree:
        sub = PARTS[item][0]
        fileio.write_text(fileio.join(dst, SOURCE_CONFIGS, f"{sub}_config.json"), json.dumps(raw[item], indent=2))
    fileio.write_text(fileio.join(dst, md.CONFIG_FILE), json.dumps(json.loads(cfg.to_json()), indent=2))
    fileio.write_text(fileio.join(dst, md.INFO_FILE), json.dumps({
        "format": FORMAT, "version": 1, "checkpoint": md.CHECKPOINT_DIR, "items": sorted(tree),
        "dtypes": {k: sorted(v) for k, v in dtypes.items()}, "provenance": {"source": src}}, indent=2))
    return _stats(nbytes, t0)


def sub_of(item: str) -> str:
    return PARTS[item][0]


def _producer(srcs, names, rows, dtype):
    def produce(chunk) -> Iterator[tuple]:
        for key, path, kind, layer in rows:
            a = _to_jax(kind, srcs.read(names[key]))
            yield ((Ellipsis,) if layer is None else (layer, Ellipsis)), np.asarray(a, dtype)
    return produce


def _stats(nbytes: int, t0: float) -> dict:
    from sgt_jax.convert.bagel_io import peak_rss_gb

    sec = time.time() - t0
    return {"bytes": nbytes, "seconds": sec, "gb_per_s": nbytes / 1e9 / max(sec, 1e-9), "peak_rss_gb": peak_rss_gb()}


def read_config(path: str) -> ml_collections.ConfigDict:
    info = fileio.read_json(fileio.join(path, md.INFO_FILE))
    if info.get("format") != FORMAT:
        raise ConversionError(f"{path}: not an OmniGen2 model dir (format {info.get('format')!r})")
    d = fileio.read_json(fileio.join(path, md.CONFIG_FILE))
    mllm = ml_collections.ConfigDict(d["mllm"])
    for k in ("mrope_section",):
        mllm.llm[k] = tuple(mllm.llm[k])
    mllm.vision.fullatt_block_indexes = tuple(mllm.vision.fullatt_block_indexes)
    dit = ml_collections.ConfigDict(d["dit"])
    dit.axes_dim_rope, dit.axes_lens = tuple(dit.axes_dim_rope), tuple(dit.axes_lens)
    out = ml_collections.ConfigDict(dict(mllm=omnigen2_config.validate_qwen25_vl(mllm),
                                         dit=omnigen2_config.validate_dit(dit)))
    if "vae" in d:
        out.vae = ml_collections.ConfigDict(d["vae"])
        out.vae.ch_mult = tuple(out.vae.ch_mult)
    return out


def _open(path: str, name: str):
    ckpt = fileio.join(path, md.CHECKPOINT_DIR)
    meta = fileio.read_json(fileio.join(ckpt, "_METADATA"))
    use_ocdbt = bool(meta.get("use_ocdbt", True))
    spec = ts_utils.ArrayReadSpec(ckpt, name, bool(meta.get("use_zarr3", False)), use_ocdbt=use_ocdbt).json
    return ts.open(ts.Spec(spec), open=True, context=ts_utils.get_ts_context(use_ocdbt=use_ocdbt)).result()


def export_omnigen2(model_dir: str, dst: str, *, overwrite: bool = False, progress: bool = False) -> dict:
    """Write ``dst/mllm/`` (model.safetensors + config.json), ``dst/transformer/`` and, when
    imported, ``dst/vae/`` (diffusion_pytorch_model.safetensors + config.json), in the stored dtype."""
    t0 = time.time()
    model_dir, dst = fileio.abspath(model_dir), fileio.abspath(dst)
    cfg = read_config(model_dir)
    stored = md.stored_arrays(model_dir)
    if fileio.isdir(dst) and fileio.listdir(dst):
        if not overwrite:
            raise ConversionError(f"{dst} exists and is not empty (pass --overwrite)")
        fileio.rmtree(dst)
    nbytes = 0
    for item, table in _tables(cfg).items():
        sub, stem = PARTS[item]
        out_dir = fileio.join(dst, sub)
        fileio.makedirs(out_dir)
        plan, handles = [], {}
        for key, path, kind, layer in table:
            name = md.name_of((item,) + tuple(path))
            if name not in stored:
                raise ConversionError(f"{model_dir}: the checkpoint has no array {name}")
            shape, dt = stored[name]
            plan.append(PlannedTensor(key, dt, _torch_shape(cfg, kind, shape if layer is None else shape[1:])))
        writer = SafetensorsPlanWriter(out_dir, stem, plan)
        pshape = qwen25_vl.patch_torch_shape(cfg.mllm)
        for (key, path, kind, layer), p in zip(table, plan):
            name = md.name_of((item,) + tuple(path))
            if name not in handles:
                handles[name] = _open(model_dir, name)
            t = handles[name]
            a = (t if layer is None else t[layer]).read().result()
            block = np.asarray(_to_torch(kind, a, pshape), p.dtype)
            writer.write(key, block)
            nbytes += block.nbytes
        writer.close()
        src_cfg = fileio.join(model_dir, SOURCE_CONFIGS, f"{sub}_config.json")
        fileio.write_text(fileio.join(out_dir, "config.json"), fileio.read_text(src_cfg))
    return _stats(nbytes, t0)

