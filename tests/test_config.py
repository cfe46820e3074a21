"""Presets build with the published shapes; inconsistent configs fail at construction."""
import numpy as np
import pytest
from flax import nnx

from sgt_jax.models import config as C
from sgt_jax.convert import keymap
from sgt_jax.models.bagel import Bagel
from sgt_jax.models.vae import AutoEncoder


def _count(state, prefix=None):
    return sum(int(np.prod(v.get_value().shape)) for p, v in nnx.to_flat_state(state)
               if prefix is None or p[0] == prefix)


def test_bagel_7b_parameter_counts_match_the_release():
    """Counts from instantiating BAGEL-7B-MoT on the meta device (reference/bagel.md 5.2)."""
    cfg = C.bagel_7b()
    model = nnx.eval_shape(lambda: Bagel(cfg, rngs=nnx.Rngs(0)))
    st = nnx.state(model, nnx.Param)
    assert _count(st, "language_model") == 14_141_252_608
    assert _count(st, "vit_model") == 402_552_736
    assert _count(st, "connector") == 16_980_992
    assert sum(_count(st, k) for k in ("time_embedder", "vae2llm", "llm2vae")) == 14_232_128
    # + the two fixed sin-cos tables = BAGEL's 14,607,260,128 total, 1223 keys
    fixed = sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(model))
                if not isinstance(v, nnx.Param))
    assert _count(st) + fixed == 14_607_260_128
    assert len(keymap.bagel_table(cfg)) + len(keymap.FIXED_KEYS) == 1223
    ae = nnx.eval_shape(lambda: AutoEncoder(cfg, rngs=nnx.Rngs(0)))
    assert _count(nnx.state(ae, nnx.Param)) == 83_819_683


def test_from_bagel_dir_reads_release_configs(golden_dir):
    cfg = C.from_bagel_dir(str(golden_dir), base=C.tiny())
    assert (cfg.llm.hidden_size, cfg.llm.num_layers, cfg.llm.num_kv_heads) == (64, 2, 2)
    assert cfg.vit.num_layers == 2          # BAGEL drops the ViT's last layer
    assert cfg.vit.max_patches_per_side == 8


def test_vit_grid_must_match():
    cfg = C.tiny()
    cfg.bagel.vit_max_num_patch_per_side = 70
    with pytest.raises(ValueError, match="vit_max_num_patch_per_side"):
        C.validate(cfg)
