"""Orbax checkpoints of a run under ``WORKDIR/checkpoints``: one ``Checkpointer`` owns the tree.

A step ``checkpoints/<step>/`` holds three items: ``state`` (the TrainState -- params, optimizer
state, EMA, step, NaN counters -- plus the frozen parameters and the VAE, so a run resumes
without its ``init_from``), ``data`` (the data iterators' states: ``data/process_<i>.json``
written by process ``i`` itself, and ``data/metadata`` with the process count, written by
process 0; each process restores its own file) and ``meta`` (the run config). The sin-cos
tables are regenerated.

Orbax writes each step into a temporary directory and renames it only when complete, so a
process killed during a save leaves the previous checkpoint intact. Damage after that (a
truncated, deleted or overwritten file) is caught by ``check``, cheaply: the items present,
the JSON items (every process's data file among them) and Orbax's ``_METADATA`` parseable,
every array of ``_METADATA`` in the OCDBT index, every data file the index points into present,
as long as the index says and starting with a zstd frame where the array is zstd-compressed. ``restore_latest`` tries the newest step
first, then older ones, reporting each failure in one line; a damaged step is moved aside to
``checkpoints/<step>.damaged-<n>`` (never deleted; Orbax's step discovery ignores the name) and
the run continues from the newest good one. With none good it stops, moving nothing.

An asynchronous save that fails (disk full, ...) is reported by ``poll`` at the next step, in
one line naming the file, the space needed and free; the previous checkpoints are untouched
(Orbax deletes old steps only after a new one is committed). The RNG needs no state of its own:
every key derives from (seed, step). Local paths and ``gs://`` URLs both work (orbax/tensorstore).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from sgt_jax import fileio
from sgt_jax.train.step import Consts

log = logging.getLogger("sgt_jax.train")

ITEMS = ("state", "data", "meta")
DAMAGED = re.compile(r"^(\d+)\.damaged-(\d+)$")
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_STATUS = re.compile(r"^[A-Z][A-Z_]{3,}: ")       # a tensorstore / absl status message
# tensorstore status codes that mean the checkpoint's bytes are bad (not: unavailable, denied,
# out of memory, ... -- those, and any other exception, are raised as they are, nothing moved)
_DAMAGE = ("DATA_LOSS", "OUT_OF_RANGE", "FAILED_PRECONDITION", "NOT_FOUND", "INVALID_ARGUMENT")


class CheckpointError(RuntimeError):
    """A checkpoint problem the run cannot continue past; the message names the step, the file
    and what to do."""


class SaveError(CheckpointError):
    pass


class ConfigChangeError(CheckpointError):
    pass


class Damaged(Exception):
    """One step's problem, as one line starting with the file's path."""


@dataclasses.dataclass
class Restored:
    step: int
    state: object          # TrainState
    consts: Consts         # fixed=None: the tables are regenerated (Program.fixed), not stored
    data: dict             # the data item: {"iterator": ..., "stats": ...}
    meta: dict


class DataHandler(ocp.AsyncCheckpointHandler):
    """The ``data`` item: every process writes its own iterator state, ``process_<i>.json``, and
    process 0 the process count, ``metadata``; a restore reads the calling process's file."""

    def save(self, directory, args: "DataSave"):
        i = jax.process_index()
        (directory / f"process_{i}.json").write_text(json.dumps(args.item))
        if i == 0:
            (directory / "metadata").write_text(json.dumps({"process_count": jax.process_count()}))

    async def async_save(self, directory, args: "DataSave"):
        async def write():
            self.save(directory, args)
        # runs once Orbax signals that the step's directories exist (on every process)
        return [ocp.future.CommitFutureAwaitingContractedSignals(write(), name="sgt_data_save")]

    def restore(self, directory, args: "DataRestore | None" = None) -> dict:
        own = directory / f"process_{jax.process_index()}.json"
        if not own.exists():          # a checkpoint from before per-process files: one process
            return json.loads((directory / "metadata").read_text())
        return json.loads(own.read_text())


