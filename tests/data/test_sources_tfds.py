"""TFDS source (sources/tfds.py): COCO 2017 panoptic and instances prepared as TFDS ArrayRecord
datasets, read back with ``tfds.data_source`` through the Grain pipeline, give the same records
(keys, image and target bytes, skip reasons) as the COCO-JSON readers (sources/coco.py) on the
same files. No network; no TensorFlow (not in the requirements: these tests pass without it).

The datasets are written by TFDS's own COCO builder (``tensorflow_datasets.object_detection.coco``:
its feature spec and ``_generate_examples``, i.e. what ``tfds build coco/2017_panoptic`` writes),
over synthetic COCO-format files the module writes; only the download step is replaced (local
folders) and the one TensorFlow dtype of its ``_info`` (``tf.int64``) is given as numpy's.
"""
import json
import os
import types

import numpy as np
import pytest
from PIL import Image
from fake_data import _enc, _id2rgb, _write

from sgt_jax.data import pipeline as PL
from sgt_jax.data import render, sources, synthetic
from sgt_jax.data.records import BadRecord
from sgt_jax.data.tokenizer import Tokenizer, build_tiny_tokenizer

tfds = pytest.importorskip("tensorflow_datasets")
pycoco = pytest.importorskip("pycocotools.mask")
from tensorflow_datasets.object_detection import coco as tfds_coco

N_GOOD = 5
# image id -> what is wrong with it (both readers must skip it for the same reason)
BROKEN = {6: "corrupt_jpeg", 7: "png_size", 8: "no_segments", 9: "bad_rle"}


def _coco_files(root: str) -> dict:
    """COCO 2017 layout: train2017/*.jpg, annotations/{panoptic,instances}_train2017.json,
    panoptic_train2017/*.png -- synthetic scenes (sgt_jax.data.synthetic.make_scene), each shape
    a "thing" segment / instance (polygon for even ids, RLE for odd), the background a "stuff"
    segment in the panoptic PNG."""
    images, pan_anns, inst_anns = [], [], []
    for image_id in range(1, N_GOOD + len(BROKEN) + 1):
        rng = np.random.default_rng([7, image_id])
        h, w = int(rng.integers(40, 72)), int(rng.integers(40, 72))
        scene = synthetic.make_scene(rng, h, w, int(rng.integers(2, 5)))
        name = f"{image_id:012d}"
        jpg = _enc(scene["image"], quality=95)
        if BROKEN.get(image_id) == "corrupt_jpeg":
            jpg = jpg[:40]                                      # truncated: header only
        _write(f"{root}/train2017/{name}.jpg", jpg)
        images.append({"id": image_id, "file_name": f"{name}.jpg", "height": h, "width": w})
        ids = np.zeros((h, w), np.int64)
        segs = [] if BROKEN.get(image_id) == "no_segments" else [
            {"id": 1000 * image_id + 1 + j, "category_id": 1 + (j % 3), "iscrowd": 0, "mask": p["visible"]}
            for j, p in enumerate(scene["shapes"])]
        if segs:
            bg = ~np.any([s["mask"] for s in segs], 0)
            segs.append({"id": 1000 * image_id + 999, "category_id": 100, "iscrowd": 0, "mask": bg})
        for s in segs:
            ids[s["mask"]] = s["id"]
        png = np.array([_id2rgb(int(v)) for v in ids.ravel()], np.uint8).reshape(h, w, 3)
        if BROKEN.get(image_id) == "png_size":
            png = png[:-1]
        _write(f"{root}/panoptic_train2017/{name}.png", _enc(png, "PNG"))
        info = []
        for s in segs:
            ys, xs = np.nonzero(s["mask"])
            bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                    int(ys.max() - ys.min() + 1)]
            info.append({"id": s["id"], "category_id": s["category_id"], "iscrowd": 0,
                         "area": int(ys.size), "bbox": bbox})
            if s["category_id"] == 100:
                continue                                       # stuff: not an instance
            seg = (render.rle_encode(s["mask"].astype(np.uint8)) if image_id % 2 else
                   [[float(bbox[0]), float(bbox[1]), float(bbox[0] + bbox[2]), float(bbox[1]),
                     float(bbox[0] + bbox[2]), float(bbox[1] + bbox[3]), float(bbox[0]),
                     float(bbox[1] + bbox[3])]])
            if BROKEN.get(image_id) == "bad_rle":
                seg = {"size": [h, w], "counts": "!!bad"}
            inst_anns.append({"id": s["id"], "image_id": image_id, "category_id": s["category_id"],
                              "iscrowd": 0, "area": int(ys.size), "bbox": bbox, "segmentation": seg})
        pan_anns.append({"image_id": image_id, "file_name": f"{name}.png", "segments_info": info})
    # the real files' category counts (TFDS's ClassLabels have exactly these many names)
    pan_cats = [{"id": c, "name": f"pan{c}", "isthing": int(c < 100)} for c in range(1, 134)]
    inst_cats = [{"id": c, "name": f"cat{c}"} for c in range(1, 81)]
    _write(f"{root}/annotations/panoptic_train2017.json",
           json.dumps({"images": images, "annotations": pan_anns, "categories": pan_cats}))
    _write(f"{root}/annotations/instances_train2017.json",
           json.dumps({"images": images, "annotations": inst_anns, "categories": inst_cats}))
    return {"root": root, "panoptic_json": f"{root}/annotations/panoptic_train2017.json",
            "instances_json": f"{root}/annotations/instances_train2017.json",
            "png_dir": f"{root}/panoptic_train2017", "image_dir": f"{root}/train2017"}


