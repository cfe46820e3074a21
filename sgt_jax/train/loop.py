"""The training loop: build (or restore) the sharded state, compile the step once, feed it the
global batch, log, checkpoint, and stop cleanly on SIGTERM (TPU preemption)."""
from __future__ import annotations

import logging
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sgt_jax import fileio
from sgt_jax.keydiff import key_diff
from sgt_jax.models.bagel import Bagel
from sgt_jax.models import config as model_config
from sgt_jax.models.vae import AutoEncoder
from sgt_jax.parallel import mesh as mesh_lib
from sgt_jax.train import config as run_config
from sgt_jax.train import metrics as metrics_lib
from sgt_jax.train.checkpoint import Checkpointer, ConfigChangeError, config_json
from sgt_jax.train.config import check_consistency
from sgt_jax.train.executable import load_compiled, step_fingerprint  # noqa: F401 (step_fingerprint: loop's API)
from sgt_jax.train.optimizer import copy_init_moe, make_tx, trainable_filter
from sgt_jax.train.preemption import StopAgreement
from sgt_jax.train.step import Consts, TrainState, make_train_step

log = logging.getLogger("sgt_jax.train")


class NonFiniteLossError(RuntimeError):
    pass


class CompileCounter:
    """Counts XLA backend compilations by function name (jax.monitoring) -- a run must compile
    its train step (``sgt_train_step``) exactly once."""
    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.by_name: dict[str, int] = {}
        jax.monitoring.register_event_duration_secs_listener(self._on)

    def _on(self, event, duration, fun_name: str = "?", **kw):
        if event == self.EVENT:
            self.by_name[fun_name] = self.by_name.get(fun_name, 0) + 1


_COMPILES = CompileCounter()


def compile_count(name: str | None = None) -> int:
    """Compilations so far of the function ``name`` (all functions if None)."""
    if name is None:
        return sum(_COMPILES.by_name.values())
    return sum(v for k, v in _COMPILES.by_name.items() if name in k)


# ------------------------------------------------------------------------------------------------


# the random init's compile options on CPU: the init program runs once, its compile dominates
# (tiny preset: ~2x faster to compile; the values differ from the optimised build's in the last bits)
INIT_CPU_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def vae_dtype(cfg):
    """The frozen VAE encodes in the model's compute dtype (BAGEL: under bf16 autocast)."""
    return jnp.dtype(cfg.model.compute_dtype)


