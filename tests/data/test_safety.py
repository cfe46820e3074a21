"""Data safety (issue 11): no source reads outside its root, no record is dropped without a
counter, no defect ends in the catch-all. Each case is a record or file that reproduces it, the
counter that must appear, and -- for paths -- proof that nothing outside the root was opened
(an audit hook on ``open`` events, ``sys.addaudithook``)."""
import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from fake_data import REPO, tiny_run_config
from PIL import Image

from sgt_jax import fileio
from sgt_jax.data import pipeline as PL
from sgt_jax.data import render, sources, synthetic
from sgt_jax.data.records import BadRecord


# ------------------------------------------------------------------------------------------------
# every file opened while recording (the hook stays installed for the session; it records only
# inside ``opened()``)

_REC: list = []


def _audit(event, args):
    if event == "open" and _REC and isinstance(args[0], (str, bytes, os.PathLike)):
        _REC[-1].append(os.path.realpath(os.fsdecode(args[0])))


sys.addaudithook(_audit)


@contextlib.contextmanager
def opened():
    _REC.append([])
    try:
        yield _REC[-1]
    finally:
        _REC.pop()


def _under(paths, d) -> list:
    d = os.path.realpath(d)
    return [p for p in paths if p == d or p.startswith(d + os.sep)]


def _jpg(seed=0, h=24, w=32) -> bytes:
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    b = io.BytesIO()
    Image.fromarray(a).save(b, "PNG")        # lossless: any format PIL reads is a "jpg" here
    return b.getvalue()


def _write(path, data):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def _counts(src) -> dict:
    sk = sources.SkippingSource(src)
    good = [sk[i] for i in range(len(sk))]
    return {"good": [r["id"] for r in good if r is not None], **sk.counts}


@pytest.fixture
def outside(tmp_path):
    """A secret image and a text file outside every data root."""
    d = tmp_path / "outside"
    _write(d / "secret.jpg", _jpg(99))
    _write(d / "passwd", "root:x:0:0\n")
    return d


# ------------------------------------------------------------------------------------------------
# the containment function

def test_resolve_inside_local(tmp_path, outside):
    root = tmp_path / "data"
    _write(root / "a" / "x.jpg", b"x")
    os.symlink(outside / "secret.jpg", root / "link.jpg")            # a symlink out
    os.symlink(outside, root / "linkdir")                            # a symlinked directory out
    os.symlink(root / "a" / "x.jpg", root / "inner.jpg")             # a symlink inside: fine
    os.symlink(root, tmp_path / "rootlink")                          # a symlinked root: fine
    real = os.path.realpath(root / "a" / "x.jpg")
    assert fileio.resolve_inside(str(root), "a/x.jpg") == real
    assert fileio.resolve_inside(str(root), "a/../a/./x.jpg") == real
    assert fileio.resolve_inside(str(root), "inner.jpg") == real
    assert fileio.resolve_inside(str(tmp_path / "rootlink"), "a/x.jpg") == real
    assert fileio.resolve_inside(str(root), "a/missing.jpg").endswith("missing.jpg")  # open decides
    for rel, why in [(str(outside / "secret.jpg"), "absolute"), ("/etc/passwd", "absolute"),
                     ("../outside/secret.jpg", r"\('..'\)"), ("a/../../outside/passwd", r"\('..'\)"),
                     ("link.jpg", "symlink"), ("linkdir/secret.jpg", "symlink"),
                     ("gs://bucket/x.jpg", "absolute"), ("file:///etc/passwd", "absolute")]:
        with pytest.raises(fileio.PathOutsideRoot, match=why):
            fileio.resolve_inside(str(root), rel)
    for bad in (None, 3, "a\0b", "\ud800.jpg"):
        with pytest.raises(ValueError) as e:
            fileio.resolve_inside(str(root), bad)
        assert not isinstance(e.value, fileio.PathOutsideRoot)


