"""Reward encoders: CLIP / DINOv2 equal transformers' PyTorch models on random tiny configs loaded
from the HF safetensors layout; the bicubic preprocessing equals torch's F.interpolate."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from sgt_jax.models import clip  # noqa: E402
from sgt_jax.rl import rewards  # noqa: E402

TOL = 1e-5


def _randomize(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim == 1 else 0.1))
            if "norm" in name and name.endswith("weight"):
                p.add_(1.0)
    return model.eval()


def _images(n, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _torch_pixels(images, size, mean, std):
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() * 0.00392156862745098
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.mark.parametrize("hw", [(37, 51), (28, 28), (90, 60)])
def test_preprocess_equals_torch_bicubic(hw):
    imgs = _images(2, *hw, seed=1)
    ref = _torch_pixels(imgs, 28, clip.CLIP_MEAN, clip.CLIP_STD).permute(0, 2, 3, 1).numpy()
    out = np.asarray(clip.preprocess(jnp.asarray(imgs), 28, clip.CLIP_MEAN, clip.CLIP_STD))
    # in [0, 1] pixel units (before the division by std ~0.27 that scales torch's fp32 rounding up)
    assert (np.abs(out - ref) * np.asarray(clip.CLIP_STD)).max() <= 1e-5


@pytest.mark.parametrize("projection", [0, 16])
def test_clip_matches_transformers(tmp_path, projection):
    hcfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=28, patch_size=14,
                                         projection_dim=projection or 16)
    hcfg._attn_implementation = "eager"
    cls = transformers.CLIPVisionModelWithProjection if projection else transformers.CLIPVisionModel
    hf = _randomize(cls(hcfg), 3)
    hf.save_pretrained(tmp_path)
    enc = rewards.load_encoder("clip", str(tmp_path))
    assert enc.config.projection_dim == projection
    imgs = _images(3, 40, 33)
    with torch.no_grad():
        px = _torch_pixels(imgs, 28, clip.CLIP_MEAN, clip.CLIP_STD)
        out = hf(pixel_values=px)
        feats = out.image_embeds if projection else out.pooler_output
        hidden = out.last_hidden_state.numpy()
    ours_hidden = np.asarray(enc.hidden_states(jnp.asarray(px.permute(0, 2, 3, 1).numpy())))
    assert np.abs(ours_hidden - hidden).max() <= TOL
    emb = np.asarray(nnx.jit(lambda m, x: m.encode(x))(enc, jnp.asarray(imgs)))
    ref = torch.nn.functional.normalize(feats, dim=-1).numpy()
    err = np.abs(emb - ref).max()
    print(f"clip (projection={projection}) max abs err {err:.2e}")
    assert err <= TOL


def test_dinov2_matches_transformers(tmp_path):
    hcfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     image_size=28, patch_size=14, mlp_ratio=2)
    hcfg._attn_implementation = "eager"
    hf = _randomize(transformers.Dinov2Model(hcfg), 4)
    hf.save_pretrained(tmp_path)
    enc = rewards.load_encoder("dinov2", str(tmp_path))
    imgs = _images(2, 30, 45, seed=2)
    from sgt_jax.models import dinov2
    with torch.no_grad():
        out = hf(pixel_values=_torch_pixels(imgs, 28, dinov2.IMAGENET_MEAN, dinov2.IMAGENET_STD))
    emb = np.asarray(enc.encode(jnp.asarray(imgs)))
    ref = torch.nn.functional.normalize(out.pooler_output, dim=-1).numpy()
    err = np.abs(emb - ref).max()
    print(f"dinov2 max abs err {err:.2e}")
    assert err <= TOL


def test_wrong_checkpoint_keys_are_listed(tmp_path):
    hcfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=28, patch_size=14)
    transformers.CLIPVisionModel(hcfg).save_pretrained(tmp_path)
    enc = clip.CLIPVision(clip.VitConfig(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                                         image_size=28, patch_size=14, projection_dim=0), rngs=nnx.Rngs(0))
    from safetensors.numpy import load_file
    with pytest.raises(ValueError, match=r"missing keys: vision_model\.encoder\.layers\.2\."):
        rewards.load_tensors(enc, "clip", load_file(str(tmp_path / "model.safetensors")))


def test_reward_is_cosine_and_siglip_interface():
    from sgt_jax.models.config import tiny
    enc = rewards.random_encoder("siglip", model_cfg=tiny(), image_size=28)
    imgs = jnp.asarray(_images(2, 32, 32, seed=5))
    e = np.asarray(enc.encode(imgs))
    assert e.shape[0] == 2 and np.allclose(np.linalg.norm(e, axis=-1), 1.0, atol=1e-5)
    r = np.asarray(rewards.reward(enc, imgs, imgs[::-1]))
    assert np.allclose(r, np.sum(e * e[::-1], axis=-1), atol=1e-5)
    assert np.allclose(np.asarray(rewards.reward(enc, imgs, imgs)), 1.0, atol=1e-5)
