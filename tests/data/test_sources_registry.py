"""The source contract and the spec registry (sources/base.py, registry.py): Grain random access
and pickling, spec errors that name the spec and the fix. All data is written by the tests
(tmp_path)."""
import pickle

import pytest
from fake_data import _same_record

from sgt_jax.data import sources


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


def test_a_new_kind_is_one_registry_row(monkeypatch):
    """A format added as one ``Kind`` and one ``KINDS`` row is parsed, built and reported with its
    own options and usage line."""
    from sgt_jax.data.sources import registry

    class Echo(sources.Kind):
        name = "echo"
        options = frozenset({"n"})
        usage = "echo:TEXT[?n=N]"

        @classmethod
        def from_spec(cls, spec):
            return [spec.body] * int(spec.opts.get("n", 1))

    monkeypatch.setitem(registry.KINDS, "echo", Echo)
    assert sources.make_source("echo:hi?n=2", seed=0) == ["hi", "hi"]
    assert sources.index_targets("echo:hi") == []
    with pytest.raises(sources.SpecError, match="unknown option 'm' for echo; valid: n"):
        sources.make_source("echo:hi?m=2", seed=0)
    with pytest.raises(sources.SpecError, match=r"invalid literal.*usage: 'echo:TEXT\[\?n=N\]'"):
        sources.make_source("echo:hi?n=two", seed=0)
    for kind, row in registry.KINDS.items():
        assert row.name == kind and row.usage.startswith(kind + ":") and row.options
