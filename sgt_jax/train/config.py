"""Defaults of the ``train`` and ``mesh`` sections of a run config (presets in configs/), the one
validator of a whole run config (``validate``: every section, once, before anything is built or
compiled), and what a resumed run may change (``config_changes``)."""
from __future__ import annotations

import math

import ml_collections

from sgt_jax.data.config import check_consistency


def default_train_config() -> ml_collections.ConfigDict:
    """BAGEL's TrainingArguments defaults where they exist (reference/bagel.md 4.1)."""
    return ml_collections.ConfigDict(dict(
        seed=0,
        steps=300,
        lr=1e-4, warmup_steps=2000, schedule="constant", min_lr=1e-7,   # constant | cosine
        b1=0.9, b2=0.95, eps=1e-15, weight_decay=0.0,
        max_grad_norm=1.0,                           # 0: no clipping
        ema_decay=0.9999,
        ce_weight=1.0, mse_weight=1.0, ce_loss_reweighting=False,
        grad_accum=1,
        freeze_llm=False, freeze_vit=False,          # freeze_und lives in model.llm (it changes the forward)
        copy_init_moe=True,                          # gen expert := und at random init (BAGEL init_moe)
        init_from="",                                # an imported model dir (python -m sgt_jax.convert import)
        vae_init="",                                 # a FLUX AE safetensors file for the frozen VAE ('' = random
                                                     # or init_from's); train/vae_init.py
        executable="",                               # a step compiled ahead of time (python -m sgt_jax.aot --serialize)
        nan_max_streak=10,                           # stop after this many consecutive non-finite steps
        save_every=100, keep=3, async_checkpointing=True,
        log_every=10,
        allow_config_change="",                      # "key1,key2": resume although these identity keys changed
    ))


def default_eval_config() -> ml_collections.ConfigDict:
    """Evaluation inside training (``sgt_jax.eval``, docs/evaluation.md): every ``every`` steps
    (0 = off), at step 0 of a fresh run and at the last step. Held-out synthetic scenes are
    generated with ``scene_seed`` (the training scenes use their spec's ``gen_seed``, default 0: a
    run whose synthetic ``gen_seed`` equals ``scene_seed`` is refused); ``seg`` / ``vqa`` name
    other held-out sources (source specs, '' = the held-out synthetic scenes)."""
    return ml_collections.ConfigDict(dict(
        every=0,                 # evaluate every N steps (0: never inside training)
        weights="ema",           # "ema" or "params"
        num_scenes=16,           # held-out segmentation images (generated mask -> mIoU / PQ)
        num_questions=32,        # held-out VQA questions (greedy answer -> exact match)
        loss_batches=2,          # held-out packed batches for CE / MSE at fixed noise
        scene_seed=1000,         # gen_seed of the held-out synthetic scenes
        seed=0,                  # noise of held-out losses and of generation
        flow_steps=20,           # Euler num_timesteps of the generated masks
        cfg_text_scale=4.0, cfg_img_scale=2.0,   # segmentation CFG (BAGEL's editing settings)
        max_new_tokens=16,       # answer length
        batch_size=8,            # requests per inference batch
        grid_rows=4,             # scenes in the sample grid
        seg="", vqa="",          # held-out source specs ('' = the held-out synthetic scenes)
    ))


def default_mesh_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))


class ConfigError(ValueError):
    """A run config that cannot be meant; the message names every bad key and its fix."""


# ------------------------------------------------------------------------------------------------
# validation


