"""The sgt-jax *model dir*: what the trainer starts from and what ``export`` reads.

Layout::

    DIR/
      model_dir.json      format marker + provenance; written last (its presence = complete)
      model_config.json   the full model ConfigDict (cfg.to_dict()) incl. the model-level
                          settings latent_patch_size, max_latent_size, vit_max_num_patch_per_side,
                          timestep_shift (bagel.*), the ViT layers actually used, the VAE config
      checkpoint/         Orbax PyTree checkpoint (OCDBT + zarr3) of
                          {"params": nnx.to_pure_dict(nnx.state(Bagel, nnx.Param)),
                           "vae":    nnx.to_pure_dict(nnx.state(AutoEncoder, nnx.Param))}
                          in the port's layout (kernels (in, out), stacked layers
                          (num_layers, ...), und/gen experts as layers/und, layers/gen) and
                          *in the dtype the weights were stored in* (an import of the bf16
                          release stores bf16, of an fp32 BAGEL training checkpoint fp32;
                          model_dir.json records which). ``load_model_dir`` casts on restore.
      tokenizer/          tokenizer files copied verbatim (when the source had them)
      bagel_configs/      the source's llm_config.json / vit_config.json verbatim, so an export
                          reproduces every field of them (optional)

Arrays are chunked at <= 32 MiB with a leading layer axis of 1 for stacked parameters, so a
sharded restore on a pod reads only the chunks of its own shards, and the streaming
import/export touch one layer slice at a time. ``save_model_dir`` writes in-memory trees
(numpy or jax arrays, sharded jax arrays on a pod: all processes call it);
the converter writes through the same function with ``StreamedArray`` leaves whose data is
produced block by block while Orbax writes (no whole stacked parameter is ever in memory).

DIR may be a local path or a ``gs://`` URL: Orbax / tensorstore open the checkpoint themselves;
the JSON files, ``tokenizer/`` and ``bagel_configs/`` go through ``sgt_jax.fileio``.
"""
from __future__ import annotations

import json
import math
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from flax import nnx
from orbax.checkpoint._src.futures import future as ocp_future
from orbax.checkpoint._src.serialization import ocdbt_utils
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
from orbax.checkpoint._src.serialization import type_handler_registry as ocp_registry
from orbax.checkpoint._src.serialization import type_handlers as ocp_type_handlers

from sgt_jax import fileio
from sgt_jax.models import config as config_lib

FORMAT = "sgt-jax model dir"
VERSION = 1
INFO_FILE = "model_dir.json"
CONFIG_FILE = "model_config.json"
CHECKPOINT_DIR = "checkpoint"
TOKENIZER_DIR = "tokenizer"
BAGEL_CONFIGS_DIR = "bagel_configs"
CHUNK_BYTES = 32 * 2 ** 20
SMALL_BYTES = 16 * 2 ** 20         # StreamedArrays up to this size are assembled, then written once
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.json",
                   "chat_template.jinja", "generation_config.json")


class ModelDirError(ValueError):
    """Not a (complete, consistent) model dir; the message says what is wrong."""


# --------------------------------------------------------------------------------------------------
# trees


_ABSTRACT_CACHE: dict = {}


def _cached(kind: str, cfg, build):
    key = (kind, cfg.to_json())
    if key not in _ABSTRACT_CACHE:
        if len(_ABSTRACT_CACHE) > 8:
            _ABSTRACT_CACHE.clear()
        _ABSTRACT_CACHE[key] = build()
    return jax.tree.map(lambda x: x, _ABSTRACT_CACHE[key])     # a fresh tree, shared leaves


def abstract_params(cfg) -> dict:
    """Pure dict of ShapeDtypeStruct (fp32) of the Bagel parameters for ``cfg`` (no allocation;
    cached per config: building the model computes its sin-cos tables, ~1 s at 7B)."""
    from sgt_jax.models.bagel import Bagel

    def build():
        m = nnx.eval_shape(lambda: Bagel(cfg, rngs=nnx.Rngs(0)))
        return nnx.to_pure_dict(nnx.state(m, nnx.Param))
    return _cached("params", cfg, build)


