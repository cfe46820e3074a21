"""COCO panoptic and instances sources (sources/coco.py). All data is written by the tests
(tmp_path)."""
import json

import numpy as np
import pytest
from fake_data import _enc, _write

from sgt_jax.data import render, sources
from sgt_jax.data.records import BadRecord

pycoco = pytest.importorskip("pycocotools.mask")


def test_coco_panoptic(tmp_path):
    h, w = 30, 40
    ids = np.zeros((h, w), np.int64)
    ids[:, :20] = 1 + 256 * 3                      # "stuff"
    ids[5:15, 25:35] = 300                         # a "thing"
    ids[20:25, 25:30] = 70000
    png_rgb = np.stack([ids % 256, (ids // 256) % 256, ids // 65536], -1).astype(np.uint8)
    yy, xx = np.mgrid[:h, :w]
    img = np.stack([yy * 8, xx * 6, yy + xx], -1).astype(np.uint8)      # smooth: JPEG-friendly
    for d in ("ann", "images"):
        (tmp_path / d).mkdir()
    _write(f"{tmp_path}/images/000001.jpg", _enc(img))
    _write(f"{tmp_path}/ann/000001.png", _enc(png_rgb, "PNG"))
    _write(f"{tmp_path}/images/000002.jpg", _enc(img))               # PNG missing
    _write(f"{tmp_path}/images/000003.jpg", _enc(img))
    _write(f"{tmp_path}/ann/000003.png", _enc(png_rgb[:-1], "PNG"))   # PNG size differs
    segs = [{"id": int(i), "category_id": 1, "area": int((ids == i).sum()), "iscrowd": 0}
            for i in (769, 300, 70000)]
    meta = {"images": [{"id": k, "file_name": f"00000{k}.jpg", "height": h, "width": w}
                       for k in (1, 2, 3, 4)],
            "annotations": [{"image_id": k, "file_name": f"00000{k}.png",
                             "segments_info": segs if k != 4 else []} for k in (1, 2, 3, 4)],
            "categories": [{"id": 1, "name": "x", "isthing": 1, "color": [1, 2, 3]}]}
    _write(f"{tmp_path}/ann/panoptic.json", json.dumps(meta))
    spec = f"coco_panoptic:{tmp_path}/ann/panoptic.json::{tmp_path}/ann::{tmp_path}/images"
    src = sources.make_source(spec, seed=0)
    assert len(src) == 4
    r = src[0]
    assert r["id"] == "000001" and np.array_equal(r["target"], png_rgb)
    assert np.abs(r["image"].astype(int) - img).mean() < 8            # JPEG round trip
    reasons = []
    for i in (1, 2, 3):
        with pytest.raises(BadRecord) as e:
            src[i]
        reasons.append(e.value.reason)
    assert reasons == ["missing_file", "bad_annotation", "no_masks"]
    rend = sources.make_source(spec + "?colors=render", seed=0)[0]["target"]
    cols = [tuple(rend[ids == i][0]) for i in (769, 300, 70000)]
    for i, c in zip((769, 300, 70000), cols):
        assert (rend[ids == i] == c).all()
    assert len(set(cols)) == 3 and (rend[ids == 0] == 0).all()


def test_coco_instances(tmp_path):
    h, w = 30, 40
    img = np.random.default_rng(2).integers(0, 255, (h, w, 3), dtype=np.uint8)
    _write(f"{tmp_path}/img/a.jpg", _enc(img))
    blob = np.zeros((h, w), np.uint8)
    blob[8:12, 10:14] = 1
    strip = np.zeros((h, w), np.uint8)
    strip[20:28, :] = 1
    crowd = np.zeros((h, w), np.uint8)
    crowd[0:3, 30:40] = 1
    counts = render.counts_from_string(render.rle_encode(strip)["counts"]).tolist()
    anns = [
        {"id": 1, "image_id": 1, "category_id": 5, "iscrowd": 0,
         "segmentation": [[2.0, 2.0, 30.0, 2.0, 30.0, 18.0, 2.0, 18.0]]},       # polygon
        {"id": 2, "image_id": 1, "category_id": 5, "iscrowd": 0,
         "segmentation": render.rle_encode(blob)},                             # compressed RLE
        {"id": 3, "image_id": 1, "category_id": 7, "iscrowd": 0,
         "segmentation": {"size": [h, w], "counts": counts}},                  # uncompressed
        {"id": 4, "image_id": 1, "category_id": 7, "iscrowd": 1,
         "segmentation": render.rle_encode(crowd)},
        {"id": 5, "image_id": 2, "category_id": 7, "iscrowd": 0,
         "segmentation": {"size": [h, w], "counts": "!!bad"}},
    ]
    meta = {"images": [{"id": 1, "file_name": "a.jpg", "height": h, "width": w},
                       {"id": 2, "file_name": "a.jpg", "height": h, "width": w},
                       {"id": 3, "file_name": "a.jpg", "height": h, "width": w}],
            "annotations": anns, "categories": [{"id": 5, "name": "p"}, {"id": 7, "name": "q"}]}
    _write(f"{tmp_path}/instances.json", json.dumps(meta))
    spec = f"coco_instances:{tmp_path}/instances.json::{tmp_path}/img"
    src = sources.make_source(spec, seed=4)
    poly = pycoco.decode(pycoco.merge(pycoco.frPyObjects(anns[0]["segmentation"], h, w)))
    expected = render.render_masks([poly, blob, strip], (h, w), seed=4, image_id=1)
    r = src[0]
    assert np.array_equal(r["target"], expected)
    assert (r["target"][blob == 1] == r["target"][9, 11]).all()          # small one on top
    assert (r["target"][crowd == 1] == 0).all()                          # crowd skipped
    with_crowd = sources.make_source(spec + "?crowd=1", seed=4)[0]["target"]
    assert (with_crowd[crowd == 1] != 0).all()
    for i, reason in ((1, "bad_annotation"), (2, "no_masks")):
        with pytest.raises(BadRecord) as e:
            src[i]
        assert e.value.reason == reason
    sem = sources.make_source(spec + "?by=category", seed=4)[0]["target"]
    assert (sem[blob == 1] == sem[5, 5]).all()                          # same category 5
    assert not (sem[24, 5] == sem[5, 5]).all()                          # category 7 differs
