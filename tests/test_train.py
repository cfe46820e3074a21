"""The trainer: sharding equivalence, exact resume after SIGKILL, SIGTERM, freezing, EMA, warmup,
NaN guard, one compilation per run."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from fake_data import FakeIterator
from sgt_jax.models.config import tiny
from sgt_jax.parallel import mesh as mesh_lib
from sgt_jax.train import config as run_config
from sgt_jax.train import loop
from sgt_jax.train.config import default_mesh_config, default_train_config


def _one_device():
    """A mesh of one of the 8 fake devices, for in-process loop tests that are not about sharding
    (XLA:CPU ran out of pool threads for the fake devices' collectives: see NPROC in conftest.py)."""
    return mesh_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])

HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_run_config(steps=4, save_every=100, **train):
    cfg = ml_collections.ConfigDict(dict(
        model=tiny(), data=ml_collections.ConfigDict(dict(gen_tokens_per_row=8)),
        train=default_train_config(), mesh=default_mesh_config()))
    cfg.train.update(dict(steps=steps, warmup_steps=2, log_every=1, save_every=save_every, lr=1e-3), **train)
    return cfg


def flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def run_steps(cfg, mesh, n, rows=8, **it_kw):
    setup = loop.Program(cfg, mesh=mesh)
    state, consts = setup.init(cfg.train.seed)
    it = FakeIterator(cfg, rows=rows, **it_kw)
    losses = []
    for _ in range(n):
        b, _ = next(it)
        state, m = setup.step_fn(state, consts, setup.global_batch(b))
        losses.append(float(m["loss"]))
    return setup, state, consts, losses


@pytest.mark.slow
@pytest.mark.parametrize("shape", [dict(data=1, fsdp=4, tensor=2), dict(data=2, fsdp=4, tensor=1)])
def test_sharded_step_equals_single_device(shape):
    assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    cfg = tiny_run_config()
    one = mesh_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    many = mesh_lib.make_mesh(shape)
    _, s1, _, l1 = run_steps(cfg, one, 2)
    setup8, s8, c8, l8 = run_steps(cfg, many, 2)
    np.testing.assert_allclose(l1, l8, rtol=1e-5)
    a, b = flat(s1.params), flat(s8.params)
    for k in a:
        if "vit_model" in k and "k_proj" in k and "bias" in k:
            # softmax is invariant to the key bias: its true gradient is exactly 0, the computed one
            # is round-off, and Adam turns round-off into +-lr updates (golden README notes the same)
            continue
        np.testing.assert_allclose(a[k], b[k], atol=1e-6, rtol=1e-5, err_msg=k)
    # the state really is sharded: embeddings over fsdp (and tensor), ema and Adam moments alike
    emb = s8.params["language_model"]["embed_tokens"]["embedding"].get_value()
    spec = emb.sharding.spec
    assert spec[1] == "fsdp" and (shape["tensor"] == 1 or spec[0] == "tensor"), spec
    assert s8.ema["language_model"]["embed_tokens"]["embedding"].get_value().sharding.spec == spec
    mu = s8.opt_state[1][0].mu["language_model"]["embed_tokens"]["embedding"].get_value()
    assert mu.sharding.spec == spec
    n_shards = len({d for d in emb.sharding.device_set})
    assert n_shards == 8 and emb.addressable_shards[0].data.shape[1] == emb.shape[1] // 4
    q = s8.params["language_model"]["layers"]["gen"]["q_proj"]["kernel"].get_value()
    assert q.sharding.spec[1:] == ("fsdp", "tensor" if shape["tensor"] > 1 else None)


