"""Image degradations of the low-level proxy tasks, on OpenCV (``opencv-python-headless``).

Each function takes a clean uint8 RGB image (H, W, 3) and a ``numpy.random.Generator`` and returns
the degraded uint8 RGB image of the same size (``super_resolution`` and ``inpaint`` also return what
they drew). All randomness comes from the generator: same image + same generator state -> same bytes.

Parameter ranges follow the official SGT code (``song2yu/SGT`` ``BAGEL/data/add_noise.py``, read for
the facts, re-written here) and the paper's supplementary text (``../shared/papers/sgt_paper.md``);
where they disagree the paper wins (super-resolution upsampling: bilinear, the code uses bicubic).
Lengths the official code gives in absolute pixels (motion-blur kernel 10/20/30 px, stroke steps of
up to 50 px, defocus radius) are defined at a reference short side of ``REF_SIDE`` = 480 px (COCO's
usual short side) and scaled with the image's short side, so the tiny 64-128 px synthetic scenes are
degraded as much, relatively, as COCO images are.

  denoise          shuffled chain: Gaussian (p 0.8, sigma U(5, 50)/255), JPEG (p 0.5, quality 30-50),
                   Poisson (p 0.5, peak U(10, 50) photons), salt & pepper (p 0.2, 0.5-5 % of pixels)
  rain             sparse seeds (uniform noise above 254 - 2 s), smeared by a 105-degree line kernel of
                   10 + 30 s px, added with cv2.addWeighted(img, 0.8, rain, 0.4 + 0.2 s); s in {.4, .6, .8}
  haze             I = J t + A (1 - t), A = 0.95, t = exp(-(0.5 + 3 s) d), d = vertical ramp 0.8 -> 0.2
                   plus N(0, 0.05) noise, clipped to [0.1, 1]; s in {.4, .6, .8}
  motion_blur      a line kernel of 10 / 20 / 30 px at a uniform angle, cv2.filter2D (reflect-101)
  defocus_blur     a normalised disc (cv2.getStructuringElement ellipse) of radius 3-9 px
                   (not in the official code: the issue names defocus deblurring; ours)
  low_light        x * U(0.1, 0.5) + N(0, U(0.01, 0.04)), clipped (paper: brightness 0.1-0.5, noise
                   0.01-0.04)
  super_resolution down by 2 / 4 / 6 / 8 (cv2.INTER_CUBIC, as the official code) and back to the
                   full size with cv2.INTER_LINEAR (bilinear, as the paper states)
  inpaint          random strokes (polylines with round joints), plus solid rectangles with
                   probability 0.3 + 0.5 i, i in {.3, .5, .6, .8}; all filled black or white
"""
from __future__ import annotations

import cv2
import numpy as np

REF_SIDE = 480
SR_FACTORS = (2, 4, 6, 8)
MOTION_SIZES = (10, 20, 30)
DEFOCUS_RADII = (3, 9)                # inclusive range, at REF_SIDE
RAIN_FOG_INTENSITIES = (0.4, 0.6, 0.8)
INPAINT_INTENSITIES = (0.3, 0.5, 0.6, 0.8)
FILL_VALUES = (0, 255)


def _scale(image: np.ndarray) -> float:
    return min(image.shape[:2]) / REF_SIDE


