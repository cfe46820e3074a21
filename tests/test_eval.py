"""Evaluation: the mask -> instances -> Hungarian IoU pipeline on hand-built masks, VQA
normalisation, the exports' layout, held-out losses (deterministic, equal across a resume) and
evaluation inside training (no extra step compilation, training unchanged)."""
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from sgt_jax.eval import exports, metrics
from sgt_jax.parallel import mesh as mesh_lib

BG = (0, 0, 0)


def square(h, w, y, x, s):
    m = np.zeros((h, w), bool)
    m[y:y + s, x:x + s] = True
    return m


def paint(masks, colors, h=64, w=64, bg=BG):
    im = np.zeros((h, w, 3), np.uint8) + np.asarray(bg, np.uint8)
    for m, c in zip(masks, colors):
        im[m] = c
    return im


def test_permuted_colours_give_miou_one():
    masks = [square(64, 64, 4, 4, 20), square(64, 64, 30, 30, 25), square(64, 64, 5, 40, 12)]
    target = paint(masks, [(200, 30, 30), (30, 200, 30), (30, 30, 200)])
    rng = np.random.default_rng(0)
    # other colours, in another order, with generation noise (+-6 per channel)
    gen = paint(masks, [(250, 250, 0), (0, 160, 240), (170, 0, 170)]).astype(int)
    gen = np.clip(gen + rng.integers(-6, 7, gen.shape), 0, 255).astype(np.uint8)
    s = metrics.score_mask(target, gen)
    assert s.ious == [1.0, 1.0, 1.0] and (s.tp, s.fp, s.fn) == (3, 0, 0)
    summ = metrics.summarize([s])
    assert summ["miou"] == 1.0 and summ["pq"] == 1.0


@pytest.mark.parametrize("shift", [3, 12])
def test_shifted_mask_gives_the_computed_iou(shift):
    a = square(64, 64, 10, 10, 20)
    b = square(64, 64, 10, 10 + shift, 20)
    iou = (a & b).sum() / (a | b).sum()              # independent of the module: boolean areas
    s = metrics.score_mask(paint([a], [(255, 0, 0)]), paint([b], [(0, 0, 255)]))
    assert s.ious == [pytest.approx(iou)]
    summ = metrics.summarize([s])
    assert summ["miou"] == pytest.approx(iou)
    if iou > 0.5:        # a true positive: SQ = its IoU, RQ = 1
        assert summ["pq"] == pytest.approx(iou)
    else:                # no match: one false positive and one false negative
        assert summ["pq"] == 0.0 and (s.tp, s.fp, s.fn) == (0, 1, 1)


def test_missing_and_extra_instances():
    a, b, extra = square(64, 64, 2, 2, 20), square(64, 64, 40, 40, 20), square(64, 64, 40, 2, 16)
    target = paint([a, b], [(255, 0, 0), (0, 255, 0)])
    gen = paint([a, extra], [(0, 0, 255), (255, 255, 0)])      # b missed, one extra instance
    s = metrics.score_mask(target, gen)
    assert sorted(s.ious) == [0.0, 1.0] and (s.tp, s.fp, s.fn) == (1, 1, 1)
    summ = metrics.summarize([s])
    assert summ["miou"] == 0.5 and summ["rq"] == pytest.approx(1 / (1 + 0.5 + 0.5))
    # a background that is not black (a source's background=R,G,B) is no instance either
    grey = (120, 120, 120)
    s2 = metrics.score_mask(paint([a], [(255, 0, 0)], bg=grey), paint([a], [(0, 255, 0)], bg=grey), grey)
    assert s2.ious == [1.0] and s2.fp == 0


def test_hungarian_assignment_maximises_the_summed_iou():
    """Two targets overlapping two predictions: the greedy best pair is not the best assignment."""
    gt = np.zeros((1, 10), np.int32)
    gt[0, :6], gt[0, 6:] = 1, 2
    pred = np.zeros((1, 10), np.int32)
    pred[0, 2:6], pred[0, 6:] = 1, 2
    iou = metrics.iou_matrix(gt, pred)
    np.testing.assert_allclose(iou, [[4 / 6, 0], [0, 1]])
    assert metrics.match(gt, pred).ious == pytest.approx([4 / 6, 1.0])


def test_vqa_normalisation():
    n = metrics.normalize_answer
    assert n("Three.") == "3" and n("  The RED circle! ") == "red circle" and n("an apple") == "apple"
    assert metrics.exact_match("Left.", "left") and metrics.exact_match("two", "2")
    assert not metrics.exact_match("yes", "no") and not metrics.exact_match("left or right", "Left")