def test_warmup_from_zero_ema_and_frozen_parameters():
    cfg = tiny_run_config(freeze_vit=True, ema_decay=0.9)
    mesh = mesh_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    setup = loop.Program(cfg, mesh=mesh)
    state, consts = setup.init(0)
    p0, f0, v0 = flat(state.params), flat(consts.frozen), flat(consts.vae)
    assert not any("vit_model" in k for k in p0) and any("vit_model" in k for k in f0)
    it = FakeIterator(cfg, rows=2)
    b, _ = next(it)
    state, m = setup.step_fn(state, consts, setup.global_batch(b))
    assert float(m["lr"]) == 0.0
    p1 = flat(state.params)
    assert all(np.array_equal(p0[k], p1[k]) for k in p0), "the first update must use lr 0 (BAGEL)"
    b, _ = next(it)
    state, m = setup.step_fn(state, consts, setup.global_batch(b))
    assert float(m["lr"]) == pytest.approx(cfg.train.lr / 2)
    p2, e2 = flat(state.params), flat(state.ema)
    assert any(not np.array_equal(p1[k], p2[k]) for k in p1)
    for k in p2:   # ema_2 = d (d p0 + (1-d) p1) + (1-d) p2, with p1 == p0
        want = 0.9 * (0.9 * p0[k] + 0.1 * p1[k]) + 0.1 * p2[k]
        np.testing.assert_allclose(e2[k], want, rtol=1e-6, atol=1e-7, err_msg=k)
    assert all(np.array_equal(f0[k], v) for k, v in flat(consts.frozen).items())
    assert all(np.array_equal(v0[k], v) for k, v in flat(consts.vae).items())


def test_freeze_und_gives_no_gradient_through_und_tokens():
    cfg = tiny_run_config()
    cfg.model.llm.freeze_und = True
    setup = loop.Program(cfg, mesh=mesh_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1]))
    names = set(flat(setup.abstract_state.params))
    assert not any("'und'" in k or "embed_tokens" in k or "vit_model" in k or "connector" in k for k in names)
    assert any("lm_head" in k for k in names) and any("'gen'" in k for k in names)


def test_nan_guard_skips_and_stops(tmp_path):
    cfg = tiny_run_config(steps=6, nan_max_streak=2)
    mesh = mesh_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    setup = loop.Program(cfg, mesh=mesh)
    state, consts = setup.init(0)
    it = FakeIterator(cfg, rows=2, nan_at=(2,))
    ps = []
    for i in range(4):
        b, _ = next(it)
        before = flat(state.params)
        state, m = setup.step_fn(state, consts, setup.global_batch(b))
        ps.append((before, flat(state.params), bool(m["skipped"])))
    assert [x[2] for x in ps] == [False, False, True, False]
    assert all(np.array_equal(ps[2][0][k], ps[2][1][k]) for k in ps[2][0]), "a skipped step changes nothing"
    assert int(state.nan_total) == 1 and int(state.nan_streak) == 0
    with pytest.raises(loop.NonFiniteLossError, match="consecutive steps"):
        loop.train(cfg, str(tmp_path / "run"), data_iterator=FakeIterator(cfg, rows=8, nan_at=(1, 2, 3)),
                   mesh=_one_device(), quiet=True)


def test_one_compilation_across_varying_samples(tmp_path):
    cfg = tiny_run_config(steps=5)
    s = loop.train(cfg, str(tmp_path / "run"), data_iterator=FakeIterator(cfg, rows=8, vary=True), quiet=True,
                   mesh=_one_device())
    assert s["steps"] == 5
    assert s["compiles_in_loop"] == 1, s["compiles_in_loop"]


def _worker(workdir, steps, *extra, wait=True):
    cmd = [sys.executable, os.path.join(HERE, "train_worker.py"), str(workdir), str(steps), *map(str, extra)]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def _losses(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows}


def _final_params(workdir, step):
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    tree = ocp.PyTreeCheckpointer().restore(path)
    return flat(tree["train"])


