"""Checkpoint conversion: BAGEL release layout <-> model dir (sgt_jax/convert), docs/convert.md.

Evidence: the golden tiny_v1 dir (itself a BAGEL-layout checkpoint made by the real PyTorch code)
imports, exports tensor-for-tensor identical (names, shapes, dtypes, bits) with config files
equal to the originals, and the imported model dir reproduces the golden outputs; a BAGEL-7B-
shaped checkpoint (real widths, 1 layer) round-trips bit-exactly (slow); every refusal names
what it refuses.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from sgt_jax.convert import (ConversionError, ModelDirError, export_bagel, import_bagel, load_model_dir,
                             read_config, save_model_dir)
from sgt_jax.convert import __main__ as cli
from sgt_jax.convert import bagel_io
from sgt_jax.convert import model_dir as md
from sgt_jax.convert import safetensors_io as sio
from sgt_jax.convert import synthetic
from sgt_jax.convert import check_golden as G
from sgt_jax.models import config as C
from sgt_jax.convert import keymap

REPO = Path(__file__).resolve().parents[1]
GOLDEN_OPTS = dict(preset="tiny", max_latent_size=8, vit_max_patches_per_side=8)


def quiet(*a, **k):
    pass


@pytest.fixture(scope="module")
def golden_md(tmp_path_factory, golden_dir):
    d = tmp_path_factory.mktemp("golden") / "md"
    stats = import_bagel(str(golden_dir), str(d), progress=False, log=quiet, **GOLDEN_OPTS)
    assert stats["params_dtype"] == "float32"
    return d


def same_files(a: str, b: str):
    """Tensor-for-tensor identity: names, shapes, dtypes and bytes."""
    ta, tb = load_file(a), load_file(b)
    assert sorted(ta) == sorted(tb), sorted(set(ta) ^ set(tb))
    bad = [k for k in ta if ta[k].dtype != tb[k].dtype or ta[k].shape != tb[k].shape
           or ta[k].tobytes() != tb[k].tobytes()]
    assert not bad, bad


def copy_golden(golden_dir, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in ("model.safetensors", "ae.safetensors", "llm_config.json", "vit_config.json"):
        shutil.copy(golden_dir / f, dst / f)
    return dst


# ----------------------------------------------------------------------------------------------
# golden: bit-exact round trip, config files, outputs


@pytest.mark.golden
def test_golden_export_is_identical_to_the_original_files(golden_md, golden_dir, tmp_path):
    out = tmp_path / "out"
    export_bagel(str(golden_md), str(out), weights_name="model", progress=False, log=quiet)
    same_files(str(golden_dir / "model.safetensors"), str(out / "model.safetensors"))
    same_files(str(golden_dir / "ae.safetensors"), str(out / "ae.safetensors"))
    for name, fields in (("llm_config.json", bagel_io.LLM_CONFIG_FIELDS), ("vit_config.json", bagel_io.VIT_CONFIG_FIELDS)):
        got = json.loads((out / name).read_text())
        assert got == json.loads((golden_dir / name).read_text()), name
        assert set(fields) <= set(got), (name, set(fields) - set(got))
    # explicit fp32 is the same file; the tensors also keep BAGEL's names/metadata for torch
    out32 = tmp_path / "out32"
    export_bagel(str(golden_md), str(out32), dtype="fp32", weights_name="model", progress=False, log=quiet)
    same_files(str(out / "model.safetensors"), str(out32 / "model.safetensors"))
    with safe_open(str(out / "model.safetensors"), "numpy") as f:
        assert f.metadata() == {"format": "pt"}


@pytest.mark.golden
def test_config_files_parse_with_hf_config_classes(golden_md, tmp_path):
    """Without carried bagel_configs/ the export writes every field from the config + templates;
    the HF config classes BAGEL's loaders derive from read back the model's shapes."""
    transformers = pytest.importorskip("transformers")
    shutil.rmtree(golden_md.parent / "md_nocfg", ignore_errors=True)
    d = golden_md.parent / "md_nocfg"
    shutil.copytree(golden_md, d)
    shutil.rmtree(d / md.BAGEL_CONFIGS_DIR)
    out = tmp_path / "out"
    export_bagel(str(d), str(out), progress=False, log=quiet)
    assert (out / "ema.safetensors").exists()
    cfg = read_config(d)
    lj = json.loads((out / "llm_config.json").read_text())
    vj = json.loads((out / "vit_config.json").read_text())
    assert set(bagel_io.LLM_CONFIG_FIELDS) <= set(lj) and set(bagel_io.VIT_CONFIG_FIELDS) <= set(vj)
    q = transformers.Qwen2Config.from_json_file(str(out / "llm_config.json"))
    assert (q.vocab_size, q.hidden_size, q.intermediate_size, q.num_hidden_layers, q.num_attention_heads,
            q.num_key_value_heads, q.tie_word_embeddings) == (
        cfg.llm.vocab_size, cfg.llm.hidden_size, cfg.llm.intermediate_size, cfg.llm.num_layers,
        cfg.llm.num_heads, cfg.llm.num_kv_heads, False)
    assert lj["rope_theta"] == cfg.llm.rope_theta
    s = transformers.SiglipVisionConfig.from_json_file(str(out / "vit_config.json"))
    assert s.num_hidden_layers - 1 == cfg.vit.num_layers          # BAGEL drops the last layer
    assert s.image_size // s.patch_size == cfg.bagel.vit_max_num_patch_per_side
    assert (s.hidden_size, s.intermediate_size, s.num_attention_heads) == (
        cfg.vit.hidden_size, cfg.vit.intermediate_size, cfg.vit.num_heads)


@pytest.mark.golden
def test_import_records_the_config_the_files_imply(golden_md, golden_dir):
    cfg = read_config(golden_md)
    ref = G.config_from_meta(json.loads((golden_dir / "meta.json").read_text()))
    for part in ("llm", "vit", "vae", "bagel"):
        for k, v in ref[part].items():
            if k in ("remat_policy", "scan_layers", "attention_impl", "ce_chunk_size"):
                continue
            assert cfg[part][k] == (tuple(v) if isinstance(v, list) else v), (part, k, cfg[part][k], v)
    info = md.read_info(golden_md)
    assert info["model_settings"] == dict(latent_patch_size=2, max_latent_size=8, vit_max_num_patch_per_side=8,
                                          timestep_shift=1.0)
    assert info["params_dtype"] == "float32" and info["items"] == ["params", "vae"]


@pytest.mark.golden
def test_imported_model_dir_reproduces_the_golden_outputs(golden_md, golden_dir):
    from sgt_jax.models.bagel import Bagel
    from sgt_jax.models.vae import AutoEncoder

    cfg, params, vae = load_model_dir(golden_md)
    cfg.compute_dtype = "float32"
    fx = G.load_fixture(str(golden_dir))
    meta, t = fx["meta"], fx["batch"]
    # the restored parameters are bit-identical to loading the golden file through the key table
    ref = nnx.to_pure_dict(nnx.state(G.build_model(cfg, fx["model"]), nnx.Param))
    for p, v in md.flatten(ref).items():
        assert np.asarray(md.get_in(params, p)).tobytes() == np.asarray(v).tobytes(), p
    model = Bagel(cfg, rngs=nnx.Rngs(1))
    st = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(st, params)
    nnx.update(model, st)
    batch, noise, num_gen = G.packed_batch_from_golden(meta, t, cfg)
    out = nnx.jit(lambda m, b, e: m(b, num_gen=num_gen, noise=e))(model, batch, noise)
    n = int(meta["batch"]["sequence_length"])
    loss, ce, mse = G.reduced_loss(out, batch, meta["config"].get("train", {}))
    assert abs(float(loss) - float(t["loss"])) < 1e-5
    assert np.abs(np.asarray(out["hidden"][0, :n]) - t["last_hidden_state"]).max() < 1e-5
    assert np.abs(np.asarray(out["ce"][0, t["ce_loss_indexes"]]) - t["ce_tok"]).max() < 1e-5
    assert np.abs(np.asarray(out["mse"][0, t["mse_loss_indexes"]]) - t["mse_tok"]).max() < 1e-5
    ae = AutoEncoder(cfg, rngs=nnx.Rngs(0))
    st = nnx.state(ae, nnx.Param)
    nnx.replace_by_pure_dict(st, vae)
    nnx.update(ae, st)
    dec = ae.decode(jnp.asarray(t["padded_latent"]).transpose(0, 2, 3, 1))
    assert np.abs(np.asarray(dec).transpose(0, 3, 1, 2) - t["decoded"]).max() < 1e-5


@pytest.mark.golden
def test_load_model_dir_into_shardings_and_dtypes(golden_md):
    mesh = jax.make_mesh((len(jax.devices()),), ("fsdp",))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    row = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "fsdp"))
    abstract = md.abstract_params(read_config(golden_md))
    # shard the stacked q_proj kernels on their input axis, replicate the rest
    sh = jax.tree.map(lambda _: rep, abstract)
    sh["language_model"]["layers"]["und"]["q_proj"]["kernel"] = row
    cfg, params, vae = load_model_dir(golden_md, shardings=sh, dtype=jnp.bfloat16)
    q = params["language_model"]["layers"]["und"]["q_proj"]["kernel"]
    assert q.sharding == row and q.dtype == jnp.bfloat16
    assert len({str(s.index) for s in q.addressable_shards}) == len(jax.devices())
    assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(vae))
    assert jax.tree.leaves(vae)[0].sharding.mesh == mesh                    # VAE replicated on the mesh
    _, p32, _ = load_model_dir(golden_md, shardings=rep, dtype=None)        # as stored (fp32)
    np.testing.assert_array_equal(np.asarray(q, np.float32),
                                  np.asarray(p32["language_model"]["layers"]["und"]["q_proj"]["kernel"]).astype(
                                      ml_dtypes.bfloat16).astype(np.float32))


@pytest.mark.golden
def test_save_model_dir_from_memory_round_trips(golden_md, golden_dir, tmp_path):
    """The trainer's path: in-memory (jax) params -> save_model_dir -> export == the golden."""
    cfg, params, vae = load_model_dir(golden_md)
    d = tmp_path / "md2"
    save_model_dir(d, cfg, params, vae, tokenizer_dir=None, bagel_configs_dir=golden_md / md.BAGEL_CONFIGS_DIR)
    with pytest.raises(ModelDirError, match="not empty"):
        save_model_dir(d, cfg, params, vae)
    cfg2, p2, v2 = load_model_dir(d)
    assert cfg2.to_dict() == cfg.to_dict()
    out = tmp_path / "out"
    export_bagel(str(d), str(out), weights_name="model", progress=False, log=quiet)
    same_files(str(golden_dir / "model.safetensors"), str(out / "model.safetensors"))
    same_files(str(golden_dir / "ae.safetensors"), str(out / "ae.safetensors"))
    # a tree that does not match the config is refused with the parameter names
    bad = jax.tree.map(lambda x: x, params)
    bad["connector"]["fc1"]["kernel"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ModelDirError, match="connector.fc1.kernel"):
        save_model_dir(tmp_path / "md3", cfg, bad, vae)


