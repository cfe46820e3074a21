"""SIGTERM agreed by every process at step boundaries, so all of them checkpoint the same step.

A TPU preemption (or ``launch/tpu.sh stop``) may reach the hosts at different moments, or only
some of them; a process that left the step loop alone would wait forever in the next collective
of the others. So the stop flag is an all-reduce (max over one int per device) dispatched at every
step boundary like any other computation, and its result is read one boundary later: every
process reads the same value at the same step, and the host never waits for the step it just
dispatched (the read waits for the previous step only, so loading the next batch still overlaps
the device's work). A SIGTERM therefore stops a multi-process run one step after the boundary
that saw it. One process alone needs no agreement: the flag is read directly.
"""
from __future__ import annotations

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


class StopAgreement:
    def __init__(self, event: threading.Event):
        self.event = event
        self.stopped = False             # agreed by every process
        self.seconds = 0.0               # host time spent in the agreement (measured by tests)
        self._pending = None             # the all-reduce dispatched at the previous boundary
        self.multi = jax.process_count() > 1
        if self.multi:
            mesh = Mesh(np.asarray(jax.devices()), ("all",))
            self._sharding = NamedSharding(mesh, P("all"))
            self._any = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))

    def _dispatch(self):
        flag = np.array([int(self.event.is_set())], np.int32)
        local = [jax.device_put(flag, d) for d in self._sharding.addressable_devices]
        return self._any(jax.make_array_from_single_device_arrays(
            (jax.device_count(),), self._sharding, local))

    def _timed(self, fn) -> bool:
        t = time.perf_counter()
        self.stopped = bool(fn())
        self.seconds += time.perf_counter() - t
        return self.stopped

    def before_first_step(self) -> bool:
        """Did any process get SIGTERM before the first step (waits for the answer)."""
        if not self.multi:
            return self._timed(self.event.is_set)
        return self._timed(lambda: int(self._dispatch()))

    def at_boundary(self) -> bool:
        """After a step was dispatched: stop now? (multi-process: the flags sampled at the
        previous boundary)."""
        if not self.multi:
            return self._timed(self.event.is_set)

        def agree():
            previous, self._pending = self._pending, self._dispatch()
            return previous is not None and int(previous)
        return self._timed(agree)