@pytest.mark.slow
def test_exact_resume_after_sigkill(tmp_path):
    n = 4
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    r = _worker(straight, 2 * n)
    assert r.returncode == 0, r.stdout + r.stderr
    # killed when asking for batch n+1 (checkpoints at steps 2 and 4 were requested, async)
    r = _worker(killed, 2 * n, "--kill-at", n + 1)
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    r = _worker(killed, 2 * n)
    assert r.returncode == 0, r.stdout + r.stderr
    a, b = _losses(straight), _losses(killed)
    assert all(a[s] == b[s] for s in a), (a, b)        # fp32 on CPU: bitwise
    pa, pb = _final_params(straight, 2 * n), _final_params(killed, 2 * n)
    assert pa.keys() == pb.keys()
    assert all(np.array_equal(pa[k], pb[k]) for k in pa)


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    wd = tmp_path / "run"
    p = _worker(wd, 50, "--sleep", 0.5, "--save-every", 1000, wait=False)
    deadline = time.time() + 600
    while time.time() < deadline:
        if (wd / "metrics.jsonl").exists() and len((wd / "metrics.jsonl").read_text().splitlines()) >= 2:
            break
        time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    summary = json.loads(out.split("SUMMARY ", 1)[1].splitlines()[0])
    assert summary["preempted"] and 2 <= summary["steps"] < 50
    steps = sorted(int(d) for d in os.listdir(wd / "checkpoints") if d.isdigit())
    assert steps[-1] == summary["steps"]


@pytest.mark.slow
def test_kill_during_async_save_leaves_previous_checkpoint(tmp_path):
    wd = tmp_path / "run"
    # save every step; kill right after step 3's save was requested (asynchronous, likely unfinished)
    r = _worker(wd, 10, "--kill-at", 3, "--save-every", 1)
    assert r.returncode == -signal.SIGKILL
    mgr = ocp.CheckpointManager(str(wd / "checkpoints"))
    latest = mgr.latest_step()
    assert latest is not None and latest >= 1
    tree = ocp.PyTreeCheckpointer().restore(str(wd / "checkpoints" / str(latest) / "state"))
    assert int(np.asarray(tree["train"]["step"])) == latest
    r = _worker(wd, 5)
    assert r.returncode == 0, r.stdout + r.stderr


def test_grad_accumulation_averages_micro_batches():
    """BAGEL normalises each micro-batch by its own token totals and averages. With rows of equal
    token counts that equals the one-batch token mean, and randomness is drawn per global row, so
    accumulating two micro-batches must reproduce the one-batch update."""
    mesh = mesh_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    b, _ = next(FakeIterator(tiny_run_config(), rows=2, vary=False))
    assert len(set(np.asarray(b.ce_mask).sum(1))) == 1 and len(set(np.asarray(b.mse_mask).sum(1))) == 1
    out = []
    for accum in (1, 2):
        cfg = tiny_run_config(grad_accum=accum, warmup_steps=0)
        setup = loop.Program(cfg, mesh=mesh)
        state, consts = setup.init(0)
        state, m = setup.step_fn(state, consts, setup.global_batch(b))
        out.append((float(m["loss"]), flat(state.params)))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-6)
    for k in out[0][1]:
        if "vit_model" in k and "k_proj" in k and "bias" in k:
            continue   # exactly-zero true gradient, see test_sharded_step_equals_single_device
        np.testing.assert_allclose(out[0][1][k], out[1][1][k], rtol=1e-5, atol=1e-6, err_msg=k)


def _collectives(hlo: str) -> dict:
    import re

    ops = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
    return {op: len(re.findall(r"= \S+ " + op + r"(-start)?\(", hlo)) for op in ops}


@pytest.mark.slow
def test_micro_batches_stay_on_their_devices():
    """grad_accum splits the rows strided (row j*A + i -> micro-batch i), so with rows sharded in
    contiguous blocks over fsdp every device keeps its own rows in every micro-batch: the
    accumulating step has no collective the one-batch step lacks (the contiguous split moved
    rows between devices: 100 all-gathers instead of 83 here, and XLA's 'involuntary full
    rematerialization' of batch tensors)."""
    mesh = mesh_lib.make_mesh(dict(data=1, fsdp=4, tensor=1), devices=jax.devices()[:4])
    counts = {}
    for accum in (1, 2):
        cfg = tiny_run_config(grad_accum=accum, warmup_steps=0)
        setup = loop.Program(cfg, mesh=mesh)
        b, _ = next(FakeIterator(cfg, rows=8, vary=True))
        compiled = setup.step_fn.lower(setup.abstract_state, setup.abstract_consts, setup.global_batch(b)).compile()
        counts[accum] = _collectives(compiled.as_text())
    assert counts[2]["all-to-all"] == counts[2]["collective-permute"] == 0, counts
    assert counts[2]["all-gather"] <= counts[1]["all-gather"], counts