def test_resolve_inside_urls(tmp_path, outside):
    root = "gs://bucket/ov/images"
    assert fileio.resolve_inside(root, "a/./b//c.jpg") == "gs://bucket/ov/images/a/b/c.jpg"
    assert fileio.resolve_inside(root + "/", "a/../c.jpg") == "gs://bucket/ov/images/c.jpg"
    for rel in ("../x.jpg", "a/../../x.jpg", "../../../other/x.jpg", "/x.jpg",
                "gs://other/x.jpg", "gs://bucket/ov/images/x.jpg", "s3://bucket/x.jpg", ".."):
        with pytest.raises(fileio.PathOutsideRoot):
            fileio.resolve_inside(root, rel)
    # file:// is a local filesystem: its symlinks are resolved
    d = tmp_path / "data"
    _write(d / "x.jpg", b"x")
    os.symlink(outside / "secret.jpg", d / "link.jpg")
    assert fileio.resolve_inside(f"file://{d}", "x.jpg") == f"file://{os.path.realpath(d / 'x.jpg')}"
    with pytest.raises(fileio.PathOutsideRoot, match="symlink"):
        fileio.resolve_inside(f"file://{d}", "link.jpg")


# ------------------------------------------------------------------------------------------------
# reads outside the root, per source and form

def _llava_rows(images):
    rows = [{"id": f"r{j}", "image": im,
             "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                               {"from": "gpt", "value": "A picture."}]} for j, im in enumerate(images)]
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_llava_never_reads_outside_its_image_root(tmp_path, outside):
    root = tmp_path / "ov"
    _write(root / "images" / "good.jpg", _jpg(1))
    os.symlink(outside / "secret.jpg", root / "images" / "link.jpg")
    os.symlink(outside, root / "images" / "linkdir")
    _write(root / "data.jsonl", _llava_rows([
        "good.jpg", "/etc/passwd", str(outside / "secret.jpg"), "../outside/secret.jpg",
        "../../outside/secret.jpg", "link.jpg", "linkdir/secret.jpg",
        {"path": "../../outside/secret.jpg"}, "file://" + str(outside / "secret.jpg")]))
    src = sources.make_source(f"llava:{root}/data.jsonl::{root}/images", seed=0)
    with opened() as seen:
        c = _counts(src)
    assert c == {"good": ["r0"], "path_outside_root": 8}
    assert _under(seen, outside) == [] and "/etc/passwd" not in seen
    assert _under(seen, root / "images")                  # the good image was read (the hook works)


def test_llava_remote_root_refuses_other_buckets_and_dotdot(fake_gcs, tmp_path):
    from remote_fs import upload_tree

    _write(tmp_path / "local" / "images" / "good.jpg", _jpg(1))
    upload_tree(str(tmp_path / "local"), fake_gcs, "gs://bucket/ov")
    _write(fake_gcs / "other" / "secret.jpg", _jpg(99))              # another bucket
    _write(fake_gcs / "bucket" / "secret.jpg", _jpg(98))             # the bucket, outside the root
    _write(tmp_path / "data.jsonl", _llava_rows([
        "good.jpg", "../../secret.jpg", "a/../../../secret.jpg", "gs://other/secret.jpg",
        "gs://bucket/secret.jpg", "s3://other/secret.jpg", "/secret.jpg", "../../../other/secret.jpg"]))
    upload_tree(str(tmp_path / "data.jsonl"), fake_gcs, "gs://bucket/ov/data.jsonl")
    src = sources.make_source("llava:gs://bucket/ov/data.jsonl::gs://bucket/ov/images", seed=0)
    with opened() as seen:
        c = _counts(src)
    assert c == {"good": ["r0"], "path_outside_root": 7}
    assert _under(seen, fake_gcs / "other") == []
    assert fake_gcs / "bucket" / "secret.jpg" not in map(Path, seen)
    assert _under(seen, fake_gcs / "bucket" / "ov" / "images")


def _sa1b(folder, name, h=24, w=32, **image):
    m = np.zeros((h, w), np.uint8)
    m[4:12, 5:20] = 1
    _write(folder / f"{name}.jpg", _jpg(hash(name) % 100, h, w))
    _write(folder / f"{name}.json", json.dumps(
        {"image": {"image_id": name, "height": h, "width": w, **image},
         "annotations": [{"id": 0, "segmentation": render.rle_encode(m)}]}))


def test_sa1b_and_sgt_pairs_folders_refuse_symlinks_out(tmp_path, outside):
    sa = tmp_path / "sa1b"
    _sa1b(sa, "sa_1", file_name="../../outside/secret.jpg")   # file_name is never opened
    _write(sa / "sa_2.json", (sa / "sa_1.json").read_text())
    os.symlink(outside / "secret.jpg", sa / "sa_2.jpg")       # the image is a symlink out
    _sa1b(outside / "d", "sa_3")                               # a whole directory symlinked in
    os.symlink(outside / "d", sa / "sub")
    with opened() as seen:
        c = _counts(sources.make_source(f"sa1b:{sa}", seed=0))
    assert c == {"good": ["sa_1"], "path_outside_root": 2}    # sa_2 and sub/sa_3
    assert _under(seen, outside) == []

    pairs = tmp_path / "pairs"
    _write(pairs / "sam_selection" / "a.jpg", _jpg(1))
    _write(pairs / "sam_mask" / "a.png", _jpg(2))
    _write(pairs / "sam_selection" / "b.jpg", _jpg(3))
    os.symlink(outside / "secret.jpg", pairs / "sam_mask" / "b.png")        # the mask: out
    os.symlink(outside / "secret.jpg", pairs / "sam_selection" / "c.jpg")   # the image: out
    _write(pairs / "sam_mask" / "c.png", _jpg(4))
    _write(tmp_path / "list.txt", "a\nb\nc\n../../outside/secret\n/etc/passwd\n")   # a manifest
    with opened() as seen:
        c = _counts(sources.make_source(f"sgt_pairs:{pairs}?list={tmp_path}/list.txt", seed=0))
    assert c == {"good": ["a"], "path_outside_root": 2}
    assert _under(seen, outside) == [] and "/etc/passwd" not in seen


def test_coco_file_names_stay_in_their_dirs(tmp_path, outside):
    h, w = 24, 32
    (tmp_path / "ann").mkdir()
    _write(tmp_path / "images" / "000001.jpg", _jpg(1, h, w))
    png = np.zeros((h, w, 3), np.uint8)
    png[2:10, 3:9] = (1, 0, 0)
    b = io.BytesIO()
    Image.fromarray(png).save(b, "PNG")
    _write(tmp_path / "ann" / "000001.png", b.getvalue())
    os.symlink(outside / "secret.jpg", tmp_path / "images" / "link.jpg")
    bad_files = ["../outside/secret.jpg", str(outside / "secret.jpg"), "link.jpg"]
    images = [{"id": 1, "file_name": "000001.jpg", "height": h, "width": w}] + [
        {"id": 2 + j, "file_name": f, "height": h, "width": w} for j, f in enumerate(bad_files)]
    segs = [{"id": 1, "category_id": 1, "iscrowd": 0}]
    pan = {"images": images + [{"id": 9, "file_name": "000001.jpg"}],
           "annotations": [{"image_id": im["id"], "file_name": "000001.png", "segments_info": segs}
                           for im in images] +
                          [{"image_id": 9, "file_name": "../../outside/secret.jpg", "segments_info": segs}],
           "categories": [{"id": 1, "name": "x"}]}
    _write(tmp_path / "ann" / "pan.json", json.dumps(pan))
    with opened() as seen:
        c = _counts(sources.make_source(f"coco_panoptic:{tmp_path}/ann/pan.json::{tmp_path}/ann::"
                                        f"{tmp_path}/images", seed=0))
    assert c == {"good": ["000001"], "path_outside_root": 4}
    assert _under(seen, outside) == []
    pytest.importorskip("pycocotools")
    inst = {"images": images, "categories": [{"id": 1, "name": "x"}],
            "annotations": [{"id": im["id"], "image_id": im["id"], "category_id": 1, "iscrowd": 0,
                             "segmentation": [[2.0, 2.0, 20.0, 2.0, 20.0, 15.0]]} for im in images]}
    _write(tmp_path / "inst.json", json.dumps(inst))
    with opened() as seen:
        c = _counts(sources.make_source(f"coco_instances:{tmp_path}/inst.json::{tmp_path}/images", seed=0))
    assert c == {"good": ["000001"], "path_outside_root": 3}
    assert _under(seen, outside) == []


def test_preview_never_delivers_an_outside_image(tmp_path, outside):
    """The issue's report: the outside image was packed into batches by the preview. Through the
    whole pipeline those records are counted skips, and the secret is never opened."""
    from sgt_jax.data import preview

    root = tmp_path / "ov"
    _write(root / "images" / "real.jpg", _jpg(1, 48, 64))
    os.symlink(outside / "secret.jpg", root / "images" / "link.jpg")
    _write(root / "data.jsonl", _llava_rows(["real.jpg", "../../outside/secret.jpg",
                                             str(outside / "secret.jpg"), "link.jpg"]))
    cfg = tiny_run_config()
    cfg.data.sources.vqa = f"llava:{root}/data.jsonl::{root}/images"
    with opened() as seen:
        s = preview.run(cfg, batches=2, out=str(tmp_path / "out"), samples=2, log=lambda *_: None)
    assert _under(seen, outside) == [] and _under(seen, root / "images")
    sk = s["counters"]["skipped"]
    assert sk.get("path_outside_root", 0) >= 3 and not any(k.startswith("error_") for k in sk), sk


# ------------------------------------------------------------------------------------------------
# records dropped with no counter

def test_orphans_are_counted_in_source_pipeline_preview_and_metrics(tmp_path, caplog):
    sa = tmp_path / "sa1b"
    synthetic.generate(str(sa), 5, seed=1, size=(48, 64))
    jpgs = sorted(sa.glob("sa_*.jpg"))
    jpgs[0].unlink()                                             # an SA-1B JSON without its image
    with caplog.at_level(logging.WARNING, "sgt_jax.data.sources"):
        src = sources.make_source(f"sa1b:{sa}", seed=0)
    assert len(src) == 4 and src.index_counts() == {"missing_file": 1, "read_error": 0}
    assert "no image file" in caplog.text and jpgs[0].stem in caplog.text
    pairs = tmp_path / "pairs"
    _write(pairs / "a.jpg", _jpg(1))
    _write(pairs / "a.png", _jpg(2))
    _write(pairs / "b.png", _jpg(3))                             # an SGT mask without its RGB
    _write(pairs / "c.png", _jpg(4))
    p = sources.make_source(f"sgt_pairs:{pairs}", seed=0)
    assert len(p) == 1 and p.index_counts()["missing_file"] == 2
    # the run's stats (and so metrics.jsonl: data_total/index/missing_file) and a resume
    from test_pipeline import _cfg, VQA
    from sgt_jax.train.loop import _flat_counts

    tok = _tok(tmp_path)
    cfg = _cfg()
    it = PL.make_train_iterator(cfg, workdir=None, tokenizer=tok,
                                sources={"seg": PL.Concat([src, p]), "vqa": VQA})
    _, st = next(it)
    assert st["total/index/missing_file"] == 3 and "total/index/read_error" not in st
    assert _flat_counts(st)["total/index/missing_file"] == 3.0      # loop.py: data_<key> metrics
    state = it.get_state()
    it2 = PL.make_train_iterator(cfg, workdir=None, tokenizer=tok,
                                 sources={"seg": PL.Concat([src, p]), "vqa": VQA})
    it2.set_state(json.loads(json.dumps(state)))
    assert next(it2)[1]["total/index/missing_file"] == 3            # not doubled by the restore


def _tok(tmp_path):
    from sgt_jax.data.tokenizer import Tokenizer, build_tiny_tokenizer

    d = tmp_path / "tok"
    if not d.exists():
        build_tiny_tokenizer(str(d))
    return Tokenizer(str(d))


def test_preview_json_reports_orphans(tmp_path):
    from sgt_jax.data import preview

    sa = tmp_path / "syn"
    synthetic.generate(str(sa), 8, seed=0, size=(48, 64))
    for j in sorted(sa.glob("sa_*.jpg"))[:2]:
        j.unlink()
    cfg = tiny_run_config()
    cfg.data.sources.seg = f"sa1b:{sa}"
    lines = []
    s = preview.run(cfg, batches=1, out=str(tmp_path / "out"), samples=2, log=lines.append)
    assert s["counters"]["index"] == {"missing_file": 2}
    on_disk = json.loads((tmp_path / "out" / "preview.json").read_text())
    assert on_disk["counters"]["index"]["missing_file"] == 2
    assert any("dropped while indexing" in ln and "missing_file 2" in ln for ln in lines)


def _tar_blob(members, fmt=tarfile.USTAR_FORMAT) -> bytes:
    b = io.BytesIO()
    with tarfile.open(fileobj=b, mode="w", format=fmt) as tf:
        for n, data in members:
            ti = tarfile.TarInfo(n)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return b.getvalue()


def _damage(blob: bytes, *members: str) -> bytes:
    """The tar with the header blocks of ``members`` overwritten by garbage (bad checksums)."""
    with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
        ats = [tf.getmember(m).offset for m in members]
    junk = np.random.default_rng(0).integers(1, 256, 512, dtype=np.uint8).tobytes()
    for at in ats:
        blob = blob[:at] + junk + blob[at + 512:]
    return blob


def test_tar_with_a_damaged_header_recovers_the_members_after_it(tmp_path, caplog, fake_gcs):
    folder = tmp_path / "f"
    synthetic.generate(str(folder), 4, seed=3, size=(40, 48))
    names = sorted(n for n in os.listdir(folder) if n.startswith("sa_"))
    files = [(n, (folder / n).read_bytes()) for n in names]          # 8 members: 4 jpg + 4 json
    bad = _damage(_tar_blob(files), names[2])                        # the 2nd image's header
    shard = tmp_path / "s.tar"
    shard.write_bytes(bad)
    with tarfile.open(shard) as tf:                                  # the defect: tarfile stops
        assert [m.name for m in tf] == names[:2]
    url = "gs://bucket/s.tar"
    _write(fake_gcs / "bucket" / "s.tar", bad)
    for path, cache in ((str(shard), None), (str(shard), str(tmp_path / "cache")),
                        (str(shard), str(tmp_path / "cache")), (url, None)):
        caplog.clear()
        st = {}
        with caplog.at_level(logging.WARNING, "sgt_jax.data.sources"):
            got = sources._tar_members(path, cache, stats=st)
        assert [n for n, _, _ in got] == names[:2] + names[3:], path
        assert len(st["damaged"]) == 1 and not st["truncated"]
        assert "unreadable header" in caplog.text and "read_error" in caplog.text   # every time
    assert st["damaged"][0][2] == 2                                   # after 2 members
    fs = sources.FileSet([str(shard)])
    for ref, (n, data) in zip(fs.entries, files[:2] + files[3:]):
        assert ref[1] == n and fs.read(ref) == data                   # bit-exact after the damage
    src = sources.make_source(f"sa1b:{shard}", seed=0)
    # the damaged member was an image: its JSON is left alone, an orphan -- both counted
    assert src.index_counts() == {"missing_file": 1, "read_error": 1}
    assert _counts(src)["good"] == [n[:-4] for n in names if n.endswith(".jpg") and n != names[2]]


def test_tar_damage_variants(tmp_path):
    files = [(f"m{i}.bin", bytes([i]) * (700 + 300 * i)) for i in range(6)]
    clean = _tar_blob(files)
    # a clean shard: no damage reported, nothing scanned past the end
    (tmp_path / "clean.tar").write_bytes(clean)
    st = {}
    assert len(sources._tar_members(str(tmp_path / "clean.tar"), None, stats=st)) == 6
    assert st["damaged"] == [] and not st["truncated"]
    # two damaged headers, and the last one: every intact member survives
    two = _damage(clean, "m1.bin", "m4.bin")
    (tmp_path / "two.tar").write_bytes(two)
    got = sources._tar_members(str(tmp_path / "two.tar"), None, stats=st)
    assert [n for n, _, _ in got] == ["m0.bin", "m2.bin", "m3.bin", "m5.bin"]
    assert [d[2] for d in st["damaged"]] == [1, 3]
    last = _damage(clean, "m5.bin")
    (tmp_path / "last.tar").write_bytes(last)
    got = sources._tar_members(str(tmp_path / "last.tar"), None, stats=st)
    assert len(got) == 5 and [d[2] for d in st["damaged"]] == [5]    # no header after it: reported
    assert st["damaged"][0][1] == len(last)
    (tmp_path / "junk_after.tar").write_bytes(clean + b"\x07" * 3000)   # junk after the end marker
    assert len(sources._tar_members(str(tmp_path / "junk_after.tar"), None, stats=st)) == 6
    assert st["damaged"] == []
    # concatenated archives (an end marker inside): recovered, and not damage
    (tmp_path / "cat.tar").write_bytes(_tar_blob(files[:3]) + _tar_blob(files[3:]))
    got = sources._tar_members(str(tmp_path / "cat.tar"), None, stats=st)
    assert [n for n, _, _ in got] == [n for n, _ in files] and st["damaged"] == []
    # pax / GNU long names after the damage
    long = [("d/" + "x" * 150 + f"{i}.bin", b"%d" % i * 50) for i in range(4)]
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        blob = _tar_blob(long, fmt)
        with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
            ms = tf.getmembers()
        p = tmp_path / f"long{fmt}.tar"
        p.write_bytes(blob[:ms[1].offset] + b"\xff" * 512 + blob[ms[1].offset + 512:])
        got = sources._tar_members(str(p), None, stats=st)
        assert [n for n, _, _ in got][0] == long[0][0] and [n for n, _, _ in got][-2:] == \
            [n for n, _ in long[2:]], fmt
        fs = sources.FileSet([str(p)])
        assert fs.read(fs.entries[-1]) == long[-1][1]
    # a file whose first header is garbage is not a tar: a clear error, as before
    (tmp_path / "junk.tar").write_bytes(b"\x01" * 4096)
    with pytest.raises(ValueError, match="not a readable uncompressed tar"):
        sources._tar_members(str(tmp_path / "junk.tar"), None)


# ------------------------------------------------------------------------------------------------
# defects that used to end in the catch-all

def test_rle_overflow_is_bad_annotation(tmp_path):
    h, w = 24, 32
    for counts in ([2 ** 63, 1], [2 ** 64 + 5], [1, 2 ** 70, -1], [h * w + 1], [1.5, h * w - 1.5],
                   [[1, 2], [3]], ["a", "b"], [None]):
        with pytest.raises(ValueError):
            render.rle_counts({"size": [h, w], "counts": counts})
    assert render.rle_counts({"size": [h, w], "counts": [3, h * w - 3]})[1].tolist() == [3, h * w - 3]
    sa = tmp_path / "sa"
    _sa1b(sa, "sa_1")
    _sa1b(sa, "sa_2")
    meta = json.loads((sa / "sa_2.json").read_text())
    meta["annotations"][0]["segmentation"] = {"size": [h, w], "counts": [2 ** 63, 5]}
    (sa / "sa_2.json").write_text(json.dumps(meta))
    _sa1b(sa, "sa_3")
    (sa / "sa_3.json").write_text("[" * 100_000 + "]" * 100_000)    # nesting past the recursion limit
    assert _counts(sources.make_source(f"sa1b:{sa}", seed=0)) == {"good": ["sa_1"], "bad_annotation": 2}


def test_lone_surrogate_is_bad_text(tmp_path):
    tok = _tok(tmp_path)
    with pytest.raises(Exception):                 # the defect: the tokenizer itself fails
        tok.encode("what is \ud800 this")
    _write(tmp_path / "images" / "a.jpg", _jpg(1))
    rows = json.loads("[" + _llava_rows(["a.jpg", "a.jpg"]).strip().replace("\n", ",") + "]")
    rows[1]["conversations"][0]["value"] = "<image>\nwhat is \ud800?"
    rows.append({"id": "t", "conversations": [{"from": "human", "value": "hi"},
                                              {"from": "gpt", "value": "\udfff"}]})
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))   # valid JSON
    src = sources.make_source(f"llava:{tmp_path}/d.jsonl::{tmp_path}/images", seed=0)
    assert _counts(src) == {"good": ["r0"], "bad_text": 2}
    # the sample builder refuses it too (records from any source, e.g. an in-memory list)
    from test_pipeline import _cfg, SEG

    from sgt_jax.data.samples import SampleBuilder

    b = SampleBuilder(_cfg(), tok)
    rec = {"task": "vqa", "id": "x", "images": [],
           "conversations": [{"from": "human", "value": "q\ud800"}, {"from": "gpt", "value": "a"}]}
    with pytest.raises(BadRecord) as e:
        b(rec, stream="vqa", index=0)
    assert e.value.reason == "bad_text"
    it = PL.make_train_iterator(_cfg(), workdir=None, tokenizer=tok,
                                sources={"seg": SEG, "vqa": [rec] + [src[0]] * 5})
    for _ in range(3):
        _, st = next(it)
    assert st["total/skipped/bad_text"] >= 1 and not any("error_" in k for k in st)