def test_exports_layout(tmp_path):
    prompts = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
               {"tag": "two_object", "prompt": "a photo of a dog and a car"}]
    out = tmp_path / "geneval"
    exports.write_seeds(str(out), [0, 7, 9])
    for i, p in enumerate(prompts):
        imgs = [np.full((16, 16, 3), 10 * k + i, np.uint8) for k in range(3)]
        exports.write_geneval_prompt(str(out), i, p, imgs)
    assert sorted(os.listdir(out)) == ["00000", "00001", "seeds.json"]
    for i, p in enumerate(prompts):
        d = out / f"{i:05d}"
        assert json.loads((d / "metadata.jsonl").read_text()) == p
        assert sorted(os.listdir(d / "samples")) == ["00000.png", "00001.png", "00002.png"]
        assert np.asarray(Image.open(d / "samples" / "00002.png"))[0, 0, 0] == 20 + i
    assert json.loads((out / "seeds.json").read_text())["seeds"] == [0, 7, 9]

    rows = [{"index": 3, "question": "Which is closer?", "A": "the cat", "B": "the dog", "answer": "A",
             "prediction": "A"},
            {"index": 5, "question": "Count\tthem", "A": "1", "B": "2", "C": "3", "answer": "C", "prediction": "(B)"}]
    tsv, jl = exports.write_answers(str(tmp_path / "a" / "answers.tsv"), rows)
    lines = open(tsv).read().splitlines()
    assert lines[0].split("\t") == ["index", "question", "A", "B", "C", "answer", "prediction"]
    assert lines[1].split("\t") == ["3", "Which is closer?", "the cat", "the dog", "", "A", "A"]
    assert lines[2].split("\t") == ["5", "Count them", "1", "2", "3", "C", "(B)"]
    assert [json.loads(x)["prediction"] for x in open(jl)] == ["A", "(B)"]
    assert exports.mc_prompt("Q?", exports.options_of(rows[1])).splitlines()[:4] == ["Q?", "A. 1", "B. 2", "C. 3"]


# ------------------------------------------------------------------------------------------------
# inside training (the tiny preset on its synthetic data, a few steps)


def _tiny(steps=4, every=2, **ev):
    from configs.tiny import get_config

    cfg = get_config()
    cfg.train.update(steps=steps, save_every=2, log_every=1, warmup_steps=2)
    cfg.data.rows_per_batch = 8          # a whole number of rows on each of the session's 8 devices
    cfg.eval.update(dict(every=every, num_scenes=2, num_questions=2, loss_batches=1, flow_steps=3,
                         max_new_tokens=4, grid_rows=2), **ev)
    return cfg


def _eval_rows(wd):
    rows = [json.loads(x) for x in open(os.path.join(wd, "metrics.jsonl"))]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("eval/")} for r in rows if "eval/ce" in r}


def _weights(wd):
    from sgt_jax.train.export import find_checkpoint, restore_weights

    _, params, _ = restore_weights(*find_checkpoint(wd))
    import jax

    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}


@pytest.mark.slow
def test_eval_in_training_is_deterministic_resumable_and_changes_nothing(tmp_path):
    from sgt_jax.eval.runner import make_hook
    from sgt_jax.infer.engine import compile_counts
    from sgt_jax.train import loop

    cfg = _tiny()
    a, b, c = (str(tmp_path / x) for x in "abc")
    hook, snaps = make_hook(cfg, a), []

    def recording(step, state, consts):
        out = hook(step, state, consts)
        if out:
            snaps.append({**compile_counts(), "eval_losses": loop.compile_count("sgt_eval_losses")})
        return out

    one = mesh_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])   # see test_train._one_device
    sa = loop.train(cfg, a, quiet=False, evaluate=recording, mesh=one)
    assert sa["compiles_in_loop"] == 1, sa["compiles_in_loop"]          # eval adds no step compilation
    assert [e["step"] for e in sa["eval"]] == [0, 2, 4]
    assert snaps[0] == snaps[1] == snaps[2], snaps      # later evaluations compile nothing new
    # resumed run: stop after 2 steps, resume; its evaluations are the same numbers, bit for bit
    loop.train(cfg, b, stop_after=2, quiet=False, evaluate=make_hook(cfg, b), mesh=one)
    sb = loop.train(cfg, b, quiet=False, evaluate=make_hook(cfg, b), mesh=one)
    assert [e["step"] for e in sb["eval"]] == [4]
    ra, rb = _eval_rows(a), _eval_rows(b)
    assert sorted(ra) == sorted(rb) == [0, 2, 4]
    for s in (0, 2, 4):
        assert ra[s] == rb[s], (s, ra[s], rb[s])
    assert ra[0]["eval/ce"] != ra[4]["eval/ce"]
    for k in ("eval/seg_miou", "eval/seg_pq", "eval/vqa_acc", "eval/seg_miou_vae_ceiling"):
        assert k in ra[4]
    # the same run without evaluation: identical training (losses and final weights)
    sc = loop.train(cfg, c, quiet=True, mesh=one)
    assert [h["loss"] for h in sa["history"]] == [h["loss"] for h in sc["history"]]
    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    assert all(np.array_equal(wa[k], wc[k]) and np.array_equal(wa[k], wb[k]) for k in wa)
    assert sorted(os.listdir(os.path.join(a, "eval"))) == ["grid_000000.png", "grid_000002.png", "grid_000004.png"]