def test_vae_encodes_in_the_compute_dtype():
    from sgt_jax.train.step import encode_images

    for name in ("float32", "bfloat16"):
        cfg = tiny_run_config()
        cfg.model.compute_dtype = name
        setup = loop.Program(cfg, mesh=mesh_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1]))
        vae = nnx.merge(setup.vae_graphdef, setup.abstract_consts.vae)
        assert vae.dtype == jnp.dtype(name)
        images = jax.ShapeDtypeStruct((2, 1, 32, 32, 3), jnp.float32)
        lat = jax.eval_shape(lambda v, im: encode_images(setup.vae_graphdef, v, im, jax.random.key(0)),
                             setup.abstract_consts.vae, images)
        assert lat.dtype == jnp.float32      # latents are fp32 whatever the encoder ran in


def test_micro_batches_must_divide_over_batch_shards():
    cfg = tiny_run_config(grad_accum=4)
    cfg.data.rows_per_batch = 8
    mesh = mesh_lib.make_mesh(dict(data=1, fsdp=4, tensor=1), devices=jax.devices()[:4])
    with pytest.raises(ValueError, match="rows_per_batch=8 must be a multiple of"):
        run_config.check_micro_batches(cfg, mesh)
    cfg.train.grad_accum = 2
    run_config.check_micro_batches(cfg, mesh)


def test_init_from_imported_model_dir(golden_dir, tmp_path):
    """train.init_from: the run starts from an imported BAGEL checkpoint (here the golden model)."""
    from safetensors.numpy import load_file

    from sgt_jax.convert.__main__ import main as convert_main
    from sgt_jax.convert.model_dir import read_config
    from sgt_jax.convert import keymap

    out = tmp_path / "imported"
    assert convert_main(["import", "--from", str(golden_dir), "--to", str(out), "--max-latent-size", "8",
                         "--vit-max-patches-per-side", "8", "--preset", "tiny"]) == 0
    cfg = tiny_run_config(init_from=str(out), copy_init_moe=True)
    cfg.model = read_config(str(out))
    cfg.model.compute_dtype = "float32"
    mesh = mesh_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    setup = loop.Program(cfg, mesh=mesh)
    state, consts = setup.init(0)
    model = nnx.merge(setup.graphdef, state.params, consts.frozen, consts.fixed)
    ours = keymap.export_state(model, keymap.bagel_table(cfg.model))
    golden = load_file(str(golden_dir / "model.safetensors"))
    for k, v in ours.items():      # copy_init_moe must not overwrite imported gen weights
        assert np.array_equal(v, golden[k]), k
    ema = nnx.merge(setup.graphdef, state.ema, consts.frozen, consts.fixed)
    assert np.array_equal(keymap.export_state(ema, keymap.bagel_table(cfg.model))[
        "language_model.lm_head.weight"], golden["language_model.lm_head.weight"])


def test_export_training_checkpoint_to_bagel_layout(golden_dir, tmp_path):
    """Train from the imported golden model for one step at lr 0, export the EMA through the converter:
    BAGEL's files must come back bit for bit (model incl. the sin-cos tables, and the VAE)."""
    from safetensors.numpy import load_file

    from sgt_jax.convert.__main__ import main as convert_main
    from sgt_jax.convert.model_dir import read_config

    imported = tmp_path / "imported"
    assert convert_main(["import", "--from", str(golden_dir), "--to", str(imported), "--max-latent-size", "8",
                         "--vit-max-patches-per-side", "8", "--preset", "tiny", "--no-progress"]) == 0
    # one step: its update uses lr 0 (warmup from 0, as BAGEL), so the EMA equals the imported weights
    cfg = tiny_run_config(steps=1, warmup_steps=1, init_from=str(imported), ema_decay=0.5)
    cfg.model = read_config(str(imported))
    cfg.model.compute_dtype = "float32"
    cfg.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    run = tmp_path / "run"
    loop.train(cfg, str(run), data_iterator=FakeIterator(cfg, rows=8), quiet=True, mesh=_one_device())
    out = tmp_path / "exported"
    assert convert_main(["export", "--from", str(run), "--to", str(out), "--ema", "--dtype", "fp32",
                         "--no-progress"]) == 0
    for name in ("ema.safetensors", "ae.safetensors"):
        got = load_file(str(out / name))
        want = load_file(str(golden_dir / ("model.safetensors" if name == "ema.safetensors" else name)))
        assert got.keys() == want.keys(), set(got) ^ set(want)
        for k in want:
            assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), k


