"""Orbax checkpoints of a run: the TrainState (params, optimizer state, EMA, step, NaN counters),
the data iterator state, and run metadata, saved asynchronously under ``WORKDIR/checkpoints``.

Orbax writes each step into a temporary directory and renames it only when complete, so a
process killed during a save leaves the previous checkpoint intact; ``latest_step`` only ever
sees finished ones. The RNG needs no state of its own: every key derives from (seed, step).
Local paths and ``gs://`` URLs both work (orbax/tensorstore).
"""
from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Checkpointer:
    def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True):
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, save_interval_steps=save_every, create=True,
                enable_async_checkpointing=async_save),
            item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, meta: dict, *, force: bool = False) -> bool:
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)), force=force)

    def restore(self, step: int, abstract_state, shardings):
        """Restore (state, data_state, meta) of ``step`` straight into ``shardings``."""
        r = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(abstract_state, shardings)),
            data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        return r.state, r.data, r.meta

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def config_json(cfg) -> dict:
    return json.loads(cfg.to_json_best_effort())
