"""Checkpoints under faults: a damaged latest step is reported in one line naming the file, moved
aside and the run continues from the previous good step exactly as an uninterrupted run; a
changed run config is refused (identity keys) or applied (cadence keys); a failed save (disk
full) stops the run at once with the previous checkpoints intact; metrics rows stay unique."""
import json
import logging
import os
import shutil
import signal
import subprocess

import jax
import numpy as np
import pytest
import tensorstore as ts

from fake_data import FakeIterator
from test_train import _final_params, _losses, _worker, tiny_run_config
from sgt_jax.parallel import mesh as mesh_lib
from sgt_jax.train import loop
from sgt_jax.train.checkpoint import CheckpointError, ConfigChangeError

STEPS, EVERY = 6, 2          # checkpoints at 2, 4, 6; the damage is done to step 6


def _cfg(**kw):
    return tiny_run_config(steps=STEPS, save_every=EVERY, **kw)


def _train(wd, cfg=None, **kw):
    """In-process runs on one of the 8 fake devices: these tests are about checkpoints, and XLA:CPU
    ran out of pool threads for the fake devices' collectives: see NPROC in conftest.py."""
    cfg = cfg or _cfg()
    mesh = mesh_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    return loop.train(cfg, str(wd), data_iterator=FakeIterator(cfg, rows=8), mesh=mesh, **kw)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """An uninterrupted run: its losses by step and its step-6 parameters."""
    wd = tmp_path_factory.mktemp("ref") / "run"
    s = _train(wd)
    assert s["steps"] == STEPS
    return {"wd": wd, "losses": _losses(wd), "params": _final_params(wd, STEPS)}


def _copy(ref, tmp_path):
    wd = tmp_path / "run"
    shutil.copytree(ref["wd"], wd)
    return wd


def _values(state_dir):
    """(key, data file, offset, length) of every array chunk stored outside the OCDBT index
    (read with tensorstore's own dump)."""
    kv = ts.KvStore.open("file://" + str(state_dir) + "/").result()
    root = ts.ocdbt.dump(kv).result()["versions"][-1]["root"]["location"]
    out = []
    for e in ts.ocdbt.dump(kv, root).result()["entries"]:
        if "indirect_value" in e:
            head, off, n = e["indirect_value"].rsplit(":", 2)
            _, base, name = head.split(":", 2)
            out.append((e["key"].decode(), base + name, int(off), int(n)))
    return out


def _biggest_file(state):
    d = state / "ocdbt.process_0" / "d"
    return max(d.iterdir(), key=lambda p: p.stat().st_size)


