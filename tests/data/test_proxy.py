"""Proxy tasks (issue 16): each target builder against an independent reference, determinism
across runs / processes / resume, every task through the pipeline into valid packed batches, the
depth filter, and a few training steps of the tiny model on three tasks."""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from sgt_jax import batch as B
from sgt_jax.data import config as C
from sgt_jax.data import depth_filter as DF
from sgt_jax.data import pipeline as PL
from sgt_jax.data import synthetic
from sgt_jax.data.proxy import degrade, tasks
from sgt_jax.data.proxy.instructions import BY_TASK
from sgt_jax.data.proxy.source import ProxyRecords
from sgt_jax.data.records import BadRecord
from sgt_jax.data.sources.synthetic import SyntheticScenes
from sgt_jax.data.tokenizer import Tokenizer, build_tiny_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIELDS = B.TOKEN_FIELDS + ("vit_patches", "vit_position_ids", "vit_image_ids", "vae_images")


@pytest.fixture(scope="module")
def scenes_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("scenes") / "synthetic")
    synthetic.ensure_generated(d, 24, seed=5, size=(48, 80), num_shapes=(2, 5))
    return d


@pytest.fixture(scope="module")
def src(scenes_dir):
    return SyntheticScenes([scenes_dir], seed=0)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer(build_tiny_tokenizer(str(tmp_path_factory.mktemp("tok") / "t")))