class Program:
    """The compiled program of a run, everything static about it: mesh, graphdefs, abstract state
    and constants with their shardings, the optimizer and the jitted step (``step_fn``; with
    ``train.executable`` the step compiled ahead of time by ``python -m sgt_jax.aot --serialize``
    for this run config, loaded instead of compiled here)."""

    def __init__(self, cfg, mesh=None, *, validate: bool = True):
        """``validate``: the whole run config (train.config.validate) first; False checks only
        what the shapes need (the model section and its agreement with data), e.g. to read
        back a finished run's checkpoint."""
        self.cfg = cfg
        if validate:
            run_config.validate(cfg, mesh, process_count=jax.process_count())
        else:
            model_config.validate(cfg.model)
            check_consistency(cfg)
        self.mesh = mesh if mesh is not None else mesh_lib.make_mesh(cfg.mesh.to_dict())
        self.tx = make_tx(cfg.train)
        self.filter = trainable_filter(cfg.train, cfg.model)
        abstract = nnx.eval_shape(lambda: Bagel(cfg.model, rngs=nnx.Rngs(0), rules=mesh_lib.RULES))
        self.graphdef, a_params, a_frozen, a_fixed = nnx.split(abstract, self.filter, nnx.Param, ...)
        vae_abs = nnx.eval_shape(lambda: AutoEncoder(cfg.model, rngs=nnx.Rngs(0), dtype=vae_dtype(cfg)))
        self.vae_graphdef, a_vae = nnx.split(vae_abs, nnx.Param)
        a_opt = jax.eval_shape(self.tx.init, a_params)
        sh = lambda tree: mesh_lib.state_shardings(tree, self.mesh)
        rep = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        self.abstract_state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=a_params,
                                         opt_state=a_opt, ema=a_params,
                                         nan_streak=jax.ShapeDtypeStruct((), jnp.int32),
                                         nan_total=jax.ShapeDtypeStruct((), jnp.int32))
        self.state_shardings = TrainState(step=rep, params=sh(a_params), opt_state=sh(a_opt),
                                          ema=sh(a_params), nan_streak=rep, nan_total=rep)
        self.abstract_consts = Consts(frozen=a_frozen, fixed=a_fixed, vae=a_vae)
        self.consts_shardings = Consts(*(sh(v) for v in self.abstract_consts))
        self.num_gen = int(cfg.data.gen_tokens_per_row)
        self.num_ce = int(cfg.data.get("ce_tokens_per_row", 0))
        step = make_train_step(graphdef=self.graphdef, vae_graphdef=self.vae_graphdef, tx=self.tx,
                               cfg=cfg, num_gen=self.num_gen, num_ce=self.num_ce)
        self.batch_sharding = mesh_lib.batch_sharding(self.mesh)
        self.step_fn = jax.jit(step, in_shardings=(self.state_shardings, self.consts_shardings, self.batch_sharding),
                               out_shardings=(self.state_shardings, rep), donate_argnums=(0,))
        if cfg.train.get("executable"):
            self.step_fn = load_compiled(cfg.train.executable, self.step_fn, fingerprint=step_fingerprint(cfg))
            log.info("train step loaded from %s (not compiled)", cfg.train.executable)

    # -- initial state -----------------------------------------------------------------------

    def init(self, seed: int):
        """Random init (or the imported checkpoint in train.init_from), created sharded on device."""
        cfg = self.cfg
        t = cfg.train

        def make():
            model = Bagel(cfg.model, rngs=nnx.Rngs(seed), rules=mesh_lib.RULES)
            if t.copy_init_moe:
                copy_init_moe(nnx.state(model))
            _, params, frozen, fixed = nnx.split(model, self.filter, nnx.Param, ...)
            vae = nnx.state(AutoEncoder(cfg.model, rngs=nnx.Rngs(seed + 1), dtype=vae_dtype(cfg)), nnx.Param)
            return params, Consts(frozen=frozen, fixed=fixed, vae=vae)

        out_sh = (self.state_shardings.params, self.consts_shardings)
        with self.mesh:
            if t.init_from:       # restored straight into the shardings: no random init to compile and run
                params, consts = self._load_model_dir(t.init_from, seed)
            else:
                init = jax.jit(make, out_shardings=out_sh).lower()
                # runs once: on CPU, LLVM without its expensive passes halves the compile (issue 23)
                params, consts = (init.compile(compiler_options=INIT_CPU_COMPILE_OPTIONS)
                                  if jax.default_backend() == "cpu" else init.compile())()
            if t.get("vae_init"):
                consts = consts._replace(vae=self._load_vae(t.vae_init))
            opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings.opt_state)(params)
            ema = jax.tree.map(lambda x: x.copy(), params)   # own buffers: the step donates both
        z = lambda: jnp.zeros((), jnp.int32)
        state = TrainState(step=z(), params=params, opt_state=opt_state, ema=ema, nan_streak=z(), nan_total=z())
        # exactly the step's shardings, so the first call does not compile a second variant
        return jax.device_put(state, self.state_shardings), consts

    def fixed(self, seed: int):
        """The regenerated tables (``consts.fixed``) alone, as ``init`` makes them: a resumed
        run restores everything else (the unused random init is dead code to XLA)."""
        def make():
            return nnx.split(Bagel(self.cfg.model, rngs=nnx.Rngs(seed)), self.filter, nnx.Param, ...)[3]

        with self.mesh:
            return jax.jit(make, out_shardings=self.consts_shardings.fixed)()

    def _load_vae(self, path):
        """The frozen VAE from a FLUX AE file (``train.vae_init``; train/vae_init.py)."""
        from sgt_jax.train import vae_init

        vae = jax.tree.map(lambda x: x, self.abstract_consts.vae)
        nnx.replace_by_pure_dict(vae, vae_init.load(path, self.cfg.model))
        log.info("VAE initialised from %s", path)
        return jax.device_put(vae, self.consts_shardings.vae)

    def _load_model_dir(self, path, seed: int):
        """Parameters from an imported model dir (python -m sgt_jax.convert import), restored
        straight into the run's shardings (no host ever holds the whole model); the fixed tables
        regenerated, the VAE randomly initialised only when the model dir has none."""
        from sgt_jax.convert.model_dir import load_model_dir

        fresh = lambda tree: jax.tree.map(lambda x: x, tree)   # noqa: E731  (filled in place below)
        params, frozen = fresh(self.abstract_state.params), fresh(self.abstract_consts.frozen)
        consts = Consts(frozen=frozen, fixed=self.fixed(seed), vae=fresh(self.abstract_consts.vae))
        full = nnx.merge_state(params, consts.frozen)
        full_sh = nnx.merge_state(self.state_shardings.params, self.consts_shardings.frozen)
        sh = {"params": nnx.to_pure_dict(full_sh), "vae": nnx.to_pure_dict(self.consts_shardings.vae)}
        _, pure, vae_pure = load_model_dir(path, shardings=sh)
        shapes = lambda tree: {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
        diff = key_diff(shapes(nnx.to_pure_dict(full)), shapes(pure))
        if diff:
            raise ValueError(f"{path}: the imported model does not match cfg.model ({'; '.join(diff.lines(limit=5))}); "
                             f"use the model config recorded in {path}/model_config.json")
        nnx.replace_by_pure_dict(full, pure)
        vae = consts.vae
        if vae_pure is not None:
            nnx.replace_by_pure_dict(vae, vae_pure)
        else:
            log.warning("%s has no VAE: the VAE keeps its random init", path)
            make_vae = lambda: nnx.state(AutoEncoder(self.cfg.model, rngs=nnx.Rngs(seed + 1),  # noqa: E731
                                                     dtype=vae_dtype(self.cfg)), nnx.Param)
            vae = jax.jit(make_vae, out_shardings=self.consts_shardings.vae)()
        model = nnx.merge(self.graphdef, full, consts.fixed)
        _, p, f, _ = nnx.split(model, self.filter, nnx.Param, ...)
        log.info("initialised from %s", path)
        return p, Consts(frozen=f, fixed=consts.fixed, vae=vae)

    def global_batch(self, local):
        return mesh_lib.global_batch(local, self.mesh)


# ------------------------------------------------------------------------------------------------


def accept_config(meta: dict, step: int, cfg, ckpt) -> bool:
    """A checkpoint's stored config against the new run's: identity changes (model, data,
    seed, freezing) refused with a diff table unless train.allow_config_change names them;
    other changes (lr, steps, cadence, mesh, ...) applied and logged. True when an identity
    change was allowed."""
    refused, applied, allowed = run_config.config_changes(
        meta["config"], config_json(cfg), cfg.train.get("allow_config_change", ""))
    where = ckpt.rel(ckpt.step_dir(step))
    if refused:
        keys = ",".join(k for k, _, _ in refused)
        raise ConfigChangeError(
            f"the run config differs from the one checkpoint {where} was written with, in keys that "
            f"change the model's shapes or the data stream:\n{run_config.diff_table(refused)}\n"
            f"Resume with the stored values, use a new workdir, or allow the change deliberately with "
            f"--config.train.allow_config_change={keys}")
    for k, a, b in applied:
        if k == "train.allow_config_change":
            continue
        log.warning("resuming %s with %s: %r -> %r (applied)", where, k, a, b)
    for k, a, b in allowed:
        log.warning("resuming %s with %s: %r -> %r (allowed by train.allow_config_change)", where, k, a, b)
    return bool(allowed)


def make_data_iterator(cfg, workdir: str):
    """This process's shard of the config's Grain pipeline. Process 0 builds its iterator first
    -- the tiny tokenizer, synthetic data and source indexes it writes into the workdir --
    and the other processes after it, reading what it wrote (built once, never raced)."""
    from sgt_jax.data.pipeline import ensure_tokenizer, make_train_iterator

    def build():
        tok = ensure_tokenizer(cfg.data, workdir)
        if tok.vocab_size > cfg.model.llm.vocab_size:
            raise ValueError(f"the tokenizer has {tok.vocab_size} ids but model.llm.vocab_size="
                             f"{cfg.model.llm.vocab_size}: ids past the embedding table would be wrong")
        return make_train_iterator(cfg.data, workdir=workdir, tokenizer=tok,
                                   process_index=jax.process_index(), process_count=jax.process_count())

    first = build() if jax.process_index() == 0 else None
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("sgt_jax_data_sources_built")
    return first if first is not None else build()


def _to_host(m: dict) -> dict:
    return {k: np.asarray(v) for k, v in jax.device_get(m).items()}


def train(cfg, workdir: str, *, data_iterator=None, stop_after: int | None = None, quiet: bool = False,
          sigterm: threading.Event | None = None, evaluate=None, mesh=None) -> dict:
    """Run (or resume) training in ``workdir``. Returns a summary dict.

    ``data_iterator`` (tests) must yield ``(PackedBatch of numpy, stats)`` and have
    ``get_state()``/``set_state()``; by default the config's Grain pipeline is built.
    ``stop_after``: return after this many steps of this invocation (tests). ``sigterm``: an
    Event the caller's SIGTERM handler sets (the CLI installs one first thing); without it the
    loop installs its own for its duration. On pods the caller has run
    ``parallel.mesh.initialize_distributed()`` first (the CLI does). ``evaluate``: called as
    ``evaluate(step, state, consts)`` at the start of a fresh run (step 0) and after every step
    (after its regular save); it returns None (not an evaluation step) or ``{"scalars": {...},
    "images": {...}}``, logged as ``eval/*``. It must only read the state (the train layer never
    imports the evaluation: the CLI hands it in, ``sgt_jax.eval.make_hook``). ``mesh``: a mesh
    to run on instead of ``cfg.mesh`` over all devices (tests: one device of the 8 fake ones)."""
    t = cfg.train
    t_enter = time.perf_counter()
    program = Program(cfg, mesh=mesh)  # the whole run config validated first: nothing built yet
    fileio.makedirs(workdir)
    stop, old_handler = sigterm, None
    if stop is None:
        stop = threading.Event()
        if _main_thread():
            old_handler = signal.signal(signal.SIGTERM, lambda *a: stop.set())
    ckpt = Checkpointer(fileio.join(workdir, "checkpoints"), save_every=t.save_every, keep=t.keep,
                        async_save=t.async_checkpointing)
    try:
        resumed = ckpt.restore_latest(program, accept=lambda meta, step: accept_config(meta, step, cfg, ckpt))
        if data_iterator is None:
            data_iterator = make_data_iterator(cfg, workdir)
        if resumed is not None:
            state, consts = resumed.state, resumed.consts._replace(fixed=program.fixed(t.seed))
            data_iterator.set_state(resumed.data["iterator"])
            log.info("resumed from step %d", resumed.step)
            start = resumed.step
        else:
            state, consts = program.init(t.seed)
            start = 0
    except BaseException:
        ckpt.close()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
        raise
    timing = {"state_s": time.perf_counter() - t_enter}     # Program + init / restore + data iterator

    is_chief = jax.process_index() == 0
    writer = metrics_lib.MetricsWriter(workdir, t.steps, start, enabled=is_chief and not quiet)
    peak = metrics_lib.device_peak_tflops()
    meta = {"config": config_json(cfg)}
    history, step, t_last, flops_acc, wait_acc, pending = [], start, time.perf_counter(), 0.0, 0.0, []
    stats = {}
    end = t.steps if stop_after is None else min(t.steps, start + stop_after)

    last_saved = start

    def save(s, force=False):
        nonlocal last_saved
        if s == last_saved:
            return False
        saved = ckpt.save(s, state, consts, {"iterator": data_iterator.get_state(), "stats": fileio.jsonable(stats)},
                          meta, force=force)
        if saved:
            last_saved = s
            writer.sync()          # a URL workdir: metrics uploaded with every checkpoint
        return saved

    evals = []

    def run_eval(s):
        out = evaluate(s, state, consts) if evaluate is not None else None
        if out:
            writer.write_eval(s, out["scalars"], out.get("images"))
            evals.append({"step": s, **out["scalars"]})

    compiles_before = compile_count("sgt_train_step")
    agreed = StopAgreement(stop)      # every process stops at the same step boundary
    try:
        if start == 0:
            t_eval = time.perf_counter()
            run_eval(0)
            timing["eval_at_start_s"] = time.perf_counter() - t_eval
        while step < end:
            if step == start and agreed.before_first_step():   # SIGTERM before the first step: nothing new to save
                log.warning("SIGTERM before the first step: exiting at step %d", step)
                break
            t_wait = time.perf_counter()
            local, stats = next(data_iterator)
            wait_acc += time.perf_counter() - t_wait
            batch = program.global_batch(local)
            flops_acc += metrics_lib.step_flops(cfg.model, local) * jax.process_count()
            t_step = time.perf_counter()
            state, m = program.step_fn(state, consts, batch)
            if "first_step_s" not in timing:          # compile + run of the first step
                jax.block_until_ready(m)
                timing["first_step_s"] = time.perf_counter() - t_step
                timing["to_first_step_s"] = time.perf_counter() - t_enter
                log.info("first step done %.1f s after train() started (state %.1f s, eval %.1f s, step compile+run "
                         "%.1f s)", timing["to_first_step_s"], timing["state_s"], timing.get("eval_at_start_s", 0.0),
                         timing["first_step_s"])
            pending.append(m)
            step += 1
            ckpt.poll()            # a failed asynchronous save stops the run at once
            if step % t.log_every == 0 or step == end:
                window = [_to_host(x) for x in jax.device_get(pending)]
                n_acc, pending = len(window), []
                m = window[-1]
                now = time.perf_counter()
                dt = (now - t_last) / n_acc
                # losses: mean over the steps of the window that were not skipped
                ok = [w for w in window if not w["skipped"]] or window
                row = {k: float(np.mean([w[k] for w in ok])) for k in ("loss", "ce", "mse", "grad_norm")}
                row.update(lr=float(m["lr"]), skipped=float(sum(w["skipped"] for w in window)),
                           nan_streak=float(m["nan_streak"]), step_time_s=dt,
                           data_wait_frac=wait_acc / max(now - t_last, 1e-9),
                           step_compiles=compile_count("sgt_train_step"))
                for k in ("tokens_text", "tokens_vit", "tokens_latent", "tokens_pad"):
                    row[k.replace("tokens_", "tokens_per_s_")] = float(np.mean([w[k] for w in window])) / dt
                tflops = flops_acc / max(now - t_last, 1e-9) / 1e12 / jax.device_count()
                row["model_tflops_per_device"] = tflops
                row["mfu"] = tflops / peak if peak else float("nan")    # NaN on CPU: no meaningful peak
                row.update({f"data_{k}": v for k, v in _flat_counts(stats).items()})
                if "tokens_ce_over_budget" in m:      # only a batch not from the packer can exceed it
                    row["ce_tokens_over_budget"] = over = float(sum(w["tokens_ce_over_budget"] for w in window))
                    if over:
                        log.warning("%d CE tokens in the last %d steps were beyond data.ce_tokens_per_row=%d "
                                    "and left out of the loss: the batches break the packer's CE budget",
                                    over, n_acc, cfg.data.get("ce_tokens_per_row", 0))
                writer.write(step, row)
                history.append(row | {"step": step})
                t_last, flops_acc, wait_acc = now, 0.0, 0.0
                streak = max(int(w["nan_streak"]) for w in window)
                if streak >= t.nan_max_streak:
                    raise NonFiniteLossError(
                        f"{streak} consecutive steps with a non-finite loss or gradient "
                        f"(step {step}); updates were skipped. Lower train.lr, check the data "
                        f"(metrics.jsonl data_* counters) or raise train.nan_max_streak.")
            writer.advance()
            if agreed.at_boundary():
                save(step, force=True)
                ckpt.wait()
                log.warning("SIGTERM: checkpoint written at step %d, exiting", step)
                break
            save(step)
            run_eval(step)
        else:
            save(step, force=True)
    finally:
        ckpt.close()
        png = writer.close()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    summary = {"workdir": workdir, "steps": step, "checkpoints": ckpt.directory, "metrics": writer.jsonl_path,
               "tensorboard": writer.tb_dir, "loss_curve": png, "history": history,
               "compiles_in_loop": compile_count("sgt_train_step") - compiles_before, "preempted": agreed.stopped,
               "stop_agreement_s": agreed.seconds, "eval": evals, "timing": timing}
    return summary


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _flat_counts(stats: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in (stats or {}).items():
        if isinstance(v, dict):
            out.update(_flat_counts(v, f"{prefix}{k}_"))
        elif isinstance(v, (int, float, np.integer, np.floating)):
            out[f"{prefix}{k}"] = float(v)
    return out
