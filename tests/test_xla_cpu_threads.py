"""The fake-device collectives of XLA:CPU do not deadlock under the tests' NPROC (conftest.py).

The program below has two independent while loops with all-reduces and two top-level
all-gathers, all ready at once on each of 8 devices. With XLA's default pool (max(cores, devices)
= 8 threads on a 2-core machine) it deadlocked within a few thousand runs in 2 of 2 tries here
(7 threads waiting in a top-level all-gather, no thread left for the 8th device's); with
NPROC=32 it ran 5000 times in 3 of 3. The training tests' scanned FSDP layers have the same shape.
"""
import os
import subprocess
import sys

PROGRAM = """
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
mesh = jax.make_mesh((8,), ("d",))
def body(x, w):
    g = jax.lax.all_gather(w, "d", tiled=True)
    g2 = jax.lax.all_gather(w * 2, "d", tiled=True)
    c = jax.lax.fori_loop(0, 2, lambda i, c: c + jax.lax.psum(c, "d"), x)
    c2 = jax.lax.fori_loop(0, 2, lambda i, c: c * jax.lax.psum(c, "d"), x)
    return c + c2 + g.sum() + g2.sum()
f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("d"), P("d")), out_specs=P("d"), check_vma=False))
x = jax.device_put(jnp.ones((16, 16)), NamedSharding(mesh, P("d")))
for _ in range(3000):
    out = f(x, x)
print(float(out.sum()))
"""


def test_fake_device_collectives_do_not_run_out_of_pool_threads():
    assert int(os.environ["NPROC"]) >= 4 * 8, os.environ.get("NPROC")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    r = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert float(r.stdout.split()[-1]) > 0
