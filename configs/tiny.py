"""The default CPU preset: a tiny BAGEL (2 MoT layers, hidden 64) trained on the built-in
synthetic scenes (SA-1B-format shapes -> pseudo-colour masks, plus VQA about them), Seg:VQA = 2:1
per batch. A few hundred steps take a few minutes on a laptop CPU.

    python -m sgt_jax.train --config configs/tiny.py --workdir /tmp/sgt_tiny
"""
import ml_collections

from sgt_jax.data.config import tiny_data_config
from sgt_jax.models.config import tiny
from sgt_jax.train.config import default_mesh_config, default_train_config


def get_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.model = tiny()
    cfg.model.llm.vocab_size = 512                  # the tiny tokenizer's vocabulary
    cfg.data = tiny_data_config()
    cfg.data.tiny_tokenizer_vocab_size = 512
    cfg.data.rows_per_batch = 4
    cfg.data.tokens_per_row = 384
    cfg.data.gen_tokens_per_row = 96
    cfg.data.vit_patches_per_row = 192
    cfg.data.vae_images_per_row = 4
    cfg.data.vae_image_size = 64                    # 4x4 latent tokens per image at most
    cfg.data.max_tokens_per_sample = 384
    cfg.data.transforms.vit_image_size = 56         # 4x4 ViT patches
    cfg.data.transforms.vae_min, cfg.data.transforms.vae_max = 64, 64
    cfg.data.transforms.vqa_vit_min, cfg.data.transforms.vqa_vit_max = 56, 84
    cfg.data.transforms.target_resample = "nearest"
    cfg.data.sources.seg = "synthetic_seg:{workdir}/synthetic?n=256&size=48-80"
    cfg.data.sources.vqa = "synthetic_vqa:{workdir}/synthetic?n=256&size=48-80"
    cfg.train = default_train_config()
    cfg.train.update(steps=300, lr=1e-3, warmup_steps=20, ema_decay=0.99, save_every=100,
                     log_every=10)
    cfg.mesh = default_mesh_config()
    return cfg
