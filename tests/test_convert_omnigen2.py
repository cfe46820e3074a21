"""``python -m sgt_jax.convert import|export --arch omnigen2``: an OmniGen2 release layout (mllm/ with
a sharded bf16 Qwen2.5-VL, transformer/ with the golden DiT in diffusers layout) -> model dir ->
release layout, bit-exact; the model dir loads into the Flax models; refusals are listed."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from sgt_jax.convert import omnigen2_io, omnigen2_keymap
from sgt_jax.convert.__main__ import main
from sgt_jax.convert.safetensors_io import SafetensorsSource, write_tensors
from sgt_jax.models import omnigen2_config, omnigen2_dit, qwen25_vl

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "omnigen2_golden")
MLLM_CONFIG = {   # a transformers-4.x style Qwen2.5-VL config.json with the tiny shapes
    "model_type": "qwen2_5_vl", "vocab_size": 160, "hidden_size": 64, "intermediate_size": 96,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
    "tie_word_embeddings": False, "image_token_id": 151, "vision_start_token_id": 152, "hidden_act": "silu",
    "vision_config": {"depth": 4, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2, "out_hidden_size": 64,
                      "in_chans": 3, "patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2,
                      "window_size": 56, "fullatt_block_indexes": [1, 3], "hidden_act": "silu"}}
DIT_CONFIG = {"_class_name": "OmniGen2Transformer2DModel", "patch_size": 2, "in_channels": 4, "out_channels": None,
              "hidden_size": 48, "num_layers": 2, "num_refiner_layers": 1, "num_attention_heads": 4,
              "num_kv_heads": 2, "multiple_of": 16, "ffn_dim_multiplier": 0.5, "norm_eps": 1e-5,
              "axes_dim_rope": [4, 4, 4], "axes_lens": [64, 64, 64], "text_feat_dim": 32, "timestep_scale": 1000.0}

VAE_CONFIG = {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
              "block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8,
              "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
              "use_quant_conv": False, "use_post_quant_conv": False, "scaling_factor": 0.3611, "shift_factor": 0.1159}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    import ml_dtypes

    root = tmp_path_factory.mktemp("og2")
    cfg = omnigen2_config.from_hf_qwen25_vl(MLLM_CONFIG)
    mllm = omnigen2_keymap.export_qwen25_vl(qwen25_vl.Qwen25VL(cfg, rngs=nnx.Rngs(3)))
    mllm = {k: v.astype(ml_dtypes.bfloat16) for k, v in mllm.items()}
    os.makedirs(root / "mllm")
    write_tensors(str(root / "mllm"), "model", mllm, max_shard_bytes=60_000)      # shards + index json
    (root / "mllm" / "config.json").write_text(json.dumps(MLLM_CONFIG))
    os.makedirs(root / "transformer")
    shutil.copy(os.path.join(FIX, "dit_tiny.safetensors"), root / "transformer" / "diffusion_pytorch_model.safetensors")
    (root / "transformer" / "config.json").write_text(json.dumps(DIT_CONFIG))
    os.makedirs(root / "vae")
    shutil.copy(os.path.join(FIX, "vae_tiny.safetensors"), root / "vae" / "diffusion_pytorch_model.safetensors")
    (root / "vae" / "config.json").write_text(json.dumps(VAE_CONFIG))
    return root


def read_all(path):
    src = SafetensorsSource(path)
    return {k: src.read(k) for k in src.keys()}


def test_round_trip_is_bit_exact(release, tmp_path):
    assert len([f for f in os.listdir(release / "mllm") if f.endswith(".safetensors")]) > 1
    md_dir, out = tmp_path / "md", tmp_path / "out"
    assert main(["import", "--arch", "omnigen2", "--from", str(release), "--to", str(md_dir), "--no-progress"]) == 0
    assert main(["export", "--arch", "omnigen2", "--from", str(md_dir), "--to", str(out), "--no-progress"]) == 0
    for sub, src_name, out_name in [("mllm", "model.safetensors.index.json", "model.safetensors"),
                                    ("transformer", "diffusion_pytorch_model.safetensors",
                                     "diffusion_pytorch_model.safetensors"),
                                    ("vae", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors")]:
        a, b = read_all(str(release / sub / src_name)), read_all(str(out / sub / out_name))
        assert set(a) == set(b), sub
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            assert a[k].tobytes() == b[k].tobytes(), k
        assert json.loads((out / sub / "config.json").read_text()) == json.loads((release / sub / "config.json").read_text())
    # the model dir's DiT weights are the golden ones: loading the export reproduces them exactly
    cfg = omnigen2_io.read_config(str(md_dir))
    dit = omnigen2_keymap.load_dit(omnigen2_dit.OmniGen2DiT(cfg.dit, rngs=nnx.Rngs(0)),
                                   load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors")))
    golden = load_file(os.path.join(FIX, "dit_tiny.safetensors"))
    for k, v in omnigen2_keymap.export_dit(dit).items():
        np.testing.assert_array_equal(v, golden[k])


def test_refusals(release, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(release, bad)
    t = load_file(str(bad / "transformer" / "diffusion_pytorch_model.safetensors"))
    t.pop("layers.0.attn.to_q.weight")
    t["layers.0.attn.to_k.weight"] = t["layers.0.attn.to_k.weight"][:, :5]
    t["bogus.weight"] = np.zeros(3, np.float32)
    os.remove(bad / "transformer" / "diffusion_pytorch_model.safetensors")
    write_tensors(str(bad / "transformer"), "diffusion_pytorch_model", t)
    with pytest.raises(Exception) as e:
        omnigen2_io.import_omnigen2(str(bad), str(tmp_path / "md"))
    msg = str(e.value)
    assert "transformer: 1 missing keys: layers.0.attn.to_q.weight" in msg
    assert "transformer: 1 unexpected keys: bogus.weight" in msg
    assert "layers.0.attn.to_k.weight: file [24, 5], config expects [24, 48]" in msg
    assert not (tmp_path / "md").exists()
    assert main(["import", "--arch", "omnigen2", "--from", str(bad), "--to", str(tmp_path / "md2"), "--no-progress"]) == 2
    pk = tmp_path / "pickle"
    shutil.copytree(release, pk)
    os.remove(pk / "transformer" / "diffusion_pytorch_model.safetensors")
    (pk / "transformer" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(Exception, match="pickle"):
        omnigen2_io.import_omnigen2(str(pk), str(tmp_path / "md3"))
