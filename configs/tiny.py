"""The default CPU preset: a tiny BAGEL (2 MoT layers, hidden 64) trained on the built-in
synthetic scenes (SA-1B-format shapes -> pseudo-colour masks, plus VQA about them), Seg:VQA = 2:1
per batch. A few hundred steps take a few minutes on a laptop CPU.

    python -m sgt_jax.train --config configs/tiny.py --workdir /tmp/sgt_tiny
"""
import ml_collections

from sgt_jax.data.config import tiny_data_config
from sgt_jax.models.config import tiny
from sgt_jax.train.config import default_eval_config, default_mesh_config, default_train_config
from sgt_jax.train.vae_init import TINY_VAE


SHIFT_FACTOR, SCALE_FACTOR = 0.0931, 0.5143     # sgt_jax/assets/tiny_vae.safetensors' metadata


def get_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.model = tiny()
    cfg.data = tiny_data_config(cfg.model)          # the model's patch / table sizes derived from it
    # the model's vocabulary is the tiny tokenizer's (512; tiny() keeps the golden fixture's 160)
    cfg.model.llm.vocab_size = cfg.data.get_ref("tiny_tokenizer_vocab_size")
    # shorter rows and smaller images than tiny_data_config(), for a fast CPU training run
    # (docs/training.md's main-job numbers are for these)
    cfg.data.update(tokens_per_row=384, gen_tokens_per_row=96, vit_patches_per_row=192,
                    max_tokens_per_sample=384,
                    vae_image_size=64,                  # 4x4 latent tokens per image at most
                    ce_tokens_per_row=32)               # lm_head at <= 32 CE positions, not all 288 und ones
                                                        # (rows hold <= 9 CE tokens here: no sample waits)
    t = cfg.data.transforms
    t.vit_image_size = 56                           # 4x4 ViT patches
    t.vae_max = 64                                  # every generation target 64 px (vae_min is 64)
    t.vqa_vit_max = 84
    t.target_resample = "nearest"
    cfg.data.sources.seg = "synthetic_seg:{workdir}/synthetic?n=256&size=48-80"
    cfg.data.sources.vqa = "synthetic_vqa:{workdir}/synthetic?n=256&size=48-80"
    cfg.train = default_train_config()
    cfg.train.update(steps=300, lr=1e-3, warmup_steps=20, ema_decay=0.99, save_every=100,
                     log_every=10)
    # the frozen VAE: an AE trained on the synthetic scenes and their masks (scripts/train_tiny_vae.py,
    # docs/training.md), not a random one -- a random VAE cannot reconstruct a mask. Its latent
    # statistics (FLUX's shift / scale factors) are the ones the script measured and stored in the file.
    cfg.train.vae_init = TINY_VAE
    cfg.model.vae.update(shift_factor=SHIFT_FACTOR, scale_factor=SCALE_FACTOR)
    cfg.mesh = default_mesh_config()
    # held-out evaluation at steps 0, 100, 200, 300 (docs/evaluation.md)
    cfg.eval = default_eval_config()
    cfg.eval.update(every=100, num_scenes=16, num_questions=32)
    return cfg
