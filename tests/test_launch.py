"""launch/: the dry-run of tpu.sh (every generated gcloud command for 2-host topologies) and
worker.sh run locally with a fake gcloud; shellcheck when it is installed."""
import json
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TPU = ROOT / "launch" / "tpu.sh"
WORKER = ROOT / "launch" / "worker.sh"


def dry(*args, **env):
    """Run tpu.sh --dry-run; return the printed commands as argv lists (+ stderr)."""
    e = {k: v for k, v in os.environ.items() if k not in (
        "TPU_NAME", "PROJECT", "ZONE", "ACCELERATOR", "BUCKET", "RUN_NAME", "WORKDIR", "CONFIG", "SPOT",
        "RESERVED", "QUEUED", "RUNTIME_VERSION", "COORDINATOR_PORT")}
    e.update({"SGT_CODE_REV": "0123abcd", **env})
    p = subprocess.run(["bash", str(TPU), "--dry-run", *args], capture_output=True, text=True, env=e, timeout=60)
    assert p.returncode == 0, p.stderr
    cmds = [shlex.split(line[2:]) for line in p.stdout.splitlines() if line.startswith("+ ")]
    return cmds, p.stderr


BASE = ["--name", "sgt", "--project", "proj", "--zone", "us-east5-a", "--bucket", "gs://bkt"]


def flag(cmd, name):
    return cmd[cmd.index(name) + 1]


def test_create_tpu_vm_and_queued_resource():
    cmds, err = dry(*BASE, "--accelerator", "v5p-16", "--spot", "create")
    assert cmds == [["gcloud", "--project", "proj", "compute", "tpus", "tpu-vm", "create", "sgt", "--zone",
                     "us-east5-a", "--accelerator-type", "v5p-16", "--version", "v2-alpha-tpuv5", "--spot"]]
    assert "2 host(s) per slice" in err
    cmds, _ = dry(*BASE, "--accelerator", "v6e-64", "--queued", "--reserved", "create")
    c = cmds[0]
    assert c[:7] == ["gcloud", "--project", "proj", "compute", "tpus", "queued-resources", "create"]
    assert flag(c, "--accelerator-type") == "v6e-64" and flag(c, "--runtime-version") == "v2-alpha-tpuv6e"
    assert flag(c, "--node-id") == "sgt" and "--reserved" in c
    assert cmds[1][5:8] == ["queued-resources", "describe", "sgt"]          # wait until ACTIVE


def test_two_slice_queued_resource_and_delete():
    cmds, _ = dry(*BASE, "--accelerator", "2xv5e-4", "create")
    c = cmds[0]
    assert "queued-resources" in c and flag(c, "--accelerator-type") == "v5litepod-4"
    assert flag(c, "--node-count") == "2" and flag(c, "--node-prefix") == "sgt"
    assert flag(c, "--runtime-version") == "v2-alpha-tpuv5-lite"
    cmds, _ = dry(*BASE, "--accelerator", "2xv5e-4", "delete")
    assert cmds == [["gcloud", "--project", "proj", "compute", "tpus", "queued-resources", "delete", "sgt",
                     "--zone", "us-east5-a", "--force", "--quiet"]]
    cmds, _ = dry(*BASE, "--accelerator", "v4-16", "delete")
    assert cmds[0][4:8] == ["tpus", "tpu-vm", "delete", "sgt"]