def _photo(h=96, w=128, seed=0):
    """A smooth 'photo' (gradients and blobs), so blur / noise changes are measurable."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(seed)
    img = np.stack([80 + 60 * np.sin(x / 9 + c) + 40 * np.cos(y / 7 - c) for c in range(3)], -1)
    for _ in range(4):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(6, 20)
        img[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# instruction lists, registry

def test_every_task_has_twenty_distinct_instructions():
    assert set(tasks.TASKS) == set(BY_TASK) | {"mixed"}
    assert tasks.TASKS == ("semantic_seg", "instance_seg", "panoptic_seg", "sa1b_seg", "detection", "edge",
                           "depth", "denoise", "derain", "dehaze", "deblur_motion", "deblur_defocus", "lowlight",
                           "super_resolution", "inpainting", "reconstruction", "mixed")
    for t, texts in BY_TASK.items():
        assert len(set(texts)) == len(texts) >= 20, t


# ------------------------------------------------------------------------------------------------
# edge: the grey conversion and the 100 / 200 thresholds on known edge images

def _step(left, right, h=32, w=32):
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = left
    img[:, w // 2:] = right
    return img


@pytest.mark.parametrize("left,right,edge", [
    ((0, 0, 0), (20, 20, 20), False),      # Sobel L1 4 x 20 = 80 < 100: no edge
    ((0, 0, 0), (35, 35, 35), False),      # 140: between the thresholds, no strong seed: no edge
    ((0, 0, 0), (60, 60, 60), True),       # 240 > 200: an edge
    ((0, 0, 0), (255, 0, 0), True),        # pure red: luma 76 (RGB order) -> 304: an edge
    ((0, 0, 0), (0, 0, 255), False),       # pure blue: luma 29 -> 116 (in BGR order it would be 76: an edge)
])
def test_canny_grey_conversion_and_thresholds(left, right, edge):
    out = degrade.canny(_step(left, right))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 0] == out[..., 2]).all()
    assert set(np.unique(out)) <= {0, 255}
    cols = np.flatnonzero(out[8:-8, :, 0].any(0))
    if edge:
        assert cols.size and set(cols) <= {15, 16}, cols         # a line at the step, nowhere else
        assert out[8:-8, cols[0], 0].all()
    else:
        assert not out.any()


def test_edge_task_is_opencv_canny_of_the_luma(src):
    rec = src.scene(0)
    pair = tasks.build("edge", rec, np.random.default_rng(0))
    grey = (0.299 * rec["image"][..., 0] + 0.587 * rec["image"][..., 1] + 0.114 * rec["image"][..., 2])
    ref = cv2.Canny(np.rint(grey).astype(np.uint8), 100, 200)
    np.testing.assert_array_equal(pair.target[..., 0], ref)
    assert pair.input is rec["image"]


# ------------------------------------------------------------------------------------------------
# super-resolution

@pytest.mark.parametrize("factor", degrade.SR_FACTORS)
def test_super_resolution_sizes_and_bilinear_round_trip(factor):
    h, w = 97, 130
    assert degrade.sr_size(h, w, factor) == (h // factor, w // factor)
    flat = np.full((h, w, 3), 173, np.uint8)
    out, f = degrade.super_resolution(flat, np.random.default_rng(0), factor)
    assert f == factor and out.shape == flat.shape
    np.testing.assert_array_equal(out, flat)                      # a constant survives exactly
    # a horizontal ramp on a grid divisible by the factor: cubic-down then bilinear-up is the ramp
    # again in the interior (both interpolations reproduce linear functions)
    w2 = 16 * factor
    ramp = np.repeat(np.repeat((np.arange(w2) * (200 / w2) + 20)[None, :, None], 8 * factor, 0), 3, 2)
    out, _ = degrade.super_resolution(np.rint(ramp).astype(np.uint8), np.random.default_rng(0), factor)
    inner = slice(2 * factor, -2 * factor)
    assert np.abs(out[:, inner].astype(int) - np.rint(ramp[:, inner])).max() <= 2
    # the output is a bilinear image of the low resolution: between two low-res sample centres
    # (factor px apart) every row is linear, so its second differences vanish away from the knots
    img = _photo(8 * factor, 8 * factor, seed=factor)
    out, _ = degrade.super_resolution(img, np.random.default_rng(0), factor)
    x = out[:, :, 0].astype(np.float64)
    centres = (np.arange(8) + 0.5) * factor - 0.5              # low-res pixel centres in full-res px
    for c in range(1, 6):
        seg = x[:, int(np.ceil(centres[c])) + 1:int(np.floor(centres[c + 1]))]
        if seg.shape[1] >= 3:
            assert np.abs(np.diff(seg, 2, axis=1)).max() <= 2


def test_super_resolution_draws_every_factor():
    seen = {degrade.super_resolution(np.zeros((32, 32, 3), np.uint8), np.random.default_rng(s))[1]
            for s in range(60)}
    assert seen == set(degrade.SR_FACTORS)


# ------------------------------------------------------------------------------------------------
# inpainting

def test_inpainting_mask_fraction_and_fill_values():
    img = _photo()
    fracs, fills = [], set()
    for s in range(40):
        pair = tasks.build("inpainting", {"id": "x", "image": img}, np.random.default_rng(s))
        m, fill = pair.info["mask"], pair.info["fill"]
        assert fill in (0, 255) and m.dtype == bool and m.shape == img.shape[:2]
        np.testing.assert_array_equal(pair.input, np.where(m[..., None], np.uint8(fill), img))
        assert pair.target is img
        fracs.append(m.mean())
        fills.add(fill)
    assert fills == {0, 255}
    fracs = np.array(fracs)
    assert (fracs > 0).all() and (fracs < 0.95).all()
    assert 0.05 < fracs.mean() < 0.6, fracs.mean()


# ------------------------------------------------------------------------------------------------
# the other degradations: the paper's / official parameter ranges

def test_low_light_scales_brightness_between_0_1_and_0_5():
    img = np.full((64, 64, 3), 200, np.uint8)
    for s in range(20):
        out = degrade.low_light(img, np.random.default_rng(s))
        ratio = out.mean() / 200
        assert 0.1 - 0.02 < ratio < 0.5 + 0.02
        assert 0.005 < (out.astype(float) / 255).std() < 0.045     # noise sigma 0.01-0.04 (quantised)


def test_restoration_inputs_differ_from_their_clean_targets():
    img = _photo()
    for t in ("denoise", "derain", "dehaze", "deblur_motion", "deblur_defocus", "lowlight",
              "super_resolution", "inpainting"):
        pair = tasks.build(t, {"id": "x", "image": img}, np.random.default_rng(1))
        assert pair.target is img and pair.input.shape == img.shape and pair.input.dtype == np.uint8, t
        assert np.abs(pair.input.astype(int) - img).mean() > 1.0, t
    assert tasks.build("reconstruction", {"image": img}, np.random.default_rng(0)).input is img


def test_blur_kernels_preserve_a_flat_image_and_haze_brightens():
    flat = np.full((80, 80, 3), 90, np.uint8)
    for f in (degrade.motion_blur, degrade.defocus_blur):
        np.testing.assert_array_equal(f(flat, np.random.default_rng(0)), flat)    # normalised kernels
    hazy = degrade.haze(flat, np.random.default_rng(0), strength=0.8)
    assert hazy.mean() > 150             # I = J t + 0.95 (1 - t) with t <= exp(-2.9 x 0.1)


# ------------------------------------------------------------------------------------------------
# against the official SGT code (tests/fixtures/proxy_golden.npz, scripts/make_proxy_golden.py)

GOLDEN = os.path.join(REPO, "tests", "fixtures", "proxy_golden.npz")


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(GOLDEN))


def test_motion_blur_equals_the_official_code(golden):
    img = golden["image"]
    for size, angle in ((10, 0.0), (20, 37.5), (30, 290.0)):
        np.testing.assert_array_equal(degrade.motion_blur_apply(img, size, angle), golden[f"motion_{size}_{angle}"])


def test_rain_haze_low_light_equal_the_official_code_given_its_draws(golden):
    """The official functions draw from NumPy's global generator; the fixture seeded it, so the
    same legacy draws here reproduce its random fields, and our apply functions must then give
    its bytes."""
    img = golden["image"]
    h, w = img.shape[:2]
    seeds = {"fog_0.4": 11, "fog_0.8": 12, "rain_0.4": 13, "rain_0.8": 14, "lowlight": 15}
    for s in (0.4, 0.8):
        legacy = np.random.RandomState(seeds[f"fog_{s}"])
        np.testing.assert_array_equal(degrade.haze_apply(img, s, legacy.normal(0, 0.05, (h, w))), golden[f"fog_{s}"])
        legacy = np.random.RandomState(seeds[f"rain_{s}"])
        noise = legacy.randint(0, 255, (h, w), dtype=np.uint8)
        np.testing.assert_array_equal(degrade.rain_apply(img, s, noise, int(10 + s * 30)), golden[f"rain_{s}"])
    legacy = np.random.RandomState(seeds["lowlight"])
    factor, sigma = legacy.uniform(0.1, 0.5), legacy.uniform(0.01, 0.04)
    np.testing.assert_array_equal(degrade.low_light_apply(img, factor, legacy.normal(0.0, sigma, img.shape)),
                                  golden["lowlight"])


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_super_resolution_is_the_official_low_resolution_upsampled_bilinearly(golden, factor):
    img = golden["image"]
    h, w = img.shape[:2]
    lr = golden[f"sr_{factor}"]
    assert lr.shape[:2] == degrade.sr_size(h, w, factor)
    ours, _ = degrade.super_resolution(img, np.random.default_rng(0), factor)
    np.testing.assert_array_equal(ours, cv2.resize(lr, (w, h), interpolation=cv2.INTER_LINEAR))
    assert not np.array_equal(ours, golden[f"sr_up_{factor}"])     # the code's bicubic: the paper says bilinear


# ------------------------------------------------------------------------------------------------
# detection

def test_detection_boxes_are_drawn_where_the_annotation_says():
    img = np.full((120, 160, 3), 128, np.uint8)
    rec = {"id": "d", "image": img, "boxes": [[10, 50, 40, 30], [90, 20, 50, 80]],
           "label_ids": [3, 7], "labels": ["cat", "dog"]}
    pair = tasks.build("detection", rec, np.random.default_rng(0), seed=4)
    out, drawn = pair.target, pair.info["boxes"]
    colors = tasks.class_palette(4, [3, 7])
    assert (pair.input == 128).all()                                # the input is the clean image
    for (x, y, w, h), c, (x0, y0, x1, y1, t, rgb, tag) in zip(rec["boxes"], colors, drawn):
        assert (x0, y0, x1, y1) == (x, y, x + w - 1, y + h - 1)
        assert rgb == tuple(int(v) for v in c)
        border = np.zeros(img.shape[:2], bool)
        border[y0:y1 + 1, x0:x1 + 1] = True
        border[y0 + t:y1 + 1 - t, x0 + t:x1 + 1 - t] = False
        tag_mask = np.zeros_like(border)
        tag_mask[tag[1]:tag[3] + 1, tag[0]:tag[2] + 1] = True
        assert (out[border & ~tag_mask] == c).all()                 # every border pixel in the class colour
        inside = np.zeros_like(border)
        inside[y0 + t + 1:y1 - t, x0 + t + 1:x1 - t] = True
        assert (out[inside & ~tag_mask] == 128).all()               # the inside untouched
        assert (out[tag_mask] != 128).any()                         # the name tag is drawn
    untouched = np.ones(img.shape[:2], bool)
    for x0, y0, x1, y1, t, _, tag in drawn:
        untouched[max(y0 - 1, 0):y1 + 2, max(x0 - 1, 0):x1 + 2] = False
        untouched[tag[1]:tag[3] + 1, tag[0]:tag[2] + 1] = False
    assert (out[untouched] == 128).all()                            # nothing drawn elsewhere


def test_detection_boxes_from_synthetic_masks(src):
    rec = src.scene(2)
    pair = tasks.build("detection", rec, np.random.default_rng(0))
    things = [m for m, t in zip(rec["masks"], rec["isthing"]) if t]
    assert len(pair.info["boxes"]) == len(things)
    for m, (x0, y0, x1, y1, *_rest) in zip(things, pair.info["boxes"]):
        ys, xs = np.nonzero(m)
        assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max(), ys.max())


def test_coco_scene_source_gives_boxes_classes_and_masks(tmp_path):
    """coco_scene: COCO instances JSON -> scene records; detection draws the JSON's bbox with the
    category name, semantic paints per category, crowd skipped, a broken RLE is a counted skip."""
    pycoco = pytest.importorskip("pycocotools.mask")
    from fake_data import _enc, _write

    from sgt_jax.data import render, sources
    h, w = 60, 80
    img = np.full((h, w, 3), 100, np.uint8)
    _write(f"{tmp_path}/img/a.jpg", _enc(img))
    blob = np.zeros((h, w), np.uint8)
    blob[30:45, 40:70] = 1
    anns = [{"id": 1, "image_id": 1, "category_id": 5, "iscrowd": 0, "bbox": [4.0, 6.0, 30.0, 20.0],
             "segmentation": [[4.0, 6.0, 34.0, 6.0, 34.0, 26.0, 4.0, 26.0]]},
            {"id": 2, "image_id": 1, "category_id": 7, "iscrowd": 0, "bbox": [40.0, 30.0, 30.0, 15.0],
             "segmentation": render.rle_encode(blob)},
            {"id": 3, "image_id": 1, "category_id": 7, "iscrowd": 1, "bbox": [0, 0, 5, 5],
             "segmentation": render.rle_encode(blob)},
            {"id": 4, "image_id": 2, "category_id": 7, "iscrowd": 0, "bbox": [0, 0, 5, 5],
             "segmentation": {"size": [h, w], "counts": "!!bad"}}]
    meta = {"images": [{"id": 1, "file_name": "a.jpg", "height": h, "width": w},
                       {"id": 2, "file_name": "a.jpg", "height": h, "width": w}],
            "annotations": anns, "categories": [{"id": 5, "name": "cat"}, {"id": 7, "name": "dog"}]}
    _write(f"{tmp_path}/inst.json", json.dumps(meta))
    src = sources.make_source(f"coco_scene:{tmp_path}/inst.json::{tmp_path}/img", seed=2)
    rec = src.scene(0)
    assert rec["labels"] == ["cat", "dog"] and rec["label_ids"] == [5, 7] and len(rec["masks"]) == 2
    np.testing.assert_array_equal(rec["boxes"], [[4, 6, 30, 20], [40, 30, 30, 15]])
    poly = pycoco.decode(pycoco.merge(pycoco.frPyObjects(anns[0]["segmentation"], h, w)))
    np.testing.assert_array_equal(rec["masks"][0], poly.astype(bool))
    pair = tasks.build("detection", dict(rec, proxy="detection"), np.random.default_rng(0), seed=2)
    assert [d[:4] for d in pair.info["boxes"]] == [(4, 6, 33, 25), (40, 30, 69, 44)]
    sem = tasks.build("semantic_seg", rec, np.random.default_rng(0), seed=2).target
    c5, c7 = tasks.class_palette(2, [5, 7])
    assert (sem[poly == 1] == c5).all() and (sem[blob == 1] == c7).all()
    assert src[0]["task"] == "seg"                                  # without a proxy: instance seg
    with pytest.raises(BadRecord) as e:
        src.scene(1)
    assert e.value.reason == "bad_annotation"


# ------------------------------------------------------------------------------------------------
# segmentation variants: colour-permutation consistent with the ground truth

def _bijective(labels: np.ndarray, target: np.ndarray) -> None:
    """Same ground-truth label -> same colour, different labels -> different colours."""
    pairs = np.unique(np.concatenate([labels.reshape(-1, 1), target.reshape(-1, 3).astype(np.int64)], 1), axis=0)
    assert len(np.unique(pairs[:, 0])) == len(pairs), "a label got two colours"
    assert len(np.unique(pairs[:, 1:], axis=0)) == len(pairs), "two labels share a colour"


def test_segmentation_variants_are_colour_permutations_of_the_ground_truth(src):
    for i in range(len(src)):
        rec = src.scene(i)
        masks, ids, thing = rec["masks"], rec["label_ids"], rec["isthing"]
        inst = np.zeros(rec["image"].shape[:2], np.int64)            # 0 = unlabelled
        sem = np.zeros_like(inst)
        pan = np.zeros_like(inst)
        for k, (m, c, t) in enumerate(zip(masks, ids, thing)):
            assert not (inst[m] > 0).any() or not t
            if t:
                inst[m] = k + 1
            sem[m] = c + 1
            pan[m] = k + 1 if t else 1000 + c
        rng = np.random.default_rng(i)
        for task, gt in (("instance_seg", inst), ("sa1b_seg", inst), ("semantic_seg", sem), ("panoptic_seg", pan)):
            target = tasks.build(task, rec, rng, seed=3).target
            _bijective(gt, target)
            if task != "panoptic_seg" and task != "semantic_seg":
                assert (target[gt == 0] == 0).all()                 # the background stays black
    # semantic colours are per class for the whole run: the same class, the same colour in two images
    a, b = src.scene(0), src.scene(1)
    ca = {c: tuple(tasks.build("semantic_seg", a, rng, seed=3).target[m][0]) for m, c in zip(a["masks"], a["label_ids"])}
    cb = {c: tuple(tasks.build("semantic_seg", b, rng, seed=3).target[m][0]) for m, c in zip(b["masks"], b["label_ids"])}
    assert all(ca[c] == cb[c] for c in set(ca) & set(cb)) and set(ca) & set(cb)


def test_sa1b_task_on_synthetic_scenes_is_todays_seg_target(src):
    """sa1b_seg renders exactly what today's seg record holds (same masks, seed, image id)."""
    for i in range(4):
        np.testing.assert_array_equal(tasks.build("sa1b_seg", src.scene(i), np.random.default_rng(0)).target,
                                      src[i]["target"])