@ocp.args.register_with_handler(DataHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
    item: dict


@ocp.args.register_with_handler(DataHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
    pass


def config_json(cfg) -> dict:
    return json.loads(cfg.to_json_best_effort())


def _tree(state, consts) -> dict:
    """The ``state`` item: the train state and the constants worth storing."""
    return {"train": state, "frozen": consts.frozen, "vae": consts.vae}


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _chain(e: BaseException):
    seen = []
    while e is not None and e not in seen:
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen


def _summary(e: BaseException) -> str:
    """The most specific line of an exception chain: tensorstore's status message (without the
    spec dump) if there is one."""
    msgs = [str(x) for x in _chain(e)]
    ts = [m for m in msgs if _STATUS.match(m)]
    m = (ts[-1] if ts else msgs[-1] if msgs and msgs[-1] else type(e).__name__)
    m = re.split(r" \[(?:tensorstore_spec|source locations)", m)[0]
    m = m.replace("\n", " ").strip()
    return m if len(m) <= 400 else m[:397] + "..."


def _is_damage(e: BaseException) -> bool:
    for x in _chain(e):
        if isinstance(x, json.JSONDecodeError) or any(str(x).startswith(c + ":") for c in _DAMAGE):
            return True
    return False


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


_ORBAX = f"{os.sep}orbax{os.sep}"


def _quiet_failed_saves():
    """After a failed asynchronous save (or restore), Orbax's threads log the error with its
    traceback, tensorstore futures finishing late call into closed asyncio loops (hundreds of
    'Event loop is closed') and Orbax's orphaned write coroutines die at exit, each with a
    traceback; the run reports the failure itself in one line. Drop exactly that output."""
    if getattr(sys.unraisablehook, "_sgt_jax", False):
        return
    previous = sys.unraisablehook

    def hook(u):
        if isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed":
            return
        code = getattr(u.object, "cr_code", None)
        if _FAILED_SAVE and code is not None and _ORBAX in code.co_filename:
            return
        previous(u)

    hook._sgt_jax = True
    sys.unraisablehook = hook

    def orbax_thread_traceback(record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and record.exc_info is not None
                    and _ORBAX in record.pathname)

    def orbax_task_exception(record: logging.LogRecord) -> bool:      # asyncio: "never retrieved"
        return not (_FAILED_SAVE and "orbax" in record.getMessage())

    logging.getLogger("absl").addFilter(orbax_thread_traceback)
    logging.getLogger("asyncio").addFilter(orbax_task_exception)


_FAILED_SAVE = []          # non-empty once a save failed in this process


class Checkpointer:
    def __init__(self, directory: str, *, save_every: int = 1, keep: int = 1, async_save: bool = True):
        _quiet_failed_saves()
        self.directory = fileio.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, save_interval_steps=save_every, create=True,
                enable_async_checkpointing=async_save),
            item_names=ITEMS)
        self._pending = None        # (step, bytes) of the save in flight
        self._failed = False        # a save failed (reported): nothing more to wait for

    # -- names ---------------------------------------------------------------------------------

    def step_dir(self, step: int) -> str:
        return fileio.join(self.directory, str(step))

    def rel(self, path: str) -> str:
        """A path as ``checkpoints/...`` for messages."""
        base = fileio.dirname(self.directory)
        return path[len(base):].lstrip("/") if path.startswith(base) else path

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def damaged(self) -> list[str]:
        """Step dirs moved aside as damaged (``<step>.damaged-<n>``)."""
        names = fileio.listdir(self.directory) if fileio.isdir(self.directory) else []
        return sorted((n for n in names if DAMAGED.match(n)), key=lambda n: tuple(map(int, DAMAGED.match(n).groups())))

    # -- save ----------------------------------------------------------------------------------

    def save(self, step: int, state, consts, data_state: dict, meta: dict, *, force: bool = False) -> bool:
        if self._pending is not None and (force or self.manager.should_save(step)):
            self._finish()          # Orbax waits for the previous save too; a failure there is its own
        tree = _tree(state, consts)
        nbytes = sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(tree))
        try:
            saved = self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(tree),
                data=DataSave(data_state),
                meta=ocp.args.JsonSave(meta)), force=force)
        except Exception as e:      # noqa: BLE001 -- a synchronous save (or the previous one) failed
            self._failed = True
            raise SaveError(self._save_failure(step, nbytes, e)) from None
        if saved:
            self._pending = (step, nbytes)
        return saved

    def poll(self):
        """Raise SaveError at once if the last asynchronous save failed (no wait otherwise)."""
        if self._pending is None or self.manager.is_saving_in_progress():
            return
        self._finish()

    def _finish(self):
        pending, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:      # noqa: BLE001 -- any failure of the background save
            self._failed = True
            step, nbytes = pending or (None, 0)
            raise SaveError(self._save_failure(step, nbytes, e)) from None

    def _save_failure(self, step, nbytes: int, e: BaseException) -> str:
        _FAILED_SAVE.append(step)
        msg = _summary(e).replace(fileio.dirname(self.directory).rstrip("/") + "/", "")    # checkpoints/...
        for tmp in fileio.glob(fileio.join(self.directory, f"{step}.orbax-checkpoint-tmp*")):
            try:                      # an unfinished step, never a checkpoint: its space back
                fileio.rmtree(tmp)    # (best effort: Orbax's orphaned writes may still add files)
            except OSError:
                pass
        self.manager.reload()
        good = self.steps()
        intact = f"checkpoint {good[0]} is intact" if len(good) == 1 else \
            f"checkpoints {', '.join(map(str, good))} are intact"
        after = f"{intact}; rerun to resume from step {good[-1]}" if good else "no earlier checkpoint exists"
        full = any("No space left" in str(x) or "os_error_code='28'" in str(x) or
                   getattr(x, "errno", None) == 28 for x in _chain(e))
        if not full:
            return f"checkpoint of step {step} not written: {msg}; {after}"
        where = (re.findall(r'Failed writing: "([^"]+)"', msg) or re.findall(r'file "([^"]+)"', msg)
                 or [str(x.filename) for x in _chain(e) if getattr(x, "filename", None)]
                 or [fileio.join(self.directory, f"{step}.orbax-checkpoint-tmp")])
        where = [self.rel(w.split(".orbax-checkpoint-tmp")[0] + ".orbax-checkpoint-tmp/...") if "tmp" in w
                 else self.rel(w) for w in where]
        need = nbytes
        if good and not fileio.is_remote(self.directory):
            d = self.step_dir(good[-1])
            need = sum(os.path.getsize(os.path.join(d, f)) for f in fileio.walk_files(d))
        free = (f", {_human(shutil.disk_usage(self.directory).free)} free"
                if not fileio.is_remote(self.directory) else "")
        return (f"checkpoint of step {step} not written: no space left on device writing "
                f"{where[0]} (a checkpoint needs about {_human(need)}"
                f"{free}; saving needs room for train.keep + 1 of them); {after} after freeing space "
                f"or lowering train.keep")

    def wait(self):
        if self._pending is not None:
            self._finish()
        elif not self._failed:
            self.manager.wait_until_finished()

    def close(self):
        try:
            self.wait()
        finally:
            try:
                self.manager.close()
            except Exception:  # noqa: BLE001 -- the failed save, already reported as SaveError
                if not self._failed:
                    raise

    # -- integrity -----------------------------------------------------------------------------

    def read_meta(self, step: int) -> dict:
        path = fileio.join(self.step_dir(step), "meta", "metadata")
        meta = self._json(path)
        if not isinstance(meta, dict) or "config" not in meta:
            raise Damaged(f"{self.rel(path)}: no run config in it")
        return meta

    def _json(self, path: str):
        if not fileio.isfile(path):
            raise Damaged(f"{self.rel(path)}: missing")
        try:
            return json.loads(fileio.read_text(path))
        except (ValueError, UnicodeDecodeError) as e:
            raise Damaged(f"{self.rel(path)}: not valid JSON ({e}; {fileio.getsize(path)} bytes)") from None

    def _check_items(self, step: int) -> None:
        d = self.step_dir(step)
        names = set(fileio.listdir(d)) if fileio.isdir(d) else set()
        missing = [i for i in ITEMS if i not in names]
        if missing:
            what = "empty" if not names else f"no {', '.join(i + '/' for i in missing)}"
            raise Damaged(f"{self.rel(d)}: {what} (items {', '.join(ITEMS)} expected)")

    def check(self, step: int) -> None:
        """Raise Damaged (one line) unless step's items look whole; reads no array data except
        four bytes per data file."""
        d = self.step_dir(step)
        self._check_items(step)
        self.read_meta(step)
        data = fileio.join(d, "data")
        files = [f for f in fileio.walk_files(data) if not f.endswith("commit_success.txt")]
        if not files:
            raise Damaged(f"{self.rel(data)}: no iterator state in it")
        for f in files:
            self._json(fileio.join(data, f))
        self._check_processes(step, data, files)
        self._check_state(fileio.join(d, "state"))

    def _check_processes(self, step: int, data: str, files: list[str]) -> None:
        """Every process of this run has its data-iterator state in the step (all processes check
        all files, so they agree on the verdict); a step written by another process count is
        refused (the iterators resume only on the same shards), not taken for damage."""
        path = fileio.join(data, "metadata")
        head = self._json(path)
        head = head if isinstance(head, dict) else {}
        # a single-process step from before process_<i>.json: the iterator state in metadata
        old = "iterator" in head and "process_count" not in head
        count = 1 if old else head.get("process_count")
        if not isinstance(count, int):
            raise Damaged(f"{self.rel(path)}: no process count in it")
        n = jax.process_count()
        if count != n:
            raise CheckpointError(f"checkpoint step {step} was written by {count} process{'es' * (count != 1)}, "
                                  f"this run has {n}: the data iterators resume only with the same process "
                                  "count (resume on the same topology or use a new workdir)")
        if old:
            return
        for i in range(n):
            if f"process_{i}.json" not in files:
                raise Damaged(f"{self.rel(fileio.join(data, f'process_{i}.json'))}: missing "
                              f"(the data-iterator state of process {i})")

    def _check_state(self, sdir: str) -> None:
        meta = self._json(fileio.join(sdir, "_METADATA"))
        tm = meta.get("tree_metadata") if isinstance(meta, dict) else None
        if not isinstance(tm, dict):
            raise Damaged(f"{self.rel(sdir)}/_METADATA: no tree_metadata in it")
        if not meta.get("use_ocdbt", True):
            return
        if not fileio.exists(fileio.join(sdir, "manifest.ocdbt")):
            raise Damaged(f"{self.rel(sdir)}/manifest.ocdbt: missing")
        refs, keys = self._ocdbt_index(sdir)
        arrays = [".".join(str(k["key"]) for k in v.get("key_metadata", ())) for v in tm.values()
                  if not v.get("value_metadata", {}).get("skip_deserialize", False)]
        for name in arrays:
            if f"{name}/.zarray" not in keys and f"{name}/zarr.json" not in keys:
                raise Damaged(f"{self.rel(sdir)}: array {name} is not in the OCDBT index (manifest.ocdbt)")
        by_file: dict[str, list] = {}
        for key, f, off, n in refs:
            by_file.setdefault(f, []).append((off, n, key))
        for f, rs in sorted(by_file.items()):
            path = fileio.join(sdir, f)
            end, key = max((off + n, key) for off, n, key in rs)
            if not fileio.exists(path):
                raise Damaged(f"{self.rel(path)}: missing (data of array {key.split('/')[0]})")
            size = fileio.getsize(path)
            if size < end:
                raise Damaged(f"{self.rel(path)}: truncated to {size} bytes, the index needs {end} "
                              f"(array {key.split('/')[0]})")
            zstd = [(off, key) for off, n, key in rs if keys.get(key.split("/")[0]) == "zstd"]
            off, key = min(zstd) if zstd else (None, key)
            if off is not None and fileio.read_bytes(path, off, 4) != _ZSTD_MAGIC:
                raise Damaged(f"{self.rel(path)}: no zstd frame at byte {off} where array {key.split('/')[0]} "
                              "starts (zeroed or overwritten)")

    def _ocdbt_index(self, sdir: str):
        """([(chunk key, data file, offset, length)], {key: compressor id or None}) of the OCDBT
        database of a ``state`` item, from its manifest and B-tree nodes (no array data read)."""
        import tensorstore as ts

        url = sdir if fileio.is_remote(sdir) else "file://" + sdir
        try:
            kv = ts.KvStore.open(url.rstrip("/") + "/").result()
        except Exception as e:  # noqa: BLE001 -- a scheme tensorstore cannot open: Orbax reports it
            log.debug("%s: OCDBT index not checked (%s)", sdir, e)
            return [], _AnyKey()
        refs, keys = [], {}

        def visit(node: str):
            for ent in ts.ocdbt.dump(kv, node).result()["entries"]:
                key = _unbytes(ent.get("key", ""))
                if "indirect_value" in ent:
                    f, off, n = _value_ref(ent["indirect_value"])
                    refs.append((key, f, off, n))
                    keys.setdefault(key, None)
                elif "inline_value" in ent:
                    keys[key] = None
                    if key.endswith("/.zarray"):
                        try:
                            z = json.loads(_unbytes(ent["inline_value"]))
                            keys[key[:-len("/.zarray")]] = (z.get("compressor") or {}).get("id")
                        except ValueError:
                            pass
                for v in ent.values():
                    if isinstance(v, str) and v.startswith("btreenode:"):
                        visit(v)

        try:
            manifest = ts.ocdbt.dump(kv).result()
            for version in manifest.get("versions", [])[-1:]:
                visit(version["root"]["location"])
        except ValueError as e:     # tensorstore's status errors: an unreadable manifest / node
            if not _STATUS.match(str(e)):
                raise
            raise Damaged(f"{self.rel(sdir)}: OCDBT index unreadable: {_summary(e)}") from None
        return refs, keys

    # -- restore -------------------------------------------------------------------------------

    def restore(self, step: int, program) -> Restored:
        """Step ``step`` straight into ``program``'s shardings (``program``: a loop.Program, with abstract_state,
        abstract_consts, state_shardings, consts_shardings); CheckpointError if it is damaged."""
        try:
            self.check(step)
            return self._restore(step, program)
        except Damaged as e:
            raise CheckpointError(f"checkpoint step {step}: {e}") from None

    def _restore(self, step: int, program) -> Restored:
        target = _abstract(_tree(program.abstract_state, program.abstract_consts),
                           _tree(program.state_shardings, program.consts_shardings))
        r = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=DataRestore(), meta=ocp.args.JsonRestore()))
        s = r.state
        return Restored(step, s["train"], Consts(frozen=s["frozen"], fixed=None, vae=s["vae"]), r.data, r.meta)

    def restore_latest(self, program, accept=None) -> Restored | None:
        """The newest good step, restored; None for a new run. ``accept(meta, step)`` vets a
        step's stored config (raising ConfigChangeError) and returns True when it allowed a
        change of the run's identity (then a failing restore is not taken for damage)."""
        failed = []
        for step in reversed(self.steps()):
            try:
                self._check_items(step)
                meta = self.read_meta(step)
                identity_changed = bool(accept(meta, step)) if accept else False
                self.check(step)
                try:
                    r = self._restore(step, program)
                except Exception as e:  # noqa: BLE001 -- classified below
                    why = _summary(e)
                    if identity_changed:
                        raise CheckpointError(
                            f"checkpoint step {step} does not restore into the changed config "
                            f"(train.allow_config_change): {why}") from None
                    if not _is_damage(e):
                        raise
                    raise Damaged(self._explain(step, why)) from None
            except Damaged as e:
                log.warning("checkpoint step %d unusable: %s", step, e)
                failed.append((step, str(e)))
                continue
            for bad, _ in failed:
                self.move_aside(bad)
            if failed:
                self.manager.reload()
                log.warning("resuming from checkpoint step %d", step)
            return r
        if failed:
            lines = "\n  ".join(f"step {s}: {why}" for s, why in failed)
            raise CheckpointError(
                f"no usable checkpoint in {self.directory}:\n  {lines}\nNothing was moved or deleted. "
                "The run will not start over from step 0 next to them: repair a step, move the run's "
                "checkpoints/ away to start over, or use a new workdir.")
        if self.damaged():
            raise CheckpointError(
                f"{self.directory} holds only steps moved aside as damaged ({', '.join(self.damaged())}); "
                "the run will not start over from step 0 next to them: move a repaired one back "
                "(e.g. checkpoints/<step>.damaged-1 -> checkpoints/<step>), or move checkpoints/ away "
                "to start over")
        return None

    def _explain(self, step: int, why: str) -> str:
        """A restore error as one line naming the data file of the array that failed."""
        sdir = fileio.join(self.step_dir(step), "state")
        m = re.search(r'Error reading "([^"/]+)/[^"]*"', why)
        if m:
            try:
                refs, _ = self._ocdbt_index(sdir)
            except Damaged:
                refs = []
            files = sorted({f for k, f, _, _ in refs if k.split("/")[0] == m.group(1)})
            where = self.rel(fileio.join(sdir, files[0])) if files else self.rel(sdir)
            detail = why.rsplit(": ", 1)[-1]
            return f"{where}: array {m.group(1)} unreadable ({detail})"
        return f"{self.rel(self.step_dir(step))}: restore failed: {why}"

    def move_aside(self, step: int) -> str:
        """checkpoints/<step> -> checkpoints/<step>.damaged-<n> (kept; Orbax no longer sees it)."""
        n = 1 + max((int(DAMAGED.match(x).group(2)) for x in self.damaged()
                     if int(DAMAGED.match(x).group(1)) == step), default=0)
        if jax.process_count() > 1:         # process 0's n, chosen before it moves anything
            from jax.experimental import multihost_utils

            n = int(multihost_utils.broadcast_one_to_all(np.int32(n)))
        src, dst = self.step_dir(step), fileio.join(self.directory, f"{step}.damaged-{n}")
        if jax.process_index() == 0:
            _move_dir(src, dst)
            log.warning("checkpoint step %d moved aside to %s (kept, not deleted)", step, self.rel(dst))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"sgt_jax_move_aside_{step}_{n}")
        return dst


class _AnyKey(dict):
    """The index of a store that could not be opened here: checks nothing."""

    def __contains__(self, key):
        return True


def _unbytes(s) -> str:
    return s.decode("utf-8", "replace") if isinstance(s, bytes) else s


def _value_ref(s: str) -> tuple[str, int, int]:
    """``value:<base path>:<file>:<offset>:<length>`` -> (file relative to the db, offset, length)."""
    head, off, n = s.rsplit(":", 2)
    _, base, name = head.split(":", 2)
    return base + name, int(off), int(n)


def _move_dir(src: str, dst: str):
    if not fileio.is_remote(src):
        os.rename(src, dst)
        return
    for f in fileio.walk_files(src):        # object stores: copy every object, then drop the old
        fileio.copy(fileio.join(src, f), fileio.join(dst, f))
    fileio.rmtree(src)
