"""Data built once per test module and shared by the data tests: SA-1B folders and shards,
SAM-SGT pairs, LLaVA files (written by the tests, tiny), and the tree the URL tests upload."""
import json
import os

import numpy as np
import pytest
from fake_data import _enc, _nested, _sa1b_json, _tar, _turns, _write

from sgt_jax import fileio
from sgt_jax.data import sources, synthetic
from sgt_jax.data.records import BadRecord


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


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """SA-1B folder (good + bad records) and its tar shards, SAM-SGT pairs (folder, tars, list),
    a LLaVA jsonl / json + images."""
    root = tmp_path_factory.mktemp("remote_data")
    sa = root / "sa1b"
    synthetic.generate(str(sa / "folder"), 4, seed=5, size=(32, 48))
    h, w = 40, 50
    big, small = _nested(h, w)
    img = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    jpg = _enc(img)
    f = sa / "folder"
    _write(f"{f}/sub/sa_900.jpg", jpg)
    _write(f"{f}/sub/sa_900.json", _sa1b_json(900, h, w, [small, big]))
    _write(f"{f}/sa_901.jpg", jpg[: len(jpg) // 2])                      # corrupt image
    _write(f"{f}/sa_901.json", _sa1b_json(901, h, w, [big]))
    _write(f"{f}/sa_902.jpg", jpg)
    _write(f"{f}/sa_902.json", "{broken")                                # bad annotation
    _write(f"{f}/sa_903.jpg", jpg)                                       # missing JSON
    _write(f"{f}/sa_904.jpg", jpg)
    _write(f"{f}/sa_904.json", _sa1b_json(904, h, w, []))                # no masks
    names = fileio.walk_files(str(f))
    (sa / "shards").mkdir()
    rd = lambda n: (f / n).read_bytes()
    _tar(sa / "shards" / "sa_000000.tar", [(f"./{n}", rd(n)) for n in names if n.endswith(".jpg")])
    _tar(sa / "shards" / "sa_000001.tar", [(n, rd(n)) for n in names if n.endswith(".json")])

    pairs = root / "pairs"
    src = sources.SA1BSource([str(f)], seed=0)
    members = []
    for i in range(len(src)):
        try:
            r = src[i]
        except BadRecord:
            continue
        jpg_b = rd(r["id"] + ".jpg")
        png_b = _enc(r["target"], "PNG")
        _write(f"{pairs}/SAM-SGT/sam_selection/{r['id']}.jpg", jpg_b)
        _write(f"{pairs}/SAM-SGT/sam_mask/{r['id']}.png", png_b)
        members += [(f"sam_selection/{r['id']}.jpg", jpg_b), (f"sam_mask/{r['id']}.png", png_b)]
    _write(f"{pairs}/SAM-SGT/sam_selection/lonely.jpg", members[0][1])   # no mask: missing_file
    _write(f"{pairs}/SAM-SGT/sam_mask/sa_2.png", b"not a png")          # corrupt mask
    (pairs / "tars").mkdir()
    _tar(pairs / "tars" / "part0.tar", members[::2])
    _tar(pairs / "tars" / "part1.tar", members[1::2])
    _write(f"{pairs}/list.txt", "x/sam_selection/sa_1.jpg\nsa_3.jpg\nsub/sa_900.jpg\n")

    lv = root / "llava"
    a = np.random.default_rng(3).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    _write(f"{lv}/images/sub/a.png", _enc(a, "PNG"))
    _write(f"{lv}/images/b.png", b"\x89PNG broken")
    rows = [{"id": "one", "image": "sub/a.png", "conversations": _turns("<image>\nWhat?", "A cat.")},
            {"id": "text", "conversations": _turns("Hi", "Hello")},
            {"id": "missing", "image": "nope.png", "conversations": _turns("<image>\nQ", "A")},
            {"id": "corrupt", "image": "b.png", "conversations": _turns("<image>\nQ", "A")},
            {"id": "roles", "conversations": _turns("Q", "A", "Q2")}]
    with open(lv / "data.jsonl", "w") as fh:
        for r in rows[:2]:
            fh.write(json.dumps(r) + "\n")
        fh.write("{broken json\n\n")
        for r in rows[2:]:
            fh.write(json.dumps(r) + "\n")
    (lv / "data.json").write_text(json.dumps(rows))
    (lv / "images" / "data.jsonl").write_text((lv / "data.jsonl").read_text())   # default root
    return root
