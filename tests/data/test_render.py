"""Mask rendering (render.py): the COCO RLE codec against pycocotools, the renderer. All data is
written by the tests (tmp_path)."""
import numpy as np
import pytest
from fake_data import _nested

from sgt_jax.data import render

pycoco = pytest.importorskip("pycocotools.mask")


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
