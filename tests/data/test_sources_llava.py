"""LLaVA source (sources/llava.py): .jsonl / .json / .parquet, conversation checks. All data is
written by the tests (tmp_path)."""
import numpy as np
import pytest
from fake_data import _enc, _turns

from sgt_jax.data import sources
from sgt_jax.data.records import BadRecord


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