@pytest.mark.golden
def test_sharded_and_bf16_export(golden_md, golden_dir, tmp_path):
    out = tmp_path / "sharded"
    st = export_bagel(str(golden_md), str(out), shard_size="300KB", progress=False, log=quiet)
    assert len(st["files"]) > 2 and "model-00001-of-" in st["files"][0]
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    ref = load_file(str(golden_dir / "model.safetensors"))
    assert set(idx["weight_map"]) == set(ref)
    assert idx["metadata"]["total_size"] == sum(a.nbytes for a in ref.values())
    src = sio.SafetensorsSource(str(out / "model.safetensors.index.json"))
    for k, a in ref.items():
        assert src.read(k).tobytes() == a.tobytes(), k
    # the shards are ordinary safetensors files for torch
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file as torch_load
    n = sum(len(torch_load(str(out / f))) for f in sorted(set(idx["weight_map"].values())))
    assert n == len(ref)
    # bf16: round-to-nearest-even exactly as torch's .to(torch.bfloat16)
    out16 = tmp_path / "bf16"
    export_bagel(str(golden_md), str(out16), dtype="bf16", progress=False, log=quiet)
    got = torch_load(str(out16 / "ema.safetensors"))
    for k, a in ref.items():
        want = torch.from_numpy(a).to(torch.bfloat16)
        assert got[k].dtype == torch.bfloat16 and torch.equal(got[k].view(torch.int16), want.view(torch.int16)), k
    assert json.loads((out16 / "llm_config.json").read_text())["torch_dtype"] == "bfloat16"
    # ... and a bf16 source imports as bf16 and exports back identically
    shutil.copy(golden_dir / "ae.safetensors", out16 / "ae.safetensors")
    md16 = tmp_path / "md16"
    assert import_bagel(str(out16), str(md16), progress=False, log=quiet, **GOLDEN_OPTS)["params_dtype"] == "bfloat16"
    back = tmp_path / "back16"
    export_bagel(str(md16), str(back), progress=False, log=quiet)
    same_files(str(out16 / "ema.safetensors"), str(back / "ema.safetensors"))


