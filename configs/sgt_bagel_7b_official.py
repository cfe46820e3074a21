"""SGT on BAGEL-7B-MoT as the released code trains it (song2yu/SGT ``train_sgt.sh`` and the
dataclass defaults): sampling weights sam 1.0 : vlm_sft 5.0 drawn per sample (not an exact
per-batch ratio), ce_weight 1.5, mse_weight 1.0, AdamW (0.9, 0.95, eps 1e-15) **without weight
decay** (the paper's Table 8 says 0.01: ``sgt_bagel_7b.py``), lr 1e-4 constant after 1000 warmup
steps, 16k tokens per row, checkpoints every 1000 steps. The release states no step count: the
paper's 10 000 are kept. Its trainer packs one ~16k sequence per GPU on 8 GPUs; this preset keeps
``sgt_bagel_7b.py``'s step (16 rows of 16k, the same compiled program but for the loss and decay
scalars): same slice and memory recipe (flash attention through ``auto``, ``grad_accum=2``), runs
as shipped on a v5p-16 (``TOPOLOGY``)."""
import ml_collections

from configs.sgt_bagel_7b import TOPOLOGY  # noqa: F401 -- the slice it fits as shipped
from configs.sgt_bagel_7b import get_config as paper


def get_config() -> ml_collections.ConfigDict:
    cfg = paper()
    cfg.data.mix.mode = "weights"
    cfg.data.mix.weights = ml_collections.ConfigDict({"seg": 1.0, "vqa": 5.0})
    cfg.train.update(ce_weight=1.5, mse_weight=1.0, weight_decay=0.0, save_every=1000)
    return cfg
