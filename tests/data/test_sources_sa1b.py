"""SA-1B source (sources/sa1b.py): folders and tar shards, rendered targets, bad records. All data
is written by the tests (tmp_path)."""
import json
import os
import pickle
import tarfile

import numpy as np
import pytest
from fake_data import _enc, _huge_png, _nested, _sa1b_json, _same_record, _tar, _write

from sgt_jax.data import sources, synthetic
from sgt_jax.data.records import BadRecord

pycoco = pytest.importorskip("pycocotools.mask")


def test_sa1b_folder_and_tar_give_identical_records(sa1b, tmp_path):
    a = sources.SA1BSource([sa1b["folder"]], seed=3)
    b = sources.SA1BSource(sa1b["tars"], seed=3, cache_dir=str(tmp_path / "cache"))
    c = sources.make_source(f"sa1b:{sa1b['shard_dir']}/*.tar", seed=3, workdir=str(tmp_path))
    d = sources.make_source(f"sa1b:{sa1b['shard_dir']}", seed=3)           # dir of shards
    assert len(a) == len(b) == len(c) == len(d) == 7
    assert os.listdir(tmp_path / "cache") and os.listdir(tmp_path / "index_cache")
    b2 = sources.SA1BSource(sa1b["tars"], seed=3, cache_dir=str(tmp_path / "cache"))  # cached
    for i in range(len(a)):
        ra = a[i]
        for other in (b, c, d, b2):
            _same_record(ra, other[i])
        assert ra["task"] == "seg" and ra["image"].dtype == np.uint8
        assert ra["image"].shape == ra["target"].shape and ra["image"].shape[2] == 3
    assert a.key(0) == "sa_1" and [a.key(i) for i in range(7)] == sorted(a.key(i) for i in range(7))
    assert a[-1]["id"] == a[6]["id"]
    with pytest.raises(IndexError):
        a[7]


def test_sa1b_target_colours_follow_the_masks(sa1b):
    src = sources.SA1BSource([sa1b["folder"]], seed=0)
    other_seed = sources.SA1BSource([sa1b["folder"]], seed=1)
    for i in range(len(src)):
        r = src[i]
        with open(os.path.join(sa1b["folder"], r["id"] + ".json")) as f:
            meta = json.load(f)
        masks = [pycoco.decode({"size": a["segmentation"]["size"],
                                "counts": a["segmentation"]["counts"].encode()}).astype(bool)
                 for a in meta["annotations"]]
        order = np.argsort([-m.sum() for m in masks], kind="stable")
        covered = np.zeros(masks[0].shape, bool)
        colours = []
        for j in order[::-1]:                          # smallest first = painted last = on top
            vis = masks[j] & ~covered
            covered |= masks[j]
            c = r["target"][vis]
            assert len(c) and (c == c[0]).all()
            colours.append(tuple(c[0]))
        assert len(set(colours)) == len(colours) and (0, 0, 0) not in colours
        assert (r["target"][~covered] == 0).all()
        assert np.array_equal(src[i]["target"], r["target"])              # deterministic
        assert not np.array_equal(other_seed[i]["target"], r["target"])   # seeded by the run
    nested = src[src._keys.index("sa_900")]["target"]
    big, small = _nested()
    assert (nested[small == 1] == nested[17, 22]).all() and not (nested[17, 22] == nested[8, 8]).all()


def test_sa1b_max_side_downscales_with_exact_colours(sa1b):
    full = sources.SA1BSource([sa1b["folder"]], seed=0)
    small = sources.make_source(f"sa1b:{sa1b['folder']}?max_side=24", seed=0)
    for i in range(len(full)):
        a, b = full[i], small[i]
        assert max(b["image"].shape[:2]) == 24 and b["image"].shape == b["target"].shape
        assert {tuple(c) for c in b["target"].reshape(-1, 3)} <= \
               {tuple(c) for c in a["target"].reshape(-1, 3)}


