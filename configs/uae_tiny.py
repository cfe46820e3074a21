"""Unified-GRPO on the tiny BAGEL (CPU): synthetic scenes, a tiny random CLIP-architecture reward
encoder, short captions, 64 px reconstructions (docs/rl.md).

    python -m sgt_jax.rl --config configs/uae_tiny.py --workdir /tmp/uae_tiny
"""
import ml_collections

from sgt_jax.models.config import tiny
from sgt_jax.rl.config import default_rl_config
from sgt_jax.train.config import default_mesh_config, default_train_config


def get_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.model = tiny()
    cfg.rl = default_rl_config()
    cfg.rl.update(stages="cold_start:20,und:160,gen:20", images_per_step=2, group_size=4, max_caption_tokens=8,
                  temperature=1.0, image_size=64, vit_image_size=56, num_timesteps=6, cfg_text_scale=2.0,
                  kl_beta=0.01, updates_per_batch=2, heldout_images=8, eval_every=50, eval_samples=2,
                  eval_encoders="dinov2,siglip", train_vit=True)
    cfg.rl.prompt_ids = [20, 21, 22, 23]           # no tokenizer: a fixed 4-token prompt
    cfg.train = default_train_config()
    cfg.train.update(steps=200, lr=1e-3, warmup_steps=10, ema_decay=0.99, save_every=50, log_every=1,
                     max_grad_norm=1.0)
    cfg.mesh = default_mesh_config()
    return cfg
