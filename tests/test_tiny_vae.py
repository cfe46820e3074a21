"""The tiny preset's trained VAE (sgt_jax/assets/tiny_vae.safetensors, scripts/train_tiny_vae.py):
the shipped weights reconstruct held-out masks, the script reproduces its kind of file, the
run-config validator refuses a bad ``train.vae_init``, and a run's VAE is the file's through
resume, export and ``Engine.load``."""
import hashlib
import importlib.util
import os
import re

import jax
import ml_collections
import numpy as np
import pytest

from fake_data import FakeIterator, tiny_run_config as tiny_preset
from sgt_jax.models.config import tiny
from sgt_jax.parallel import mesh as mesh_lib
from sgt_jax.train import config as run_config
from sgt_jax.train import loop, vae_init
from sgt_jax.train.config import default_mesh_config, default_train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = vae_init.resolve(vae_init.TINY_VAE)

# measured (docs/training.md, docs/evaluation.md): the shipped AE scores VAE-ceiling mIoU 0.429 on
# the main job's first 16 held-out targets (0.464 on 32; the preset's former random VAE: 0.020).
# The threshold leaves room for other CPUs' rounding and is 17x the random VAE's.
CEILING_ABOVE = 0.35


def _script():
    spec = importlib.util.spec_from_file_location("train_tiny_vae", os.path.join(ROOT, "scripts", "train_tiny_vae.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = np.asarray(v)
    return out


def _same(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys(), set(fa) ^ set(fb)
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def test_shipped_weights_reconstruct_heldout_masks(tmp_path):
    """The VAE ceiling of the shipped AE on the main job's held-out targets, scored by
    eval/metrics.py (Hungarian on IoU), is far above a random VAE's."""
    cfg = tiny_preset()
    assert vae_init.problems(cfg.train.vae_init, cfg.model) == []
    from safetensors import safe_open

    with safe_open(SHIPPED, "np") as f:
        meta = f.metadata()
    assert float(meta["scale_factor"]) == cfg.model.vae.scale_factor
    assert float(meta["shift_factor"]) == cfg.model.vae.shift_factor
    from safetensors.numpy import load_file

    tensors = load_file(SHIPPED)
    c = _script().ceiling_miou(cfg, tensors, str(tmp_path), num_scenes=16)
    assert c["images"] == 16
    assert c["miou"] > CEILING_ABOVE, c


def test_docs_state_the_shipped_files_sha256_and_command():
    digest = hashlib.sha256(open(SHIPPED, "rb").read()).hexdigest()
    docs = open(os.path.join(ROOT, "docs", "training.md")).read()
    assert digest in docs, f"docs/training.md does not state the sha256 {digest} of {SHIPPED}"
    assert "python3 scripts/train_tiny_vae.py" in docs
    assert os.path.getsize(SHIPPED) <= 2_000_000


def test_training_script_is_deterministic_and_writes_loadable_weights(tmp_path):
    mod = _script()
    cfg = tiny_preset()
    kw = dict(steps=2, batch=4, seed=3, n=6, gen_seed=7, lr=1e-3, kl_weight=1e-6, log=lambda s: None)
    sd1, meta1 = mod.train(cfg, **kw)
    sd2, meta2 = mod.train(cfg, **kw)
    assert sd1.keys() == sd2.keys() and meta1 == meta2
    for k in sd1:
        np.testing.assert_array_equal(sd1[k], sd2[k], err_msg=k)
    path = str(tmp_path / "ae.safetensors")
    vae_init.save(path, sd1, meta1)
    cfg.model.vae.update(scale_factor=float(meta1["scale_factor"]), shift_factor=float(meta1["shift_factor"]))
    pure = vae_init.load(path, cfg.model)
    # the loader's layout is the inverse of the writer's: loading and writing again gives the file
    from flax import nnx

    from sgt_jax.models.vae import AutoEncoder

    ae = AutoEncoder(cfg.model, rngs=nnx.Rngs(0))
    state = nnx.state(ae, nnx.Param)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(ae, state)
    back = vae_init.to_flux(ae)
    for k in sd1:
        np.testing.assert_array_equal(back[k], sd1[k], err_msg=k)
    # ... and the file is a FLUX AE state dict as the converter writes one (convert/keymap.py owns
    # the FLUX names and torch layouts; train/ may not import it)
    from sgt_jax.convert.keymap import export_vae

    flux = export_vae(ae)
    assert flux.keys() == sd1.keys()
    for k in sd1:
        np.testing.assert_array_equal(flux[k], sd1[k], err_msg=k)


def _with_meta(cfg, path):
    from safetensors import safe_open

    with safe_open(path, "np") as f:
        meta = f.metadata()
    cfg.model.vae.update(scale_factor=float(meta["scale_factor"]), shift_factor=float(meta["shift_factor"]))
    return cfg


def test_validator_refuses_a_bad_vae_init(tmp_path):
    cfg = tiny_preset()
    run_config.validate(cfg, mesh=dict(data=1, fsdp=1, tensor=1))       # the preset as shipped is valid

    def errors(path, **vae):
        c = tiny_preset()
        c.train.vae_init = path
        c.model.vae.update(vae)
        with pytest.raises(run_config.ConfigError) as e:
            run_config.validate(c, mesh=dict(data=1, fsdp=1, tensor=1))
        return str(e.value)

    msg = errors(str(tmp_path / "nope.safetensors"))
    assert "train.vae_init=" in msg and "no such file" in msg, msg
    (tmp_path / "junk.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}")
    assert "not a safetensors file" in errors(str(tmp_path / "junk.safetensors"))
    from safetensors.numpy import load_file

    sd = load_file(SHIPPED)
    sd.pop("decoder.norm_out.bias")
    sd["encoder.extra.weight"] = np.zeros(3, np.float32)
    sd["decoder.conv_out.weight"] = np.zeros((3, 16, 3, 3), np.float32)
    bad = str(tmp_path / "bad.safetensors")
    vae_init.save(bad, sd)
    msg = errors(bad)
    assert "1 missing keys: decoder.norm_out.bias" in msg, msg
    assert "1 unexpected keys: encoder.extra.weight" in msg, msg
    assert "decoder.conv_out.weight: file [3, 16, 3, 3], config expects [3, 32, 3, 3]" in msg, msg
    # an AE trained for other latent factors
    msg = errors(vae_init.TINY_VAE, scale_factor=0.3611)
    assert "model.vae.scale_factor" in msg and "--config.model.vae.scale_factor=" in msg, msg


def _one_device():
    return mesh_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])


@pytest.mark.slow
def test_a_run_keeps_the_file_vae_through_resume_export_and_engine(tmp_path):
    """The VAE is part of the checkpointed state: a resumed run, the export and Engine.load see
    the file's VAE (bit for bit), not the random init of the run's seed."""
    from flax import nnx

    from sgt_jax.infer.engine import Engine
    from sgt_jax.train.export import find_checkpoint, restore_weights

    cfg = ml_collections.ConfigDict(dict(
        model=tiny(), data=ml_collections.ConfigDict(dict(gen_tokens_per_row=8)),
        train=default_train_config(), mesh=default_mesh_config()))
    cfg.train.update(steps=2, warmup_steps=1, log_every=1, save_every=1, lr=1e-3, vae_init=vae_init.TINY_VAE)
    cfg = _with_meta(cfg, SHIPPED)
    want = vae_init.load(vae_init.TINY_VAE, cfg.model)
    run = str(tmp_path / "run")
    it = FakeIterator(cfg, rows=8)
    seen = []
    hook = lambda step, state, consts: seen.append((step, nnx.to_pure_dict(consts.vae))) and None
    loop.train(cfg, run, data_iterator=it, quiet=True, mesh=_one_device(), stop_after=1, evaluate=hook)
    loop.train(cfg, run, data_iterator=FakeIterator(cfg, rows=8), quiet=True, mesh=_one_device(), evaluate=hook)
    assert [s for s, _ in seen] == [0, 1, 2]          # step 2 ran in the resumed invocation
    for _, vae in seen:
        _same(jax.device_get(vae), want)
    _, _, vae = restore_weights(*find_checkpoint(run), mesh=_one_device())
    _same(jax.device_get(vae), want)
    eng = Engine.load(run, mesh=_one_device())
    _same(jax.device_get(nnx.to_pure_dict(eng.vae_params)) if not isinstance(eng.vae_params, dict)
          else jax.device_get(eng.vae_params), want)