def test_header_reader_agrees_with_safe_open(golden_dir, tmp_path):
    path = str(golden_dir / "model.safetensors")
    src = sio.SafetensorsSource(path)
    with safe_open(path, "numpy") as f:
        assert sorted(f.keys()) == sorted(src.keys())
        for k in f.keys():
            a = f.get_tensor(k)
            assert src.read(k).tobytes() == a.tobytes() and src.read(k).dtype == a.dtype
            if a.ndim and a.shape[0] > 3:
                assert src.read(k, (1, 3)).tobytes() == a[1:3].tobytes()
    # the plan writer's files read back with safetensors' own reader, bf16 included
    t = {"a": np.arange(12, dtype=np.float32).reshape(3, 4),
         "b": np.linspace(-2, 2, 10).astype(ml_dtypes.bfloat16), "c": np.zeros((0, 4), np.float32)}
    sio.write_tensors(str(tmp_path), "x", t)
    back = load_file(str(tmp_path / "x.safetensors"))
    assert all(back[k].tobytes() == t[k].tobytes() and back[k].shape == t[k].shape for k in t)
    assert sio.parse_size("5GB") == 5 * 10 ** 9 and sio.parse_size("2GiB") == 2 * 2 ** 30
    assert sio.parse_size(None) is None and sio.parse_size("0") is None


