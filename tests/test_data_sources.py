"""Data sources: RLE codec, renderer, SA-1B / SGT pairs / COCO / LLaVA readers, tar shards,
bad-record reasons, the spec grammar. All data is written by the tests (tmp_path)."""
import io
import json
import os
import pickle
import struct
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image

from sgt_jax.data import render, sources, synthetic
from sgt_jax.data.records import BadRecord

pycoco = pytest.importorskip("pycocotools.mask")


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def _enc(arr, fmt="JPEG", **kw) -> bytes:
    b = io.BytesIO()
    (arr if isinstance(arr, Image.Image) else Image.fromarray(arr)).save(b, fmt, **kw)
    return b.getvalue()


def _write(path, data: bytes | str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return str(path)


def _sa1b_json(image_id, h, w, masks, **image_extra):
    return json.dumps({"image": {"image_id": image_id, "height": h, "width": w,
                                 "file_name": f"sa_{image_id}.jpg", **image_extra},
                       "annotations": [{"id": k, "segmentation": render.rle_encode(m),
                                        "area": int(m.sum()), "bbox": render.mask_bbox(m)}
                                       for k, m in enumerate(masks)]})


def _huge_png(side=20000) -> bytes:
    """A PNG whose header says side x side (the pixel data is never reached)."""
    png = bytearray(_enc(np.zeros((1, 1, 3), np.uint8), "PNG"))
    ihdr = 8 + 8                                             # signature, chunk length + type
    png[ihdr:ihdr + 8] = struct.pack(">II", side, side)
    png[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(png[ihdr - 4:ihdr + 13])))
    return bytes(png)


def _nested(h=40, w=50):
    big = np.zeros((h, w), np.uint8)
    big[5:35, 5:45] = 1
    small = np.zeros((h, w), np.uint8)
    small[15:20, 20:25] = 1
    return big, small