def test_setup_ships_head_and_pins_versions_on_all_workers():
    cmds, err = dry(*BASE, "--accelerator", "v5p-16", "setup")
    assert cmds[0][:3] == ["git", "-C", str(ROOT)] and cmds[0][3] == "archive"
    assert cmds[1] == ["gcloud", "storage", "cp", "/tmp/sgt-jax-0123abcd.tar.gz", "gs://bkt/code/sgt-jax-0123abcd.tar.gz"]
    ssh = cmds[2]
    assert ssh[4:8] == ["tpus", "tpu-vm", "ssh", "sgt"] and "--worker=all" in ssh
    remote = flag(ssh, "--command")
    assert "python3.11 -m venv ~/sgt-venv" in remote
    assert "gs://bkt/code/sgt-jax-0123abcd.tar.gz" in remote
    assert "-r ~/sgt-jax/requirements.txt -r ~/sgt-jax/requirements-tpu.txt" in remote
    assert "pip freeze | sha256sum" in remote and "SGT_VERSIONS" in remote
    assert "identical" not in err and "0.10.2 0.10.2 0.0.42.1" in err      # the version check ran


def test_train_on_two_hosts_sets_the_coordinator():
    cmds, _ = dry(*BASE, "--accelerator", "v5p-16", "--run", "r1", "--set-env", "LIBTPU_INIT_ARGS=--xla_foo=1 --xla_bar=2",
                  "train", "--", "train.steps=10", "--config.mesh.tensor=4")
    describe, ssh = cmds
    assert describe[4:8] == ["tpus", "tpu-vm", "describe", "sgt"]
    assert flag(describe, "--format") == "value(networkEndpoints[0].ipAddress)"
    assert "--worker=all" in ssh
    remote = shlex.split(flag(ssh, "--command"))
    env = remote[remote.index("env") + 1:remote.index("bash")]
    assert "JAX_COORDINATOR_ADDRESS=WORKER0_IP:8476" in env and "SGT_RUN=r1" in env
    assert "LIBTPU_INIT_ARGS=--xla_foo=1 --xla_bar=2" in env
    assert "JAX_COMPILATION_CACHE_DIR=gs://bkt/runs/r1/xla_cache" in env   # restarts reuse the compiled step
    assert not any(e.startswith("MEGASCALE") for e in env)
    job = remote[remote.index("--") + 1:]
    assert job[:3] == ["~/sgt-venv/bin/python", "-m", "sgt_jax.train"]
    assert flag(job, "--workdir") == "gs://bkt/runs/r1" and flag(job, "--config") == "configs/sgt_bagel_7b.py"
    assert "--config.train.steps=10" in job and "--config.mesh.tensor=4" in job
    assert remote[:2] == ["cd", "~/sgt-jax"] and remote[remote.index("bash") + 1] == "launch/worker.sh"
    assert flag(remote, "--gcs-logs") == "gs://bkt/runs/r1/logs" and flag(remote, "--log-dir") == "~/sgt-logs/r1"
    assert "nohup" in remote and "setsid" in remote      # detached: ssh returns at once


def test_xla_cache_can_be_moved_or_turned_off():
    for value, want in (("gs://bkt/cache", "JAX_COMPILATION_CACHE_DIR=gs://bkt/cache"), ("", None)):
        cmds, _ = dry(*BASE, "--accelerator", "v5p-8", "--run", "r1", "--xla-cache", value, "train")
        remote = shlex.split(flag(cmds[-1], "--command"))
        env = remote[remote.index("env") + 1:remote.index("bash")]
        got = [e for e in env if e.startswith("JAX_COMPILATION_CACHE_DIR=")]
        assert got == ([want] if want else []), env


def test_run_on_two_single_host_slices_sets_megascale():
    cmds, err = dry(*BASE, "--accelerator", "2xv6e-8", "run", "--", "python", "-c", "print('hi there')")
    describe, ssh0, ssh1 = cmds
    assert describe[7] == "sgt-0"
    for i, ssh in enumerate((ssh0, ssh1)):
        assert ssh[7] == f"sgt-{i}" and "--worker=all" in ssh
        remote = shlex.split(flag(ssh, "--command"))
        env = remote[remote.index("env") + 1:remote.index("bash")]
        assert "JAX_COORDINATOR_ADDRESS=WORKER0_IP:8476" in env
        assert {"MEGASCALE_COORDINATOR_ADDRESS=WORKER0_IP", "MEGASCALE_NUM_SLICES=2", f"MEGASCALE_SLICE_ID={i}",
                "MEGASCALE_PORT=8081"} <= set(env)
        assert flag(remote, "--slice") == str(i)
        assert remote[remote.index("--") + 1:remote.index("--") + 4] == ["python", "-c", "print('hi there')"]
    assert "started on 2 worker(s)" in err


