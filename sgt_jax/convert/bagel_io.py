"""BAGEL release layout <-> sgt-jax model dir, streaming, through the one key table.

``import_bagel(SRC, DST)``: SRC in BAGEL's release layout (``ema.safetensors`` or
``model.safetensors``, or shards + ``*.safetensors.index.json``; ``llm_config.json``,
``vit_config.json``, ``ae.safetensors``, tokenizer files). Every header is validated first and
every key / shape / dtype is checked against the model config the files imply (one error listing
all problems); then each parameter is written into the Orbax checkpoint block by block: a
block is a run of rows of one source tensor (aligned to the storage chunks), read with a
positioned read, transposed to the port's layout, and written into its slice of the (possibly
stacked) parameter. Nothing larger than a block (<= BLOCK_BYTES) is ever materialised.

``export_bagel(MODEL_DIR, DST)``: the reverse; reads chunk-aligned blocks of each stored array
slice, transposes them back to torch rows and appends them to the safetensors file(s) in plan
order (header written first from the known shapes), writes the two regenerated sin-cos tables
(BAGEL's loaders pop them unconditionally), ``ae.safetensors``, ``llm_config.json`` /
``vit_config.json`` (every field BAGEL's loaders read; the ViT's ``num_hidden_layers`` is the
used depth + 1 because BAGEL drops the last layer) and the tokenizer files.

SRC, DST and MODEL_DIR may be ``gs://`` URLs: every file operation outside the Orbax checkpoint
goes through ``sgt_jax.fileio`` (ranged reads and streamed writes of bounded size).

Names and layouts come only from ``sgt_jax.convert.keymap`` (``bagel_table``, ``vae_entries``,
``group_entries``, ``FIXED_KEYS``).
"""
from __future__ import annotations

import math
import resource
import time
from typing import Iterator

import ml_collections
import numpy as np

from sgt_jax import fileio
import sgt_jax.convert.model_dir as md
from sgt_jax.convert.safetensors_io import (PICKLE_EXPLANATION, PICKLE_SUFFIXES, ConversionError,
                                            PlannedTensor, SafetensorsPlanWriter, SafetensorsSource,
                                            _listing, parse_size)
from sgt_jax.models import config as config_lib
import sgt_jax.convert.keymap as keymap
from sgt_jax.keydiff import key_diff

BAGEL_7B_SETTINGS = dict(latent_patch_size=2, max_latent_size=64, vit_max_num_patch_per_side=70,
                         timestep_shift=1.0)
BLOCK_BYTES = 64 * 2 ** 20
ALLOWED_DTYPES = ("F32", "BF16", "F16")
PRESETS = {"bagel_7b": config_lib.bagel_7b, "tiny": config_lib.tiny}
WEIGHT_CANDIDATES = ("ema.safetensors", "ema.safetensors.index.json", "model.safetensors",
                     "model.safetensors.index.json")
SPECIAL_TOKENS = {"bos_token_id": "<|im_start|>", "eos_token_id": "<|im_end|>",
                  "start_of_image": "<|vision_start|>", "end_of_image": "<|vision_end|>"}

# Fields of BAGEL's config files. Qwen2Config.from_json_file / SiglipVisionConfig.from_json_file
# read every __init__ argument (modeling/qwen2/configuration_qwen2.py,
# modeling/siglip/configuration_siglip.py); an export writes all of them. The template values
# are Qwen2.5-7B-Instruct's / SigLIP so400m-14-980's, used only for fields a model dir cannot
# know (when it carries no bagel_configs/ from its source).
LLM_CONFIG_TEMPLATE = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 152064,
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "hidden_act": "silu",
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "rope_scaling": None, "attention_dropout": 0.0, "initializer_range": 0.02,
    "tie_word_embeddings": False, "use_cache": True, "use_sliding_window": False,
    "sliding_window": 131072, "max_window_layers": 28, "torch_dtype": "bfloat16",
}
VIT_CONFIG_TEMPLATE = {
    "model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
    "num_hidden_layers": 27, "num_attention_heads": 16, "num_channels": 3, "image_size": 980,
    "patch_size": 14, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-06,
    "attention_dropout": 0.0,
}
LLM_CONFIG_FIELDS = tuple(LLM_CONFIG_TEMPLATE)
VIT_CONFIG_FIELDS = tuple(VIT_CONFIG_TEMPLATE)


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far, in GB (1e9 bytes).

    Linux: ``VmHWM`` of /proc/self/status, the high-water mark of this process's own address
    space. ``ru_maxrss`` is not used there: it survives ``execve``, so a converter started by
    ``subprocess`` (vfork + exec) from a large parent reports the parent's peak instead of its own.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9   # KiB elsewhere


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads) so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled,
                mininterval=1.0, smoothing=0.1)