# ----------------------------------------------------------------------------------------------
# refusals, each naming what is refused


def _mutate(golden_dir, tmp_path, fn) -> Path:
    d = copy_golden(golden_dir, tmp_path / "src")
    t = load_file(str(d / "model.safetensors"))
    fn(t)
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def _import_error(d, **kw) -> str:
    with pytest.raises(ConversionError) as e:
        import_bagel(str(d), str(d.parent / "md_refused"), progress=False, log=quiet, **{**GOLDEN_OPTS, **kw})
    assert not (d.parent / "md_refused").exists()
    return str(e.value)


K_Q = "language_model.model.layers.1.self_attn.q_proj_moe_gen.weight"
K_FC = "vit_model.vision_model.encoder.layers.0.mlp.fc1.bias"


def test_refuses_missing_unexpected_misshaped_and_wrong_dtype_keys(golden_dir, tmp_path):
    def fn(t):
        del t[K_Q]
        t["language_model.model.layers.1.self_attn.extra.weight"] = np.zeros(3, np.float32)
        t["connector.fc2.bias"] = np.zeros(7, np.float32)
        t[K_FC] = t[K_FC].astype(np.int32)
    msg = _import_error(_mutate(golden_dir, tmp_path, fn))
    assert "1 missing keys: " + K_Q in msg
    assert "1 unexpected keys: language_model.model.layers.1.self_attn.extra.weight" in msg
    assert "connector.fc2.bias: file [7], config expects [64]" in msg
    assert f"{K_FC}: I32" in msg and "wrong dtype" in msg


def test_refuses_problems_in_ae_safetensors(golden_dir, tmp_path):
    d = copy_golden(golden_dir, tmp_path / "src")
    ae = load_file(str(d / "ae.safetensors"))
    del ae["decoder.norm_out.bias"]
    ae["encoder.conv_in.bias"] = ae["encoder.conv_in.bias"][:5]
    save_file(ae, str(d / "ae.safetensors"))
    msg = _import_error(d)
    assert "ae.safetensors: 1 missing keys: decoder.norm_out.bias" in msg
    assert "encoder.conv_in.bias: file [5], config expects [32]" in msg
    os.remove(d / "ae.safetensors")
    assert "no ae.safetensors" in _import_error(d)


def test_refuses_truncated_files(golden_dir, tmp_path):
    d = copy_golden(golden_dir, tmp_path / "src")
    p = d / "model.safetensors"
    size = p.stat().st_size
    with open(p, "r+b") as f:
        f.truncate(size - 1000)
    msg = _import_error(d)
    assert "truncated" in msg and "model.safetensors" in msg
    last = max(sio.read_header(str(golden_dir / "model.safetensors"))[0].items(), key=lambda kv: kv[1].start)[0]
    assert last in msg                                                    # the cut-off tensor is named
    with open(p, "r+b") as f:
        f.truncate(100)                                                   # header itself cut
    assert "truncated: the header declares" in _import_error(d)
    with open(p, "r+b") as f:
        f.truncate(3)
    assert "shorter than the 8-byte" in _import_error(d)


class _Boom:
    def __reduce__(self):
        return (os.mkdir, ("/tmp/sgt_convert_pickle_was_loaded",))