def _prepare(files: dict, data_dir: str, config: str) -> None:
    """``tfds build coco/CONFIG --file_format=array_record`` over local files: TFDS's COCO
    builder with the download replaced."""
    annotation = (tfds_coco.AnnotationType.PANOPTIC if config == "2017_panoptic"
                  else tfds_coco.AnnotationType.BBOXES)

    class LocalCoco(tfds_coco.Coco, skip_registration=True):
        name = "coco"                               # written as data_dir/coco/CONFIG/1.1.0

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(
                image_dir=files["root"], annotation_dir=files["root"], split_name="train2017",
                annotation_type=annotation,
                panoptic_dir=files["png_dir"] if config == "2017_panoptic" else None)}

    tf_shim = types.SimpleNamespace(int64=np.int64)     # the one TF name _info uses
    saved, tfds_coco.tf = tfds_coco.tf, tf_shim
    try:
        LocalCoco(config=config, data_dir=data_dir, file_format="array_record").download_and_prepare()
    finally:
        tfds_coco.tf = saved


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("coco"))
    files = _coco_files(f"{root}/raw")
    files["data_dir"] = f"{root}/tfds"
    for config in ("2017_panoptic", "2017"):
        _prepare(files, files["data_dir"], config)
    return files


def _load_json(path):
    with open(path) as f:
        return json.load(f)


def _by_key(src) -> dict:
    """key -> record or skip reason, over a whole source."""
    out = {}
    for i in range(len(src)):
        try:
            r = src[i]
            out[r["id"]] = r
        except BadRecord as e:
            out[e.key] = e.reason
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        if isinstance(a[k], str):
            assert a[k] == b[k], k
        else:
            assert isinstance(b[k], dict), (k, b[k])
            for f in ("task", "id", "image", "target"):
                x, y = a[k][f], b[k][f]
                assert (x.tobytes() == y.tobytes() and x.shape == y.shape
                        if isinstance(x, np.ndarray) else x == y), (k, f)


def _json_spec(files, kind, query=""):
    if kind == "panoptic":
        return f"coco_panoptic:{files['panoptic_json']}::{files['png_dir']}::{files['image_dir']}{query}"
    return f"coco_instances:{files['instances_json']}::{files['image_dir']}{query}"


@pytest.mark.parametrize("query", ["", "?colors=render&max_side=48"])
def test_panoptic_same_records_as_coco_json(coco, query):
    tf_spec = f"tfds:coco/2017_panoptic:train?data_dir={coco['data_dir']}" + query.replace("?", "&")
    a = _by_key(sources.make_source(tf_spec, seed=3))
    b = _by_key(sources.make_source(_json_spec(coco, "panoptic", query), seed=3))
    _assert_same(a, b)
    reasons = {k: v for k, v in a.items() if isinstance(v, str)}
    assert reasons == {"000000000006": "corrupt_image", "000000000007": "bad_annotation",
                       "000000000008": "no_masks"}
    src = sources.make_source(tf_spec, seed=3)
    assert sorted(src.key(i) for i in range(len(src))) == sorted(a)
    good = [r for r in a.values() if isinstance(r, dict)]
    assert len(good) == N_GOOD + 1                 # + the bad-RLE image (a good panoptic PNG)
    if not query:                                  # colors=coco: the PNG's own colours, exactly
        r = a["000000000001"]
        png = np.asarray(Image.open(f"{coco['png_dir']}/000000000001.png"))
        assert np.array_equal(r["target"], png)