def test_seg_tasks_use_a_sources_rendered_target_and_missing_fields_are_bad_records():
    img = _photo()
    tgt = _photo(seed=9)
    for t in ("semantic_seg", "instance_seg", "panoptic_seg", "sa1b_seg"):
        assert tasks.build(t, {"image": img, "target": tgt}, np.random.default_rng(0)).target is tgt
    for t, reason in (("sa1b_seg", "no_masks"), ("depth", "no_depth"), ("detection", "no_boxes")):
        with pytest.raises(BadRecord) as e:
            tasks.build(t, {"id": "k", "image": img}, np.random.default_rng(0))
        assert e.value.reason == reason
    with pytest.raises(BadRecord):
        tasks.build("depth", {"image": img, "depth": np.ones((4, 4))}, np.random.default_rng(0))   # flat


# ------------------------------------------------------------------------------------------------
# depth: target normalisation, synthetic depth, the two-estimator filter

def test_depth_target_is_min_max_normalised_and_three_channels(src):
    rec = src.scene(1)
    t = tasks.build("depth", rec, np.random.default_rng(0)).target
    d = rec["depth"]
    assert (t[..., 0] == t[..., 1]).all() and (t[..., 1] == t[..., 2]).all()
    np.testing.assert_array_equal(t[..., 0], np.rint((d - d.min()) / (d.max() - d.min()) * 255).astype(np.uint8))
    # the shape drawn last (on top) is the nearest (brightest); the background is darker than every shape
    things = [m for m, th in zip(rec["masks"], rec["isthing"]) if th]
    assert (t[things[-1]] == 255).all()
    assert t[rec["masks"][-1]].max() < min(t[m].min() for m in things)