def abstract_vae(cfg) -> dict:
    from sgt_jax.models.vae import AutoEncoder

    def build():
        m = nnx.eval_shape(lambda: AutoEncoder(cfg, rngs=nnx.Rngs(0)))
        return nnx.to_pure_dict(nnx.state(m, nnx.Param))
    return _cached("vae", cfg, build)


def _key(k) -> Any:
    return k.key if hasattr(k, "key") else (k.idx if hasattr(k, "idx") else k)


def flatten(tree) -> dict[tuple, Any]:
    """{path tuple: leaf}; a path is the tuple of dict keys (ints stay ints)."""
    return {tuple(_key(k) for k in p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def name_of(path: tuple) -> str:
    """Orbax's parameter name for a tree path (keys joined by '.')."""
    return ".".join(str(k) for k in path)


def get_in(tree, path: tuple):
    for k in path:
        tree = tree[k]
    return tree


# --------------------------------------------------------------------------------------------------
# streamed leaves: written block by block through Orbax's own array-writing code


class StreamedArray:
    """A checkpoint leaf whose data is produced while it is written.

    ``produce(chunk_shape)`` yields (index, block) pairs that together cover the array exactly
    once; ``chunk_shape`` is the storage chunk shape Orbax chose, so blocks can be aligned to
    whole chunks (no read-modify-write). ``write_shape`` is the shape of one written slab (a
    leading 1 for stacked parameters), which bounds the chunk shape."""

    def __init__(self, shape, dtype, write_shape, produce: Callable[[tuple], Iterator[tuple]]):
        self.shape, self.dtype = tuple(int(s) for s in shape), np.dtype(dtype)
        self.write_shape = tuple(int(s) for s in write_shape)
        self.produce = produce

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)


class _StreamedArrayHandler(ocp_type_handlers.NumpyHandler):
    """Saves StreamedArray leaves exactly as Orbax saves numpy arrays (same tensorstore spec,
    same ``np.ndarray`` value type in the metadata), but one block at a time and one leaf after
    another, so at most one block (plus tensorstore's write-back) is in memory."""

    def typestr(self) -> str:
        return "np.ndarray"

    async def serialize(self, values, infos, args=None):
        args = args or [ocp.SaveArgs()] * len(values)
        return [ocp_future.CommitFutureAwaitingContractedSignals(
            self._write_all(values, infos, args), name="sgt_streamed_array")]

    async def _write_all(self, values, infos, args):
        for value, info, arg in zip(values, infos, args):
            await info.await_path_creation()
            spec = ts_utils.build_array_write_spec(
                info=info, arg=arg, global_shape=value.shape, local_shape=value.write_shape,
                dtype=value.dtype, use_ocdbt=info.is_ocdbt_checkpoint,
                process_index=ocdbt_utils.get_process_index_for_subdir(use_ocdbt=info.is_ocdbt_checkpoint))
            t = await ts.open(ts.Spec(spec.json), create=True, open=True, context=info.ts_context)
            chunk = tuple(int(c) for c in t.chunk_layout.write_chunk.shape)
            if value.nbytes <= SMALL_BYTES:      # assemble small arrays: one write, one data file
                full = np.empty(value.shape, value.dtype)
                for index, block in value.produce(chunk):
                    full[index] = block
                await t.write(full, can_reference_source_data_indefinitely=True)
                continue
            pending = None
            for index, block in value.produce(chunk):
                block = np.asarray(block, dtype=value.dtype)
                if pending is not None:          # overlap: produce block i+1 while i is written
                    await pending
                pending = t[index].write(block, can_reference_source_data_indefinitely=True)
            if pending is not None:
                await pending


def _type_registry():
    return ocp_registry.create_type_handler_registry(
        *ocp_registry._DEFAULT_TYPE_HANDLERS, (StreamedArray, _StreamedArrayHandler()))


def _is_leaf(x) -> bool:
    return isinstance(x, StreamedArray)


def _write_checkpoint(ckpt_dir: str, tree: dict, compress: bool = False):
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=True, use_compression=compress,
                                          type_handler_registry=_type_registry())
    save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES), tree, is_leaf=_is_leaf)
    with ocp.Checkpointer(handler) as ck:
        ck.save(epath.Path(ckpt_dir), args=ocp.args.PyTreeSave(tree, save_args=save_args))


