"""SGT on BAGEL-7B-MoT, the paper's recipe (Table 8, BAGEL column): start from the released EMA
weights (imported with ``python -m sgt_jax.convert import``), train ViT, connector and both MoT
experts (VAE frozen), Seg:VQA = 2:1 by samples in every global batch; AdamW beta (0.9, 0.95),
weight decay 0.01, lr 1e-4 constant after 1000 warmup steps, 10 000 steps, global batch 60.

Global batch 60 -> packed rows. The paper counts samples; this stack's step is a fixed number of
rows of 16 384 tokens into which samples of varying length are packed (as BAGEL's released trainer
packs them into ~16k-token sequences). Our packer puts 4.4 SGT samples in a 16k row at Seg:VQA =
2:1 (SAM-SGT and LLaVA-OV sizes: ``bench/packing.py``, bench/results/packing.json, 5274 samples
in 1200 rows), so 60 samples are 13.6 rows: the preset ships ``data.rows_per_batch=16`` (~70
samples), the nearest multiple of the v5p-16's 8 chips. ``vae_images_per_row=4``
caps the generation samples of a row (a SAM-SGT target is ~2.7k latent tokens: at most 3 fit the
10 240 gen positions anyway); a COCO proxy sample (one 688x512 target, ~1.6k tokens) is capped
by it: 16 rows hold at most 64 of them (configs/sgt_proxy.py). docs/study.md, "Global batch".

Runs as shipped on a v5p-16 (``TOPOLOGY``: 8 chips, 2 rows per chip): pure FSDP, remat
``full``, ``train.grad_accum=2`` (one 16k row per chip per micro-batch) and
``llm.attention_impl="auto"`` (the Pallas flash kernel when compiling for TPU, also ahead of time
from a CPU machine; dense XLA elsewhere). ``python -m sgt_jax.aot --config
configs/sgt_bagel_7b.py --topology v5p-16`` compiles it at 66.1 GiB of 95 per chip
(docs/tpu_plan.md, "The paper's batch on a v5p-16"); tests/test_aot.py
compiles every preset that names a ``TOPOLOGY`` for it. A bigger slice with more rows runs a
bigger batch than the paper's (docs/tpu_plan.md's v5p-64 plan: 64 rows, ``grad_accum=2``). Where
Table 8 is silent the released code's values are used (AdamW eps 1e-15, clip 1.0, EMA 0.9999,
timestep shift 1.0); ``sgt_bagel_7b_official.py`` is the released code exactly.

    python -m sgt_jax.train --config configs/sgt_bagel_7b.py \
        --config.train.init_from=gs://BUCKET/bagel-7b-mot-orbax --workdir gs://BUCKET/runs/sgt
"""
import ml_collections

from sgt_jax.data.config import default_data_config
from sgt_jax.models.config import bagel_7b
from sgt_jax.train.config import default_eval_config, default_mesh_config, default_train_config

TOPOLOGY = "v5p-16"      # the slice this preset fits as shipped (python -m sgt_jax.aot --topology)

# Table 8 (BAGEL): what every preset of the paper's experiments trains with
TABLE_8 = dict(lr=1e-4, b1=0.9, b2=0.95, weight_decay=0.01, warmup_steps=1000, steps=10_000)
PAPER_ROWS = 16          # global batch 60 samples ~ 13.6 rows of 16k (4.4 samples per row): 16


def get_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.model = bagel_7b()                      # bf16 compute, fp32 masters, remat "full", scanned layers
    cfg.model.llm.attention_impl = "auto"       # flash (Pallas) on TPU: dense 16k rows need >95 GiB/chip
    cfg.data = default_data_config(cfg.model)   # the model's patch / table sizes derived from it
    cfg.data.rows_per_batch = PAPER_ROWS        # 16 rows of 16k tokens: 2 per chip on a v5p-16
    cfg.data.vae_images_per_row = 4             # <= 4 generation samples per row (proxy batches <= 64)
    cfg.data.sources.seg = "sgt_pairs:gs://BUCKET/SAM-SGT"          # the released SAM-SGT pairs
    cfg.data.sources.vqa = "llava:gs://BUCKET/llava-ov/sft.jsonl::gs://BUCKET/llava-ov/images"
    cfg.data.tokenizer_path = "gs://BUCKET/bagel-7b-mot-orbax/tokenizer"   # from the imported model dir
    cfg.data.grain.num_workers = 4             # SA-1B decode+render+resize: ~0.4 CPU-s per row (docs/data_throughput.md)
    cfg.data.mix.mode = "samples"
    cfg.data.mix.ratios = ml_collections.ConfigDict({"seg": 2, "vqa": 1})
    cfg.train = default_train_config()
    cfg.train.update(**TABLE_8, schedule="constant", ema_decay=0.9999, ce_weight=1.0, mse_weight=1.0,
                     copy_init_moe=False, save_every=500, keep=3, log_every=10, init_from="",
                     grad_accum=2)              # 1 row per chip per micro-batch
    cfg.mesh = default_mesh_config()            # pure FSDP over every chip
    cfg.eval = default_eval_config()            # off (every=0); --config.eval.every=N turns it on
    return cfg
