"""Image decoding (sources/images.py): PIL modes, resizing, the max_pixels guard. All data is
written by the tests (tmp_path)."""
import numpy as np
import pytest
from PIL import Image
from fake_data import _enc, _huge_png

from sgt_jax.data import sources


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
