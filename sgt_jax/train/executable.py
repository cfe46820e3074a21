"""A train step compiled ahead of time (``python -m sgt_jax.aot --serialize``) written to a file,
and loaded back by the trainer in place of compiling (``train.executable``), guarded by the jax /
libtpu versions and the run config's step fingerprint."""
from __future__ import annotations

import hashlib
import importlib.metadata
import json

from sgt_jax import fileio


class ExecutableError(RuntimeError):
    pass


# train.* keys the loop reads; every other train key is baked into the compiled step
_LOOP_ONLY = ("save_every", "keep", "async_checkpointing", "log_every", "init_from", "nan_max_streak",
              "executable", "copy_init_moe", "allow_config_change")
_BATCH_SHAPE = ("rows_per_batch", "tokens_per_row", "gen_tokens_per_row", "vit_patches_per_row",
                "vae_images_per_row", "vae_image_size", "vae_images_dtype")


def step_fingerprint(cfg) -> str:
    """What a compiled train step depends on: the model, the train settings it bakes in (lr
    schedule, seed, loss weights, accumulation, ...), the mesh and the batch shapes."""
    t = {k: v for k, v in cfg.train.to_dict().items() if k not in _LOOP_ONLY}
    d = {k: cfg.data.get(k) for k in _BATCH_SHAPE}
    blob = json.dumps({"model": cfg.model.to_dict(), "train": t, "mesh": cfg.mesh.to_dict(), "data": d},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


_EXE_MAGIC = b"SGTJAX-EXECUTABLE-1\n"


def save_compiled(compiled, path: str, fingerprint: str | None = None) -> dict:
    """Write the compiled executable to ``path`` (local or URL): a magic line, a JSON header (jax /
    libtpu versions, the run config's ``step_fingerprint``, payload size) and jax's
    serialised executable. The in/out pytree structures are not stored: the loader derives them
    from the arguments of the first call (``LoadedStep``)."""
    from jax.experimental.serialize_executable import serialize

    payload, _, _ = serialize(compiled)
    header = json.dumps({"jax": version("jax"), "libtpu": version("libtpu"), "fingerprint": fingerprint,
                         "payload_bytes": len(payload)}).encode()
    with fileio.open_write(path) as f:
        f.write(_EXE_MAGIC + header + b"\n")
        f.write(payload)
    return {"path": path, "bytes": len(_EXE_MAGIC) + len(header) + 1 + len(payload)}

class LoadedStep:
    """A step executable loaded from ``save_compiled``'s file, called like ``Program.step_fn``.
    ``jit_fn`` (the run's own jitted step) gives the output structure, by ``jax.eval_shape`` on the
    first call's arguments (tracing only, no compile)."""

    def __init__(self, payload: bytes, jit_fn, devices=None):
        self.payload, self.jit_fn, self.devices, self._compiled = payload, jit_fn, devices, None

    def __call__(self, *args):
        if self._compiled is None:
            import jax
            from jax.experimental.serialize_executable import deserialize_and_load

            in_tree = jax.tree.structure((args, {}))
            out_tree = jax.tree.structure(jax.eval_shape(self.jit_fn, *args))
            self._compiled = deserialize_and_load(self.payload, in_tree, out_tree,
                                                  execution_devices=self.devices or jax.devices())
        return self._compiled(*args)

def load_compiled(path: str, jit_fn, devices=None, fingerprint: str | None = None) -> LoadedStep:
    """Load an executable written by ``save_compiled``; call it as ``step(state, consts, batch)``
    in place of ``Program.step_fn`` (``jit_fn``; the trainer does with ``train.executable``). The jax
    and libtpu versions and, when given, the run config's ``fingerprint`` must match the ones it
    was compiled with (the XLA flags too: not checked). jax deserialises the payload with its own
    unpickler, which can run code: only load files you wrote."""
    blob = fileio.read_bytes(path)
    if not blob.startswith(_EXE_MAGIC):
        raise ExecutableError(f"{path} is not an executable written by python -m sgt_jax.aot --serialize")
    end = blob.index(b"\n", len(_EXE_MAGIC))
    d = json.loads(blob[len(_EXE_MAGIC):end])
    payload = blob[end + 1:]
    if len(payload) != d["payload_bytes"]:
        raise ExecutableError(f"{path}: truncated ({len(payload)} of {d['payload_bytes']} payload bytes)")
    if d.get("jax") != version("jax") or d.get("libtpu") != version("libtpu"):
        raise ExecutableError(f"{path} was compiled with jax {d.get('jax')} / libtpu {d.get('libtpu')}, this is "
                       f"jax {version('jax')} / libtpu {version('libtpu')}: recompile")
    if fingerprint is not None and d.get("fingerprint") != fingerprint:
        raise ExecutableError(f"{path} was compiled for another run config (step fingerprint {d.get('fingerprint')}, "
                       f"this run's is {fingerprint}: the model, train, mesh or batch-shape settings differ "
                       "and they are baked into the executable); recompile with python -m sgt_jax.aot "
                       "--serialize, or unset train.executable")
    return LoadedStep(payload, jit_fn, devices)


def version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None
