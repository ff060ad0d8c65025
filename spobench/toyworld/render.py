"""Draw tiny-world scenes: anti-aliased flat shapes on a flat background, plus *quality spoils*.

``render(scene, knobs, rng_seed, size=32)`` returns ``uint8 (size, size, 3)``. Everything random is
drawn from ``rng_seed`` through separate streams (layout, object colours, background, blobs, jagged
edges, grain), so for one seed the layout is the same whatever the knobs are: spoils change quality,
never layout. Shapes are drawn by 4x supersampling and a box filter (coverage anti-aliasing).

Layout (coordinates are fractions of the image side; ``r`` is the half-extent of a shape's box; all
three shapes fill a 2r x 2r box: circle of radius r, square of side 2r, upward triangle of base and
height 2r):

* one object, count 1: r = 0.12 (small), 0.185 (no size), 0.275 (large), +-4%; placed within 0.14 of
  the centre unless a place is asked: left/right/top/bottom put the box centre in the outer 0.30 on
  that axis (and within 0.08 of the middle on the other), center within 0.06 of the middle;
* several objects (counts, two objects): r = 0.125 (0.10 small, 0.16 large), placed at random with at
  least 3.5 px (at 32 px) between boxes so that blur does not bridge them;
* relations "A above B" etc.: A in the first and B in the last third of the axis, the other axis
  near the middle (+-0.15).

Knobs (all in [0, 1], 0 = clean; none moves a shape):

=========== ==========================================================================================
grain       Gaussian pixel noise, sigma = 36 k grey levels per channel
blur        soft focus: (1 - k) image + k Gaussian blur of sigma 1 px (at 32 px; scales with size)
washout     contrast towards grey 128 by (1 - 0.5 k) and saturation by (1 - 0.45 k), whole image
color_shift object colours rotated in hue by +-11 k degrees and desaturated by (1 - 0.3 k)
blobs       round(8 k) stray blobs of random colour, radius 0.8-1.25 px (below the oracles' object area)
jagged      edges aliased (coverage snapped to 0/1 with weight k) and rows/columns jittered by +-0.8 k px
bg_tint     background mixed 40 k % with a random hue and given a low-frequency texture of about +-20 k levels
=========== ==========================================================================================

``perturb_scene(scene, rng)`` makes the *layout errors* of generators that follow prompts imperfectly:
a different colour, shape, count, size or place, swapped relation, or a missing object, always one
that the alignment oracle can see.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from functools import lru_cache

import numpy as np

from spobench.toyworld.grammar import COLORS, POSITIONS, SHAPES, SIZES, Obj, Scene

PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (225, 35, 35),
    "green": (40, 185, 55),
    "blue": (40, 70, 225),
    "yellow": (240, 225, 40),
    "purple": (145, 50, 200),
    "orange": (245, 125, 25),
    "white": (240, 240, 240),
    "cyan": (35, 205, 220),
}
assert tuple(PALETTE) == COLORS
BACKGROUND = (38.0, 38.0, 38.0)
SUPERSAMPLE = 4
GAP = 3.5 / 32  # minimum gap between object boxes (fraction of the side)
MARGIN = 0.035  # minimum gap between an object box and the image border

_STREAMS = {"layout": 1, "colour": 2, "background": 3, "blobs": 4, "jagged": 5, "grain": 6, "shift": 7}


@dataclass(frozen=True)
class Knobs:
    """Quality spoils, each in [0, 1] (0 = clean). See the module docstring for what each does."""

    grain: float = 0.0
    blur: float = 0.0
    washout: float = 0.0
    color_shift: float = 0.0
    blobs: float = 0.0
    jagged: float = 0.0
    bg_tint: float = 0.0

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"knob {f.name} must be in [0, 1], got {v}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def as_dict(self) -> dict[str, float]:
        return {n: float(getattr(self, n)) for n in self.names()}


CLEAN = Knobs()


@dataclass(frozen=True)
class Placed:
    """One drawn shape: box centre (cx, cy) and half-extent r, as fractions of the side."""

    shape: str
    color: str
    cx: float
    cy: float
    r: float


def _rng(seed: int, stream: str) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFFFFFF, _STREAMS[stream]])


# -- layout -----------------------------------------------------------------------------------------

def _radius(o: Obj, single: bool, rng: np.random.Generator) -> float:
    if single:
        base = {"small": 0.12, None: 0.185, "large": 0.275}[o.size]
    else:
        base = {"small": 0.10, None: 0.125, "large": 0.16}[o.size]
    return base * (1 + rng.uniform(-0.04, 0.04))


def _place_single(o: Obj, r: float, rng: np.random.Generator) -> tuple[float, float]:
    lo, hi = r + MARGIN, 1 - r - MARGIN

    def band(a, b):
        a, b = max(a, lo), min(b, hi)
        return rng.uniform(a, b) if b > a else (a + b) / 2

    p = o.position
    if p == "left":
        return band(lo, 0.30), band(0.42, 0.58)
    if p == "right":
        return band(0.70, hi), band(0.42, 0.58)
    if p == "top":
        return band(0.42, 0.58), band(lo, 0.30)
    if p == "bottom":
        return band(0.42, 0.58), band(0.70, hi)
    if p == "center":
        return band(0.44, 0.56), band(0.44, 0.56)
    return band(0.36, 0.64), band(0.36, 0.64)


def _free(c: tuple[float, float, float], placed: list[tuple[float, float, float]]) -> bool:
    x, y, r = c
    return all(abs(x - x2) >= r + r2 + GAP or abs(y - y2) >= r + r2 + GAP for x2, y2, r2 in placed)


def layout(scene: Scene, rng_seed: int) -> list[Placed]:
    """Where each object instance goes (deterministic in the seed; independent of knobs)."""
    rng = _rng(rng_seed, "layout")
    crng = _rng(rng_seed, "colour")
    single = len(scene.objects) == 1 and scene.objects[0].count == 1
    items = []  # (clause index, object, colour, r) per instance, drawn in order
    for k, o in enumerate(scene.objects):
        color = o.color or COLORS[int(crng.integers(len(COLORS)))]
        items += [(k, o, color, _radius(o, single, rng)) for _ in range(o.count)]
    for _attempt in range(100):  # re-sample the whole layout until every box has its gap
        taken: list[tuple[float, float, float]] = []
        for k, o, color, r in items:
            lo, hi = r + MARGIN, 1 - r - MARGIN
            for _try in range(30):
                if single:
                    cx, cy = _place_single(o, r, rng)
                elif scene.relation is not None:
                    low_side = (k == 0) == (scene.relation in ("above", "left of"))
                    near = rng.uniform(0.35, 0.65) if _try < 10 else rng.uniform(lo, hi)
                    far = rng.uniform(lo, max(lo, 0.30)) if low_side else rng.uniform(min(hi, 0.70), hi)
                    cx, cy = (near, far) if scene.relation in ("above", "below") else (far, near)
                else:
                    cx, cy = rng.uniform(lo, hi, size=2)
                if _free((cx, cy, r), taken):
                    break
            taken.append((cx, cy, r))
        if all(_free(t, taken[:i]) for i, t in enumerate(taken)):
            break
    return [Placed(o.shape, color, float(cx), float(cy), float(r)) for (_, o, color, _), (cx, cy, r) in zip(items, taken)]


# -- drawing ----------------------------------------------------------------------------------------

def _inside(shape: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    """Point-in-shape on coordinates in pixels (all of cx, cy, r in pixels too)."""
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    if shape == "square":
        return (np.abs(x - cx) <= r) & (np.abs(y - cy) <= r)
    if shape == "triangle":
        return (y <= cy + r) & (np.abs(x - cx) <= (y - cy + r) * 0.5)
    raise ValueError(f"unknown shape {shape!r}")


def coverage(shape: str, cx: float, cy: float, r: float, size: int, ss: int = SUPERSAMPLE,
             jitter: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Anti-aliased coverage of one shape (pixel units) inside its window.

    Returns ``(alpha, (y0, y1, x0, x1))``: alpha in [0, 1] for image[y0:y1, x0:x1]. ``jitter`` is a
    pair (row offsets in x, column offsets in y), one value per pixel row/column of the image.
    """
    pad = 2 + (0 if jitter is None else int(np.ceil(max(np.abs(jitter[0]).max(), np.abs(jitter[1]).max()))))
    x0, x1 = max(0, int(np.floor(cx - r)) - pad), min(size, int(np.ceil(cx + r)) + pad)
    y0, y1 = max(0, int(np.floor(cy - r)) - pad), min(size, int(np.ceil(cy + r)) + pad)
    if x1 <= x0 or y1 <= y0:
        return np.zeros((0, 0)), (0, 0, 0, 0)
    sub = (np.arange(ss) + 0.5) / ss
    xs = (np.arange(x0, x1)[:, None] + sub[None, :]).reshape(-1)  # (W*ss,)
    ys = (np.arange(y0, y1)[:, None] + sub[None, :]).reshape(-1)
    X, Y = xs[None, :], ys[:, None]
    if jitter is not None:
        X = X + np.repeat(jitter[0][y0:y1], ss)[:, None]
        Y = Y + np.repeat(jitter[1][x0:x1], ss)[None, :]
    m = _inside(shape, X, Y, cx, cy, r).astype(np.float32)
    h, w = y1 - y0, x1 - x0
    return m.reshape(h, ss, w, ss).mean(axis=(1, 3)), (y0, y1, x0, x1)