def _damage(kind, step_dir):
    """Damage one step; returns the name the one-line report must contain."""
    state = step_dir / "state"
    if kind in ("truncated", "deleted", "zeroed"):
        f = _biggest_file(state)
        size = f.stat().st_size
        if kind == "truncated":
            os.truncate(f, size // 3)
        elif kind == "deleted":
            f.unlink()
        else:
            f.write_bytes(b"\0" * size)
        return f.name
    if kind == "zeroed_mid_file":
        # an array's bytes zeroed inside a file whose first value is intact: only the restore sees it
        vals = _values(state)
        firsts = {}
        for key, f, off, n in vals:
            firsts[f] = min(firsts.get(f, off), off)
        key, f, off, n = max((v for v in vals if v[2] > firsts[v[1]]), key=lambda v: v[3])
        with open(state / f, "r+b") as fh:
            fh.seek(off)
            fh.write(b"\0" * n)
        return os.path.basename(f)
    if kind == "manifest":
        (state / "manifest.ocdbt").unlink()
        return "state/manifest.ocdbt"
    if kind == "metadata":
        (state / "_METADATA").unlink()
        return "state/_METADATA"
    if kind == "data_json":
        p = step_dir / "data" / "metadata"
        os.truncate(p, p.stat().st_size // 2)
        return "data/metadata"
    if kind == "emptied":
        for p in step_dir.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        return f"checkpoints/{step_dir.name}: empty"
    raise ValueError(kind)


def _assert_same_as_ref(ref, wd, s):
    assert s["steps"] == STEPS
    got = {h["step"]: h["loss"] for h in s["history"]}
    assert sorted(got) == [5, 6]                          # resumed from step 4
    assert all(got[k] == ref["losses"][k] for k in got), (got, ref["losses"])     # fp32 on CPU: bitwise
    p = _final_params(wd, STEPS)
    assert p.keys() == ref["params"].keys()
    assert all(np.array_equal(p[k], ref["params"][k]) for k in p)
    steps = [json.loads(x)["step"] for x in open(wd / "metrics.jsonl")]
    assert steps == list(range(1, STEPS + 1)), steps      # rows of steps 5, 6 logged once


@pytest.mark.parametrize("kind", ["truncated", "deleted", "zeroed", "zeroed_mid_file", "manifest", "metadata",
                                  "data_json", "emptied"])
def test_damaged_latest_step_falls_back_to_the_previous_one(ref, tmp_path, caplog, kind):
    wd = _copy(ref, tmp_path)
    name = _damage(kind, wd / "checkpoints" / str(STEPS))
    with caplog.at_level(logging.WARNING, logger="sgt_jax.train"):
        s = _train(wd)
    lines = [r.getMessage() for r in caplog.records if f"checkpoint step {STEPS} unusable" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert name in lines[0] and "checkpoints/6" in lines[0], lines[0]
    # moved aside, never deleted; the run continued from step 4 and wrote a new step 6
    moved = wd / "checkpoints" / f"{STEPS}.damaged-1"
    assert moved.is_dir() and (wd / "checkpoints" / str(STEPS)).is_dir()
    _assert_same_as_ref(ref, wd, s)


def test_resumes_a_step_written_before_per_process_data_files(ref, tmp_path):
    """A step of a single-process run from before ``data/process_<i>.json`` existed (the iterator
    state in ``data/metadata``) still resumes, exactly."""
    wd = _copy(ref, tmp_path)
    shutil.rmtree(wd / "checkpoints" / str(STEPS))
    data = wd / "checkpoints" / str(STEPS - EVERY) / "data"
    (data / "metadata").write_text((data / "process_0.json").read_text())
    (data / "process_0.json").unlink()
    _assert_same_as_ref(ref, wd, _train(wd))


def test_no_good_step_stops_without_starting_over(ref, tmp_path):
    wd = _copy(ref, tmp_path)
    for st in (2, 4, 6):
        (wd / "checkpoints" / str(st) / "state" / "_METADATA").unlink()
    before = sorted(os.listdir(wd / "checkpoints"))
    for _ in range(2):                    # and the same again on a rerun: nothing was moved
        with pytest.raises(CheckpointError, match="no usable checkpoint") as e:
            _train(wd)
        assert all(f"step {st}: checkpoints/{st}/state/_METADATA: missing" in str(e.value) for st in (2, 4, 6))
        assert sorted(os.listdir(wd / "checkpoints")) == before
    # steps moved aside earlier and nothing else: still no start from step 0
    for st in (2, 4, 6):
        os.rename(wd / "checkpoints" / str(st), wd / "checkpoints" / f"{st}.damaged-1")
    with pytest.raises(CheckpointError, match="only steps moved aside as damaged"):
        _train(wd)
    assert [json.loads(x)["step"] for x in open(wd / "metrics.jsonl")] == list(range(1, STEPS + 1))


def test_changed_identity_is_refused_with_a_diff_table(ref, tmp_path):
    wd = _copy(ref, tmp_path)
    compiles = loop.compile_count("sgt_train_step")
    cfg = _cfg(seed=1)
    cfg.model.llm.intermediate_size = 96
    with pytest.raises(ConfigChangeError) as e:
        _train(wd, cfg)
    msg = str(e.value)
    assert "model.llm.intermediate_size  128" in msg and "96" in msg and "train.seed" in msg, msg
    assert "--config.train.allow_config_change=model.llm.intermediate_size,train.seed" in msg
    assert loop.compile_count("sgt_train_step") == compiles
    assert sorted(os.listdir(wd / "checkpoints")) == ["2", "4", "6"]    # a refusal is not damage

    # allowed deliberately: the seed change resumes; a shape change cannot restore and says so
    cfg = _cfg(seed=1, allow_config_change="train.seed")
    assert _train(wd, cfg)["steps"] == STEPS
    cfg.model.llm.intermediate_size = 96
    cfg.train.allow_config_change = "train.seed,model.llm"
    with pytest.raises(CheckpointError, match="does not restore into the changed config"):
        _train(wd, cfg)
    assert sorted(os.listdir(wd / "checkpoints")) == ["2", "4", "6"]


@pytest.mark.parametrize("change,logged", [
    (dict(log_every=2, keep=2), ["train.log_every: 1 -> 2 (applied)", "train.keep: 3 -> 2 (applied)"]),
    pytest.param(dict(lr=2e-3, log_every=2), ["train.lr: 0.001 -> 0.002 (applied)"],
                 marks=pytest.mark.slow),          # lr is baked into the step: a second compile
])
def test_changed_cadence_is_applied_and_logged(ref, tmp_path, caplog, change, logged):
    wd = _copy(ref, tmp_path)
    shutil.rmtree(wd / "checkpoints" / "6")           # as if killed after step 6's row, before its save
    cfg = _cfg(**change)
    with caplog.at_level(logging.WARNING, logger="sgt_jax.train"):
        s = _train(wd, cfg)
    msgs = "\n".join(r.getMessage() for r in caplog.records)
    assert all(x in msgs for x in logged), msgs
    assert [h["step"] for h in s["history"]] == [6]   # one row per 2 steps now
    assert s["history"][0]["lr"] == pytest.approx(cfg.train.lr)
    steps = [json.loads(x)["step"] for x in open(wd / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 6]                   # cut back to step 4, then step 6's window
    if "keep" in change:
        assert sorted(os.listdir(wd / "checkpoints")) == ["4", "6"]


def _mount_tmpfs(path, size):
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


@pytest.mark.slow
def test_disk_full_stops_at_once_and_keeps_previous_checkpoints(tmp_path):
    """A real ENOSPC: the run's workdir on an 8 MiB tmpfs (a checkpoint of the tiny run is ~4.5
    MiB: step 1 fits, step 3 does not while step 1 is kept). The trainer (a subprocess, as a user
    runs it) stops at the failed save with one line, keeps step 1, and resumes from it once the
    disk has room."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "8m"):
        pytest.skip("cannot mount a tmpfs here (needs root); test_save_error_from_a_file_size_limit covers it")
    try:
        wd = disk / "run"
        r = _worker(wd, 9, "--save-every", 3)
        assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
        err = [x for x in r.stdout.splitlines() if x.startswith("ERROR ")]
        assert len(err) == 1, r.stdout[-3000:]
        msg = err[0]
        assert "checkpoint of step 3 not written: no space left on device" in msg, msg
        assert "checkpoints/3.orbax-checkpoint-tmp" in msg and "MiB free" in msg and "needs about" in msg, msg
        assert "checkpoint 1 is intact; rerun to resume from step 1" in msg, msg
        assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == ["1"]       # the partial step removed
        assert len(r.stdout.splitlines()) + len(r.stderr.splitlines()) < 40, r.stderr[-5000:]   # no flood
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        r = _worker(wd, 9, "--save-every", 3)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "1/9 [" in r.stderr                    # the bar starts at the restored step
        assert sorted(p.name for p in (wd / "checkpoints").iterdir() if p.name.isdigit())[-1] == "9"
        assert [json.loads(x)["step"] for x in open(wd / "metrics.jsonl")] == list(range(1, 10))
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.mark.slow
def test_save_error_from_a_file_size_limit(tmp_path):
    """Fault injection without privileges: RLIMIT_FSIZE set once step 3's checkpoint is written
    makes the next save (step 6) fail (EFBIG) inside Orbax's background thread."""
    wd = tmp_path / "run"
    r = _worker(wd, 12, "--save-every", 3, "--sleep", 0.3, "--fsize-limit-at", 5)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    err = [x for x in r.stdout.splitlines() if x.startswith("ERROR ")]
    assert len(err) == 1 and "checkpoint of step 6 not written" in err[0] and "File too large" in err[0], err
    assert "checkpoints 1, 3 are intact" in err[0]
    assert sorted(p.name for p in (wd / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "3"]
    assert len(r.stdout.splitlines()) + len(r.stderr.splitlines()) < 40, r.stderr[-5000:]   # no flood
    r = _worker(wd, 6)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.slow
def test_metrics_rows_unique_after_sigkill_and_resume(tmp_path):
    wd = tmp_path / "run"
    r = _worker(wd, 8, "--kill-at", 7, "--save-every", 4)   # rows 5, 6 logged after the last checkpoint (4)
    assert r.returncode == -signal.SIGKILL
    r = _worker(wd, 8, "--save-every", 4)
    assert r.returncode == 0, r.stdout + r.stderr
    steps = [json.loads(x)["step"] for x in open(wd / "metrics.jsonl")]
    assert steps == list(range(1, 9)), steps


def test_export_reads_through_the_checkpointer(ref, tmp_path):
    """The exporter restores with the same Checkpointer: a damaged step is one clear error."""
    from sgt_jax.train.export import checkpoint_to_model_dir

    wd = _copy(ref, tmp_path)
    name = _damage("truncated", wd / "checkpoints" / str(STEPS))
    with pytest.raises(CheckpointError, match=f"checkpoint step 6: checkpoints/6/state/.*{name}: truncated"):
        checkpoint_to_model_dir(str(wd), str(tmp_path / "out"))
