"""The ``rl`` section of a run config (``configs/uae_*.py``) and its validation.

Stages run in the order given by ``rl.stages`` ("name:steps,name:steps"), UAE's three
Unified-GRPO stages (reference notes: the stage list of the UAE repository's README; the paper
names the method):

  ``cold_start``  semantic reconstruction: flow matching of the generator on (the policy's own
                  caption -> the input image) with BOTH experts trainable (the und expert gets
                  the gradient through the caption's keys / values the latents attend to);
  ``und``         "generation for understanding": GRPO on the captions with the reconstruction
                  reward; the gen side (gen expert, norm_gen, time / latent embedders, llm2vae)
                  is frozen and part of the reward environment;
  ``gen``         "understanding for generation": flow matching on (policy caption -> input
                  image); the und side is frozen.
"""
from __future__ import annotations

import ml_collections

STAGES = ("cold_start", "und", "gen")
ENCODERS = ("clip", "dinov2", "siglip")


def default_rl_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        stages="und:300",
        images_per_step=2,             # input images per step (B); rollout rows = B * group_size
        group_size=8,                  # G
        max_caption_tokens=256,
        temperature=1.0, top_k=0, top_p=1.0,
        prompt="Describe this image in detail.",
        image_size=512,                # input / reconstructed image side (px, multiple of 16)
        vit_image_size=504,            # the ViT's copy of the input (multiple of 14)
        num_timesteps=50, timestep_shift=3.0, cfg_text_scale=4.0, cfg_img_scale=1.0,
        cfg_interval=(0.4, 1.0), cfg_renorm_type="global", cfg_renorm_min=0.0,
        clip_eps_low=0.2, clip_eps_high=0.2, kl_beta=0.04, std_eps=1e-4, reduction="sequence",
        scale_by_std=True,
        updates_per_batch=1,
        shared_group_noise=True,       # one flow noise per group: within-group reward differences come from the captions
        train_vit=False,               # und / cold_start: also train the SigLIP ViT (UAE trains the LLM)           # GRPO iterations (mu) per rollout batch
        reward_encoder="clip",         # clip | dinov2 | siglip
        reward_path="",                # HF checkpoint dir; '' = a random encoder of reward_vit (tiny runs)
        reward_vit=dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        image_size=56, patch_size=14, projection_dim=32),
        require_reward_path=False,     # True (real models): refuse to start with a random reward encoder
        reward_init_scale=0.2,         # random encoders: weights N(0, s^2) (rewards.rescale_random); 0 = the 0.02 init
        tokenizer_path="",             # a Qwen2 tokenizer dir to encode rl.prompt ('' = rl.prompt_ids)
        prompt_ids=[],
        eval_encoders="",              # extra encoders of the held-out evaluation ("dinov2,siglip"; random tiny ones
                                       # unless *_path below is set)
        dinov2_path="",
        shuffle_rewards=False,         # control run: rewards permuted across the batch (no signal)
        scene_seed=0,                  # training scenes: rng(scene_seed, step)
        heldout_seed=1000,             # held-out scenes (disjoint stream)
        heldout_images=16,
        eval_every=0,                  # held-out reconstruction reward every N steps (0: off)
        eval_samples=2,                # sampled captions per held-out image
        num_shapes=(1, 3),
    ))


def parse_stages(spec: str) -> list[tuple[str, int]]:
    out = []
    for part in str(spec).split(","):
        name, _, n = part.strip().partition(":")
        if name not in STAGES:
            raise ValueError(f"rl.stages: unknown stage {name!r} in {spec!r}; stages are {STAGES}")
        try:
            steps = int(n)
        except ValueError:
            raise ValueError(f"rl.stages: {part!r} needs a step count, e.g. und:300") from None
        if steps <= 0:
            raise ValueError(f"rl.stages: {part!r}: steps must be > 0")
        out.append((name, steps))
    return out


def stage_at(stages: list[tuple[str, int]], step: int) -> str:
    """The stage that runs step ``step`` (0-based)."""
    for name, n in stages:
        if step < n:
            return name
        step -= n
    return stages[-1][0]


def validate(cfg) -> ml_collections.ConfigDict:
    r = cfg.rl

    def need(cond, msg):
        if not cond:
            raise ValueError(f"invalid rl config: {msg}")

    stages = parse_stages(r.stages)
    need(cfg.train.steps == sum(n for _, n in stages),
         f"train.steps={cfg.train.steps} must equal the sum of rl.stages ({r.stages})")
    need(r.group_size >= 2, "rl.group_size must be >= 2")
    need(r.images_per_step >= 1, "rl.images_per_step must be >= 1")
    need(r.max_caption_tokens >= 2, "rl.max_caption_tokens must be >= 2")
    need(r.image_size % 16 == 0, f"rl.image_size={r.image_size} must be a multiple of 16")
    need(r.vit_image_size % cfg.model.vit.patch_size == 0,
         f"rl.vit_image_size={r.vit_image_size} must be a multiple of the ViT patch {cfg.model.vit.patch_size}")
    need(r.reward_encoder in ENCODERS, f"rl.reward_encoder must be one of {ENCODERS}")
    need(r.reward_path or not r.require_reward_path,
         "rl.reward_path is empty: set it to an HF checkpoint dir of the reward encoder (e.g. "
         "openai/clip-vit-large-patch14: config.json + model.safetensors)")
    need(r.updates_per_batch >= 1, "rl.updates_per_batch must be >= 1")
    need(r.temperature > 0 or all(s != "und" for s, _ in stages),
         "rl.temperature must be > 0 for the und (GRPO) stage: a group of greedy captions has no variance")
    for e in filter(None, str(r.eval_encoders).split(",")):
        need(e in ENCODERS, f"rl.eval_encoders: {e!r} is not one of {ENCODERS}")
    return cfg