@pytest.mark.parametrize("query", ["", "?by=category&max_side=48"])
def test_instances_same_records_as_coco_json(coco, query):
    tf_spec = (f"tfds:coco/2017:train?data_dir={coco['data_dir']}&instances={coco['instances_json']}"
               + query.replace("?", "&"))
    a = _by_key(sources.make_source(tf_spec, seed=5))
    b = _by_key(sources.make_source(_json_spec(coco, "instances", query), seed=5))
    _assert_same(a, b)
    reasons = {k: v for k, v in a.items() if isinstance(v, str)}
    assert reasons == {"000000000006": "corrupt_image", "000000000008": "no_masks",
                       "000000000009": "bad_annotation"}
    if not query:        # image 2's polygons, decoded here by pycocotools, rendered
        meta = _load_json(coco["instances_json"])
        r = a["000000000002"]
        h, w = r["image"].shape[:2]
        masks = [pycoco.decode(pycoco.merge(pycoco.frPyObjects(x["segmentation"], h, w)))
                 for x in meta["annotations"] if x["image_id"] == 2]
        assert np.array_equal(r["target"], render.render_masks(masks, (h, w), seed=5, image_id=2))


def test_bad_specs(coco):
    with pytest.raises(sources.SpecError, match="prepare the dataset"):
        sources.make_source(f"tfds:coco/2017_panoptic:train?data_dir={coco['root']}/none", seed=0)
    with pytest.raises(sources.SpecError, match="instances=JSON"):    # coco/2017 has no masks
        sources.make_source(f"tfds:coco/2017:train?data_dir={coco['data_dir']}", seed=0)
    with pytest.raises(sources.SpecError, match="colors must be"):
        sources.make_source(f"tfds:coco/2017_panoptic:train?data_dir={coco['data_dir']}&colors=x",
                            seed=0)
    # an image the instances JSON does not list: a counted bad_annotation, not a crash
    meta = _load_json(coco["instances_json"])
    meta["images"] = [im for im in meta["images"] if im["id"] != 3]
    _write(f"{coco['root']}/partial.json", json.dumps(meta))
    src = sources.make_source(f"tfds:coco/2017:train?data_dir={coco['data_dir']}"
                              f"&instances={coco['root']}/partial.json", seed=0)
    assert _by_key(src)["000000000003"] == "bad_annotation"


def test_grain_pipeline_reads_tfds(coco, tmp_path):
    """The TFDS spec through the pipeline (Grain MapDataset over the source, the packer): batches
    with seg samples, the broken records counted under skipped/<reason>; the source pickles
    (Grain worker processes) without its open ArrayRecord readers."""
    import pickle

    from fake_data import tiny_run_config
    cfg = tiny_run_config().data
    cfg.sources = {"seg": f"tfds:coco/2017_panoptic:train?data_dir={coco['data_dir']}&max_side=64"}
    cfg.mix.ratios = {"seg": 1}
    src = sources.make_source(cfg.sources.seg, seed=0)
    copy = pickle.loads(pickle.dumps(src))
    assert copy._ds is None and _by_key(copy).keys() == _by_key(src).keys()
    tok = Tokenizer(build_tiny_tokenizer(str(tmp_path / "tok")))
    it = PL.make_train_iterator(cfg, workdir=str(tmp_path), tokenizer=tok)
    reasons = ("corrupt_image", "bad_annotation", "no_masks")
    for _ in range(4):                 # until every broken record was met (an epoch is 9 records)
        _, stats = next(it)
        if all(stats.get(f"total/skipped/{r}", 0) for r in reasons):
            break
    assert stats.get("total/samples/seg", 0) > 0
    for r in reasons:
        assert stats.get(f"total/skipped/{r}", 0) >= 1, (r, stats)