# --------------------------------------------------------------------------------------------------
# save / load


def _dtype_summary(tree) -> str | None:
    names = sorted({np.dtype(x.dtype).name for x in jax.tree.leaves(tree, is_leaf=_is_leaf)})
    if not names:
        return None
    return names[0] if len(names) == 1 else "mixed(" + ",".join(names) + ")"


def _write_json(path: str, obj):
    fileio.write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def config_to_json(cfg) -> dict:
    return json.loads(cfg.to_json())


def config_from_json(d: dict) -> ml_collections.ConfigDict:
    d = json.loads(json.dumps(d))
    d["vae"]["ch_mult"] = tuple(d["vae"]["ch_mult"])
    return config_lib.validate(ml_collections.ConfigDict(d))


def save_model_dir(path, cfg, params_pure, vae_pure=None, tokenizer_dir=None, *, bagel_configs_dir=None,
                   compress: bool = False, provenance: dict | None = None, overwrite: bool = False):
    """Write a model dir (see the module docstring).

    ``params_pure`` / ``vae_pure``: nested dicts as ``nnx.to_pure_dict(nnx.state(m, nnx.Param))``
    with numpy arrays, jax arrays (possibly sharded across processes: every process must call
    this) or StreamedArray leaves; they are stored in their own dtype. ``vae_pure`` None: no VAE.
    ``tokenizer_dir``: a directory whose tokenizer files (TOKENIZER_FILES) are copied;
    ``bagel_configs_dir``: a directory with BAGEL's llm_config.json / vit_config.json to carry
    (e.g. the ``bagel_configs/`` of the model dir training started from). ``compress``: zstd in
    the zarr3 chunks (~25% smaller bf16 files, ~2.5x slower to write here)."""
    config_lib.validate(cfg)
    path = fileio.abspath(path)
    primary = jax.process_index() == 0
    if fileio.isdir(path) and fileio.listdir(path):
        if not overwrite:
            raise ModelDirError(f"{path} exists and is not empty (pass overwrite=True / --overwrite)")
        if primary:
            fileio.rmtree(path)
    if primary:
        fileio.makedirs(path)
    _check_tree_against_config(cfg, params_pure, vae_pure)
    tree = {"params": params_pure}
    if vae_pure is not None:
        tree["vae"] = vae_pure
    _write_checkpoint(fileio.join(path, CHECKPOINT_DIR), tree, compress=compress)
    if not primary:
        return
    _write_json(fileio.join(path, CONFIG_FILE), config_to_json(cfg))

    def carry(src_dir, names, sub) -> list[str]:
        present = set(fileio.listdir(src_dir)) if src_dir is not None and fileio.isdir(src_dir) else set()
        names = [n for n in names if n in present]
        if names:
            fileio.makedirs(fileio.join(path, sub))
        for name in names:
            fileio.copy(fileio.join(src_dir, name), fileio.join(path, sub, name))
        return names

    copied = carry(tokenizer_dir, TOKENIZER_FILES, TOKENIZER_DIR)
    carried = carry(bagel_configs_dir, ("llm_config.json", "vit_config.json"), BAGEL_CONFIGS_DIR)
    info = {
        "format": FORMAT, "version": VERSION, "checkpoint": CHECKPOINT_DIR,
        "items": sorted(tree), "params_dtype": _dtype_summary(params_pure),
        "vae_dtype": _dtype_summary(vae_pure) if vae_pure is not None else None,
        "layout": "sgt_jax nnx pure dict: kernels (in, out), stacked layers on axis 0, experts layers/und + layers/gen",
        "model_settings": {k: cfg.bagel[k] for k in ("latent_patch_size", "max_latent_size",
                                                      "vit_max_num_patch_per_side", "timestep_shift")},
        "tokenizer_files": copied, "bagel_configs": carried, "compressed": bool(compress),
        "provenance": provenance or {},
    }
    _write_json(fileio.join(path, INFO_FILE), info)


