"""Image decoding shared by every source: bytes -> uint8 RGB, with the decompression-bomb guard."""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

DEFAULT_MAX_PIXELS = 8192 * 8192


class _ImageError(Exception):
    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


def _fit_size(h: int, w: int, max_side: int | None) -> tuple[int, int]:
    if not max_side or max(h, w) <= max_side:
        return h, w
    s = max_side / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


def _to_rgb(im: Image.Image, composite: bool) -> Image.Image:
    """Any PIL mode -> RGB. 16/32-bit grey is scaled (not clipped); alpha over white if composite."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im)
        if im.mode == "F":
            a = np.clip(a, 0, 255)
        elif a.max(initial=0) > 255:
            a = a.astype(np.int64) >> (16 if a.max() > 65535 else 8)
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).convert("RGB")
    if composite and (im.mode in ("RGBA", "LA", "PA") or
                      (im.mode == "P" and "transparency" in im.info)):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im.convert("RGB") if im.mode != "RGB" else im


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 out_hw: tuple[int, int] | None = None, composite: bool = True,
                 resample: int = Image.BICUBIC) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode image bytes to uint8 RGB ``(H, W, 3)``; returns ``(array, (orig_h, orig_w))``.

    ``out_hw`` resizes (``resample``; JPEG decodes at a reduced DCT scale first when it can).
    ``composite``: alpha composited over white (photos, as BAGEL's ``pil_img2rgb``); colour masks
    pass ``composite=False, resample=NEAREST`` so that label colours stay exact.
    Raises ``_ImageError`` with reason corrupt_image / image_too_large.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise _ImageError("image_too_large", str(e)) from None
    except Exception as e:  # noqa: BLE001 -- PIL raises many types for garbage input
        raise _ImageError("corrupt_image", f"{type(e).__name__}: {e}") from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise _ImageError("corrupt_image", f"image has size {w}x{h}")
    if w * h > max_pixels:
        raise _ImageError("image_too_large", f"{w}x{h} > max_pixels={max_pixels}")
    try:
        if out_hw is not None and (out_hw[0], out_hw[1]) != (h, w) and im.format == "JPEG":
            im.draft("RGB", (out_hw[1], out_hw[0]))
        im.load()
        im = _to_rgb(im, composite)
        if out_hw is not None and im.size != (out_hw[1], out_hw[0]):
            im = im.resize((out_hw[1], out_hw[0]), resample=resample)
        a = np.asarray(im, dtype=np.uint8)
    except Exception as e:  # noqa: BLE001
        raise _ImageError("corrupt_image", f"{type(e).__name__}: {e}") from None
    if a.ndim != 3 or a.shape[2] != 3:
        raise _ImageError("corrupt_image", f"decoded to shape {a.shape}")
    return np.ascontiguousarray(a), (h, w)


def _image_size(data: bytes) -> tuple[int, int]:
    """(h, w) from the header only; raises _ImageError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            w, h = Image.open(io.BytesIO(data)).size
    except Image.DecompressionBombError as e:
        raise _ImageError("image_too_large", str(e)) from None
    except Exception as e:  # noqa: BLE001
        raise _ImageError("corrupt_image", f"{type(e).__name__}: {e}") from None
    return h, w
