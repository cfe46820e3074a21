"""Data config (data/config.py): the model constants of cfg.data are derived once from cfg.model
and follow command-line overrides; a data config beside another model is refused."""
import os
import subprocess
import sys

import pytest
from absl import flags
from fake_data import REPO, tiny_run_config
from ml_collections import config_flags

from sgt_jax.data import config as C


def _cli(*overrides):
    argv = ["prog", f"--config={REPO / 'configs' / 'tiny.py'}", *overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    return fv.config


def test_model_overrides_on_the_command_line_reach_the_data_config():
    cfg = _cli("--config.model.bagel.max_latent_size=16", "--config.model.bagel.latent_patch_size=1",
               "--config.model.bagel.vit_max_num_patch_per_side=12", "--config.model.vit.max_patches_per_side=12",
               "--config.data.tiny_tokenizer_vocab_size=1024")
    d = cfg.data
    assert (d.max_latent_size, d.vae_downsample, d.vit_max_patches_per_side) == (16, 8, 12)
    assert cfg.model.llm.vocab_size == 1024          # the tiny preset's vocabulary is the tokenizer's
    C.check_consistency(cfg)
    C.validate(d)
    assert cfg.to_dict()["data"]["max_latent_size"] == 16


def test_a_derived_data_key_is_the_model_key():
    cfg = _cli("--config.data.vit_patch_size=16")
    assert cfg.model.vit.patch_size == 16 and cfg.data.transforms.vit_stride == 16
    C.check_consistency(cfg)


def test_defaults_without_a_model_are_bagel_7b_and_tiny():
    keys = list(C.MODEL_KEYS)
    assert [C.default_data_config()[k] for k in keys] == [14, 70, 16, 64]   # BAGEL-7B-MoT's tables
    assert [C.tiny_data_config()[k] for k in keys] == [14, 8, 16, 8]        # the tiny golden model


def test_check_consistency_names_both_keys():
    cfg = tiny_run_config()
    cfg.data.vae_downsample = 32                      # a derived key set on its own
    with pytest.raises(ValueError, match=r"data.vae_downsample=32 but VAE downsample x "
                                         r"model.bagel.latent_patch_size=16"):
        C.check_consistency(cfg)
    cfg = tiny_run_config()
    cfg.data = C.default_data_config()                # a data config made for another model
    with pytest.raises(ValueError, match="data.vit_max_patches_per_side=70 but "
                                         "model.bagel.vit_max_num_patch_per_side=8"):
        C.check_consistency(cfg)


def test_preview_checks_the_model_without_importing_train():
    code = ("import sys; from fake_data import tiny_run_config\n"
            "cfg = tiny_run_config(); cfg.data.max_latent_size = 4; cfg.data.vae_downsample = 32\n"
            "before = set(sys.modules)     # the run config itself imports sgt_jax.train.config\n"
            "from sgt_jax.data import preview\n"
            "class Tok: vocab_size = 9999\n"
            "print(preview.check_model(cfg, Tok()))\n"
            "print(sorted(m for m in set(sys.modules) - before if m.startswith('sgt_jax.train')))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    problems, train_modules = p.stdout.strip().splitlines()
    assert "data.vae_downsample=32" in problems and "9999 ids" in problems
    assert train_modules == "[]"
