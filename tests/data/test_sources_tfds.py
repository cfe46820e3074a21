"""TFDS source (sources/tfds.py): the clear error without tensorflow_datasets. All data is written
by the tests (tmp_path)."""
import pytest

from sgt_jax.data import sources


def test_tfds_source():
    try:
        import tensorflow_datasets  # noqa: F401
    except ImportError:
        with pytest.raises(sources.SpecError, match="need tensorflow_datasets"):
            sources.make_source("tfds:coco/2017_panoptic:train", seed=0)
        pytest.skip("tensorflow_datasets is not installed (optional, not a dependency): "
                    "only the clear error was checked")
    with pytest.raises(sources.SpecError, match="prepare the dataset"):
        sources.make_source("tfds:coco/2017_panoptic:train?data_dir=/nonexistent", seed=0)
