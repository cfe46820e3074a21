"""SGT on BAGEL-7B-MoT, the paper's recipe: start from the released EMA weights (imported with
``python -m sgt_jax.convert import``), train ViT, connector and both MoT experts (VAE frozen),
Seg:VQA = 2:1 by samples in every global batch, rows of 16k tokens.

Runs as shipped on a v5p-64 (``TOPOLOGY``: 32 chips, 2 rows per chip): pure FSDP, remat
``full``, ``train.grad_accum=2`` (one 16k row per chip per micro-batch) and
``llm.attention_impl="auto"`` (the Pallas flash kernel when compiling for TPU, also ahead of time
from a CPU machine; dense XLA elsewhere). ``python -m sgt_jax.aot --config configs/sgt_bagel_7b.py
--topology v5p-64`` compiles it at about 26 GiB of 95 per chip (docs/tpu_plan.md, the
recommended row); with dense attention the same step has no headroom there (97.5 GiB).
tests/test_aot.py compiles every preset that names a ``TOPOLOGY`` for it.

The paper's Table 8 is not available offline; where it is silent the released code's values
are used (lr 1e-4 constant after 1000 warmup steps, AdamW 0.9/0.95/1e-15, wd 0, clip 1.0,
EMA 0.9999, timestep shift 1.0). ``sgt_bagel_7b_official.py`` is the released code exactly.

    python -m sgt_jax.train --config configs/sgt_bagel_7b.py \
        --config.train.init_from=gs://BUCKET/bagel-7b-mot-orbax --workdir gs://BUCKET/runs/sgt
"""
import ml_collections

from sgt_jax.data.config import default_data_config
from sgt_jax.models.config import bagel_7b
from sgt_jax.train.config import default_eval_config, default_mesh_config, default_train_config

TOPOLOGY = "v5p-64"      # the slice this preset fits as shipped (python -m sgt_jax.aot --topology)


def get_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.model = bagel_7b()                      # bf16 compute, fp32 masters, remat "full", scanned layers
    cfg.model.llm.attention_impl = "auto"       # flash (Pallas) on TPU: dense 16k rows need >95 GiB/chip
    cfg.data = default_data_config(cfg.model)   # the model's patch / table sizes derived from it
    cfg.data.rows_per_batch = 64                # 2 rows of 16k tokens per chip on a v5p-64 (32 chips)
    cfg.data.sources.seg = "sgt_pairs:gs://BUCKET/SAM-SGT"          # the released SAM-SGT pairs
    cfg.data.sources.vqa = "llava:gs://BUCKET/llava-ov/sft.jsonl::gs://BUCKET/llava-ov/images"
    cfg.data.tokenizer_path = "gs://BUCKET/bagel-7b-mot-orbax/tokenizer"   # from the imported model dir
    cfg.data.grain.num_workers = 4             # SA-1B decode+render+resize: ~0.4 CPU-s per row (docs/data_throughput.md)
    cfg.data.mix.mode = "samples"
    cfg.data.mix.ratios = ml_collections.ConfigDict({"seg": 2, "vqa": 1})
    cfg.train = default_train_config()
    cfg.train.update(steps=5000, lr=1e-4, warmup_steps=1000, schedule="constant", ema_decay=0.9999,
                     ce_weight=1.0, mse_weight=1.0, copy_init_moe=False, save_every=500, keep=3,
                     log_every=10, init_from="", grad_accum=2)   # 1 row per chip per micro-batch
    cfg.mesh = default_mesh_config()            # pure FSDP over every chip
    cfg.eval = default_eval_config()            # off (every=0); --config.eval.every=N turns it on
    return cfg