def test_scene_seed_of_training_is_refused(tmp_path):
    from sgt_jax.eval.runner import heldout_specs

    cfg = _tiny(scene_seed=0)
    with pytest.raises(ValueError, match="eval.scene_seed=0"):
        heldout_specs(cfg, str(tmp_path))
    seg, vqa = heldout_specs(_tiny(), str(tmp_path))
    assert "gen_seed=1000" in seg and "size=48-80" in seg and vqa.startswith("synthetic_vqa:")


def test_bad_eval_config_is_refused():
    from sgt_jax.train.config import ConfigError, validate

    cfg = _tiny(every=-1, weights="best")
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert "eval.every=-1" in str(e.value) and "eval.weights='best'" in str(e.value)


@pytest.mark.slow
def test_cli_exports_from_a_model_dir(tmp_path):
    """``geneval`` and ``answers`` on a random tiny model dir: the scorers' layouts, counted skips,
    a clear error for a missing prompts file."""
    from flax import nnx

    from sgt_jax.convert.model_dir import save_model_dir
    from sgt_jax.data.tokenizer import build_tiny_tokenizer
    from sgt_jax.evaluate import main
    from sgt_jax.models.bagel import Bagel
    from sgt_jax.models.config import tiny
    from sgt_jax.models.vae import AutoEncoder

    cfg = tiny()
    cfg.llm.vocab_size = 512
    model = tmp_path / "model"
    save_model_dir(str(model), cfg, nnx.to_pure_dict(nnx.state(Bagel(cfg, rngs=nnx.Rngs(0)), nnx.Param)),
                   nnx.to_pure_dict(nnx.state(AutoEncoder(cfg, rngs=nnx.Rngs(1)), nnx.Param)),
                   tokenizer_dir=build_tiny_tokenizer(str(tmp_path / "tok"), vocab_size=512))
    prompts = tmp_path / "meta.jsonl"
    prompts.write_text(json.dumps({"tag": "single_object", "prompt": "a photo of a cat"}) + "\n"
                       + json.dumps({"tag": "colors", "prompt": "a red car"}) + "\n")
    out = tmp_path / "geneval"
    assert main(["geneval", "--model", str(model), "--out", str(out), "--prompts", str(prompts),
                 "--seeds", "3,4", "--height", "32", "--width", "32", "--batch-size", "2"]) == 0
    assert sorted(os.listdir(out / "00001" / "samples")) == ["00000.png", "00001.png"]
    assert json.loads((out / "00001" / "metadata.jsonl").read_text())["prompt"] == "a red car"
    assert np.asarray(Image.open(out / "00000" / "samples" / "00001.png")).shape == (32, 32, 3)

    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(tmp_path / "im.png")
    bench = tmp_path / "mc.jsonl"
    bench.write_text("\n".join(json.dumps(r) for r in [
        {"index": 0, "question": "Which is closer?", "A": "cat", "B": "dog", "answer": "B", "image": "im.png"},
        {"index": 1, "question": "Broken?", "A": "x", "B": "y", "answer": "A", "image": "missing.png"}]) + "\n")
    assert main(["answers", "--model", str(model), "--out", str(tmp_path / "ans"), "--prompts", str(bench),
                 "--max-new-tokens", "3"]) == 0
    lines = (tmp_path / "ans" / "answers.tsv").read_text().splitlines()
    assert lines[0] == "index\tquestion\tA\tB\tanswer\tprediction" and len(lines) == 2
    assert lines[1].startswith("0\tWhich is closer?\tcat\tdog\tB\t")
    summary = json.loads((tmp_path / "ans" / "summary.json").read_text())
    assert summary["answers"] == 1 and summary["skipped"] == {"bad_image": 1}
    assert main(["answers", "--model", str(model), "--out", str(tmp_path / "x"),
                 "--prompts", str(tmp_path / "nope.jsonl")]) == 2


def test_eval_rows_in_metrics_jsonl_merge_on_resume(tmp_path):
    """An eval row shares its step with a training row; a resume cut back to that step keeps one
    row per step holding both, and the loss curve reads the training rows only."""
    from sgt_jax.train import metrics as M

    w = M.MetricsWriter(str(tmp_path), total_steps=4)
    w.write_eval(0, {"ce": 6.0, "vqa_acc": 0.0})
    for s in (1, 2, 3):
        w.write(s, {"loss": 3.0 - s / 2, "ce": 2.0, "mse": 1.0})
        if s == 2:
            w.write_eval(2, {"ce": 5.0, "vqa_acc": 0.25}, {"grid": np.zeros((8, 16, 3), np.uint8)})
    assert w.close() is not None
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2, 2, 3]
    M.MetricsWriter(str(tmp_path), total_steps=4, start_step=2).close()      # resumed at step 2
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[2] == {"step": 2, "loss": 2.0, "ce": 2.0, "mse": 1.0, "eval/ce": 5.0, "eval/vqa_acc": 0.25}