def test_refuses_pickle_checkpoints_without_unpickling(tmp_path, golden_dir):
    flag = Path("/tmp/sgt_convert_pickle_was_loaded")
    shutil.rmtree(flag, ignore_errors=True)
    d = tmp_path / "pt"
    d.mkdir()
    for f in ("llm_config.json", "vit_config.json"):
        shutil.copy(golden_dir / f, d / f)
    with open(d / "pytorch_model.bin", "wb") as f:
        pickle.dump(_Boom(), f)
    msg = _import_error(d)
    assert "pytorch_model.bin" in msg and "pickle" in msg and "arbitrary code" in msg
    shutil.copy(d / "pytorch_model.bin", d / "ema.pt")
    msg = _import_error(d / "ema.pt")
    assert "ema.pt" in msg and "weights_only=True" in msg
    assert "model.pth" in _import_error(d, weights="model.pth")
    assert not flag.exists()


def test_refuses_options_that_contradict_the_files(golden_dir, tmp_path):
    d = copy_golden(golden_dir, tmp_path / "src")
    msg = _import_error(d, vit_max_patches_per_side=70)
    assert "--vit-max-patches-per-side 8" in msg
    msg = _import_error(d, max_latent_size=64)
    assert "latent_pos_embed.pos_embed" in msg and "pass --max-latent-size 8" in msg


def test_sharded_source_with_index(golden_dir, tmp_path):
    d = copy_golden(golden_dir, tmp_path / "src")
    os.remove(d / "model.safetensors")
    ref = load_file(str(golden_dir / "model.safetensors"))
    sio.write_tensors(str(d), "model", ref, max_shard_bytes=300_000)
    assert (d / "model.safetensors.index.json").exists()
    import_bagel(str(d), str(tmp_path / "md"), progress=False, log=quiet, **GOLDEN_OPTS)
    out = tmp_path / "out"
    export_bagel(str(tmp_path / "md"), str(out), weights_name="model", progress=False, log=quiet)
    same_files(str(golden_dir / "model.safetensors"), str(out / "model.safetensors"))
    # a shard listed in the index but absent, or holding other tensors than listed
    shard = sorted(d.glob("model-0000*.safetensors"))[1]
    shard.rename(d / "moved.safetensors")
    assert shard.name in _import_error(d)
    (d / "moved.safetensors").rename(shard)
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    k = next(k for k, f in idx["weight_map"].items() if f == shard.name)
    idx["weight_map"][k] = sorted(d.glob("model-0000*.safetensors"))[0].name
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    assert k in _import_error(d)


def test_weights_choice_and_cli(golden_dir, tmp_path, capsys):
    d = copy_golden(golden_dir, tmp_path / "src")
    shutil.copy(d / "model.safetensors", d / "ema.safetensors")
    path, _, notes = bagel_io.find_weights(str(d))
    assert path.endswith("ema.safetensors") and any("both ema and model" in n for n in notes)
    assert bagel_io.find_weights(str(d), "model")[0].endswith("model.safetensors")
    # the CLI: exit 2 with the message on a refusal, 0 and a summary otherwise
    assert cli.main(["import", "--from", str(d), "--to", str(tmp_path / "md"), "--no-progress"]) == 2
    assert "--vit-max-patches-per-side 8" in capsys.readouterr().err
    rc = cli.main(["import", "--from", str(d), "--to", str(tmp_path / "md"), "--preset", "tiny",
                   "--max-latent-size", "8", "--vit-max-patches-per-side", "8", "--no-progress",
                   "--stats", str(tmp_path / "s.json")])
    assert rc == 0 and json.loads((tmp_path / "s.json").read_text())["peak_rss_gb"] > 0
    rc = cli.main(["export", "--from", str(tmp_path / "md"), "--to", str(tmp_path / "out"), "--ema", "--no-progress"])
    assert rc == 0 and "--ema ignored" in capsys.readouterr().out
    same_files(str(d / "ema.safetensors"), str(tmp_path / "out" / "ema.safetensors"))
    assert cli.main(["export", "--from", str(tmp_path / "out"), "--to", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "already in BAGEL's release layout" in capsys.readouterr().err
    assert cli.main(["export", "--from", str(tmp_path), "--to", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "not a complete sgt-jax model dir" in capsys.readouterr().err


def test_vae_config_from_shapes_and_tokens(tmp_path):
    cfg = C.bagel_7b()
    abstract = md.abstract_vae(cfg)
    shapes = {e.key: keymap.torch_shape(e.kind, md.get_in(abstract, e.path).shape) for e in keymap.vae_entries(cfg)}
    v = bagel_io.vae_config_from_ae(shapes, C.tiny().vae)
    assert (v.ch, tuple(v.ch_mult), v.num_res_blocks, v.z_channels, v.in_channels, v.out_ch) == (
        128, (1, 2, 4, 4), 2, 16, 3, 3)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {
        "7": {"content": "<|im_start|>"}, "9": {"content": "<|vision_end|>"}}}))
    assert bagel_io.special_tokens_from_tokenizer(str(tmp_path)) == {"bos_token_id": 7, "end_of_image": 9}


def test_tokenizer_notes_name_what_bagels_slow_tokenizer_cannot_read(tmp_path):
    assert bagel_io.tokenizer_notes(str(tmp_path)) == []               # no tokenizer files: nothing
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"extra_special_tokens": ["<|im_start|>"]}))
    notes = bagel_io.tokenizer_notes(str(tmp_path))
    assert len(notes) == 2 and "lack vocab.json and merges.txt" in notes[0] and "extra_special_tokens" in notes[1]
    (tmp_path / "vocab.json").write_text("{}")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"extra_special_tokens": {}}))
    assert bagel_io.tokenizer_notes(str(tmp_path)) == []