def test_metrics_writer_on_a_url_workdir(tmp_path, monkeypatch):
    """A gs:// workdir (here fsspec's memory://): rows, TensorBoard events and the PNG reach the
    URL on sync / close; a second writer (a resumed run) appends to the run's metrics.jsonl."""
    import fsspec

    from sgt_jax import fileio
    from sgt_jax.train import metrics as M

    monkeypatch.setattr(M.tempfile, "gettempdir", lambda: str(tmp_path))
    url = f"memory://run-{os.getpid()}"
    w = M.MetricsWriter(url, total_steps=4, sync_every_s=3600)
    assert w.jsonl_path == url + "/metrics.jsonl" and w.local.startswith(str(tmp_path))
    w.write(1, {"loss": 3.0, "ce": 2.0, "mse": 1.0})
    assert not fileio.exists(w.jsonl_path)           # staged until a sync
    w.sync()
    assert [json.loads(x)["step"] for x in fileio.read_text(w.jsonl_path).splitlines()] == [1]
    w.write(2, {"loss": 2.5, "ce": 1.5, "mse": 1.0})
    assert w.close() == url + "/loss_curve.png" and fileio.isfile(w.png_path)
    assert any(n.startswith("events.out.tfevents") for n in fileio.listdir(w.tb_dir))

    import shutil
    shutil.rmtree(w.local)                            # a new VM: nothing staged locally
    w2 = M.MetricsWriter(url, total_steps=4, start_step=2, sync_every_s=0)
    w2.write(3, {"loss": 2.0, "ce": 1.0, "mse": 1.0})   # sync_every_s=0: uploaded at once
    rows = [json.loads(x) for x in fileio.read_text(url + "/metrics.jsonl").splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    w2.close()
    fsspec.filesystem("memory").rm(url.split("://")[1], recursive=True)


def test_train_loads_an_ahead_of_time_compiled_step(tmp_path):
    """train.executable: the step serialised by sgt_jax.aot (here compiled for this CPU's devices
    by the same code path) runs instead of a compile, with the same losses; an executable of
    another run config is refused at start."""
    from sgt_jax.train import executable

    cfg = tiny_run_config(steps=3)
    cfg.data.rows_per_batch = 8
    path = str(tmp_path / "step.bin")
    # compiled in a fresh process without the persistent compilation cache: on XLA:CPU an
    # executable that came out of that cache does not re-serialise (its fused functions are
    # missing when loaded), and a test session has usually filled it with this very step
    code = "\n".join([
        f"import sys; sys.path[:0] = [{HERE!r}, {os.path.dirname(HERE)!r}]",
        "from fake_data import FakeIterator",
        "from test_train import tiny_run_config",
        "from sgt_jax.train import executable",
        "from sgt_jax.train import loop",
        "cfg = tiny_run_config(steps=3)",
        "cfg.data.rows_per_batch = 8",
        "setup = loop.Program(cfg)",
        "b, _ = next(FakeIterator(cfg, rows=8, vary=True))",
        "c = setup.step_fn.lower(setup.abstract_state, setup.abstract_consts, setup.global_batch(b)).compile()",
        f"executable.save_compiled(c, {path!r}, fingerprint=loop.step_fingerprint(cfg))"])
    env = dict(os.environ, JAX_ENABLE_COMPILATION_CACHE="false")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]

    ref = loop.train(cfg, str(tmp_path / "jit"), data_iterator=FakeIterator(cfg, rows=8, vary=True), quiet=True)
    cfg.train.executable = path
    got = loop.train(cfg, str(tmp_path / "aot"), data_iterator=FakeIterator(cfg, rows=8, vary=True), quiet=True)
    assert got["compiles_in_loop"] == 0 and ref["compiles_in_loop"] == 1
    assert [h["loss"] for h in got["history"]] == [h["loss"] for h in ref["history"]]

    blob = open(path, "rb").read()
    for bad, why in ((blob[:-10], "truncated"), (b"x" + blob, "not an executable")):
        with open(path + ".bad", "wb") as f:
            f.write(bad)
        with pytest.raises(executable.ExecutableError, match=why):
            executable.load_compiled(path + ".bad", None)
    cfg.train.lr = 2e-3                                  # baked into the executable
    with pytest.raises(executable.ExecutableError, match="another run config"):
        loop.train(cfg, str(tmp_path / "bad"), data_iterator=FakeIterator(cfg, rows=8, vary=True), quiet=True)