def test_unexpected_exceptions_are_warned_in_the_main_log(tmp_path, caplog):
    from test_pipeline import FlakySource, _cfg, SEG, VQA

    tok = _tok(tmp_path)
    seg = SEG[:6] + [RuntimeError("reader bug in record 6")]
    it = PL.make_train_iterator(_cfg(), workdir=None, tokenizer=tok,
                                sources={"seg": FlakySource(seg), "vqa": VQA})
    with caplog.at_level(logging.WARNING, "sgt_jax.data.pipeline"):
        for _ in range(6):
            _, st = next(it)
    assert st["total/skipped/error_RuntimeError"] >= 1
    warn = [r for r in caplog.records if r.levelno == logging.WARNING and "unexpected exception" in
            r.getMessage()]
    assert warn and "reader bug in record 6" in warn[0].getMessage()
    assert "skipped/error_RuntimeError" in warn[0].getMessage()
    caplog.clear()                                  # no defect, no warning
    it = PL.make_train_iterator(_cfg(), workdir=None, tokenizer=tok, sources={"seg": SEG, "vqa": VQA})
    with caplog.at_level(logging.WARNING, "sgt_jax.data.pipeline"):
        next(it)
    assert "unexpected exception" not in caplog.text


# ------------------------------------------------------------------------------------------------
# a spec error is one line

@pytest.mark.parametrize("module,extra", [("sgt_jax.data.preview", ["--out", "OUT"]),
                                          ("sgt_jax.data.index", ["--workdir", "OUT"]),
                                          ("sgt_jax.train", ["--workdir", "OUT"])])
def test_spec_error_is_one_line(tmp_path, module, extra):
    args = [a.replace("OUT", str(tmp_path / "o")) for a in extra]
    p = subprocess.run([sys.executable, "-m", module, "--config", "configs/tiny.py",
                        f"--config.data.sources.seg=sa1b:{tmp_path}/nothing_here", *args],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
                            "JAX_PLATFORMS": "cpu"})            # one CPU device, as a user runs it
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "source spec" in err[0] and "nothing_here" in err[0] and "usage" in err[0]
