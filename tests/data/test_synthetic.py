"""Synthetic scene generator: SA-1B validity, determinism, VQA answers recomputed from the masks."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from sgt_jax.data import render, sources, synthetic

pycoco = pytest.importorskip("pycocotools.mask")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("syn") / "a")
    synthetic.generate(d, 16, seed=7, size=(48, 96))
    return d


def _load(d, name):
    with open(os.path.join(d, name + ".json")) as f:
        meta = json.load(f)
    image = np.asarray(Image.open(os.path.join(d, name + ".jpg")).convert("RGB"))
    return meta, image


def _names(d):
    return sorted(f[:-5] for f in os.listdir(d) if f.endswith(".json"))


def test_sa1b_format_is_valid(scenes):
    names = _names(scenes)
    assert len(names) == 16
    for name in names:
        meta, image = _load(scenes, name)
        info = meta["image"]
        assert info["file_name"] == name + ".jpg" and name == f"sa_{info['image_id']}"
        h, w = image.shape[:2]
        assert (info["height"], info["width"]) == (h, w) and 48 <= h <= 96 and 48 <= w <= 96
        assert 1 <= len(meta["annotations"]) <= 6
        union = np.zeros((h, w), int)
        ids = set()
        for a in meta["annotations"]:
            seg = a["segmentation"]
            assert seg["size"] == [h, w] and isinstance(seg["counts"], str)
            ref = {"size": seg["size"], "counts": seg["counts"].encode()}
            m = pycoco.decode(ref)                       # independent decoder
            assert np.array_equal(m, render.rle_decode(seg))
            assert a["area"] == int(m.sum()) == int(pycoco.area(ref)) > 0
            assert a["bbox"] == [float(v) for v in pycoco.toBbox(ref)]
            x, y = a["point_coords"][0]
            assert m[int(y), int(x)] == 1
            assert a["crop_box"] == [0, 0, w, h]
            union += m
            ids.add(a["id"])
        assert union.max() == 1                          # visible masks do not overlap
        assert len(ids) == len(meta["annotations"])


def test_deterministic_and_prefix_stable(tmp_path):
    a = synthetic.generate(str(tmp_path / "a"), 4, seed=3, size=(40, 56))
    b = synthetic.generate(str(tmp_path / "b"), 4, seed=3, size=(40, 56))
    c = synthetic.generate(str(tmp_path / "c"), 4, seed=4, size=(40, 56))
    p = synthetic.generate(str(tmp_path / "p"), 2, seed=3, size=(40, 56))
    for f in sorted(os.listdir(a)):
        with open(os.path.join(a, f), "rb") as fa, open(os.path.join(b, f), "rb") as fb:
            assert fa.read() == fb.read(), f
    differ = [f for f in os.listdir(a) if f.endswith(".jpg")
              and open(os.path.join(a, f), "rb").read() != open(os.path.join(c, f), "rb").read()]
    assert differ, "another seed must give other scenes"
    for f in ("sa_1.jpg", "sa_1.json", "sa_2.json"):
        assert open(os.path.join(a, f), "rb").read() == open(os.path.join(p, f), "rb").read()


def _color_of(image, mask):
    rgb = np.median(image[mask.astype(bool)], axis=0)
    names = list(synthetic.COLORS)
    d = [np.abs(rgb - synthetic.COLORS[n]).sum() for n in names]
    return names[int(np.argmin(d))]


def test_vqa_answers_recomputed_from_masks(scenes):
    with open(os.path.join(scenes, synthetic.VQA_FILE)) as f:
        records = [json.loads(ln) for ln in f]
    seen = set()
    for rec in records:
        name = rec["image"][:-4]
        meta, image = _load(scenes, name)
        masks = [render.rle_decode(a["segmentation"]) for a in meta["annotations"]]
        colors = [_color_of(image, m) for m in masks]
        assert len(set(colors)) == len(colors)          # a colour names one shape
        kinds = {s["color"]: s["kind"] for s in meta["synthetic"]["shapes"]}
        assert set(kinds) == set(colors)                # metadata agrees with the pixels
        cx = {c: np.nonzero(m)[1].mean() for c, m in zip(colors, masks)}
        conv = rec["conversations"]
        assert conv[0]["from"] == "human" and conv[0]["value"].count("<image>") == 1
        q, ans, kind = conv[0]["value"], conv[1]["value"].lower(), rec["qa"]["type"]
        seen.add(kind)
        if kind == "count":
            expected = str(len(masks))
        elif kind == "largest_color":
            areas = [int(m.sum()) for m in masks]
            expected = colors[int(np.argmax(areas))]
            top = sorted(areas)
            assert len(top) == 1 or top[-1] >= synthetic.LARGEST_MARGIN * top[-2]
        elif kind == "left_right":
            (ca, ka), (cb, kb) = [(c, k) for c, k in
                                  [s.split(" ") for s in
                                   q.split("Is the ")[1].split("?")[0].split(" left or right of the ")]]
            assert kinds[ca] == ka and kinds[cb] == kb
            expected = "left" if cx[ca] < cx[cb] else "right"
            assert abs(cx[ca] - cx[cb]) >= synthetic.LEFT_RIGHT_MARGIN * image.shape[1] - 1
        elif kind == "exists":
            c, k = q.split("Is there a ")[1].split(" in the image")[0].split(" ")
            fam = synthetic._FAMILY
            if c in kinds and kinds[c] == k:
                expected = "yes"
            else:
                assert not (c in kinds and fam[kinds[c]] == fam[k])
                expected = "no"
        else:
            raise AssertionError(kind)
        assert ans == expected, (rec["id"], q, ans, expected)
        assert synthetic.evaluate_vqa_answer(rec, conv[1]["value"])
    assert seen == {"count", "largest_color", "left_right", "exists"}


def test_evaluate_vqa_answer():
    rec = lambda a, t, ch: {"conversations": [{"from": "human", "value": "<image>\nq"},
                                              {"from": "gpt", "value": a}],
                            "qa": {"type": t, "answer": a, "choices": ch}}
    count = rec("3", "count", synthetic.COUNT_CHOICES)
    assert synthetic.evaluate_vqa_answer(count, "3")
    assert synthetic.evaluate_vqa_answer(count, "There are three shapes.")
    assert not synthetic.evaluate_vqa_answer(count, "4")
    assert not synthetic.evaluate_vqa_answer(count, "3 or 4")
    lr = rec("Left", "left_right", ["left", "right"])
    assert synthetic.evaluate_vqa_answer(lr, "left.")
    assert not synthetic.evaluate_vqa_answer(lr, "Left or right")
    assert not synthetic.evaluate_vqa_answer(lr, "")
    col = rec("Red", "largest_color", list(synthetic.COLORS))
    assert synthetic.evaluate_vqa_answer(col, "The largest shape is red")
    assert not synthetic.evaluate_vqa_answer(col, "blue")
    plain = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "Yes"}]}
    assert synthetic.evaluate_vqa_answer(plain, "yes") and not synthetic.evaluate_vqa_answer(plain, "no")
    assert synthetic.vqa_accuracy([count, lr], ["three", "right"]) == 0.5


def test_ensure_generated_stamp(tmp_path):
    d = str(tmp_path / "s")
    synthetic.ensure_generated(d, 3, seed=1, size=(32, 40))
    t = os.path.getmtime(os.path.join(d, "sa_1.jpg"))
    synthetic.ensure_generated(d, 3, seed=1, size=(32, 40))          # reused, not rewritten
    assert os.path.getmtime(os.path.join(d, "sa_1.jpg")) == t
    with pytest.raises(ValueError, match="generated with"):
        synthetic.ensure_generated(d, 4, seed=1, size=(32, 40))
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="not a synthetic data directory"):
        synthetic.ensure_generated(str(other), 3)
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_synthetic_specs_default_to_workdir(tmp_path):
    seg = sources.make_source("synthetic_seg:?n=5&size=40-48", seed=0, workdir=str(tmp_path))
    vqa = sources.make_source("synthetic_vqa:?n=5&size=40-48", seed=0, workdir=str(tmp_path))
    assert len(seg) == 5 and os.path.isdir(tmp_path / "synthetic")
    r = seg[0]
    assert r["task"] == "seg" and r["image"].shape == r["target"].shape
    v = vqa[0]
    assert v["task"] == "vqa" and len(v["images"]) == 1 and v["images"][0].dtype == np.uint8
    with pytest.raises(sources.SpecError, match="give a directory or a workdir"):
        sources.make_source("synthetic_seg:", seed=0)
