"""``train.vae_init``: the frozen VAE of a fresh run read from a FLUX AE safetensors file (FLUX
state-dict names and torch layouts, as ``ae.safetensors``), instead of a random init -- the tiny
preset's trained AE ships as ``sgt_jax/assets/tiny_vae.safetensors`` (scripts/train_tiny_vae.py,
docs/training.md). The file's key names and shapes come from ``models/vae.torch_key_table``;
problems are reported through ``keydiff`` before anything is built. The VAE is part of a run's
checkpointed state (``Consts.vae``): a resumed run, ``train/export.py`` and ``Engine.load`` read
it from the checkpoint, never from this file again.

A path may start with ``package:`` -- relative to the ``sgt_jax`` package directory, so a config
names a shipped asset the same way in every clone (``package:assets/tiny_vae.safetensors``).
"""
from __future__ import annotations

import os

import numpy as np

from sgt_jax import fileio
from sgt_jax.keydiff import key_diff

PACKAGE = "package:"
TINY_VAE = PACKAGE + "assets/tiny_vae.safetensors"


def resolve(path: str) -> str:
    if path.startswith(PACKAGE):
        return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), path[len(PACKAGE):])
    return path


def _layout(kind: str, a: np.ndarray) -> np.ndarray:
    """ours -> torch layout (a conv kernel HWIO -> OIHW)."""
    return np.transpose(a, (3, 2, 0, 1)) if kind == "conv" else a


def _torch_shape(kind: str, shape) -> tuple:
    shape = tuple(int(s) for s in shape)
    return (shape[3], shape[2], shape[0], shape[1]) if kind == "conv" else shape


def _abstract(model_cfg):
    from flax import nnx

    from sgt_jax.models.vae import AutoEncoder

    return nnx.state(nnx.eval_shape(lambda: AutoEncoder(model_cfg, rngs=nnx.Rngs(0))), nnx.Param)


def _leaf(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def expected_shapes(model_cfg) -> dict[str, tuple]:
    """FLUX key -> torch-layout shape of the AE ``model_cfg`` describes."""
    from sgt_jax.models.vae import torch_key_table

    state = _abstract(model_cfg)
    return {k: _torch_shape(kind, _leaf(state, path).shape) for k, path, kind in torch_key_table(model_cfg)}


def to_flux(ae) -> dict[str, np.ndarray]:
    """An ``AutoEncoder`` -> FLUX state dict (fp32 numpy, torch layout)."""
    from flax import nnx

    from sgt_jax.models.vae import torch_key_table

    state = nnx.state(ae, nnx.Param)
    return {k: np.ascontiguousarray(_layout(kind, np.asarray(_leaf(state, path)[...], np.float32)))
            for k, path, kind in torch_key_table(ae.config)}


def save(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write fp32 ``tensors`` as safetensors, byte-for-byte deterministic: keys and metadata
    sorted (the ``safetensors`` package writes its metadata in hash order, different per process,
    so a file's sha256 could not be reproduced). Any safetensors reader reads it."""
    import json

    header, chunks, off = {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    for k in sorted(tensors):
        a = np.ascontiguousarray(np.asarray(tensors[k], np.float32))
        b = a.astype("<f4").tobytes()
        header[k] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        chunks.append(b)
        off += len(b)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)             # the data starts 8-byte aligned, as safetensors pads
    fileio.makedirs(os.path.dirname(path) or ".")
    with fileio.open_write(path) as f:
        f.write(len(head).to_bytes(8, "little") + head + b"".join(chunks))


def _read_header(path: str) -> tuple[dict, dict]:
    """(key -> shape, metadata) from the safetensors header alone."""
    import json
    import struct

    with fileio.open_read(path) as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError("not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise ValueError("not a safetensors file (implausible header length)")
        try:
            head = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"not a safetensors file (header: {e})") from None
    meta = head.pop("__metadata__", None) or {}
    return {k: tuple(v["shape"]) for k, v in head.items()}, meta


def problems(path: str, model_cfg) -> list[str]:
    """What is wrong with ``path`` as the VAE of ``model_cfg`` (the run-config validator's check;
    reads the header only): missing file, not safetensors, missing / unexpected / mis-shaped keys,
    latent factors different from the ones the file was trained with."""
    where = f"train.vae_init={path!r}"
    real = resolve(path)
    if not fileio.exists(real):
        return [f"{where}: no such file ({real}); give a FLUX AE safetensors file "
                f"(scripts/train_tiny_vae.py writes one) or '' for a random VAE"]
    try:
        found, meta = _read_header(real)
    except (OSError, ValueError) as e:
        return [f"{where}: {e}"]
    diff = key_diff(expected_shapes(model_cfg), found)
    out = [f"{where}: {line}; the file is not an AE of model.vae = {dict(model_cfg.vae)}"
           for line in diff.lines(limit=5, layout="torch layout")]
    for k in ("scale_factor", "shift_factor"):
        if k in meta and abs(float(meta[k]) - float(model_cfg.vae[k])) > 1e-6:
            out.append(f"{where}: the AE was trained for model.vae.{k}={meta[k]}, the config has "
                       f"{model_cfg.vae[k]}: set --config.model.vae.{k}={meta[k]}")
    return out


def load(path: str, model_cfg) -> dict:
    """The VAE params of ``model_cfg`` from ``path`` as a pure dict (``nnx.to_pure_dict`` of the
    AutoEncoder's Params, fp32, our layouts). Raises ValueError naming every bad key."""
    from flax import nnx
    from safetensors.numpy import load as st_load

    from sgt_jax.models.vae import torch_key_table

    bad = problems(path, model_cfg)
    if bad:
        raise ValueError("; ".join(bad))
    with fileio.open_read(resolve(path)) as f:
        tensors = st_load(f.read())
    pure = nnx.to_pure_dict(_abstract(model_cfg))
    for k, p, kind in torch_key_table(model_cfg):
        a = np.asarray(tensors[k], np.float32)
        parent = _leaf(pure, p[:-1])
        parent[p[-1]] = np.ascontiguousarray(np.transpose(a, (2, 3, 1, 0)) if kind == "conv" else a)
    return pure