def _same_record(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
        elif isinstance(a[k], list) and a[k] and isinstance(a[k][0], np.ndarray):
            assert all(np.array_equal(x, y) for x, y in zip(a[k], b[k], strict=True)), k
        else:
            assert a[k] == b[k], k


# ------------------------------------------------------------------------------------------------
# RLE and renderer
# ------------------------------------------------------------------------------------------------

def test_rle_roundtrip_against_pycocotools():
    rng = np.random.default_rng(0)
    for t in range(60):
        h, w = rng.integers(1, 70, 2)
        m = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        if t % 7 == 0:
            m[:] = t % 2
        if t % 5 == 0:                                       # blobs: long runs, big deltas
            m = np.zeros((h, w), np.uint8)
            m[h // 4: h // 2 + 1, w // 3:] = 1
        ours = render.rle_encode(m)
        ref = pycoco.encode(np.asfortranarray(m))
        assert ours["size"] == [h, w] and ours["counts"] == ref["counts"].decode()
        assert np.array_equal(render.rle_decode(ours), m)
        assert np.array_equal(pycoco.decode({"size": [int(h), int(w)],
                                             "counts": ours["counts"].encode()}), m)
        assert render.rle_area(ours) == int(m.sum())
        # uncompressed counts (COCO crowd format) decode to the same mask
        counts = render.counts_from_string(ours["counts"]).tolist()
        assert np.array_equal(render.rle_decode({"size": [h, w], "counts": counts}), m)


def test_rle_large_counts_and_errors():
    m = np.zeros((300, 400), np.uint8)
    m[:, 200:] = 1
    m[10:20, 5:9] = 1
    r = render.rle_encode(m)
    assert np.array_equal(render.rle_decode(r), m)
    assert np.array_equal(pycoco.decode({"size": r["size"], "counts": r["counts"].encode()}), m)
    for bad in ({"size": [2, 2], "counts": "!!"},                        # chars below '0'
                {"size": [2, 2], "counts": "0p"},                        # char above 'o'
                {"size": [3, 3], "counts": render.counts_to_string([4, 4])},  # sum 8 != 9
                {"size": [2, 2], "counts": "P"},                         # ends mid-number
                {"size": [2, 2], "counts": [1, -1, 4]},
                {"size": [2], "counts": "4"},
                {"counts": "4"}):
        with pytest.raises(ValueError):
            render.rle_decode(bad)


def test_renderer_paints_larger_first_with_distinct_seeded_colours():
    big, small = _nested()
    for masks in ([big, small], [small, big], [render.rle_encode(small), big]):
        out = render.render_masks(masks, big.shape, seed=1, image_id=42)
        c_small, c_big = out[17, 22], out[8, 8]
        assert (out[small == 1] == c_small).all()             # small mask fully visible on top
        assert (out[(big == 1) & (small == 0)] == c_big).all()
        assert (out[big == 0] == 0).all()                      # background black
        assert not np.array_equal(c_small, c_big) and c_small.any() and c_big.any()
    a = render.render_masks([big, small], big.shape, seed=1, image_id=42)
    assert np.array_equal(a, render.render_masks([small, big], big.shape, seed=1, image_id=42))
    assert not np.array_equal(a, render.render_masks([big, small], big.shape, seed=1, image_id=43))
    assert not np.array_equal(a, render.render_masks([big, small], big.shape, seed=2, image_id=42))
    assert render.render_seed(1, 42) == render.render_seed(1, "42")   # stable, not hash()
    cols = render.distinct_colors(300, seed=5)
    assert len({tuple(c) for c in cols}) == 300 and not (cols == 0).all(1).any()
    d = np.sqrt(((cols[:40, None].astype(int) - cols[None, :40]) ** 2).sum(-1))
    assert d[~np.eye(40, dtype=bool)].min() > 40               # spread out, not just distinct
    assert np.array_equal(render.distinct_colors(10, seed=5), cols[:10])   # prefix-stable
    with pytest.raises(ValueError, match="differs from the image size"):
        render.render_masks([big[:-1]], big.shape, seed=0, image_id=0)


# ------------------------------------------------------------------------------------------------
# SA-1B: folders, tar shards, bad records
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sa1b(tmp_path_factory):
    """Synthetic scenes + a hand-made nested-mask image, as a folder and as two tar shards
    (images in one, JSON in the other, './' member prefixes), and a folder holding the shards."""
    root = tmp_path_factory.mktemp("sa1b")
    folder = str(root / "folder")
    synthetic.generate(folder, 6, seed=11, size=(40, 64))
    big, small = _nested()
    img = np.full((40, 50, 3), 128, np.uint8)
    _write(f"{folder}/sa_900.jpg", _enc(img))
    _write(f"{folder}/sa_900.json", _sa1b_json(900, 40, 50, [small, big]))
    files = sorted(f for f in os.listdir(folder) if f.startswith("sa_"))
    read = lambda f: open(os.path.join(folder, f), "rb").read()
    shards = root / "shards"
    shards.mkdir()
    _tar(shards / "sa_000000.tar", [(f"./{f}", read(f)) for f in files if f.endswith(".jpg")])
    _tar(shards / "sa_000001.tar", [(f, read(f)) for f in files if f.endswith(".json")])
    return {"folder": folder, "tars": sorted(str(p) for p in shards.iterdir()),
            "shard_dir": str(shards)}


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


def test_decode_image_modes():
    rgb = np.random.default_rng(0).integers(0, 255, (6, 7, 3), dtype=np.uint8)
    cases = {
        "L": _enc(Image.fromarray(rgb[..., 0]), "PNG"),
        "CMYK": _enc(Image.fromarray(rgb).convert("CMYK"), "JPEG"),
        "RGBA": _enc(Image.fromarray(np.dstack([rgb, np.zeros((6, 7), np.uint8)])), "PNG"),
        "I;16": _enc(Image.fromarray(np.full((6, 7), 60000, np.uint16)), "PNG"),
        "P": _enc(Image.fromarray(rgb).convert("P"), "PNG"),
        "1": _enc(Image.fromarray(rgb[..., 0] > 128), "PNG"),
    }
    for mode, data in cases.items():
        a, hw = sources.decode_image(data)
        assert a.shape == (6, 7, 3) and a.dtype == np.uint8 and hw == (6, 7), mode
    assert (sources.decode_image(cases["RGBA"])[0] == 255).all()       # transparent over white
    assert (sources.decode_image(cases["I;16"])[0] == 60000 >> 8).all()  # scaled, not clipped
    assert np.array_equal(sources.decode_image(cases["L"])[0][..., 1], rgb[..., 0])
    a, hw = sources.decode_image(_enc(rgb, "PNG"), out_hw=(3, 4))
    assert a.shape == (3, 4, 3) and hw == (6, 7)
    for data, reason in ((b"", "corrupt_image"), (_huge_png(), "image_too_large"),
                         (_enc(rgb, "PNG"), "image_too_large")):
        with pytest.raises(sources._ImageError) as e:
            sources.decode_image(data, max_pixels=40)
        assert e.value.reason == reason


# ------------------------------------------------------------------------------------------------
# pre-rendered SGT pairs
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pairs(sa1b, tmp_path_factory):
    """Released SAM-SGT layout built from the SA-1B records: sam_selection/*.jpg + sam_mask/*.png."""
    src = sources.SA1BSource([sa1b["folder"]], seed=0)
    root = tmp_path_factory.mktemp("pairs")
    recs = [src[i] for i in range(len(src))]
    imgs, masks = [], []
    for r in recs:
        jpg = open(os.path.join(sa1b["folder"], r["id"] + ".jpg"), "rb").read()
        png = _enc(r["target"], "PNG")
        _write(f"{root}/SAM-SGT/sam_selection/{r['id']}.jpg", jpg)
        _write(f"{root}/SAM-SGT/sam_mask/{r['id']}.png", png)
        imgs.append((f"sam_selection/{r['id']}.jpg", jpg))
        masks.append((f"sam_mask/{r['id']}.png", png))
    _write(f"{root}/SAM-SGT/sam_selection/lonely.jpg", imgs[0][1])      # no mask
    _write(f"{root}/SAM-SGT/sam_mask/orphan.png", masks[0][1])          # no image: ignored
    (root / "tars").mkdir()
    _tar(root / "tars" / "part0.tar", imgs[:4] + masks[4:])          # pairs split across shards
    _tar(root / "tars" / "part1.tar", imgs[4:] + masks[:4])
    return {"root": str(root / "SAM-SGT"), "tars": str(root / "tars"), "records": recs}


def test_sgt_pairs_released_layout_folder_and_tar(pairs):
    f = sources.make_source(f"sgt_pairs:{pairs['root']}", seed=0)
    t = sources.make_source(f"sgt_pairs:{pairs['tars']}/part*.tar", seed=0)
    assert len(f) == len(pairs["records"]) + 1 and len(t) == len(pairs["records"])
    for r in pairs["records"]:
        a, b = f[f._keys.index(r["id"])], t[t._keys.index(r["id"])]
        _same_record(a, b)
        _same_record(a, r)                      # PNG is lossless: the SA-1B rendering comes back
    with pytest.raises(BadRecord) as e:
        f[f._keys.index("lonely")]
    assert e.value.reason == "missing_file" and e.value.source == "sgt_pairs"


def test_sgt_pairs_flat_layout_suffix_resize_and_list(pairs, tmp_path):
    r = pairs["records"][0]
    jpg = open(os.path.join(pairs["root"], "sam_selection", r["id"] + ".jpg"), "rb").read()
    half = Image.fromarray(r["target"]).resize((r["target"].shape[1] // 2,
                                                r["target"].shape[0] // 2), Image.NEAREST)
    _write(f"{tmp_path}/flat/a.jpg", jpg)
    _write(f"{tmp_path}/flat/a_mask.png", _enc(half, "PNG"))
    _write(f"{tmp_path}/flat/b.jpg", jpg)
    _write(f"{tmp_path}/flat/b_mask.png", _enc(r["target"], "PNG"))
    _write(f"{tmp_path}/list.txt", "/somewhere/sam_selection/b.jpg\n")
    src = sources.make_source(f"sgt_pairs:{tmp_path}/flat?mask_suffix=_mask.png", seed=0)
    assert src._keys == ["a", "b"]
    a = src[0]
    assert a["target"].shape == a["image"].shape                   # resized to the image
    assert {tuple(c) for c in a["target"].reshape(-1, 3)} <= \
           {tuple(c) for c in r["target"].reshape(-1, 3)}          # nearest: colours exact
    listed = sources.make_source(
        f"sgt_pairs:{tmp_path}/flat?mask_suffix=_mask.png&list={tmp_path}/list.txt", seed=0)
    assert listed._keys == ["b"] and np.array_equal(listed[0]["target"], r["target"])
    with pytest.raises(sources.SpecError, match="also an image extension"):
        sources.make_source(f"sgt_pairs:{tmp_path}/flat?mask_suffix=.jpg", seed=0)


# ------------------------------------------------------------------------------------------------
# COCO panoptic and instances
# ------------------------------------------------------------------------------------------------

def _id2rgb(i):
    return [i % 256, (i // 256) % 256, i // 65536]


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


# ------------------------------------------------------------------------------------------------
# LLaVA-OneVision SFT
# ------------------------------------------------------------------------------------------------

def _turns(*vals):
    return [{"from": "human" if j % 2 == 0 else "gpt", "value": v} for j, v in enumerate(vals)]


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    d = tmp_path_factory.mktemp("llava")
    rng = np.random.default_rng(3)
    a = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    b = rng.integers(0, 255, (16, 12, 3), dtype=np.uint8)
    _write(f"{d}/images/sub/a.png", _enc(a, "PNG"))
    _write(f"{d}/images/b.png", _enc(b, "PNG"))
    rows = [
        {"id": "one", "image": "sub/a.png", "conversations": _turns("<image>\nWhat?", "A cat.")},
        {"id": "text", "conversations": _turns("Hi", "Hello", "Bye", "Bye.")},
        {"id": "none", "image": "None", "conversations": _turns("Hi", "Hello")},
        {"id": "two", "image": ["sub/a.png", "b.png"],
         "conversations": _turns("<image> vs <image>?", "Left.")},
        {"id": "mismatch", "image": "sub/a.png",
         "conversations": _turns("<image><image> compare", "Same.")},
        {"id": "missing", "image": "nope.png", "conversations": _turns("<image>\nQ", "A")},
        {"id": "roles", "image": None, "conversations": _turns("Q", "A") + [
            {"from": "gpt", "value": "again"}]},
        {"id": "system", "conversations": [{"from": "system", "value": "x"}] + _turns("Q", "A")},
        {"id": "endhuman", "conversations": _turns("Q", "A", "Q2")},
        {"id": "gptimg", "image": "b.png", "conversations": _turns("<image>", "<image> here")},
        {"id": "noph", "image": "b.png", "conversations": _turns("Describe.", "Noise.")},
        {"id": "user", "conversations": [{"from": "user", "value": "Q"},
                                         {"from": "assistant", "value": "A"}]},
        {"id": "video", "video": "v.mp4", "conversations": _turns("<video>", "x")},
    ]
    expect = {"one": None, "text": None, "none": None, "two": None,
              "mismatch": "placeholder_mismatch", "missing": "missing_file",
              "roles": "bad_conversation", "system": "bad_conversation",
              "endhuman": "bad_conversation", "gptimg": "placeholder_mismatch",
              "noph": "placeholder_mismatch", "user": None, "video": "unsupported"}
    with open(d / "data.jsonl", "w") as f:
        for r in rows[:5]:
            f.write(json.dumps(r) + "\n")
        f.write("{broken json\n\n")                       # bad line; the blank line is skipped
        for r in rows[5:]:
            f.write(json.dumps(r) + "\n")
    with open(d / "data.json", "w") as f:
        json.dump(rows, f)
    return {"dir": d, "rows": rows, "expect": expect, "a": a, "b": b}


def _check_llava(src, llava, with_broken_line):
    ids = []
    for i in range(len(src)):
        try:
            r = src[i]
        except BadRecord as e:
            assert e.source == "llava"
            ids.append((e.key, e.reason))
            continue
        ids.append((r["id"], None))
        assert r["task"] == "vqa" and r["conversations"][-1]["from"] == "gpt"
        n_ph = sum(t["value"].count("<image>") for t in r["conversations"])
        assert n_ph == len(r["images"])
        if r["id"] == "two":
            assert np.array_equal(r["images"][0], llava["a"])
            assert np.array_equal(r["images"][1], llava["b"])
        if r["id"] == "user":
            assert [t["from"] for t in r["conversations"]] == ["human", "gpt"]
    want = [(k, v) for k, v in llava["expect"].items()]
    if with_broken_line:
        want.insert(5, ("data:5", "bad_json"))
    assert ids == want


def test_llava_jsonl_and_json(llava):
    d = llava["dir"]
    _check_llava(sources.make_source(f"llava:{d}/data.jsonl::{d}/images", seed=0), llava, True)
    _check_llava(sources.make_source(f"llava:{d}/data.json::{d}/images", seed=0), llava, False)
    fixed = sources.make_source(f"llava:{d}/data.json::{d}/images?fix_placeholders=1", seed=0)
    r = fixed[[row["id"] for row in llava["rows"]].index("noph")]
    assert r["conversations"][0]["value"] == "<image>\nDescribe." and len(r["images"]) == 1


def test_llava_parquet(llava):
    pa = pytest.importorskip("pyarrow", reason="pyarrow not installed: parquet is optional")
    import pyarrow.parquet as pq
    d = llava["dir"]
    b = _enc(llava["b"], "PNG")
    rows = [{"id": "p1", "image": {"bytes": b, "path": "b.png"},
             "conversations": _turns("<image>\nQ?", "A.")},
            {"id": "p2", "image": None, "conversations": _turns("Q?", "A.")}]
    pq.write_table(pa.Table.from_pylist(rows), d / "data.parquet")
    src = sources.make_source(f"llava:{d}/data.parquet", seed=0)
    assert len(src) == 2
    assert np.array_equal(src[0]["images"][0], llava["b"]) and src[1]["images"] == []


# ------------------------------------------------------------------------------------------------
# grain compatibility, spec grammar, tfds
# ------------------------------------------------------------------------------------------------

def test_sources_are_grain_random_access_and_picklable(sa1b, llava):
    import grain
    import grain.python as gp
    d = llava["dir"]
    for src in (sources.SA1BSource(sa1b["tars"], seed=0),
                sources.make_source(f"llava:{d}/data.jsonl::{d}/images", seed=0)):
        assert isinstance(src, gp.RandomAccessDataSource)
        assert repr(src) == repr(pickle.loads(pickle.dumps(src)))
        _same_record(pickle.loads(pickle.dumps(src))[0], src[0])
        ds = grain.MapDataset.source(src)
        _same_record(ds[0], src[0])


@pytest.mark.parametrize("spec, match", [
    ("nonsense", "expected KIND:BODY"),
    ("sam:/x", "unknown kind 'sam'"),
    ("sa1b:", "no path"),
    ("sa1b:/does/not/exist", "does not exist"),
    ("sa1b:/does/not/*.tar", "matches nothing"),
    ("sa1b:{tmp}?max_sid=3", "unknown option 'max_sid'.*valid: background, max_pixels, max_side"),
    ("sa1b:{tmp}?max_side", "must be NAME=VALUE"),
    ("sa1b:{tmp}?max_side=big", "invalid literal"),
    ("coco_panoptic:{tmp}/x.json::{tmp}", "needs 3 '::'-separated paths"),
    ("coco_instances:{tmp}/x.json", "needs 2 '::'-separated paths"),
    ("llava:{tmp}/x.json::{tmp}::{tmp}", "needs 1-2"),
    ("llava:{tmp}/missing.jsonl", "does not exist"),
    ("llava:{tmp}/x.txt", "must be .jsonl, .json or .parquet"),
    ("sa1b:{tmp}/x.txt", "neither a directory nor an uncompressed .tar"),
    ("sa1b:{tmp}/x.tar.gz", "compressed tar"),
    ("tfds:coco/2017_panoptic", "tfds needs NAME:SPLIT"),
    ("synthetic_seg:{tmp}/s?size=9-3", "LO-HI"),
])
def test_make_source_errors_name_spec_and_fix(tmp_path, spec, match):
    (tmp_path / "x.json").write_text("[]")
    (tmp_path / "x.txt").write_text("")
    import gzip
    (tmp_path / "x.tar.gz").write_bytes(gzip.compress(b"\0" * 1024))
    spec = spec.format(tmp=tmp_path)
    with pytest.raises(sources.SpecError, match=match) as e:
        sources.make_source(spec, seed=0)
    assert repr(spec) in str(e.value)
    if ":" in spec and not spec.startswith("sam:"):
        assert "usage:" in str(e.value) or "valid:" in str(e.value) or "known kinds" in str(e.value)


def test_tfds_source():
    try:
        import tensorflow_datasets  # noqa: F401
    except ImportError:
        with pytest.raises(sources.SpecError, match="need tensorflow_datasets"):
            sources.make_source("tfds:coco/2017_panoptic:train", seed=0)
        pytest.skip("tensorflow_datasets is not installed (optional, not a dependency): "
                    "only the clear error was checked")
    with pytest.raises(sources.SpecError, match="prepare the dataset"):
        sources.make_source("tfds:coco/2017_panoptic:train?data_dir=/nonexistent", seed=0)
