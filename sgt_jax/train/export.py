"""A training checkpoint -> a model dir (the format ``python -m sgt_jax.convert export`` turns
into BAGEL's release layout). The EMA (default) or the raw parameters, merged with the frozen
ones, plus the VAE, the tokenizer and BAGEL's config files of the model training started from.
The run, the model dir it started from and the output may be local paths or gs:// URLs
(``sgt_jax.fileio``; Orbax reads and writes the checkpoints itself)."""
from __future__ import annotations

import jax
import ml_collections
from flax import nnx

from sgt_jax import fileio
from sgt_jax.parallel import mesh as mesh_lib
from sgt_jax.train.checkpoint import Checkpointer


def find_checkpoint(path: str) -> tuple[str, int]:
    """(checkpoints dir, step) for a run dir (latest step), its ``checkpoints/`` or a step dir."""
    path = fileio.abspath(path)
    if fileio.isdir(fileio.join(path, "checkpoints")):
        path = fileio.join(path, "checkpoints")
    base = fileio.basename(path)
    if base.isdigit() and fileio.isdir(fileio.join(path, "state")):
        return fileio.dirname(path), int(base)
    steps = sorted(int(d) for d in fileio.listdir(path) if d.isdigit()) if fileio.isdir(path) else []
    if not steps:
        raise FileNotFoundError(f"{path}: no training checkpoint (expected RUN/checkpoints/<step>/state)")
    return path, steps[-1]


def is_training_checkpoint(path: str) -> bool:
    try:
        find_checkpoint(path)
        return True
    except (FileNotFoundError, NotADirectoryError):
        return False


def restore_weights(ckpt_dir: str, step: int, *, ema: bool = True, mesh=None):
    """(run config, params pure dict, vae pure dict) of one training checkpoint step: the EMA (or
    the raw parameters) merged with the frozen ones, restored into ``mesh`` (default: all devices
    on fsdp). The run's own stored config decides the shapes."""
    from sgt_jax.train.loop import Program

    meta = fileio.read_json(fileio.join(ckpt_dir, str(step), "meta", "metadata"))
    cfg = ml_collections.ConfigDict(meta["config"])
    cfg.model.vae.ch_mult = tuple(cfg.model.vae.ch_mult)
    mesh = mesh if mesh is not None else mesh_lib.make_mesh(dict(data=1, fsdp=-1, tensor=1))
    program = Program(cfg, mesh=mesh, validate=False)   # the run's own config: only its shapes matter here
    ck = Checkpointer(ckpt_dir, keep=10**6)
    try:
        r = ck.restore(step, program)
    finally:
        ck.close()
    trained = r.state.ema if ema else r.state.params
    return cfg, nnx.to_pure_dict(nnx.merge_state(trained, r.consts.frozen)), nnx.to_pure_dict(r.consts.vae)


def checkpoint_to_model_dir(path: str, out: str, *, ema: bool = True, overwrite: bool = False) -> dict:
    """Write the model dir of a training checkpoint; returns {"step", "weights", "model_dir"}."""
    from sgt_jax.convert.model_dir import save_model_dir

    ckpt_dir, step = find_checkpoint(path)
    cfg, params, vae = restore_weights(ckpt_dir, step, ema=ema)
    init_from = cfg.train.get("init_from", "")
    tok = fileio.join(init_from, "tokenizer") if init_from else ""
    if not (tok and fileio.isdir(tok)):
        run_dir = fileio.dirname(ckpt_dir)
        tok = cfg.data.get("tokenizer_path", "").replace("{workdir}", run_dir)
    bagel_cfgs = fileio.join(init_from, "bagel_configs") if init_from else ""
    save_model_dir(out, cfg.model, params, vae, tokenizer_dir=tok if tok and fileio.isdir(tok) else None,
                   bagel_configs_dir=bagel_cfgs if bagel_cfgs and fileio.isdir(bagel_cfgs) else None,
                   provenance={"training_checkpoint": fileio.join(ckpt_dir, str(step)),
                               "weights": "ema" if ema else "params"}, overwrite=overwrite)
    jax.effects_barrier()
    return {"step": step, "weights": "ema" if ema else "params", "model_dir": out}
