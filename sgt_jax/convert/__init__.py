"""Checkpoint conversion between BAGEL's PyTorch/HF release layout and the sgt-jax model dir.

    python -m sgt_jax.convert import --from BAGEL_DIR --to MODEL_DIR [options]
    python -m sgt_jax.convert export --from MODEL_DIR --to BAGEL_DIR [--dtype bf16|fp32] [--shard-size 5GB]

API: ``import_bagel``, ``export_bagel`` (bagel_io.py); ``load_model_dir``, ``save_model_dir``,
``read_config`` (model_dir.py). See docs/convert.md.
"""
from sgt_jax.convert.bagel_io import export_bagel, import_bagel
from sgt_jax.convert.model_dir import ModelDirError, load_model_dir, read_config, save_model_dir
from sgt_jax.convert.safetensors_io import ConversionError

__all__ = ["import_bagel", "export_bagel", "load_model_dir", "save_model_dir", "read_config",
           "ConversionError", "ModelDirError"]