def read_info(path) -> dict:
    path = fileio.abspath(path)
    f = fileio.join(path, INFO_FILE)
    if not fileio.exists(f):
        hint = ""
        if fileio.exists(fileio.join(path, "llm_config.json")):
            hint = (" It looks like a BAGEL release dir: convert it first with "
                    f"`python -m sgt_jax.convert import --from {path} --to MODEL_DIR`.")
        elif fileio.exists(fileio.join(path, CONFIG_FILE)) or fileio.exists(fileio.join(path, CHECKPOINT_DIR)):
            hint = " It has a checkpoint but no model_dir.json: the write was interrupted; re-create it."
        else:
            hint = (" (A trainer checkpoint is first written as a model dir by the trainer, with "
                    "save_model_dir; see docs/convert.md.)")
        raise ModelDirError(f"{path} is not a complete sgt-jax model dir (no {INFO_FILE}).{hint}")
    info = fileio.read_json(f)
    if info.get("format") != FORMAT:
        raise ModelDirError(f"{f}: format {info.get('format')!r}, expected {FORMAT!r}")
    if int(info.get("version", 0)) > VERSION:
        raise ModelDirError(f"{f}: version {info['version']} is newer than this code reads ({VERSION})")
    return info


def read_config(path) -> ml_collections.ConfigDict:
    read_info(path)
    return config_from_json(fileio.read_json(fileio.join(path, CONFIG_FILE)))


def _check_tree_against_config(cfg, params, vae):
    problems = _compare(flatten(abstract_params(cfg)), {p: tuple(v.shape) for p, v in
                                                        flatten_any(params).items()}, "params")
    if vae is not None:
        problems += _compare(flatten(abstract_vae(cfg)), {p: tuple(v.shape) for p, v in
                                                          flatten_any(vae).items()}, "vae")
    if problems:
        raise ModelDirError("parameters do not match the model config:\n  " + "\n  ".join(problems))


def flatten_any(tree) -> dict[tuple, Any]:
    return {tuple(_key(k) for k in p): v
            for p, v in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)[0]}


def _compare(expected: dict, got_shapes: dict, what: str) -> list[str]:
    exp = {name_of(p): tuple(v.shape) for p, v in expected.items()}
    got = {name_of(p): tuple(s) for p, s in got_shapes.items()}
    out = []
    missing = sorted(set(exp) - set(got))
    extra = sorted(set(got) - set(exp))
    shape = sorted(f"{k}: stored {got[k]}, config implies {exp[k]}" for k in set(exp) & set(got) if exp[k] != got[k])
    if missing:
        out.append(f"{what}: {len(missing)} missing: {missing[:30]}")
    if extra:
        out.append(f"{what}: {len(extra)} unexpected: {extra[:30]}")
    if shape:
        out.append(f"{what}: {len(shape)} mis-shaped: {shape[:30]}")
    return out


def stored_arrays(path) -> dict[str, tuple[tuple, np.dtype]]:
    """{orbax name: (shape, dtype)} of every array in the model dir's checkpoint."""
    ck = epath.Path(fileio.join(path, CHECKPOINT_DIR))
    meta = ocp.PyTreeCheckpointer().metadata(ck)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    out = {}
    for p, m in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[name_of(tuple(_key(k) for k in p))] = (tuple(m.shape), np.dtype(m.dtype))
    return out


def _restore_shardings(shardings, abstract: dict):
    """Normalise ``shardings`` to a tree matching ``abstract`` ({"params": .., "vae": ..})."""
    if shardings is None:
        s = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda _: s, abstract)
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda _: shardings, abstract)
    if isinstance(shardings, dict) and "params" in shardings and set(shardings) <= {"params", "vae"}:
        out = {"params": shardings["params"]}
        if "vae" in abstract:
            out["vae"] = shardings.get("vae")
            if out["vae"] is None:
                out["vae"] = _replicated_like(shardings["params"], abstract["vae"])
        return out
    out = {"params": shardings}           # a params-only tree: the VAE is replicated on its mesh
    if "vae" in abstract:
        out["vae"] = _replicated_like(shardings, abstract["vae"])
    return out


