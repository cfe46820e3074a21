"""Presets build with the published shapes; inconsistent configs fail at construction."""
import numpy as np
import pytest
from flax import nnx

from sgt_jax.models import config as C
from sgt_jax.convert import keymap
from sgt_jax.models.bagel import Bagel
from sgt_jax.models.vae import AutoEncoder


def _count(state, prefix=None):
    return sum(int(np.prod(v.get_value().shape)) for p, v in nnx.to_flat_state(state)
               if prefix is None or p[0] == prefix)


def test_bagel_7b_parameter_counts_match_the_release():
    """Counts from instantiating BAGEL-7B-MoT on the meta device (reference/bagel.md 5.2)."""
    cfg = C.bagel_7b()
    model = nnx.eval_shape(lambda: Bagel(cfg, rngs=nnx.Rngs(0)))
    st = nnx.state(model, nnx.Param)
    assert _count(st, "language_model") == 14_141_252_608
    assert _count(st, "vit_model") == 402_552_736
    assert _count(st, "connector") == 16_980_992
    assert sum(_count(st, k) for k in ("time_embedder", "vae2llm", "llm2vae")) == 14_232_128
    # + the two fixed sin-cos tables = BAGEL's 14,607,260,128 total, 1223 keys
    fixed = sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(model))
                if not isinstance(v, nnx.Param))
    assert _count(st) + fixed == 14_607_260_128
    assert len(keymap.bagel_table(cfg)) + len(keymap.FIXED_KEYS) == 1223
    ae = nnx.eval_shape(lambda: AutoEncoder(cfg, rngs=nnx.Rngs(0)))
    assert _count(nnx.state(ae, nnx.Param)) == 83_819_683


def test_from_bagel_dir_reads_release_configs(golden_dir):
    cfg = C.from_bagel_dir(str(golden_dir), base=C.tiny())
    assert (cfg.llm.hidden_size, cfg.llm.num_layers, cfg.llm.num_kv_heads) == (64, 2, 2)
    assert cfg.vit.num_layers == 2          # BAGEL drops the ViT's last layer
    assert cfg.vit.max_patches_per_side == 8


def test_vit_grid_must_match():
    cfg = C.tiny()
    cfg.bagel.vit_max_num_patch_per_side = 70
    with pytest.raises(ValueError, match="vit_max_num_patch_per_side"):
        C.validate(cfg)


# ---- the experiment presets of the SGT study (issue 16): Table 8, the proxy tasks, Fig. 5 -----

def _preset(name: str, arg: str | None = None):
    import importlib

    mod = importlib.import_module(f"configs.{name}")
    return mod.get_config(arg) if arg is not None else mod.get_config()


def _override(cfg, flag: str) -> None:
    """``--config.a.b=v`` as ml_collections' config flags apply it: the value parsed as the type
    of the key it replaces (str for a placeholder)."""
    import ast

    path, _, value = flag[len("--config."):].partition("=")
    *parents, leaf = path.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    old = node[leaf]
    node[leaf] = value if old is None or isinstance(old, str) else type(old)(ast.literal_eval(value))


def _check_run(cfg) -> None:
    """The run config validates on a slice of its rows' size and its data pipeline config builds:
    data config, every source spec parsed (kind, options; nothing opened)."""
    from sgt_jax.data import config as data_config
    from sgt_jax.data import sources
    from sgt_jax.train.config import validate

    validate(cfg, mesh={"data": 1, "fsdp": int(cfg.data.rows_per_batch) // int(cfg.train.grad_accum),
                        "tensor": 1})
    data_config.validate(cfg.data)
    for spec in cfg.data.sources.values():
        for part in spec.split(";"):
            sources.parse_spec(part.strip())


def test_paper_preset_is_table_8():
    """The paper's Table 8, BAGEL column (supplementary): AdamW (0.9, 0.95), weight decay 0.01,
    lr 1e-4, 1000 warmup steps, 10 000 steps; the released code's preset keeps its own values."""
    t = _preset("sgt_bagel_7b").train
    assert (t.lr, t.b1, t.b2, t.weight_decay, t.warmup_steps, t.steps, t.schedule) == \
        (1e-4, 0.9, 0.95, 0.01, 1000, 10_000, "constant")
    o = _preset("sgt_bagel_7b_official")
    assert (o.train.weight_decay, o.train.ce_weight, o.data.mix.mode) == (0.0, 1.5, "weights")
    assert o.train.steps == t.steps and o.data.rows_per_batch == _preset("sgt_bagel_7b").data.rows_per_batch


