"""SGT pairs source (sources/sgt_pairs.py): released and flat layouts, list files. All data is
written by the tests (tmp_path)."""
import os

import numpy as np
import pytest
from PIL import Image
from fake_data import _enc, _same_record, _write

from sgt_jax.data import sources
from sgt_jax.data.records import BadRecord


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


def test_sgt_pairs_subset_is_nested_and_reads_the_same_records(pairs):
    """``subset=N`` (the data-scaling sweep): N keys, nested across N, another set for another
    seed, each record the full source's record for that key."""
    full = sources.make_source(f"sgt_pairs:{pairs['root']}", seed=0)
    sub = {n: sources.make_source(f"sgt_pairs:{pairs['root']}?subset={n}", seed=0) for n in (2, 4)}
    assert [len(sub[n]) for n in (2, 4)] == [2, 4]
    assert set(sub[2]._keys) < set(sub[4]._keys) < set(full._keys)
    assert set(sub[4]._keys) != set(sources.make_source(
        f"sgt_pairs:{pairs['root']}?subset=4&subset_seed=9", seed=0)._keys)
    for i, k in enumerate(sub[4]._keys):
        if k != "lonely":                       # the image without its mask: a skip in both
            _same_record(sub[4][i], full[full._keys.index(k)])
    with pytest.raises(sources.SpecError, match="subset"):
        sources.make_source(f"sgt_pairs:{pairs['root']}?subset=0", seed=0)