# ----------------------------------------------------------------------------------------------
# BAGEL-7B widths, reduced depth


@pytest.mark.slow
def test_bagel_7b_widths_round_trip_bit_exact(tmp_path):
    """Real widths (hidden 3584, vocab 152064, intermediate 18944, ViT 1152, FLUX AE), 1 LLM and
    1 ViT layer, bf16, sharded with an index json, through the CLI in subprocesses (peak RSS)."""
    cfg = C.bagel_7b()
    cfg.llm.num_layers, cfg.vit.num_layers = 1, 1
    src = tmp_path / "src"
    info = synthetic.write_checkpoint(cfg, str(src), dtype="bf16", shard_bytes=2 * 10 ** 9)
    assert (src / "ema.safetensors.index.json").exists()
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    run = lambda *a: subprocess.run([sys.executable, "-m", "sgt_jax.convert", *a, "--no-progress"], env=env,
                                    check=True, capture_output=True, text=True)
    run("import", "--from", str(src), "--to", str(tmp_path / "md"), "--stats", str(tmp_path / "i.json"))
    shutil.rmtree(src)                                 # verify against the generator, not the copy
    run("export", "--from", str(tmp_path / "md"), "--to", str(tmp_path / "out"), "--shard-size", "2GB",
        "--stats", str(tmp_path / "e.json"))
    assert synthetic.verify_export(cfg, str(tmp_path / "out" / "model.safetensors.index.json"), dtype="bf16") == []
    target = 4.0 + info["largest_tensor_bytes"] / 1e9
    for f in ("i.json", "e.json"):
        s = json.loads((tmp_path / f).read_text())
        assert s["peak_rss_gb"] < target, s
    assert md.read_info(tmp_path / "md")["params_dtype"] == "bfloat16"
    assert (tmp_path / "out" / "tokenizer_config.json").exists()


def test_peak_rss_is_the_converters_own_not_its_parents():
    """A converter started by subprocess from a big parent (the pytest process late in the suite)
    reports its own peak: ru_maxrss survives vfork + exec and reported the parent's (CI: 8.8 GB)."""
    big = np.ones(1_000_000_000 // 8)            # 1 GB resident in this process
    big += 1
    code = "from sgt_jax.convert.bagel_io import peak_rss_gb; print(peak_rss_gb())"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(REPO)),
                         check=True, capture_output=True, text=True).stdout
    assert float(out) < 0.9, out
    del big


def test_conv_form_patch_embedding_is_converted(golden_dir, tmp_path):
    """A stock-SigLIP Conv2d patch weight (hidden, 3, p, p) imports as BAGEL's Linear form."""
    from sgt_jax.models import siglip

    k = bagel_io.PATCH_KEY
    d = _mutate(golden_dir, tmp_path, lambda t: t.update({k: siglip.linear_patch_weight_to_conv(t[k], 14)}))
    notes = []
    import_bagel(str(d), str(tmp_path / "md"), progress=False, log=notes.append, **GOLDEN_OPTS)
    assert any("Conv2d form" in n for n in notes)
    export_bagel(str(tmp_path / "md"), str(tmp_path / "out"), weights_name="model", progress=False, log=quiet)
    same_files(str(golden_dir / "model.safetensors"), str(tmp_path / "out" / "model.safetensors"))