def test_depth_alignment_recovers_scale_shift_and_drops_a_pair_above_0_4(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.uniform(0.5, 3.0, (40, 50))
    s, t = DF.align(a, 2.5 * a + 0.7)
    assert s == pytest.approx(2.5, abs=1e-9) and t == pytest.approx(0.7, abs=1e-9)
    score, s, t = DF.discrepancy(a, 2.5 * a + 0.7)
    assert score == pytest.approx(0.0, abs=1e-9)
    # an independent least-squares reference: the normal equations
    b = 1.3 * a - 0.2 + rng.normal(0, 0.1, a.shape)
    x = np.stack([a.ravel(), np.ones(a.size)], 1)
    ref = np.linalg.solve(x.T @ x, x.T @ b.ravel())
    np.testing.assert_allclose(DF.align(a, b), ref, rtol=1e-9)
    # files: 'good' agrees up to scale/shift, 'bad' is unrelated (AbsRel > 0.4), 'inv' is 1 / depth
    da, db = tmp_path / "a", tmp_path / "b"
    da.mkdir(), db.mkdir()
    np.save(da / "good.npy", a.astype(np.float32))
    np.save(db / "good.npy", (3 * a + 1).astype(np.float32))
    np.save(da / "bad.npy", a.astype(np.float32))
    np.save(db / "bad.npy", rng.uniform(0.05, 3.0, a.shape).astype(np.float32)[::-1])
    cv2.imwrite(str(da / "png.png"), np.rint(a / 3 * 65535).astype(np.uint16))
    cv2.imwrite(str(db / "png.png"), np.rint(a / 3 * 60000 + 100).astype(np.uint16))
    np.save(da / "lonely.npy", a.astype(np.float32))
    out = tmp_path / "kept"
    rep = DF.run(str(da), str(db), out_dir=str(out), log=lambda s: None)
    assert rep["kept"] == ["good", "png"] and rep["dropped"] == ["bad"], rep["scores"]
    assert rep["scores"]["bad"] > 0.4 and rep["only_in_a"] == 1
    assert sorted(os.listdir(out)) == ["good.npy", "png.png"]
    # the command, as the docs name it
    cmd = [sys.executable, "-m", "sgt_jax.data.depth_filter", "--a", str(da), "--b", str(db),
           "--report", str(tmp_path / "r.json")]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "kept 2, dropped 1" in r.stdout
    assert json.load(open(tmp_path / "r.json"))["dropped"] == ["bad"]


def test_image_only_tasks_read_the_image_without_masks(src):
    for task, scene in (("denoise", False), ("edge", False), ("depth", True), ("mixed", True),
                        ("derain+dehaze", False), ("lowlight+detection", True)):
        pr = ProxyRecords(src, task)
        assert pr.needs_scene == scene, task
        rec = pr[3]
        assert ("masks" in rec) == scene and rec["proxy"] == task
        np.testing.assert_array_equal(rec["image"], src[3]["image"])


def test_depth_maps_from_a_folder(src, tmp_path):
    rec = src.scene(0)
    d = np.linspace(0, 1, rec["image"].shape[0] * rec["image"].shape[1]).reshape(rec["image"].shape[:2])
    np.save(tmp_path / f"{rec['key']}.npy", d.astype(np.float32))
    pr = ProxyRecords(src, "depth", str(tmp_path))
    got = pr[0]
    assert got["task"] == "proxy" and got["proxy"] == "depth"
    np.testing.assert_array_equal(got["depth"], d.astype(np.float32))
    with pytest.raises(BadRecord) as e:
        pr[1]
    assert e.value.reason == "no_depth"


# ------------------------------------------------------------------------------------------------
# determinism, mixed, the pipeline

def _sample_bytes(scenes_dir, tok_path, task, positions):
    """sha256 of the ViT input, VAE target and text of proxy samples built by a SampleBuilder."""
    import hashlib

    from sgt_jax.data.samples import SampleBuilder
    b = SampleBuilder(C.tiny_data_config(), Tokenizer(tok_path))
    pr = ProxyRecords(SyntheticScenes([scenes_dir], seed=0), task)
    out = []
    for g in positions:
        s = b(pr[g % len(pr)], stream="seg", index=g)
        data = s.vit_patches.tobytes() + b"".join(v.tobytes() for v in s.vae_images) + s.text.encode()
        out.append(hashlib.sha256(data).hexdigest())
    return out


def test_same_seed_and_position_give_the_same_bytes_in_another_process(scenes_dir, tok, tmp_path):
    tok_path = str(tmp_path / "tok")
    build_tiny_tokenizer(tok_path)
    positions = [0, 5, 31, 100]
    here = {t: _sample_bytes(scenes_dir, tok_path, t, positions) for t in ("denoise", "inpainting", "mixed", "derain")}
    code = ("import json, sys; sys.path.insert(0, %r); from test_proxy import _sample_bytes; "
            "print(json.dumps({t: _sample_bytes(%r, %r, t, %r) for t in %r}))"
            % (os.path.dirname(__file__), scenes_dir, tok_path, positions, list(here)))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == here
    # and positions differ from each other (an epoch later the degradation is drawn anew)
    assert len(set(here["denoise"])) == len(positions)


def test_mixed_is_equal_thirds_of_panoptic_reconstruction_edge(src):
    got = [tasks.build("mixed", src.scene(g % len(src)), np.random.default_rng(g), index=g).task for g in range(30)]
    assert got[:3] == ["panoptic_seg", "reconstruction", "edge"]
    assert {t: got.count(t) for t in set(got)} == {"panoptic_seg": 10, "reconstruction": 10, "edge": 10}


def test_joined_tasks_draw_one_task_per_sample_uniformly(src):
    got = [tasks.build("derain+dehaze", src.scene(0), np.random.default_rng(g)).task for g in range(200)]
    assert set(got) == {"derain", "dehaze"} and 70 < got.count("derain") < 130
    for bad in ("derain+colorize", "mixed+edge"):
        with pytest.raises(ValueError, match="not a proxy task"):
            tasks.check_task(bad)


def _proxy_cfg(task, scenes_dir, **kw):
    cfg = C.tiny_data_config()
    cfg.proxy = task
    cfg.sources.seg = f"synthetic_seg:{scenes_dir}"
    cfg.sources.vqa = f"synthetic_vqa:{scenes_dir}"
    for k, v in kw.items():
        cfg[k] = v
    return cfg


def test_every_task_yields_valid_packed_batches(scenes_dir, tok):
    for task in tasks.TASKS:
        cfg = _proxy_cfg(task, scenes_dir)
        it = PL.make_train_iterator(cfg, workdir=None, tokenizer=tok)
        batch, st = next(it)
        B.check_routing(batch, cfg.gen_tokens_per_row)
        assert st["batch/samples/seg"] == 2 * st["batch/samples/vqa"] > 0, task
        assert not any(k.startswith("total/skipped") for k in st), (task, st)
        assert (batch.kind == B.VAE_NOISED).sum() > 0 and batch.mse_mask.any(), task
        it.close()


def test_proxy_stream_resumes_exactly(scenes_dir, tok):
    cfg = _proxy_cfg("denoise", scenes_dir)
    it = PL.make_train_iterator(cfg, workdir=None, tokenizer=tok)
    for _ in range(2):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    want = [next(it)[0] for _ in range(3)]
    fresh = PL.make_train_iterator(cfg, workdir=None, tokenizer=tok)
    fresh.set_state(state)
    for a in want:
        b, _ = next(fresh)
        for f in FIELDS:
            np.testing.assert_array_equal(np.asarray(getattr(a, f)), np.asarray(getattr(b, f)), err_msg=f)


def test_config_rejects_an_unknown_task(scenes_dir):
    with pytest.raises(ValueError, match="not a proxy task"):
        C.validate(_proxy_cfg("colorize", scenes_dir))
    with pytest.raises(ValueError, match="proxy_stream"):
        C.validate(_proxy_cfg("edge", scenes_dir, proxy_stream="t2i"))


# ------------------------------------------------------------------------------------------------
# the tiny model trains on proxy tasks (one device, a few steps)

@pytest.mark.slow
def test_tiny_model_trains_a_few_steps_on_the_mixed_proxy(scenes_dir, tmp_path):
    """configs/tiny.py with data.proxy=mixed: panoptic segmentation, reconstruction and edge samples
    (three tasks in one compile, the CI budget) train with finite losses and one compilation."""
    import jax

    from sgt_jax.parallel import mesh as mesh_lib
    from sgt_jax.train import loop
    sys.path.insert(0, REPO)
    try:
        from configs.tiny import get_config
    finally:
        sys.path.remove(REPO)
    cfg = get_config()
    cfg.data.proxy = "mixed"
    cfg.data.sources.seg = f"synthetic_seg:{scenes_dir}"
    cfg.data.sources.vqa = f"synthetic_vqa:{scenes_dir}"
    cfg.train.update(steps=3, save_every=100, log_every=1, warmup_steps=1)
    mesh = mesh_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    s = loop.train(cfg, str(tmp_path / "run"), quiet=True, mesh=mesh)
    assert s["steps"] == 3 and s["compiles_in_loop"] == 1
    rows = s["history"]
    assert len(rows) == 3 and all(np.isfinite(r["loss"]) and r["mse"] > 0 for r in rows)
    last = rows[-1]
    assert last["data_total/samples/seg"] >= 3 * 8 and not any("skipped" in k for k in last if k.startswith("data_"))