def _to_u8(x: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint8 by clipping and truncation (the official code's ``astype``)."""
    return (np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# denoising

def gaussian_noise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    sigma = rng.uniform(5, 50) / 255.0
    return x + rng.normal(0.0, sigma, x.shape).astype(np.float32)


def poisson_noise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    peak = rng.uniform(10, 50)
    return (rng.poisson(np.abs(x) * peak) / peak).astype(np.float32)


def jpeg_artifacts(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    quality = int(rng.integers(30, 51))
    bgr = cv2.cvtColor(_to_u8(x), cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", bgr, [int(cv2.IMWRITE_JPEG_QUALITY), quality])
    if not ok:
        return x
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0


def salt_pepper(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    amount = rng.uniform(0.005, 0.05)
    h, w = x.shape[:2]
    n = int(np.ceil(amount * h * w * 0.5))
    out = x.copy()
    for value in (1.0, 0.0):
        out[rng.integers(0, h, n), rng.integers(0, w, n)] = value
    return out


NOISE_CHAIN = ((gaussian_noise, 0.8), (jpeg_artifacts, 0.5), (poisson_noise, 0.5), (salt_pepper, 0.2))


def denoise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The shuffled noise chain; at least one operation is applied (a draw with none would make an
    identity pair: the first operation of the shuffled order is then forced)."""
    order = rng.permutation(len(NOISE_CHAIN))
    chosen = [NOISE_CHAIN[i][0] for i in order if rng.random() < NOISE_CHAIN[i][1]]
    if not chosen:
        chosen = [NOISE_CHAIN[order[0]][0]]
    x = image.astype(np.float32) / 255.0
    for op in chosen:
        x = op(x, rng)
    return _to_u8(x)


# ------------------------------------------------------------------------------------------------
# rain, haze

def _line_kernel(length: int, angle: float, diagonal: bool = False) -> np.ndarray:
    """A normalised straight-line kernel (float64) of ``length`` px rotated by ``angle`` degrees:
    a horizontal line through the centre row (motion blur) or the main diagonal (rain streaks)."""
    length = max(int(length), 2)
    if diagonal:
        k = np.eye(length)
        centre = (length / 2, length / 2)
    else:
        k = np.zeros((length, length))
        c = (length - 1) // 2
        k[c, :] = 1.0
        centre = (c, c)
    m = cv2.getRotationMatrix2D(centre, float(angle), 1.0)
    k = cv2.warpAffine(k, m, (length, length))
    s = k.sum()
    return k / s if s > 0 else np.full_like(k, 1.0 / k.size)


def rain_apply(image: np.ndarray, strength: float, noise: np.ndarray, length: int) -> np.ndarray:
    """Rain from a uniform uint8 ``noise`` field (h, w): seeds above 254 - int(2 s), smeared by a
    ``length`` px line kernel at 105 degrees, blended with weights 0.8 / 0.4 + 0.2 s."""
    _, seeds = cv2.threshold(noise, 254 - int(strength * 2), 255, cv2.THRESH_BINARY)
    streaks = cv2.filter2D(seeds, -1, _line_kernel(length, 105.0, diagonal=True))
    layer = cv2.cvtColor(streaks, cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(image, 0.8, layer, 0.4 + 0.2 * strength, 0)


def rain(image: np.ndarray, rng: np.random.Generator, strength: float | None = None) -> np.ndarray:
    s = float(rng.choice(RAIN_FOG_INTENSITIES) if strength is None else strength)
    h, w = image.shape[:2]
    noise = rng.integers(0, 255, (h, w), dtype=np.uint8)
    return rain_apply(image, s, noise, max(3, round((10 + 30 * s) * _scale(image))))


def haze_apply(image: np.ndarray, strength: float, noise: np.ndarray) -> np.ndarray:
    """The atmospheric model with depth = vertical ramp 0.8 -> 0.2 plus ``noise`` (h, w)."""
    h, w = image.shape[:2]
    d = np.tile(np.linspace(0.8, 0.2, h)[:, None], (1, w)) + noise
    t = np.dstack([np.exp(-(0.5 + 3.0 * strength) * np.clip(d, 0.1, 1.0))] * 3)
    return _to_u8(image.astype(np.float32) / 255.0 * t + 0.95 * (1 - t))


def haze(image: np.ndarray, rng: np.random.Generator, strength: float | None = None) -> np.ndarray:
    s = float(rng.choice(RAIN_FOG_INTENSITIES) if strength is None else strength)
    return haze_apply(image, s, rng.normal(0, 0.05, image.shape[:2]))


# ------------------------------------------------------------------------------------------------
# blur, low light

def motion_blur_apply(image: np.ndarray, size: int, angle: float) -> np.ndarray:
    return cv2.filter2D(image, -1, _line_kernel(size, angle), borderType=cv2.BORDER_REFLECT_101)


def motion_blur(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = max(3, round(int(rng.choice(MOTION_SIZES)) * _scale(image)))
    return motion_blur_apply(image, size, rng.uniform(0, 360))


def defocus_blur(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    r = max(1, round(int(rng.integers(DEFOCUS_RADII[0], DEFOCUS_RADII[1] + 1)) * _scale(image)))
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)).astype(np.float64)
    return cv2.filter2D(image, -1, disc / disc.sum(), borderType=cv2.BORDER_REFLECT_101)


def low_light_apply(image: np.ndarray, factor: float, noise: np.ndarray) -> np.ndarray:
    return _to_u8(image.astype(np.float32) / 255.0 * factor + noise)


def low_light(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    factor = rng.uniform(0.1, 0.5)
    sigma = rng.uniform(0.01, 0.04)
    return low_light_apply(image, factor, rng.normal(0.0, sigma, image.shape))


# ------------------------------------------------------------------------------------------------
# super-resolution, inpainting

def sr_size(h: int, w: int, factor: int) -> tuple[int, int]:
    """The low-resolution (h, w) for a down-sampling ``factor`` (floor, at least 1 px)."""
    return max(1, h // factor), max(1, w // factor)


def super_resolution(image: np.ndarray, rng: np.random.Generator,
                     factor: int | None = None) -> tuple[np.ndarray, int]:
    """-> (the low-resolution image bilinearly resized back to (H, W), the factor drawn)."""
    f = int(rng.choice(SR_FACTORS) if factor is None else factor)
    h, w = image.shape[:2]
    lh, lw = sr_size(h, w, f)
    low = cv2.resize(image, (lw, lh), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(low, (w, h), interpolation=cv2.INTER_LINEAR), f


def inpaint_mask(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """The corruption mask (uint8 0/1, (h, w)): strokes, plus rectangles with probability
    0.3 + 0.5 i (the official 'mixed' mode)."""
    i = float(rng.choice(INPAINT_INTENSITIES))
    m = np.zeros((h, w), np.uint8)
    side = min(h, w)
    sc = side / REF_SIDE
    step = max(2, round(50 * sc))
    for _ in range(int(rng.integers(1, int(3 + 12 * i)))):           # strokes
        p = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        for _ in range(int(rng.integers(2, int(4 + 12 * i)))):
            q = (int(np.clip(p[0] + rng.integers(-step, step), 0, w)),
                 int(np.clip(p[1] + rng.integers(-step, step), 0, h)))
            t = int(rng.integers(max(1, round(2 * sc)), max(2, int(side * (0.02 + 0.1 * i)))))
            cv2.line(m, p, q, 1, t)
            cv2.circle(m, p, t // 2, 1, -1)
            p = q
    if rng.random() < 0.3 + 0.5 * i:                                   # solid blocks
        lo = int(side * 0.05)
        hi = max(int(side * (0.1 + 0.4 * i)), lo + 1)
        for _ in range(int(rng.integers(1, int(5 + 10 * i)))):
            rh, rw = int(rng.integers(lo, hi)), int(rng.integers(lo, hi))
            x, y = int(rng.integers(0, max(1, w - rw))), int(rng.integers(0, max(1, h - rh)))
            cv2.rectangle(m, (x, y), (x + rw, y + rh), 1, -1)
    return m


def inpaint(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    """-> (corrupted image, mask (bool, (H, W)), fill value 0 or 255)."""
    fill = int(rng.choice(FILL_VALUES))
    m = inpaint_mask(image.shape[0], image.shape[1], rng).astype(bool)
    out = image.copy()
    out[m] = fill
    return out, m, fill


# ------------------------------------------------------------------------------------------------
# edges

EDGE_LOW, EDGE_HIGH = 100, 200


def canny(image: np.ndarray) -> np.ndarray:
    """The paper's edge target: cv2.Canny(grey, 100, 200) of the RGB image's luma (cv2.COLOR_RGB2GRAY),
    replicated to 3 channels (edges white on black)."""
    grey = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
    return np.repeat(cv2.Canny(grey, EDGE_LOW, EDGE_HIGH)[..., None], 3, axis=2)