def test_babysit_dry_run_creates_sets_up_and_trains_once():
    cmds, _ = dry(*BASE, "--accelerator", "v5p-16", "babysit", "--", "train.steps=5")
    verbs = [" ".join(c[4:7]) for c in cmds if c[0] == "gcloud" and c[3] == "compute"]
    assert verbs == ["tpus tpu-vm describe", "tpus tpu-vm create", "tpus tpu-vm ssh", "tpus tpu-vm describe",
                     "tpus tpu-vm ssh", "tpus tpu-vm ssh"]
    assert "exit_code" in flag(cmds[-1], "--command") and "--worker=all" in cmds[-1]    # every worker


FAKE_GCLOUD = r'''#!/usr/bin/env python3
"""gcloud for babysit tests: logs every call; describe answers the next TPU state of FAKE/states
(READY when none is left) or an IP; an ssh that asks for exit codes answers the next block of
FAKE/exits (blocks separated by '---'); setup's version probe gets one version line."""
import json, os, sys
d, args = os.environ["FAKE"], sys.argv[1:]
with open(os.path.join(d, "calls"), "a") as f:
    f.write(json.dumps(args) + "\n")

def pop(name, default):
    path = os.path.join(d, name)
    blocks = [b for b in open(path).read().split("---\n") if b.strip()] if os.path.exists(path) else []
    if not blocks:
        return default
    open(path, "w").write("---\n".join(blocks[1:]))
    return blocks[0].strip()

if "describe" in args:
    fmt = args[args.index("--format") + 1]
    print("10.0.0.2" if "ipAddress" in fmt else pop("states", "READY"))
elif "ssh" in args:
    cmd = args[args.index("--command") + 1]
    if "SGT_VERSIONS" in cmd:
        print("SGT_VERSIONS 0.10.2 0.10.2 0.0.42.1 0123456789abcdef")
    elif "SGT_EXIT" in cmd:
        print(pop("exits", "SGT_EXIT 0 running"))
'''


def babysit(tmp_path, *args, states=(), exits=(), ok=True):
    """Run ``tpu.sh babysit`` (not a dry run) against the fake gcloud (and a no-op git), polling
    without sleeping; ``states``: the TPU states describe reports in turn; ``exits``: per poll,
    {worker: exit code or 'running'}. Returns (the gcloud calls, stderr)."""
    fake = tmp_path / "fake"
    (fake / "bin").mkdir(parents=True)
    (fake / "bin" / "gcloud").write_text(FAKE_GCLOUD)
    (fake / "bin" / "git").write_text("#!/bin/sh\n")
    for f in ("gcloud", "git"):
        (fake / "bin" / f).chmod(0o755)
    (fake / "states").write_text("---\n".join(states) + "\n")
    (fake / "exits").write_text("---\n".join(
        "\n".join(f"SGT_EXIT {w} {c}" for w, c in poll.items()) + "\n" for poll in exits))
    e = {k: v for k, v in os.environ.items() if k not in ("TPU_NAME", "QUEUED", "SPOT", "WORKDIR", "SGT_DRY_RUN")}
    e.update(FAKE=str(fake), PATH=f"{fake / 'bin'}:{os.environ['PATH']}", SGT_CODE_REV="0123abcd", POLL="0")
    p = subprocess.run(["bash", str(TPU), *BASE, *args, "babysit", "--", "train.steps=5"],
                       capture_output=True, text=True, env=e, timeout=120)
    assert (p.returncode == 0) == ok, p.stderr
    calls = [json.loads(x) for x in (fake / "calls").read_text().splitlines()]
    return calls, p.stderr


