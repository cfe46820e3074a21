"""The SGT study's proxy tasks (paper Sec. 3.3, Fig. 3, Table 6): BAGEL-7B-MoT generative-tuned on
ONE visual task at a time, 20k COCO 2017 train images per task, the same images for every task,
no VQA data ("we exclusively utilize visual data for generative tuning during this investigative
phase"), with the paper's Table 8 recipe and step (configs/sgt_bagel_7b.py: AdamW (0.9, 0.95),
weight decay 0.01, lr 1e-4, 1000 warmup steps, 10 000 steps; 16 rows of 16k tokens, at most 4
generation samples per row: <= 64 COCO samples per step for the paper's 60). The task is the
config argument (a task of ``data.PROXY_TASKS`` or ``a+b`` of them, e.g. ``derain+dehaze``; default panoptic_seg):

    python -m sgt_jax.train --config configs/sgt_proxy.py:edge \
        --config.train.init_from=gs://BUCKET/bagel-7b-mot-orbax --workdir gs://BUCKET/runs/proxy_edge

COCO is read through TFDS (``tfds build coco/2017_panoptic`` and ``coco/2017`` with
``--file_format=array_record`` into ``COCO_TFDS``, docs/data_sources.md "COCO through TFDS");
``subset=20000`` keeps the same 20 000 image ids in every task's source (``sources.subset_ids``:
a seeded hash of the COCO image id, whatever the reader). Each task reads the source whose
records carry its target (``SOURCES``): panoptic segments re-coloured by the renderer, instances
per object, the semantic target one colour per category (COCO things: the instances JSON), and
the image-only tasks the panoptic source's images. ``sa1b_seg`` is class-agnostic SA-1B
segmentation (the paper's supplementary variant), not COCO. Runs as shipped on a v5p-16
(``TOPOLOGY``): the same compiled step as sgt_bagel_7b.py (tests/test_aot.py compiles it once).
docs/study.md maps each config to the paper's figures and tables.
"""
import ml_collections

from configs.sgt_bagel_7b import TOPOLOGY  # noqa: F401 -- the slice it fits as shipped
from configs.sgt_bagel_7b import get_config as paper
from sgt_jax.data.proxy.tasks import check_task

COCO_TFDS = "/data/tfds"          # the prepared TFDS datasets (a local or mounted directory)
COCO_ANN = "/data/coco/annotations"
SUBSET = 20_000                   # COCO images per task (paper: "20k sample pairs" per task)

_IMAGES = f"tfds:coco/2017_panoptic:train?data_dir={COCO_TFDS}&colors=render"
_INSTANCES = f"tfds:coco/2017:train?data_dir={COCO_TFDS}&instances={COCO_ANN}/instances_train2017.json"
# task -> the seg stream's source (its records' image is the input; their target the seg target)
SOURCES = {
    "panoptic_seg": _IMAGES,
    "instance_seg": _INSTANCES + "&by=instance",
    "semantic_seg": _INSTANCES + "&by=category",
    "detection": _INSTANCES + "&by=instance",
    # class-agnostic SA-1B segmentation: two of SA-1B's 1000 tars, ~22k images (~11k each)
    "sa1b_seg": "sa1b:gs://BUCKET/sa1b/sa_000000.tar,gs://BUCKET/sa1b/sa_000001.tar",
}


def get_config(task: str = "panoptic_seg") -> ml_collections.ConfigDict:
    try:
        check_task(task)
    except ValueError as e:
        raise ValueError(f"configs/sgt_proxy.py:{task}: {e}") from None
    cfg = paper()
    spec = SOURCES.get(task, _IMAGES)
    if spec.startswith("tfds:"):
        spec += f"&subset={SUBSET}"
    cfg.data.sources = ml_collections.ConfigDict({"seg": spec})      # no VQA stream in the study
    cfg.data.mix.mode = "samples"
    cfg.data.mix.ratios = ml_collections.ConfigDict({"seg": 1})
    cfg.data.proxy = task
    cfg.data.grain.num_workers = 4
    return cfg