def check_micro_batches(cfg, mesh) -> None:
    """Every micro-batch must hold the same number of rows on every batch shard (see step.py:
    strided micro-batches), else XLA reshuffles rows between devices inside the step.
    ``mesh``: a Mesh or its {axis: size}."""
    if cfg.data.get("rows_per_batch") is None:     # a caller-supplied iterator (tests)
        return
    rows, accum = int(cfg.data.rows_per_batch), int(cfg.train.grad_accum)
    shape = getattr(mesh, "shape", mesh)
    shards = int(shape["data"]) * int(shape["fsdp"])
    if accum < 1 or rows % (shards * accum):
        raise ValueError(f"data.rows_per_batch={rows} must be a multiple of (mesh data x fsdp = {shards}) x "
                         f"train.grad_accum={accum}: each micro-batch needs the same whole number of rows on "
                         f"every batch shard")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _train_problems(t) -> list[str]:
    out = []

    def need(cond, key, why):
        if not cond:
            out.append(f"train.{key}={t.get(key)!r}: {why}")

    need(_is_int(t.steps) and t.steps >= 1, "steps", "must be an int >= 1 (the step to stop at)")
    need(_is_num(t.lr) and t.lr > 0, "lr", "must be > 0 (lr <= 0 trains nothing or ascends), e.g. 1e-4")
    need(_is_int(t.warmup_steps) and t.warmup_steps >= 0, "warmup_steps", "must be an int >= 0")
    if _is_int(t.warmup_steps) and _is_int(t.steps):
        need(t.warmup_steps <= t.steps, "warmup_steps",
             f"is more than train.steps={t.steps}: the run would stop inside the warmup; lower "
             f"train.warmup_steps or raise train.steps")
    need(t.schedule in ("constant", "cosine"), "schedule", "must be 'constant' or 'cosine'")
    need(_is_num(t.min_lr) and t.min_lr >= 0, "min_lr", "must be >= 0")
    if t.schedule == "cosine" and _is_num(t.min_lr) and _is_num(t.lr):
        need(t.min_lr <= t.lr, "min_lr", f"is above train.lr={t.lr}: the cosine would rise")
    for k in ("b1", "b2"):
        need(_is_num(t[k]) and 0 <= t[k] < 1, k, "must be in [0, 1) (Adam's moment decay)")
    need(_is_num(t.eps) and t.eps > 0, "eps", "must be > 0 (Adam divides by sqrt(v) + eps)")
    need(_is_num(t.weight_decay) and t.weight_decay >= 0, "weight_decay", "must be >= 0")
    need(_is_num(t.max_grad_norm) and t.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0: no clipping)")
    need(_is_num(t.ema_decay) and 0 <= t.ema_decay <= 1, "ema_decay", "must be in [0, 1] (1 keeps the initial weights)")
    for k in ("ce_weight", "mse_weight"):
        need(_is_num(t[k]) and t[k] >= 0, k, "must be >= 0")
    if _is_num(t.ce_weight) and _is_num(t.mse_weight):
        need(t.ce_weight + t.mse_weight > 0, "ce_weight", "and train.mse_weight are both 0: the loss is 0")
    need(_is_int(t.grad_accum) and t.grad_accum >= 1, "grad_accum", "must be an int >= 1 (micro-batches per step)")
    need(_is_int(t.nan_max_streak) and t.nan_max_streak >= 1, "nan_max_streak", "must be an int >= 1")
    need(_is_int(t.save_every) and t.save_every >= 1, "save_every",
         "must be an int >= 1 (a checkpoint every N steps), e.g. --config.train.save_every=100")
    need(_is_int(t.keep) and t.keep >= 1, "keep",
         "must be an int >= 1 (checkpoints kept on disk; 0 would leave none to resume from)")
    need(_is_int(t.log_every) and t.log_every >= 1, "log_every", "must be an int >= 1 (a metrics row every N steps)")
    need(_is_int(t.seed) and t.seed >= 0, "seed", "must be an int >= 0")
    need(isinstance(t.get("vae_init", ""), str), "vae_init",
         "must be a path string ('' = no file), e.g. 'package:assets/tiny_vae.safetensors'")
    need(isinstance(t.get("allow_config_change", ""), str), "allow_config_change",
         "must be a string of comma-separated keys, e.g. 'train.seed,data.sources.seg'")
    return out


def _eval_problems(e) -> list[str]:
    out = []

    def need(cond, key, why):
        if not cond:
            out.append(f"eval.{key}={e.get(key)!r}: {why}")

    unknown = sorted(set(e.keys()) - set(default_eval_config().keys()))
    if unknown:
        out.append(f"eval: unknown keys {unknown} (known: {sorted(default_eval_config().keys())})")
    for k in ("every", "num_scenes", "num_questions", "loss_batches", "scene_seed", "seed", "grid_rows"):
        need(_is_int(e.get(k)) and e.get(k) >= 0, k, "must be an int >= 0")
    for k in ("flow_steps", "max_new_tokens", "batch_size"):
        need(_is_int(e.get(k)) and e.get(k) >= (2 if k == "flow_steps" else 1), k,
             "must be an int >= 2 (Euler steps + 1)" if k == "flow_steps" else "must be an int >= 1")
    for k in ("cfg_text_scale", "cfg_img_scale"):
        need(_is_num(e.get(k)) and e.get(k) >= 0, k, "must be a number >= 0 (1 = no guidance)")
    need(e.get("weights") in ("ema", "params"), "weights", "must be 'ema' or 'params'")
    for k in ("seg", "vqa"):
        need(isinstance(e.get(k), str), k, "must be a source spec string ('' = held-out synthetic scenes)")
    return out