def _kinds(calls):
    """Each call as a short word: state, create, delete, setup, train, poll, stop."""
    out = []
    for c in calls:
        cmd = flag(c, "--command") if "--command" in c else ""
        if "describe" in c:
            out.append("ip" if "ipAddress" in flag(c, "--format") else "state")
        elif "create" in c or "delete" in c:
            out.append("create" if "create" in c else "delete")
        elif "SGT_VERSIONS" in cmd:
            out.append("setup")
        elif "sgt_jax.train" in cmd:
            out.append("train")
        elif "SGT_EXIT" in cmd:
            out.append("poll")
        elif "kill -KILL" in cmd:
            out.append("stop")
        elif c[:2] != ["storage", "cp"] and c[2:4] != ["storage", "cp"]:
            out.append(" ".join(c))
    return [k for k in out if k != "ip"]


def test_babysit_restarts_the_job_when_a_worker_dies_while_worker_0_runs(tmp_path):
    running = {w: "running" for w in range(4)}
    calls, err = babysit(tmp_path, "--accelerator", "v5p-32", exits=[
        running, {**running, 3: 137}, {w: 0 for w in range(4)}])
    assert _kinds(calls) == ["state", "train", "poll", "state", "poll", "stop", "state", "train", "poll"], _kinds(calls)
    assert "worker 3 of slice 0 exited with 137 on a healthy TPU: stopping every worker and restarting the job " \
           "(restart 1 of 5)" in err, err
    stop = [c for c in calls if "--command" in c and "kill -KILL" in flag(c, "--command")][0]
    assert "--worker=all" in stop and "kill -TERM" in flag(stop, "--command")
    assert "training finished (every worker exited 0)" in err


def test_babysit_waits_for_every_worker_and_gives_up_after_max_restarts(tmp_path):
    # worker 0 done early is not the end of the job; worker 1 failing twice is too many
    calls, err = babysit(tmp_path, "--accelerator", "v5p-16", "--max-restarts", "1", ok=False, exits=[
        {0: 0, 1: "running"}, {0: 0, 1: 1}, {0: 1, 1: "running"}])
    assert _kinds(calls) == ["state", "train", "poll", "state", "poll", "stop", "state", "train", "poll"], _kinds(calls)
    assert "worker 1 of slice 0 exited with 1" in err and "worker 0 of slice 0 exited with 1" in err
    assert "giving up after 1 restarts" in err


@pytest.mark.parametrize("queued,state", [(False, "PREEMPTED"), (True, "SUSPENDED")])
def test_babysit_recreates_a_preempted_tpu_or_queued_resource(tmp_path, queued, state):
    up = "ACTIVE" if queued else "READY"
    # the job runs, the TPU is preempted, re-created (a queued resource: waited for until ACTIVE),
    # set up, and the job started again; it then finishes
    states = [up, state] + (["ACTIVE"] if queued else [])
    calls, err = babysit(tmp_path, "--accelerator", "v5p-16", "--spot", *(["--queued"] if queued else []),
                         states=states, exits=[{0: "running", 1: "running"}, {0: 0, 1: 0}])
    want = ["state", "train", "poll", "state", "delete", "create"] + (["state"] if queued else []) + \
           ["setup", "train", "poll"]
    assert _kinds(calls) == want, _kinds(calls)
    assert f"sgt is {state}: deleting and re-creating it" in err, err
    kind = "queued-resources" if queued else "tpu-vm"
    create = [c for c in calls if "create" in c][0]
    assert kind in create and "--spot" in create
    delete = [c for c in calls if "delete" in c][0]
    assert kind in delete and ("--force" in delete) == queued


