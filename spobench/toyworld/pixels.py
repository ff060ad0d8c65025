"""Pixels to masks and colour names for the tiny world's oracle (spobench/toyworld/oracle.py): resampling
to the analysis size, the median filter, 8-connected components, dilation, the background surface, and
palette names by nearest hue. Pure numpy; every image is brought to ``SIZE`` x ``SIZE`` first."""

from __future__ import annotations

import numpy as np

from spobench.toyworld.render import BACKGROUND, PALETTE

SIZE = 32


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rgb = np.asarray(rgb, np.float64)
    mx, mn = rgb.max(-1), rgb.min(-1)
    c = mx - mn
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.where(c > 1e-9, c, 1.0)
    h = np.where(mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4)) * 60.0
    s = np.where(mx > 1e-9, c / np.where(mx > 1e-9, mx, 1.0), 0.0)
    return np.where(c > 1e-9, h, 0.0), s, mx


_CHROMATIC = {k: v for k, v in PALETTE.items() if k != "white"}
_HUES = {k: float(_hsv(np.array(v))[0]) for k, v in _CHROMATIC.items()}
_SATS = {k: float(_hsv(np.array(v))[1]) for k, v in PALETTE.items()}
_CONTRAST = {k: float(np.linalg.norm(np.array(v) - np.array(BACKGROUND))) for k, v in PALETTE.items()}


def hue_distance(a: float, b: float) -> float:
    d = abs(a - b) % 360.0
    return min(d, 360.0 - d)


_HUE_NAMES = np.array(list(_HUES))
_HUE_VALUES = np.array(list(_HUES.values()))


def classify_colors(rgb: np.ndarray, bg_value: float = BACKGROUND[0]) -> np.ndarray:
    """Vectorised :func:`classify_color` names for an (N, 3) array."""
    h, s, v = _hsv(np.asarray(rgb, np.float64).reshape(-1, 3))
    d = np.abs(h[:, None] - _HUE_VALUES[None, :]) % 360.0
    names = _HUE_NAMES[np.argmin(np.minimum(d, 360.0 - d), axis=1)].astype(object)
    grey = s < 0.25
    names[grey & (v > bg_value + 40)] = "white"
    names[grey & ~(v > bg_value + 40)] = "unknown"
    return names


def classify_color(rgb, bg_value: float = BACKGROUND[0]) -> tuple[str, float]:
    """Palette name of a colour and its hue error in degrees (0 for white / unknown)."""
    h, s, v = (float(x) for x in _hsv(np.asarray(rgb, np.float64)))
    if s < 0.25:
        return ("white" if v > bg_value + 40 else "unknown"), 0.0
    name = min(_HUES, key=lambda k: hue_distance(h, _HUES[k]))
    return name, hue_distance(h, _HUES[name])


# -- image processing helpers ---------------------------------------------------------------------------

def to_array(image) -> np.ndarray:
    """float64 (32, 32, 3) in grey levels from a PIL image or an (H, W, 3) uint8/float array."""
    if hasattr(image, "convert"):
        img = image.convert("RGB")
        if img.size != (SIZE, SIZE):
            from PIL import Image
            img = img.resize((SIZE, SIZE), Image.BOX)
        return np.asarray(img, np.float64)
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {arr.shape}")
    if arr.shape[:2] != (SIZE, SIZE):
        from PIL import Image
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).resize((SIZE, SIZE), Image.BOX)
        return np.asarray(img, np.float64)
    return arr.astype(np.float64)


def median3(x: np.ndarray) -> np.ndarray:
    h, w = x.shape[:2]
    p = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
    stack = np.stack([p[i:i + h, j:j + w] for i in range(3) for j in range(3)])
    return np.partition(stack, 4, axis=0)[4]


_NEIGHBOURS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def _shifted(x: np.ndarray, dy: int, dx: int, fill) -> np.ndarray:
    """x shifted so that out[i, j] = x[i + dy, j + dx] (``fill`` outside)."""
    h, w = x.shape
    out = np.full_like(x, fill)
    out[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)] = x[max(0, dy):h - max(0, -dy) or None,
                                                                     max(0, dx):w - max(0, -dx) or None]
    return out


def label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a boolean mask: labels 1..n (0 = background), n."""
    h, w = mask.shape
    big = h * w + 1
    lab = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), big)
    while True:
        m = lab
        for dy, dx in _NEIGHBOURS:
            m = np.minimum(m, _shifted(lab, dy, dx, big))
        m = np.where(mask, m, big)
        # pointer jumping: follow each label to the label its root pixel holds now
        flat = np.concatenate([[big], m.reshape(-1), [big]])
        m = np.where(mask, flat[np.minimum(m, big)], big)
        if np.array_equal(m, lab):
            break
        lab = m
    uniq, inv = np.unique(np.where(mask, lab, 0), return_inverse=True)
    out = inv.reshape(h, w)
    if uniq[0] != 0:
        out = out + 1
    return out, len(uniq) - (1 if uniq[0] == 0 else 0)


def dilate(mask: np.ndarray) -> np.ndarray:
    """3 x 3 binary dilation."""
    rows = mask.copy()
    rows[1:] |= mask[:-1]
    rows[:-1] |= mask[1:]
    out = rows.copy()
    out[:, 1:] |= rows[:, :-1]
    out[:, :-1] |= rows[:, 1:]
    return out


def _fit_surface(img: np.ndarray, use: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w] / (h - 1) - 0.5
    basis = np.stack([np.ones_like(xx), xx, yy, xx * xx, xx * yy, yy * yy], -1).reshape(-1, 6)
    sel = use.reshape(-1)
    if sel.sum() < 40:
        return np.broadcast_to(np.median(img.reshape(-1, 3), 0), img.shape).copy()
    b = basis[sel]
    coef = np.linalg.solve(b.T @ b + 1e-6 * np.eye(6), b.T @ img.reshape(-1, 3)[sel])
    return (basis @ coef).reshape(h, w, 3)


def _box(x: np.ndarray, rad: int) -> np.ndarray:
    """Sum over a (2 rad + 1)^2 window (zero padding), via an integral image."""
    p = np.pad(x, ((rad + 1, rad), (rad + 1, rad)) + ((0, 0),) * (x.ndim - 2))
    c = p.cumsum(0).cumsum(1)
    k = 2 * rad + 1
    return c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]


def _background_surface(img: np.ndarray, use: np.ndarray, rad: int = 4) -> np.ndarray:
    """Local mean of the background pixels around each pixel (normalised convolution); where a
    window holds too few of them (inside large objects) the quadratic surface fills in."""
    m = use.astype(np.float64)
    cnt = _box(m, rad)
    local = _box(img * m[..., None], rad) / np.maximum(cnt, 1e-9)[..., None]
    quad = _fit_surface(img, use)
    w = np.clip((cnt - 8) / 16, 0, 1)[..., None]
    return w * local + (1 - w) * quad