def _hue_rotate(rgb: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate colours about the grey axis (a linear hue rotation)."""
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    k = 1.0 / 3.0
    sq = np.sqrt(k)
    m = np.array([
        [c + (1 - c) * k, k * (1 - c) - sq * s, k * (1 - c) + sq * s],
        [k * (1 - c) + sq * s, c + (1 - c) * k, k * (1 - c) - sq * s],
        [k * (1 - c) - sq * s, k * (1 - c) + sq * s, c + (1 - c) * k],
    ])
    return rgb @ m.T


def _saturate(rgb: np.ndarray, factor: float) -> np.ndarray:
    grey = rgb @ np.array([0.299, 0.587, 0.114])
    return grey[..., None] + (rgb - grey[..., None]) * factor


@lru_cache(maxsize=64)
def blur_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) matrix of a 1-D Gaussian blur with edge padding: blurred = K @ x along an axis."""
    rad = max(1, int(np.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-rad, rad + 1) / sigma) ** 2)
    k /= k.sum()
    K = np.zeros((n, n))
    for i in range(n):
        for j, w in zip(range(i - rad, i + rad + 1), k):
            K[i, min(max(j, 0), n - 1)] += w
    return K


def _gauss_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an (H, W, C) or (H, W) array, edges padded by replication."""
    if sigma <= 1e-3:
        return img
    sigma = round(float(sigma), 4)
    kh, kw = blur_matrix(img.shape[0], sigma), blur_matrix(img.shape[1], sigma)
    if img.ndim == 2:
        return kh @ img @ kw.T
    return (kh @ img.transpose(2, 0, 1) @ kw.T).transpose(1, 2, 0)


def _background(size: int, kn: Knobs, rng: np.random.Generator) -> np.ndarray:
    bg = np.broadcast_to(np.array(BACKGROUND, np.float32), (size, size, 3)).copy()
    if kn.bg_tint > 0:
        hue = rng.uniform(0, 360)
        tint = _hue_rotate(np.array([150.0, 45.0, 45.0]), hue)  # a mid, saturated colour of random hue
        bg = bg * (1 - 0.4 * kn.bg_tint) + tint * (0.4 * kn.bg_tint)
        g = rng.normal(size=(4, 4, 3)) * np.array([1.0, 0.5, 0.5]) + rng.normal(size=(4, 4, 1))  # lum + chroma
        # bilinear upsample of the 4x4 grid to the image
        t = np.linspace(0, 3, size)
        i0 = np.minimum(t.astype(int), 2)
        f = (t - i0)[:, None]
        rows = g[i0] * (1 - f[..., None]) + g[i0 + 1] * f[..., None]  # (size, 4, 3)
        tex = rows[:, i0] * (1 - f.T[..., None]) + rows[:, i0 + 1] * f.T[..., None]
        bg = bg + tex * (20.0 / 1.6) * kn.bg_tint
    return bg


def render(scene: Scene, knobs: Knobs = CLEAN, rng_seed: int = 0, size: int = 32) -> np.ndarray:
    """Draw ``scene`` with quality ``knobs``; uint8 (size, size, 3). Deterministic in all arguments."""
    return render_placed(layout(scene, rng_seed), knobs, rng_seed, size)


def render_placed(placed: list[Placed], knobs: Knobs = CLEAN, rng_seed: int = 0, size: int = 32) -> np.ndarray:
    kn = knobs
    S = float(size)
    scale = size / 32.0
    img = _background(size, kn, _rng(rng_seed, "background"))
    jitter = None
    if kn.jagged > 0:
        jr = _rng(rng_seed, "jagged")
        amp = 0.8 * kn.jagged * scale
        jitter = (jr.uniform(-amp, amp, size), jr.uniform(-amp, amp, size))
    srng = _rng(rng_seed, "shift")
    for p in placed:
        col = np.array(PALETTE[p.color], np.float64)
        if kn.color_shift > 0:
            sign = 1.0 if srng.random() < 0.5 else -1.0
            col = _saturate(_hue_rotate(col, sign * 11.0 * kn.color_shift), 1 - 0.3 * kn.color_shift)
        a, (y0, y1, x0, x1) = coverage(p.shape, p.cx * S, p.cy * S, p.r * S, size, jitter=jitter)
        if a.size == 0:
            continue
        if kn.jagged > 0:
            a = (1 - kn.jagged) * a + kn.jagged * (a >= 0.5)
        win = img[y0:y1, x0:x1]
        img[y0:y1, x0:x1] = win * (1 - a[..., None]) + col * a[..., None]
    if kn.blobs > 0:
        br = _rng(rng_seed, "blobs")
        n = round(8 * kn.blobs)
        spots: list[tuple[float, float]] = []
        for _ in range(n):
            for _try in range(50):
                x, y = br.uniform(1.5 * scale, size - 1.5 * scale, 2)
                if all((x - a) ** 2 + (y - b) ** 2 >= (3.5 * scale) ** 2 for a, b in spots):
                    break
            spots.append((x, y))
            rad = br.uniform(0.8, 1.25) * scale
            col = br.uniform(30, 255, 3)
            a, (y0, y1, x0, x1) = coverage("circle", x, y, rad, size)
            img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - a[..., None]) + col * a[..., None]
    if kn.washout > 0:
        img = _saturate(img, 1 - 0.45 * kn.washout)
        img = 128.0 + (img - 128.0) * (1 - 0.5 * kn.washout)
    if kn.blur > 0:  # soft focus: a blend with a sigma = 1 px blur (a small sigma alone would do nothing)
        img = (1 - kn.blur) * img + kn.blur * _gauss_blur(img, 1.0 * scale)
    if kn.grain > 0:
        img = img + _rng(rng_seed, "grain").normal(0.0, 36.0 * kn.grain, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# -- layout errors ------------------------------------------------------------------------------------

ERROR_KINDS = ("color", "shape", "count", "size", "position", "swap", "missing")


def _other(rng: np.random.Generator, options, current):
    opts = [o for o in options if o != current]
    return opts[int(rng.integers(len(opts)))]


def perturb_scene(scene: Scene, rng: np.random.Generator, kinds: tuple[str, ...] = ERROR_KINDS) -> tuple[Scene, str]:
    """A scene with one layout error that the alignment oracle can see, and the error's name.

    Tried in a random order among ``kinds``, keeping the first that applies: ``color`` (a coloured
    object gets another colour), ``shape``, ``count`` (+-1 within 1-3; adds a copy to one-object
    scenes), ``size`` (a sized object gets the other size), ``position`` (another place), ``swap``
    (the two objects of a relation swap places), ``missing`` (one of two objects dropped).
    """
    objs = list(scene.objects)
    order = [kinds[i] for i in rng.permutation(len(kinds))]
    for kind in order:
        i = int(rng.integers(len(objs)))
        o = objs[i]
        if kind == "color" and o.color is not None:
            new = replace(o, color=_other(rng, COLORS, o.color))
        elif kind == "shape":
            new = replace(o, shape=_other(rng, SHAPES, o.shape))
        elif kind == "count":
            new = replace(o, count=2 if o.count == 1 else (o.count - 1 if rng.random() < 0.5 or o.count == 3 else 3))
        elif kind == "size" and o.size is not None and o.count == 1 and len(objs) == 1:
            new = replace(o, size=_other(rng, SIZES, o.size))
        elif kind == "position" and o.position is not None:
            new = replace(o, position=_other(rng, POSITIONS, o.position))
        elif kind == "swap" and scene.relation is not None:
            return replace(scene, objects=(objs[1], objs[0])), kind
        elif kind == "missing" and len(objs) == 2:
            return Scene((objs[1 - i],), None, scene.prefix), kind
        else:
            continue
        cand = objs.copy()
        cand[i] = new
        # changing a shape/colour must not make it the other clause's object (still a match)
        if len(cand) == 2 and (cand[0].shape, cand[0].color) == (cand[1].shape, cand[1].color):
            continue
        if len(cand) == 2 and cand[0].shape == cand[1].shape and (cand[0].color is None) != (cand[1].color is None):
            continue
        return replace(scene, objects=tuple(cand)), kind
    return replace(scene, objects=(replace(objs[0], shape=_other(rng, SHAPES, objs[0].shape)),) + tuple(objs[1:])), "shape"