def test_subset_is_the_same_images_in_every_reader(coco, tmp_path):
    """``subset=N``: the same N COCO image ids whatever the reader (TFDS panoptic / instances,
    COCO-JSON panoptic / instances) -- the proxy presets' shared image set -- nested across N,
    and the TFDS id pass cached in the workdir."""
    def ids(spec, workdir=None):
        src = sources.make_source(spec, seed=0, workdir=workdir)
        return {src.key(i) for i in range(len(src))}

    tf_pan = f"tfds:coco/2017_panoptic:train?data_dir={coco['data_dir']}"
    tf_ins = f"tfds:coco/2017:train?data_dir={coco['data_dir']}&instances={coco['instances_json']}"
    for n in (3, 6):
        q = f"?subset={n}&subset_seed=1"
        sets = [ids(tf_pan + q.replace("?", "&"), str(tmp_path)), ids(tf_ins + q.replace("?", "&")),
                ids(_json_spec(coco, "panoptic", q)), ids(_json_spec(coco, "instances", q))]
        assert all(s == sets[0] for s in sets) and len(sets[0]) == n
        if n == 3:
            small = sets[0]
    assert small < sets[0]
    assert ids(_json_spec(coco, "panoptic", "?subset=6&subset_seed=2")) != sets[0]
    assert [f for f in os.listdir(tmp_path / "index_cache") if f.startswith("tfds_ids_")]
    # the subset's records are the full reader's records for those keys
    a = _by_key(sources.make_source(tf_pan + "&subset=6&subset_seed=1", seed=0))
    b = _by_key(sources.make_source(tf_pan, seed=0))
    _assert_same(a, {k: b[k] for k in a})


def test_instances_scene_records(coco):
    """``scene(i)`` (the proxy tasks' record: masks, classes, boxes) of the instances readers:
    TFDS and COCO-JSON give the same scenes; the masks are pycocotools' decoding of the JSON, the
    boxes the JSON's, scaled with ``max_side``."""
    meta = _load_json(coco["instances_json"])
    names = {c["id"]: c["name"] for c in meta["categories"]}
    for query in ("", "?max_side=40"):
        tf = sources.make_source(f"tfds:coco/2017:train?data_dir={coco['data_dir']}"
                                 f"&instances={coco['instances_json']}" + query.replace("?", "&"), seed=0)
        js = sources.make_source(_json_spec(coco, "instances", query), seed=0)
        scenes = {}
        for src in (tf, js):
            out = {}
            for i in range(len(src)):
                try:
                    sc = src.scene(i)
                    out[sc["key"]] = sc
                except BadRecord as e:
                    out[e.key] = e.reason
            scenes[src.name] = out
        a, b = scenes["tfds"], scenes["coco_instances"]
        assert sorted(a) == sorted(b)
        for k in a:
            if isinstance(a[k], str):
                assert a[k] == b[k]
                continue
            for f in ("image", "boxes"):
                assert np.array_equal(a[k][f], b[k][f]), (k, f)
            assert [m.tobytes() for m in a[k]["masks"]] == [m.tobytes() for m in b[k]["masks"]]
            assert a[k]["label_ids"] == b[k]["label_ids"] and a[k]["labels"] == b[k]["labels"]
        r = a["000000000003"]                              # odd id: RLE masks
        anns = [x for x in meta["annotations"] if x["image_id"] == 3]
        h, w = r["image"].shape[:2]
        assert r["labels"] == [names[x["category_id"]] for x in anns]
        ref = [pycoco.decode(x["segmentation"]).astype(bool) for x in anns]
        full_h, full_w = ref[0].shape
        if (h, w) == (full_h, full_w):
            assert all(np.array_equal(m, q) for m, q in zip(r["masks"], ref))
            assert np.allclose(r["boxes"], [x["bbox"] for x in anns])
        else:
            assert np.allclose(r["boxes"], [[x["bbox"][0] * w / full_w, x["bbox"][1] * h / full_h,
                                             x["bbox"][2] * w / full_w, x["bbox"][3] * h / full_h]
                                            for x in anns], atol=1e-4)
            assert all(m.shape == (h, w) and m.dtype == bool for m in r["masks"])


def test_damaged_array_record_is_a_counted_skip(coco, tmp_path):
    """Bytes flipped inside the ArrayRecord file: the records in the damaged chunks are
    ``read_error`` skips (ArrayRecord's chunk hash check), the others still read."""
    import shutil

    data_dir = tmp_path / "tfds"
    shutil.copytree(coco["data_dir"], data_dir)
    (f,) = (data_dir / "coco" / "2017_panoptic" / "1.1.0").glob("*.array_record-*")
    raw = bytearray(f.read_bytes())
    for i in range(100, 3000):
        raw[i] ^= 0x5A
    f.write_bytes(bytes(raw))
    out = _by_key(sources.make_source(f"tfds:coco/2017_panoptic:train?data_dir={data_dir}", seed=0))
    reasons = [v for v in out.values() if isinstance(v, str)]
    assert "read_error" in reasons
    assert any(isinstance(v, dict) for v in out.values())
