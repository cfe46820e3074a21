"""A 'small' CPU preset for benchmarks: 4 MoT layers, hidden 256, rows of 1024 tokens."""
import ml_collections

from configs.tiny import get_config as tiny_config


def get_config() -> ml_collections.ConfigDict:
    cfg = tiny_config()
    cfg.model.llm.update(hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4, num_kv_heads=2)
    cfg.model.vit.update(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=2)
    cfg.data.update(tokens_per_row=1024, gen_tokens_per_row=256, vit_patches_per_row=640,
                    vae_images_per_row=16, max_tokens_per_sample=1024,
                    ce_tokens_per_row=64)           # rows hold <= 24 CE tokens of the 768 und positions
    return cfg
