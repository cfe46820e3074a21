"""SGT on BAGEL-7B-MoT exactly as the released code trains it (song2yu/SGT ``train_sgt.sh``):
sampling weights sam 1.0 : vlm_sft 5.0 drawn per sample (not an exact per-batch ratio),
ce_weight 1.5, mse_weight 1.0, lr 1e-4 constant after 1000 warmup steps, 16k tokens per row,
checkpoints every 1000 steps. Same slice and memory recipe as ``sgt_bagel_7b.py`` (flash attention
through ``auto``, ``grad_accum=2``): runs as shipped on a v5p-64 (``TOPOLOGY``)."""
import ml_collections

from configs.sgt_bagel_7b import TOPOLOGY  # noqa: F401 -- the slice it fits as shipped
from configs.sgt_bagel_7b import get_config as paper


def get_config() -> ml_collections.ConfigDict:
    cfg = paper()
    cfg.data.mix.mode = "weights"
    cfg.data.mix.weights = ml_collections.ConfigDict({"seg": 1.0, "vqa": 5.0})
    cfg.train.update(ce_weight=1.5, mse_weight=1.0, save_every=1000)
    return cfg