def validate(cfg, mesh=None, process_count: int = 1):
    """The whole run config, checked once before anything is built or compiled: the model
    section (``models.config.validate``), the data section (``data.config.validate``; skipped
    for a data section without ``sources``, i.e. a caller-supplied iterator), model/data
    agreement, the train values, the mesh (``mesh``, or the config's over this process's
    devices) and the micro-batch split over it. Raises one ConfigError listing every problem
    with its key and fix; returns cfg."""
    from sgt_jax.data import config as data_config
    from sgt_jax.models import config as model_config

    problems = []

    def run(fn, *a):
        try:
            fn(*a)
        except ValueError as e:
            problems.append(str(e))

    run(model_config.validate, cfg.model)
    if "sources" in cfg.data:
        run(data_config.validate, cfg.data, process_count)
    run(check_consistency, cfg)
    problems += _train_problems(cfg.train)
    if isinstance(cfg.train.get("vae_init"), str) and cfg.train.vae_init and not problems:
        from sgt_jax.train import vae_init

        problems += vae_init.problems(cfg.train.vae_init, cfg.model)
    if "eval" in cfg:
        problems += _eval_problems(cfg.eval)
    for k in ("data", "fsdp", "tensor"):
        v = cfg.mesh.get(k)
        if not (_is_int(v) and (v >= 1 or v == -1)):
            problems.append(f"mesh.{k}={v!r}: must be an int >= 1, or -1 (the remaining devices)")
    if mesh is None and not problems:
        import jax

        from sgt_jax.parallel.mesh import MESH_AXES, mesh_shape, num_slices

        try:
            mesh = dict(zip(MESH_AXES, mesh_shape(cfg.mesh.to_dict(), jax.device_count(), num_slices(jax.devices()))))
        except ValueError as e:
            problems.append(str(e))
    if mesh is not None and not problems:
        run(check_micro_batches, cfg, mesh)
    if problems:
        raise ConfigError("invalid run config:\n  " + "\n  ".join(problems))
    return cfg


# ------------------------------------------------------------------------------------------------
# resuming with a changed config

# The identity of a run: what changes the parameters' shapes or the data stream. A resumed run
# refuses a change here unless train.allow_config_change names the key; every other key (the
# rest of train: lr, steps, cadence, optimizer; the mesh) is applied and logged.
IDENTITY = ("model", "data", "train.seed", "train.freeze_llm", "train.freeze_vit")
MUTABLE_SECTIONS = ("train", "mesh", "eval")
_ABSENT = "(absent)"


def flat_config(d: dict, prefix: str = "") -> dict:
    """{'train.lr': 1e-4, ...} of a config's JSON form (``checkpoint.config_json``)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def config_changes(stored: dict, new: dict, allow: str = "") -> tuple[list, list, list]:
    """Compare a checkpoint's config with the new run's (both JSON forms). Returns
    (refused, applied, allowed): lists of (key, stored value, new value)."""
    a, b = flat_config(stored), flat_config(new)
    allowed_keys = [k.strip() for k in (allow or "").split(",") if k.strip()]
    refused, applied, allowed = [], [], []
    for k in sorted(a.keys() | b.keys()):
        va, vb = a.get(k, _ABSENT), b.get(k, _ABSENT)
        if va == vb:
            continue
        row = (k, va, vb)
        if _under(k, IDENTITY) or not _under(k, MUTABLE_SECTIONS):
            (allowed if _under(k, allowed_keys) else refused).append(row)
        else:
            applied.append(row)
    return refused, applied, allowed


def diff_table(rows) -> str:
    rows = [("key", "checkpoint", "now")] + [(k, _show(x), _show(y)) for k, x, y in rows]
    w0, w1 = (max(len(r[i]) for r in rows) for i in (0, 1))
    return "\n".join(f"  {k:<{w0}}  {x:<{w1}}  {y}" for k, x, y in rows)


def _show(v) -> str:
    s = v if isinstance(v, str) and v == _ABSENT else repr(v)
    return s if len(s) <= 60 else s[:57] + "..."