def _replicated_like(sh_tree, target):
    leaves = [s for s in jax.tree.leaves(sh_tree) if isinstance(s, jax.sharding.Sharding)]
    if leaves and isinstance(leaves[0], jax.sharding.NamedSharding):
        rep = jax.sharding.NamedSharding(leaves[0].mesh, jax.sharding.PartitionSpec())
    else:
        rep = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda _: rep, target)


def load_model_dir(path, *, shardings=None, dtype=jnp.float32):
    """Restore a model dir -> (cfg, params_pure_dict, vae_pure_dict or None).

    ``shardings``: None (everything on the first local device), one ``jax.sharding.Sharding``
    for every leaf, a tree matching the params pure dict (the VAE is then replicated on the same
    mesh), or {"params": tree, "vae": tree}. Arrays are restored directly into their shardings
    (each process reads only its shards). ``dtype``: cast on restore (None: as stored).
    Refuses (ModelDirError, listing names) a checkpoint whose arrays do not match the config."""
    path = fileio.abspath(path)
    info = read_info(path)
    cfg = read_config(path)
    abstract = {"params": abstract_params(cfg)}
    if "vae" in info.get("items", []):
        abstract["vae"] = abstract_vae(cfg)
    stored = stored_arrays(path)
    problems = []
    for item in abstract:
        exp = flatten(abstract[item])
        got = {tuple(n.split(".")[1:]): s for n, (s, _) in stored.items() if n.split(".")[0] == item}
        problems += _compare({(item,) + p: v for p, v in exp.items()},
                             {(item,) + p: s for p, s in got.items()}, item)
    extra_items = sorted({n.split(".")[0] for n in stored} - set(abstract))
    if extra_items:
        problems.append(f"unexpected items in the checkpoint: {extra_items}")
    if problems:
        raise ModelDirError(f"{path}: checkpoint does not match {CONFIG_FILE}:\n  " + "\n  ".join(problems))
    sh = _restore_shardings(shardings, abstract)
    flat_abs = flatten(abstract)
    flat_sh = flatten(sh)

    def leaf_dtype(p):
        return jnp.dtype(dtype) if dtype is not None else stored[name_of(p)][1]

    item = {}
    rargs = {}
    for p, a in flat_abs.items():
        d = leaf_dtype(p)
        _set(item, p, jax.ShapeDtypeStruct(a.shape, d, sharding=flat_sh[p]))
        _set(rargs, p, ocp.ArrayRestoreArgs(sharding=flat_sh[p], dtype=d, global_shape=tuple(a.shape)))
    with ocp.PyTreeCheckpointer() as ck:
        out = ck.restore(epath.Path(fileio.join(path, CHECKPOINT_DIR)),
                         args=ocp.args.PyTreeRestore(item=item, restore_args=rargs))
    return cfg, out["params"], out.get("vae")


def _set(tree: dict, path: tuple, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


# --------------------------------------------------------------------------------------------------
# streaming reads (export)


class ModelDirReader:
    """Open the arrays of a model dir one by one and read slices (no whole-tree restore)."""

    def __init__(self, path):
        self.path = fileio.abspath(path)
        self.info = read_info(self.path)
        self.cfg = read_config(self.path)
        self.ckpt = fileio.join(self.path, CHECKPOINT_DIR)
        meta = fileio.read_json(fileio.join(self.ckpt, "_METADATA"))
        self.use_zarr3 = bool(meta.get("use_zarr3", False))
        self.use_ocdbt = bool(meta.get("use_ocdbt", True))
        self.context = ts_utils.get_ts_context(use_ocdbt=self.use_ocdbt)
        self.stored = stored_arrays(self.path)

    def open(self, name: str) -> ts.TensorStore:
        if name not in self.stored:
            raise ModelDirError(f"{self.ckpt}: no array {name}")
        spec = ts_utils.ArrayReadSpec(self.ckpt, name, self.use_zarr3, use_ocdbt=self.use_ocdbt).json
        return ts.open(ts.Spec(spec), open=True, context=self.context).result()

    def read(self, name: str) -> np.ndarray:
        return self.open(name).read().result()