@pytest.mark.parametrize("key,value,fix", [
    ("lr", 0.0, "must be > 0"), ("lr", -1e-4, "must be > 0"), ("steps", 0, "int >= 1"),
    ("warmup_steps", 10, "more than train.steps=4"), ("weight_decay", -0.1, "must be >= 0"),
    ("save_every", 0, "--config.train.save_every=100"), ("log_every", 0, "a metrics row every N steps"),
    ("keep", 0, "0 would leave none to resume from"), ("grad_accum", 0, "micro-batches per step"),
    ("ema_decay", 1.5, "in [0, 1]"), ("b2", 1.0, "in [0, 1)"), ("schedule", "linear", "'constant' or 'cosine'"),
    ("nan_max_streak", 0, "int >= 1"), ("max_grad_norm", -1.0, "0: no clipping")])
def test_validator_refuses_values_that_cannot_be_meant_before_any_compile(tmp_path, key, value, fix):
    from sgt_jax.train.config import ConfigError

    cfg = tiny_run_config(**{key: value})
    before = loop.compile_count()
    with pytest.raises(ConfigError) as e:
        loop.train(cfg, str(tmp_path / "run"), data_iterator=FakeIterator(cfg, rows=8), quiet=True)
    assert f"train.{key}={value!r}: " in str(e.value) and fix in str(e.value), str(e.value)
    assert loop.compile_count() == before and not (tmp_path / "run").exists()


def test_validator_lists_every_problem_of_every_section():
    from sgt_jax.data.config import tiny_data_config
    from sgt_jax.train.config import ConfigError, validate

    cfg = tiny_run_config(save_every=0, lr=-1.0)
    cfg.data = tiny_data_config()
    cfg.data.gen_tokens_per_row = cfg.data.tokens_per_row          # a data-section error
    cfg.model.llm.num_kv_heads = 3                                  # a model-section error
    with pytest.raises(ConfigError) as e:
        validate(cfg, mesh={"data": 1, "fsdp": 1, "tensor": 1})
    msg = str(e.value)
    for want in ("train.save_every=0", "train.lr=-1.0", "gen_tokens_per_row=512 must be < tokens_per_row",
                 "llm.num_kv_heads=3 does not divide"):
        assert want in msg, msg
    assert len(msg.splitlines()) == 5, msg                          # a header + one line per problem


@pytest.mark.parametrize("preset", ["tiny", "small", "sgt_bagel_7b", "sgt_bagel_7b_official"])
def test_presets_pass_the_validator(preset):
    import importlib

    from sgt_jax.train.config import validate

    cfg = importlib.import_module(f"configs.{preset}").get_config()
    accum = int(cfg.train.grad_accum)
    validate(cfg, mesh={"data": 1, "fsdp": int(cfg.data.rows_per_batch) // accum, "tensor": 1})