def test_global_batch_maps_to_rows():
    """docs/study.md's mapping of "global batch 60": 16 rows of 16k tokens; at the packer's
    measured 4.4 SGT samples per row (bench/results/packing.json) ~70 samples; COCO proxy samples
    (one 688x512 target each) at most 4 per row, 64 per step."""
    import json
    import pathlib

    cfg = _preset("sgt_bagel_7b")
    d = cfg.data
    assert (d.rows_per_batch, d.tokens_per_row, d.vae_images_per_row) == (16, 16384, 4)
    res = json.loads((pathlib.Path(__file__).parents[1] / "bench/results/packing.json").read_text())
    ours = res["sgt"]["results"]["ours"]
    per_row = ours["samples"] / ours["rows"]
    assert 55 <= d.rows_per_batch * per_row <= 80
    from sgt_jax.data.samples import resize_hw
    t = d.transforms
    vh, vw = resize_hw(640, 480, t.vae_max, t.vae_min, t.vae_stride, t.vae_max_pixels)
    latents = (vh // d.vae_downsample) * (vw // d.vae_downsample)
    assert 4 * latents <= d.gen_tokens_per_row                 # the image cap, not the tokens, binds
    assert d.rows_per_batch * d.vae_images_per_row == 64


@pytest.mark.parametrize("task", __import__("sgt_jax.data.config", fromlist=["x"]).PROXY_TASKS)
def test_proxy_preset_builds(task):
    """``configs/sgt_proxy.py:TASK`` for every task: validates, one seg stream (no VQA), the task
    in ``data.proxy``, COCO read with the shared 20k subset, and the same compiled step as the
    paper preset (tests/test_aot.py compiles that once)."""
    from sgt_jax.train.executable import step_fingerprint

    cfg = _preset("sgt_proxy", task)
    _check_run(cfg)
    assert cfg.data.proxy == task and list(cfg.data.sources) == ["seg"]
    spec = cfg.data.sources.seg
    assert spec.startswith("sa1b:") if task == "sa1b_seg" else "subset=20000" in spec
    assert step_fingerprint(cfg) == step_fingerprint(_preset("sgt_bagel_7b"))


def test_proxy_presets_read_the_same_images():
    """Every COCO proxy reads COCO 2017 train through TFDS with the same subset (size, seed): the
    same image ids whatever the reader (tests/data/test_sources_tfds.py checks the readers)."""
    from sgt_jax.data import sources
    from sgt_jax.data.config import PROXY_TASKS

    subsets = set()
    for task in PROXY_TASKS:
        kind, body, opts = sources.parse_spec(_preset("sgt_proxy", task).data.sources.seg)
        if task != "sa1b_seg":
            assert kind == "tfds" and body.endswith(":train")
            subsets.add((opts["subset"], opts.get("subset_seed", "0")))
    assert subsets == {("20000", "0")}


def test_unknown_proxy_task_is_an_error():
    from sgt_jax.data import config as data_config

    with pytest.raises(ValueError, match="'segmentation' is not a proxy task"):
        _preset("sgt_proxy", "segmentation")
    assert _preset("sgt_proxy", "derain+dehaze").data.proxy == "derain+dehaze"   # Table 6's combined rows
    cfg = data_config.tiny_data_config()
    assert cfg.proxy == ""
    data_config.validate(cfg)
    cfg.proxy = "Edge"
    with pytest.raises(ValueError, match="proxy='Edge' is not a proxy task: one of semantic_seg"):
        data_config.validate(cfg)


def test_study_doc_commands_build():
    """Every ``python -m sgt_jax.train`` command of docs/study.md (the Fig. 5 sweeps, the proxy
    runs) builds: the preset with its argument, the overrides applied, validated, specs parsed."""
    import pathlib
    import shlex

    text = (pathlib.Path(__file__).parents[1] / "docs/study.md").read_text()
    commands = [" ".join(c.split("\\\n")) for c in text.split("python -m sgt_jax.train ")[1:]]
    commands = [c.split("\n")[0] for c in commands]
    assert len(commands) >= 14
    seen = set()
    for c in commands:
        args = shlex.split(c)
        assert args[0] == "--config", c
        name, _, arg = args[1].removeprefix("configs/").removesuffix("").partition(":")
        cfg = _preset(name.removesuffix(".py"), arg or None)
        for a in args[2:]:
            if a.startswith("--config."):
                _override(cfg, a)
        _check_run(cfg)
        seen.add((cfg.data.mix.ratios.get("seg"), cfg.data.mix.ratios.get("vqa"), cfg.data.sources.seg))
    ratios = {(s, v) for s, v, _ in seen}
    assert {(0, 1), (1, 2), (1, 1), (2, 1), (3, 1), (4, 1)} <= ratios
    sizes = {spec.rsplit("subset=", 1)[1] for _, _, spec in seen
             if spec.startswith("sgt_pairs") and "subset=" in spec}
    assert sizes == {"2000", "5000", "10000", "20000", "50000", "100000"}
