"""``python -m sgt_jax.aot``: see the package doc."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")   # compile for the topology; never grab a local TPU
# quiet libtpu's "could not determine TPU accelerator type" warnings on a machine without a TPU
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

from sgt_jax.aot.cli import main  # noqa: E402 (after the environment it reads at backend init)

if __name__ == "__main__":
    main()