def test_sa1b_bad_records_have_reasons(tmp_path):
    d = str(tmp_path)
    h, w = 40, 50
    big, small = _nested(h, w)
    img = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    good_json = lambda i: _sa1b_json(i, h, w, [big, small])
    jpg = _enc(img)
    _write(f"{d}/sa_1.jpg", jpg)                                    # good
    _write(f"{d}/sa_1.json", good_json(1))
    _write(f"{d}/sa_2.jpg", jpg[: len(jpg) * 2 // 3])               # truncated JPEG
    _write(f"{d}/sa_2.json", good_json(2))
    _write(f"{d}/sa_3.jpg", b"this is not an image")
    _write(f"{d}/sa_3.json", good_json(3))
    bad_rle = json.loads(good_json(4))
    bad_rle["annotations"][0]["segmentation"]["counts"] = "!!not-rle"
    _write(f"{d}/sa_4.jpg", jpg)
    _write(f"{d}/sa_4.json", json.dumps(bad_rle))
    _write(f"{d}/sa_5.jpg", jpg)                                    # RLE size != image size
    _write(f"{d}/sa_5.json", _sa1b_json(5, h, w, [np.zeros((h + 1, w), np.uint8)]).replace(
        f'"height": {h}', f'"height": {h}'))
    _write(f"{d}/sa_6.jpg", jpg)
    _write(f"{d}/sa_6.json", good_json(6)[:50])                     # truncated JSON
    _write(f"{d}/sa_7.jpg", jpg)                                    # no JSON
    _write(f"{d}/sa_8.jpg", jpg)
    _write(f"{d}/sa_8.json", _sa1b_json(8, h, w, []))               # no masks
    _write(f"{d}/sa_9.jpg", _huge_png())                            # 20000 x 20000 header
    _write(f"{d}/sa_9.json", _sa1b_json(9, 20000, 20000, []))
    _write(f"{d}/sa_10.jpg", jpg)
    _write(f"{d}/sa_10.json", _sa1b_json(10, h + 2, w, [big]))      # JSON image size wrong
    _write(f"{d}/stray.json", "{}")                                 # orphan: ignored
    expected = {"sa_1": None, "sa_2": "corrupt_image", "sa_3": "corrupt_image",
                "sa_4": "bad_annotation", "sa_5": "bad_annotation", "sa_6": "bad_annotation",
                "sa_7": "missing_file", "sa_8": "no_masks", "sa_9": "image_too_large",
                "sa_10": "bad_annotation"}
    src = sources.SA1BSource([d], seed=0)
    assert sorted(src._keys) == sorted(expected)
    for i in range(len(src)):
        key = src.key(i)
        if expected[key] is None:
            assert src[i]["id"] == key
            continue
        with pytest.raises(BadRecord) as e:
            src[i]
        assert (e.value.reason, e.value.source, e.value.key) == (expected[key], "sa1b", key), \
            (key, str(e.value))
        assert e.value.reason in sources.REASONS
    skipping = sources.SkippingSource(src)
    got = [skipping[i] for i in range(len(skipping))]
    assert sum(r is not None for r in got) == 1
    assert dict(skipping.counts) == {"corrupt_image": 2, "bad_annotation": 4, "missing_file": 1,
                                     "no_masks": 1, "image_too_large": 1}
    assert pickle.loads(pickle.dumps(skipping))[0] is not None


def test_truncated_tar_shard_is_a_counted_skip(tmp_path):
    folder = str(tmp_path / "f")
    synthetic.generate(folder, 3, seed=2, size=(40, 48))
    names = sorted(f for f in os.listdir(folder) if f.startswith("sa_"))
    shard = _tar(tmp_path / "s.tar", [(n, open(os.path.join(folder, n), "rb").read())
                                      for n in names])
    data = open(shard, "rb").read()
    last = tarfile.open(shard).getmembers()[-1]
    with open(shard, "wb") as f:                        # cut into the last member's data
        f.write(data[: last.offset_data + last.size // 2])
    src = sources.SA1BSource([shard], seed=0)
    counts = sources.SkippingSource(src)
    ok = [counts[i] for i in range(len(src))]
    assert sum(r is not None for r in ok) == 2 and sum(counts.counts.values()) == 1
    assert set(counts.counts) <= {"read_error", "missing_file"}
