"""UAE's Unified-GRPO on BAGEL-7B-MoT (docs/rl.md): start from the released weights imported with
``python -m sgt_jax.convert import``; CLIP ViT-L/14 reward (HF ``openai/clip-vit-large-patch14``,
safetensors), bicubic 224 resize + CLIP normalisation as UAE's ``ClipScore``.

    python -m sgt_jax.rl --config configs/uae_bagel_7b.py \
        --config.train.init_from=gs://BUCKET/bagel-7b-mot-orbax \
        --config.rl.tokenizer_path=gs://BUCKET/bagel-7b-mot-orbax/tokenizer \
        --config.rl.reward_path=/path/to/clip-vit-large-patch14 --workdir gs://BUCKET/runs/uae

Stated in the UAE paper and used here: G captions per input image from the old policy, reward
cos(CLIP(x), CLIP(x_hat)), the GRPO objective with the per-token ratio pi/pi_old, the
generator frozen in "generation for understanding"; the three stages (reference notes on the
UAE repository's README). ASSUMPTIONS (the paper gives no number; the RL code was never
released): G = 8, eps = 0.2 (PPO / DeepSeekMath), KL beta = 0.04 with the k3 estimator
(DeepSeekMath), lr 1e-6 constant (DeepSeekMath's GRPO), one update per rollout batch, sampling
temperature 1.0, captions <= 512 tokens (UAE's LongCap captions are 250+ words), rollout images
512 px with 25 Euler steps and BAGEL's t2i CFG (text 4.0, interval 0.4-1.0, global renorm), stage
lengths 500 / 2000 / 1000 steps, 8 input images per step (64 rollouts). UAE fine-tunes LoRA
adapters; this recipe fine-tunes the stage's side in full.

No TPU slice is named yet: the AOT compile of a 7B rollout + update step is not wired
(docs/rl.md, "Not done").
"""
import ml_collections

from sgt_jax.models.config import bagel_7b
from sgt_jax.rl.config import default_rl_config
from sgt_jax.train.config import default_mesh_config, default_train_config


def get_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.model = bagel_7b()
    cfg.model.llm.attention_impl = "auto"
    cfg.rl = default_rl_config()
    cfg.rl.update(stages="cold_start:500,und:2000,gen:1000", images_per_step=8, group_size=8,
                  max_caption_tokens=512, temperature=1.0, image_size=512, vit_image_size=504,
                  num_timesteps=25, cfg_text_scale=4.0, cfg_img_scale=1.0, clip_eps_low=0.2, clip_eps_high=0.2,
                  kl_beta=0.04, updates_per_batch=1, reward_encoder="clip", reward_path="",
                  require_reward_path=True, tokenizer_path="",
                  prompt="Describe this image in detail.", eval_every=250, heldout_images=100)
    cfg.train = default_train_config()
    cfg.train.update(steps=3500, lr=1e-6, warmup_steps=0, schedule="constant", ema_decay=0.9999,
                     copy_init_moe=False, save_every=100, keep=3, log_every=1, init_from="")
    cfg.mesh = default_mesh_config()
    return cfg