def _np_dtype(name: str) -> np.dtype:
    import ml_dtypes

    return {"bf16": np.dtype(ml_dtypes.bfloat16), "bfloat16": np.dtype(ml_dtypes.bfloat16),
            "fp32": np.dtype(np.float32), "float32": np.dtype(np.float32)}[name]


def transpose2d(a: np.ndarray, dtype) -> np.ndarray:
    """``a.T`` as a new C-contiguous array of ``dtype``, copied in 256x256 tiles: 3-5x faster
    than numpy's strided copy for the tall blocks of a checkpoint (cache/TLB friendly)."""
    n, m = a.shape
    out = np.empty((m, n), dtype)
    bs = 256
    for i in range(0, n, bs):
        for j in range(0, m, bs):
            out[j:j + bs, i:i + bs] = a[i:i + bs, j:j + bs].T
    return out


def _step(chunk_extent: int, row_bytes: int, n: int) -> int:
    """Rows per block: a multiple of the storage chunk extent, about BLOCK_BYTES."""
    rows = max(1, BLOCK_BYTES // max(row_bytes, 1))
    rows = max(chunk_extent, rows // chunk_extent * chunk_extent)
    return min(rows, n) if n else 1


# --------------------------------------------------------------------------------------------------
# import


def find_weights(src: str, weights: str | None = None) -> tuple[str, str, list[str]]:
    """(weights path, directory of the config files, notes). ``weights``: None (auto), "ema",
    "model", or a path to a .safetensors file / index json."""
    notes = []
    if fileio.isfile(src):
        if src.endswith(PICKLE_SUFFIXES):
            raise ConversionError(f"{src}: {PICKLE_EXPLANATION}")
        return src, fileio.dirname(src), notes
    if not fileio.isdir(src):
        raise ConversionError(f"{src}: no such file or directory")
    listing = fileio.listdir(src)
    if weights and weights not in ("ema", "model"):
        p = weights if fileio.isabs(weights) or fileio.exists(weights) else fileio.join(src, weights)
        if p.endswith(PICKLE_SUFFIXES):
            raise ConversionError(f"{p}: {PICKLE_EXPLANATION}")
        if not fileio.exists(p):
            raise ConversionError(f"--weights {weights}: {p} not found")
        return p, src, notes
    cands = [c for c in WEIGHT_CANDIDATES if c in listing]
    if weights:
        cands = [c for c in cands if c.startswith(weights + ".")]
    if not cands:
        pickles = sorted(f for f in listing if f.endswith(PICKLE_SUFFIXES) or f.endswith(".bin.index.json"))
        if pickles:
            raise ConversionError(f"{src}: no safetensors weights, only pickle-based files {pickles}: "
                                  f"{PICKLE_EXPLANATION}")
        other = sorted(f for f in listing if f.endswith(".safetensors.index.json") and not f.startswith("ae."))
        if len(other) == 1 and not weights:
            return fileio.join(src, other[0]), src, notes
        want = [c for c in WEIGHT_CANDIDATES if not weights or c.startswith(weights + ".")]
        raise ConversionError(f"{src}: no BAGEL weights found; expected one of {want}"
                              + (f" (or pass --weights; index files present: {other})" if other else ""))
    stems = {c.split(".")[0] for c in cands}
    chosen = cands[0]
    single, index = f"{chosen.split('.')[0]}.safetensors", f"{chosen.split('.')[0]}.safetensors.index.json"
    if single in cands and index in cands:
        notes.append(f"both {single} and {index} exist; using {single}")
    if len(stems) > 1:
        notes.append(f"both ema and model weights exist; importing {chosen} (pass --weights model for the other)")
    pick = sorted(f for f in listing if f.endswith(PICKLE_SUFFIXES))
    if pick:
        notes.append(f"ignoring pickle-based files (never opened): {pick}")
    return fileio.join(src, chosen), src, notes


def vae_config_from_ae(shapes: dict[str, tuple], base) -> ml_collections.ConfigDict:
    """The FLUX AE hyper-parameters implied by ``ae.safetensors``' shapes (BAGEL hard-codes them
    in ``load_ae``); scale/shift factors and GroupNorm groups come from ``base``."""
    need = ["encoder.conv_in.weight", "decoder.conv_in.weight", "decoder.conv_out.weight",
            "encoder.down.0.block.0.conv1.weight"]
    missing = [k for k in need if k not in shapes]
    if missing:
        raise ConversionError(f"ae.safetensors is not a FLUX autoencoder state dict: missing {missing}")
    v = ml_collections.ConfigDict(base.to_dict())
    ch, cin = shapes["encoder.conv_in.weight"][:2]
    levels = 0
    while f"encoder.down.{levels}.block.0.conv1.weight" in shapes:
        levels += 1
    blocks = 0
    while f"encoder.down.0.block.{blocks}.conv1.weight" in shapes:
        blocks += 1
    v.update(dict(in_channels=int(cin), ch=int(ch), out_ch=int(shapes["decoder.conv_out.weight"][0]),
                  z_channels=int(shapes["decoder.conv_in.weight"][1]), num_res_blocks=blocks,
                  ch_mult=tuple(int(shapes[f"encoder.down.{i}.block.0.conv1.weight"][0]) // int(ch)
                                for i in range(levels))))
    return v


def special_tokens_from_tokenizer(d: str) -> dict[str, int]:
    """BAGEL's four special token ids from the tokenizer files in ``d`` (those it has)."""
    vocab = {}
    try:
        tok = fileio.read_json(fileio.join(d, "tokenizer.json"))
        vocab.update({t["content"]: int(t["id"]) for t in tok.get("added_tokens", [])})
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        dec = fileio.read_json(fileio.join(d, "tokenizer_config.json")).get("added_tokens_decoder", {})
        vocab.update({t["content"]: int(i) for i, t in dec.items()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    try:
        vocab.update({k: int(v) for k, v in fileio.read_json(fileio.join(d, "added_tokens.json")).items()})
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    return {name: vocab[tok] for name, tok in SPECIAL_TOKENS.items() if tok in vocab}


def tokenizer_notes(d: str) -> list[str]:
    """Notes on tokenizer files in ``d`` that BAGEL's loader (its slow ``Qwen2Tokenizer``,
    transformers 4.49) cannot read; nothing when ``d`` has no tokenizer files."""
    names = set(fileio.listdir(d)) if fileio.isdir(d) else set()
    if not names & {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"}:
        return []
    notes = []
    lacking = [f for f in ("vocab.json", "merges.txt") if f not in names]
    if lacking:
        notes.append(f"the tokenizer files lack {' and '.join(lacking)}: BAGEL's Qwen2Tokenizer.from_pretrained "
                     "(the slow tokenizer its app / eval scripts use) needs both (tokenizer.json alone only "
                     "serves a fast tokenizer)")
    try:
        extra = fileio.read_json(fileio.join(d, "tokenizer_config.json")).get("extra_special_tokens")
    except (OSError, ValueError, AttributeError):
        extra = None
    if isinstance(extra, list):
        notes.append("tokenizer_config.json has 'extra_special_tokens' as a list (transformers 5 format): "
                     "transformers 4.x (BAGEL pins 4.49) expects a dict there and fails to load it")
    return notes


def _config_for_source(cfg_dir: str, keys: set, ae_shapes: dict | None, *, preset: str, settings: dict,
                       vae_scale_factor=None, vae_shift_factor=None) -> tuple[ml_collections.ConfigDict, list]:
    notes = []
    missing = [f for f in ("llm_config.json", "vit_config.json") if not fileio.exists(fileio.join(cfg_dir, f))]
    if missing:
        raise ConversionError(f"{cfg_dir}: missing {missing} (BAGEL's loaders read both; the release ships them)")
    lj = fileio.read_json(fileio.join(cfg_dir, "llm_config.json"))
    vj = fileio.read_json(fileio.join(cfg_dir, "vit_config.json"))
    grid = vj.get("image_size", 980) // vj.get("patch_size", 14)
    if grid != settings["vit_max_num_patch_per_side"]:
        raise ConversionError(
            f"vit_config.json implies a ViT grid of {grid} patches per side (image_size {vj.get('image_size')} / "
            f"patch_size {vj.get('patch_size')}), but --vit-max-patches-per-side is "
            f"{settings['vit_max_num_patch_per_side']}: pass --vit-max-patches-per-side {grid}")
    base = PRESETS[preset]()
    cfg = config_lib.from_bagel_configs(lj, vj, base=base, where=cfg_dir, **settings)
    mot = any("_moe_gen" in k for k in keys)
    cfg.llm.layer_module = "mot" if mot else "dense"
    cfg.llm.qk_norm = any(".self_attn.q_norm" in k for k in keys)
    cfg.bagel.visual_gen = "vae2llm.weight" in keys
    cfg.bagel.visual_und = "connector.fc1.weight" in keys
    from_tok = special_tokens_from_tokenizer(cfg_dir)
    for k, v in from_tok.items():
        cfg.llm[k] = v
    bad_tok = {k: cfg.llm[k] for k in SPECIAL_TOKENS if not 0 <= cfg.llm[k] < cfg.llm.vocab_size}
    if bad_tok:
        origin = ("read from the tokenizer files" if set(bad_tok) <= set(from_tok)
                  else f"preset {preset}, no tokenizer files")
        notes.append(f"special token ids {bad_tok} ({origin}) are outside the vocabulary "
                     f"({cfg.llm.vocab_size}); fix model_config.json or import with the matching tokenizer")
    notes += tokenizer_notes(cfg_dir)
    if ae_shapes is not None:
        cfg.vae = vae_config_from_ae(ae_shapes, cfg.vae)
    if vae_scale_factor is not None:
        cfg.vae.scale_factor = float(vae_scale_factor)
    if vae_shift_factor is not None:
        cfg.vae.shift_factor = float(vae_shift_factor)
    return config_lib.validate(cfg), notes


PATCH_KEY = "vit_model.vision_model.embeddings.patch_embedding.weight"


def _conv_patch_embedding(infos: dict, cfg) -> dict:
    """{key: converter} when the ViT patch embedding is stored in stock SigLIP's Conv2d form
    (hidden, C, p, p) instead of BAGEL's Linear form (hidden, p*p*C)."""
    t = infos.get(PATCH_KEY)
    p = cfg.vit.patch_size
    if t is not None and cfg.bagel.visual_und and len(t.shape) == 4 and t.shape[0] == cfg.vit.hidden_size \
            and t.shape[2:] == (p, p):
        from sgt_jax.models import siglip

        return {PATCH_KEY: (siglip.conv_patch_weight_to_linear, (t.shape[0], t.shape[1] * p * p))}
    return {}


def _check_tensors(what: str, infos: dict, table: list, param_shapes: dict, optional: dict,
                   converted: dict | None = None) -> list[str]:
    """Problems of one state dict against a table: missing, unexpected, mis-shaped, wrong dtype.
    ``optional``: keys allowed but not required -> expected torch shape. ``converted``: keys
    stored in another form -> (converter, the torch shape after conversion)."""
    converted = converted or {}
    expected = {}
    for e in table:
        p = param_shapes[tuple(e.path)]
        expected[e.key] = keymap.torch_shape(e.kind, p if e.layer is None else p[1:])
    found = {k: (converted[k][1] if k in converted else tuple(t.shape)) for k, t in infos.items()}
    problems = key_diff(expected, found, optional=optional).lines(what, layout="torch layout")
    dt = [f"{k}: {infos[k].dtype}" for k in [*expected, *optional]
          if k in infos and infos[k].dtype not in ALLOWED_DTYPES]
    if dt:
        problems.append(f"{what}: {len(dt)} tensors of a wrong dtype (allowed: {', '.join(ALLOWED_DTYPES)}): "
                        f"{_listing(dt, 20)}")
    return problems


def _check_fixed(src: SafetensorsSource, cfg, problems: list, notes: list):
    """The stored sin-cos tables (optional; BAGEL regenerates them) must agree with the options."""
    h = cfg.llm.hidden_size
    opt = {"latent_pos_embed.pos_embed": ("--max-latent-size", cfg.bagel.max_latent_size),
           "vit_pos_embed.pos_embed": ("--vit-max-patches-per-side", cfg.bagel.vit_max_num_patch_per_side)}
    expected = keymap.fixed_table_shapes(cfg)
    for key, want in expected.items():
        t = src.tensors.get(key)
        if t is None:
            notes.append(f"{key} not in the weights (fine: it is regenerated)")
            continue
        flag, value = opt[key]
        if tuple(t.shape) != want:
            g = math.isqrt(t.shape[0]) if len(t.shape) == 2 else None
            hint = f"pass {flag} {g}" if g and g * g == t.shape[0] and t.shape[1] == h else "wrong table shape"
            problems.append(f"{key} in the weights is {list(t.shape)}, but {flag} {value} implies {list(want)}: {hint}")
            continue
        if t.dtype in ALLOWED_DTYPES:
            stored = src.read(key).astype(np.float32)
            ref = keymap.fixed_tables(cfg)[key].astype(t.np_dtype).astype(np.float32)
            err = float(np.abs(stored - ref).max()) if stored.size else 0.0
            if err > 0:
                notes.append(f"{key}: stored values differ from the regenerated table by up to {err:.3g} "
                             "(ignored, as BAGEL does; the export writes the regenerated table)")
    for key in keymap.FIXED_KEYS:
        if key not in expected and key in src.tensors:
            notes.append(f"{key} present but its branch is absent; ignored")


def _group_dtype(src: SafetensorsSource, group) -> np.dtype:
    names = {src.tensors[e.key].dtype for e in group.entries}
    return _np_dtype("bf16") if names == {"BF16"} else np.dtype(np.float32)


def _import_producer(src: SafetensorsSource, group, shape: tuple, dtype: np.dtype, bar, converted: dict):
    """Blocks for one parameter: rows of each source tensor -> their slice of the parameter."""
    def produce(chunk: tuple) -> Iterator[tuple]:
        for e in group.entries:
            pre = () if e.layer is None else (e.layer,)
            ch = chunk[len(pre):]
            t = src.tensors[e.key]
            if e.kind == "conv" or len(t.shape) == 0 or e.key in converted:
                a = src.read(e.key)
                if e.key in converted:
                    a = converted[e.key][0](a)
                a = np.array(keymap.from_torch(e.kind, a), dtype=dtype)
                bar.update(t.nbytes)
                yield pre + (Ellipsis,), a
                continue
            n = t.shape[0]
            row_bytes = t.nbytes // max(n, 1)
            axis_chunk = ch[-1] if e.kind == "linear" else ch[0]
            step = _step(axis_chunk, max(row_bytes, row_bytes * dtype.itemsize // t.np_dtype.itemsize), n)
            for r0 in range(0, n, step):
                r1 = min(n, r0 + step)
                a = src.read(e.key, (r0, r1))
                if e.kind == "linear":            # torch rows = kernel columns
                    block = transpose2d(a, dtype)
                    idx = pre + (slice(None), slice(r0, r1))
                else:
                    block = a.astype(dtype, copy=False)
                    idx = pre + (slice(r0, r1),)
                bar.update(a.nbytes)
                yield idx, block
    return produce


def _streamed_tree(src: SafetensorsSource, table: list, abstract: dict, bar, converted: dict | None = None) -> dict:
    tree: dict = {}
    for g in keymap.group_entries(table):
        shape = tuple(md.get_in(abstract, g.path).shape)
        dtype = _group_dtype(src, g)
        write_shape = ((1,) + shape[1:]) if g.stacked else shape
        md._set(tree, tuple(g.path), md.StreamedArray(shape, dtype, write_shape,
                                                       _import_producer(src, g, shape, dtype, bar,
                                                                        converted or {})))
    return tree


def import_bagel(src: str, dst: str, *, latent_patch_size: int = 2, max_latent_size: int = 64,
                 vit_max_patches_per_side: int = 70, timestep_shift: float = 1.0, preset: str = "bagel_7b",
                 weights: str | None = None, no_vae: bool = False, vae_scale_factor: float | None = None,
                 vae_shift_factor: float | None = None, compress: bool = False, overwrite: bool = False,
                 progress: bool = True, log=print) -> dict:
    """Convert a BAGEL release-layout checkpoint into a model dir; returns stats."""
    t0 = time.perf_counter()
    if fileio.isdir(dst) and fileio.listdir(dst) and not overwrite:
        raise ConversionError(f"{dst} exists and is not empty (pass --overwrite)")
    wpath, cfg_dir, notes = find_weights(src, weights)
    source = SafetensorsSource(wpath)
    ae_path = fileio.join(cfg_dir, "ae.safetensors")
    ae = None
    if not no_vae:
        if not fileio.exists(ae_path):
            bins = [f for f in ("ae.bin", "ae.pt", "ae.pth") if fileio.exists(fileio.join(cfg_dir, f))]
            if bins:
                raise ConversionError(f"{cfg_dir}/{bins[0]}: {PICKLE_EXPLANATION}")
            raise ConversionError(f"{cfg_dir}: no ae.safetensors (the FLUX VAE BAGEL ships with its weights); "
                                  "pass --no-vae to import the Bagel weights alone")
        ae = SafetensorsSource(ae_path)
    settings = dict(latent_patch_size=latent_patch_size, max_latent_size=max_latent_size,
                    vit_max_num_patch_per_side=vit_max_patches_per_side, timestep_shift=float(timestep_shift))
    cfg, cfg_notes = _config_for_source(
        cfg_dir, set(source.keys()), {k: t.shape for k, t in ae.tensors.items()} if ae else None,
        preset=preset, settings=settings, vae_scale_factor=vae_scale_factor, vae_shift_factor=vae_shift_factor)
    notes += cfg_notes
    table = keymap.bagel_table(cfg)
    abstract = md.abstract_params(cfg)
    pshapes = {p: tuple(v.shape) for p, v in md.flatten(abstract).items()}
    converted = _conv_patch_embedding(source.tensors, cfg)
    if converted:
        notes.append(f"{PATCH_KEY} is in Conv2d form {list(source.tensors[PATCH_KEY].shape)}: converted to "
                     "BAGEL's Linear form (permute(0, 2, 3, 1).reshape)")
    problems = _check_tensors(fileio.basename(wpath), source.tensors, table, pshapes,
                              optional=keymap.fixed_table_shapes(cfg), converted=converted)
    _check_fixed(source, cfg, problems, notes)
    vae_table = abstract_vae = None
    if ae is not None:
        vae_table = keymap.vae_entries(cfg)
        abstract_vae = md.abstract_vae(cfg)
        vshapes = {p: tuple(v.shape) for p, v in md.flatten(abstract_vae).items()}
        problems += _check_tensors("ae.safetensors", ae.tensors, vae_table, vshapes, optional={})
    if problems:
        raise ConversionError(f"cannot import {src}:\n  " + "\n  ".join(problems))
    for n in notes:
        log(f"note: {n}")

    total = sum(source.tensors[e.key].nbytes for e in table) + (
        sum(ae.tensors[e.key].nbytes for e in vae_table) if ae else 0)
    bar = _progress(total, "import", progress)
    params = _streamed_tree(source, table, abstract, bar, converted)
    vae = _streamed_tree(ae, vae_table, abstract_vae, bar) if ae else None
    tok = cfg_dir if set(md.TOKENIZER_FILES) & set(fileio.listdir(cfg_dir)) else None
    prov = {"tool": "sgt_jax.convert import", "source": fileio.abspath(src), "weights": fileio.basename(wpath),
            "weights_files": [fileio.basename(f) for f in source.files], "preset": preset,
            "settings_from_options": settings, "notes": notes}
    t1 = time.perf_counter()
    md.save_model_dir(dst, cfg, params, vae, tokenizer_dir=tok, bagel_configs_dir=cfg_dir, compress=compress,
                      provenance=prov, overwrite=overwrite)
    bar.close()
    dt = time.perf_counter() - t0
    stats = {"bytes": total, "seconds": dt, "write_seconds": time.perf_counter() - t1,
             "gb_per_s": total / 1e9 / dt, "peak_rss_gb": peak_rss_gb(), "cpu_seconds": cpu_seconds(),
             "tensors": len(table) + (len(vae_table) if ae else 0),
             "params_dtype": md.read_info(dst)["params_dtype"], "notes": notes}
    return stats


# --------------------------------------------------------------------------------------------------
# export


def _export_plan(reader: md.ModelDirReader, table: list, item: str, out_dtype) -> list[tuple]:
    """[(entry, orbax name, torch shape, output dtype)] in table order."""
    plan = []
    for e in table:
        name = md.name_of((item,) + tuple(e.path))
        shape, stored = reader.stored[name]
        s = shape if e.layer is None else shape[1:]
        plan.append((e, name, keymap.torch_shape(e.kind, s), np.dtype(out_dtype) if out_dtype is not None else stored))
    return plan


def _export_blocks(reader: md.ModelDirReader, plan: list, writer: SafetensorsPlanWriter, bar):
    """Read chunk-aligned blocks of each stored slice, turn them into torch rows, append them.
    One read is kept in flight ahead of the block being converted and written."""
    handles: dict[str, object] = {}

    def tasks():
        for e, name, tshape, dt in plan:
            if name not in handles:
                handles[name] = reader.open(name)
            t = handles[name]
            pre = () if e.layer is None else (e.layer,)
            chunk = tuple(t.chunk_layout.read_chunk.shape)[len(pre):]
            if e.kind == "conv" or len(tshape) == 0:
                yield e, t[pre + (Ellipsis,)], lambda a, k=e.kind, d=dt: np.array(keymap.to_torch(k, a), dtype=d)
                continue
            n = tshape[0]
            row_bytes = math.prod(tshape[1:]) * max(dt.itemsize, t.dtype.numpy_dtype.itemsize)
            axis_chunk = chunk[-1] if e.kind == "linear" else chunk[0]
            step = _step(axis_chunk, row_bytes, n)
            for r0 in range(0, n, step):
                r1 = min(n, r0 + step)
                if e.kind == "linear":
                    yield e, t[pre + (slice(None), slice(r0, r1))], lambda a, d=dt: transpose2d(a, d)
                else:
                    yield e, t[pre + (slice(r0, r1),)], lambda a, d=dt: a.astype(d, copy=False)

    it = tasks()
    cur = next(it, None)
    fut = cur[1].read() if cur else None
    while cur is not None:
        nxt = next(it, None)
        nfut = nxt[1].read() if nxt else None
        a = fut.result()
        block = cur[2](a)
        writer.write(cur[0].key, block)
        bar.update(block.nbytes)
        cur, fut = nxt, nfut


def bagel_config_files(cfg, templates: dict | None = None, torch_dtype: str | None = None) -> tuple[dict, dict]:
    """(llm_config.json, vit_config.json) dicts: the templates (the source's files when the model
    dir carries them) with every shape field set from ``cfg``."""
    lt = dict(LLM_CONFIG_TEMPLATE if not templates or "llm_config.json" not in templates
              else templates["llm_config.json"])
    for k, v in LLM_CONFIG_TEMPLATE.items():
        lt.setdefault(k, v)
    llm = cfg.llm
    lt.update(vocab_size=llm.vocab_size, hidden_size=llm.hidden_size, intermediate_size=llm.intermediate_size,
              num_hidden_layers=llm.num_layers, num_attention_heads=llm.num_heads,
              num_key_value_heads=llm.num_kv_heads, rms_norm_eps=float(llm.rms_norm_eps),
              rope_theta=float(llm.rope_theta), tie_word_embeddings=False)
    if lt.get("max_window_layers", 0) > llm.num_layers and not (templates and "llm_config.json" in templates):
        lt["max_window_layers"] = llm.num_layers
    if torch_dtype:
        lt["torch_dtype"] = torch_dtype
    vt = dict(VIT_CONFIG_TEMPLATE if not templates or "vit_config.json" not in templates
              else templates["vit_config.json"])
    for k, v in VIT_CONFIG_TEMPLATE.items():
        vt.setdefault(k, v)
    vit = cfg.vit
    vt.update(hidden_size=vit.hidden_size, intermediate_size=vit.intermediate_size,
              num_hidden_layers=vit.num_layers + 1,         # BAGEL's loaders drop the last layer
              num_attention_heads=vit.num_heads, patch_size=vit.patch_size,
              image_size=vit.max_patches_per_side * vit.patch_size, layer_norm_eps=float(vit.layer_norm_eps))
    return lt, vt


def export_bagel(model_dir: str, dst: str, *, dtype: str | None = None, shard_size=None,
                 weights_name: str | None = None, overwrite: bool = False, progress: bool = True,
                 ema: bool = False, log=print) -> dict:
    """Write BAGEL's release layout from a model dir; returns stats."""
    t0 = time.perf_counter()
    if fileio.isdir(model_dir) and not fileio.exists(fileio.join(model_dir, md.INFO_FILE)) and \
            set(WEIGHT_CANDIDATES) & set(fileio.listdir(model_dir)):
        raise ConversionError(f"{model_dir} is already in BAGEL's release layout (nothing to export); "
                              "`import` converts it into a model dir")
    reader = md.ModelDirReader(model_dir)
    notes = []
    if ema:
        notes.append("--ema ignored: a model dir holds one set of weights (export a trainer checkpoint's EMA "
                     "into a model dir first)")
    cfg = reader.cfg
    out_dtype = _np_dtype(dtype) if dtype else None
    max_bytes = parse_size(shard_size)
    stem = weights_name or ("model" if max_bytes else "ema")
    table = keymap.bagel_table(cfg)
    # the stored arrays must be exactly what the config implies
    problems = []
    for item, abstract in (("params", md.abstract_params(cfg)),) + (
            (("vae", md.abstract_vae(cfg)),) if "vae" in reader.info.get("items", []) else ()):
        exp = {(item,) + p: v for p, v in md.flatten(abstract).items()}
        got = {tuple(n.split(".")[:1]) + tuple(int(x) if x.isdigit() else x for x in n.split(".")[1:]): s
               for n, (s, _) in reader.stored.items() if n.split(".")[0] == item}
        problems += md._compare(exp, got, item)
    if problems:
        raise ConversionError(f"{model_dir}: checkpoint does not match its model_config.json:\n  " + "\n  ".join(problems))
    if fileio.isdir(dst) and fileio.listdir(dst):
        if not overwrite:
            raise ConversionError(f"{dst} exists and is not empty (pass --overwrite)")
        fileio.rmtree(dst)
    fileio.makedirs(dst)

    plan = _export_plan(reader, table, "params", out_dtype)
    fixed = keymap.fixed_tables(cfg)
    fixed_dtype = out_dtype or reader.stored["params.language_model.embed_tokens.embedding"][1]
    planned = [PlannedTensor(e.key, dt, shape) for e, _, shape, dt in plan]
    planned += [PlannedTensor(k, fixed_dtype, v.shape) for k, v in fixed.items()]
    has_vae = "vae" in reader.info.get("items", [])
    vae_plan = _export_plan(reader, keymap.vae_entries(cfg), "vae", None) if has_vae else []
    total = sum(p.nbytes for p in planned) + sum(math.prod(s) * d.itemsize for _, _, s, d in vae_plan)
    bar = _progress(total, "export", progress)
    writer = SafetensorsPlanWriter(dst, stem, planned, max_bytes)
    _export_blocks(reader, plan, writer, bar)
    for k, v in fixed.items():
        a = v.astype(fixed_dtype)
        writer.write(k, a)
        bar.update(a.nbytes)
    files = writer.close()
    if has_vae:
        vw = SafetensorsPlanWriter(dst, "ae", [PlannedTensor(e.key, dt, s) for e, _, s, dt in vae_plan])
        _export_blocks(reader, vae_plan, vw, bar)
        files += vw.close()
    else:
        notes.append("the model dir has no VAE: ae.safetensors not written")
    bar.close()
    templates = {}
    cdir = fileio.join(model_dir, md.BAGEL_CONFIGS_DIR)
    for name in ("llm_config.json", "vit_config.json"):
        if fileio.exists(fileio.join(cdir, name)):
            templates[name] = fileio.read_json(fileio.join(cdir, name))
    dtypes = {np.dtype(t.dtype).name for t in planned}
    lj, vj = bagel_config_files(cfg, templates, torch_dtype=dtypes.pop() if len(dtypes) == 1 else None)
    for name, obj in (("llm_config.json", lj), ("vit_config.json", vj)):
        fileio.write_json(fileio.join(dst, name), obj)
    tdir = fileio.join(model_dir, md.TOKENIZER_DIR)
    copied = []
    if fileio.isdir(tdir):
        for name in sorted(fileio.listdir(tdir)):
            fileio.copy(fileio.join(tdir, name), fileio.join(dst, name))
            copied.append(name)
        notes += tokenizer_notes(tdir)
    else:
        notes.append("the model dir carries no tokenizer files; copy them from the BAGEL release")
    for n in notes:
        log(f"note: {n}")
    dt = time.perf_counter() - t0
    return {"bytes": total, "seconds": dt, "gb_per_s": total / 1e9 / dt, "peak_rss_gb": peak_rss_gb(),
            "cpu_seconds": cpu_seconds(), "files": [fileio.basename(f) for f in files], "tokenizer_files": copied,
            "tensors": len(planned) + len(vae_plan), "notes": notes}