def test_logs_stop_status():
    cmds, _ = dry(*BASE, "--accelerator", "v5p-16", "--worker", "1", "logs")
    assert "--worker=1" in cmds[0] and flag(cmds[0], "--command") == "tail -n 200 -F ~/sgt-logs/sgt/worker-1.log"
    cmds, _ = dry(*BASE, "--accelerator", "v5p-16", "stop")
    assert "--worker=all" in cmds[0] and "kill -TERM" in flag(cmds[0], "--command")
    cmds, _ = dry(*BASE, "--accelerator", "v5p-16", "status")
    assert cmds[0][6] == "describe" and "exit_code" in flag(cmds[1], "--command")


def test_bad_arguments_fail_clearly():
    e = dict(os.environ, SGT_CODE_REV="x")
    p = subprocess.run(["bash", str(TPU), "--dry-run", *BASE, "--accelerator", "v9-8", "create"],
                       capture_output=True, text=True, env=e)
    assert p.returncode != 0 and "unknown accelerator" in p.stderr
    p = subprocess.run(["bash", str(TPU), "--dry-run", "--zone", "z", "--accelerator", "v5p-8", "create"],
                       capture_output=True, text=True, env={k: v for k, v in e.items() if k != "TPU_NAME"})
    assert p.returncode != 0 and "TPU_NAME" in p.stderr


@pytest.mark.parametrize("acc,hosts", [("v5p-8", 1), ("v5p-16", 2), ("v5p-64", 8), ("v4-32", 4), ("v6e-8", 1),
                                       ("v6e-64", 16), ("v5litepod-16", 4), ("v5e-4", 1)])
def test_hosts_per_slice(acc, hosts):
    out = subprocess.run(["bash", "-c", f"source {ROOT}/launch/lib.sh; hosts_per_slice {acc}"],
                         capture_output=True, text=True, check=True).stdout
    assert int(out) == hosts


def test_worker_runs_logs_syncs_and_records_exit_code(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    calls = tmp_path / "gcloud_calls"
    (fake / "gcloud").write_text(f'#!/usr/bin/env bash\necho "$@" >> {calls}\n')
    (fake / "gcloud").chmod(0o755)
    logs = tmp_path / "logs"
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", SGT_WORKER_ID="1", SGT_LOG_SYNC="1",
               JAX_COORDINATOR_ADDRESS="10.0.0.2:8476")
    p = subprocess.run(["bash", str(WORKER), "--log-dir", str(logs), "--gcs-logs", "gs://bkt/runs/r/logs",
                        "--slice", "0", "--", "bash", "-c", "echo hello from the job; sleep 1.5; exit 3"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 3, p.stderr
    log = (logs / "worker-1.log").read_text()
    assert "hello from the job" in log and "JAX_COORDINATOR_ADDRESS=10.0.0.2:8476" in log and "exit 3" in log
    assert (logs / "exit_code").read_text().strip() == "3"
    assert not (logs / "pid").exists()
    assert f"storage cp {logs}/worker-1.log gs://bkt/runs/r/logs/slice-0-worker-1.log" in calls.read_text()


def test_worker_forwards_sigterm(tmp_path):
    logs = tmp_path / "logs"
    env = dict(os.environ, SGT_WORKER_ID="0")
    job = "trap 'echo got-term; exit 42' TERM; for i in $(seq 100); do sleep 0.1; done"
    p = subprocess.Popen(["bash", str(WORKER), "--log-dir", str(logs), "--", "bash", "-c", job], env=env)
    for _ in range(100):
        if (logs / "pid").exists():
            break
        time.sleep(0.1)
    time.sleep(0.5)                         # let the job install its trap
    p.terminate()
    assert p.wait(timeout=30) == 42
    assert "got-term" in (logs / "worker-0.log").read_text()
    assert (logs / "exit_code").read_text().strip() == "42"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed (apt-get install shellcheck)")
def test_shellcheck_clean():
    files = sorted(str(f) for f in (ROOT / "launch").glob("*.sh"))
    p = subprocess.run(["shellcheck", "-x", *files], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
