"""The tiny world's ground truth: a GenEval-style alignment check and a prompt-free aesthetic score.

Both work on ANY RGB image (a render, or a sample of a diffusion model), through one analysis:

1. the image is box-resampled to 32 x 32 (if it is not) and denoised with a 3x3 median filter;
2. background: pixels near the border median, then (twice) a background surface: the local mean of
   background pixels in a 9 x 9 window (a quadratic least-squares surface fills in where a window
   holds few of them, inside large objects), so tinted and smoothly textured backgrounds are modelled;
3. foreground: distance ``D`` of each denoised pixel's colour to the background surface at or above a
   noise floor (``median + 5 MAD`` of the background's ``D``, at least 20 grey levels); 8-connected
   components. A component is an object candidate only if its peak ``D`` is at least 40 grey levels
   and 0.3 of the most contrasted component's (fainter ones are background texture);
4. per component, from the *raw* image (the median filter would round squares' corners): coverage
   ``a = (D_raw - n0) / (peak - n0)`` clipped to [0, 1] (``n0`` the background's median ``D_raw``,
   peak the 90th percentile in the component), over the component grown by 1 px. Cores (``a >= 0.5``)
   joined only by a faint bridge (blur) are split into separate parts; a part's area is the sum of its
   coverage, and parts below ``MIN_AREA`` (12 px at 32 x 32) are *specks* (stray blobs), not objects.
   A part whose deep core (``a >= 0.95``) holds two palette colours with ``MIN_AREA`` pixels each is
   split by colour;
5. colour: the coverage-weighted mean colour of the core (``a >= 0.75``): saturation below 0.25 is
   ``white`` if brighter than the background by 40 (else ``unknown``), otherwise the palette colour of
   nearest hue (hues survive washout and +-11 degree colour shifts);
6. shape: template fit. For circle, square and triangle the template with the part's area and
   centroid is drawn (anti-aliased, as the renderer draws; also blurred, sigma 0.45 / 0.9 px) and
   compared by soft IoU ``sum(min(a, t)) / sum(max(a, t))``; the leading shapes are refined over
   +-0.5 px centre offsets; the best fit gives the shape, the box centre and the half-extent ``r``.
   (This subsumes box fill ratio - circle 0.79, square 1, triangle 0.5 - and the top/bottom width
   asymmetry of triangles.)

``alignment(image, scene)`` (GenEval's rule: an image is correct only if *every* check passes):

* the number of objects equals the number the prompt asks for (extra objects fail, specks are ignored);
* each clause has exactly ``count`` objects of its shape and (if given) colour;
* size: small means ``r < 0.15``, large ``r > 0.23`` (fractions of the side; renders use 0.12 / 0.275);
* place: left ``cx < 0.4``, right ``cx > 0.6``, top ``cy < 0.4``, bottom ``cy > 0.6``, center both
  within 0.15 of the middle;
* relation "A above B": ``cy_B - cy_A > 0.1`` and larger than ``|cx_B - cx_A|`` (likewise below,
  left of, right of on their axes).

``aesthetic(image)`` is ``10 - sum_i w_i p_i`` clipped to [0, 10]; each penalty ``p_i`` in [0, 1]
grows smoothly (``1 - exp(-excess / scale)``) with a measured defect:

============ ====== =======================================================================================
penalty      weight measures (``excess`` is above the clean renders' level; ``scale`` in parentheses)
============ ====== =======================================================================================
noise        1.5    robust std of (image - median-filtered image) on flat pixels, grey levels (12) - grain
soft_edges   1.5    objects' edge width: sum 4a(1-a) over a part / its template perimeter, px (0.8) - blur
misfit       2.0    1 - soft IoU of objects with their best *sharp* template (0.12) - jagged edges, blur
impurity     1.75   hue error / 8 deg + saturation loss / 0.25 of objects' colours (1.5) - colour shift
low_contrast 1.0    1 - objects' contrast to the background / clean palette contrast (0.3) - washout
specks       1.5    number of stray components below the object area (4) - blobs
background   1.25   background chroma / 20 + surface spread / 10 + residual texture / 6 (1.5) - bg tint
============ ====== =======================================================================================

An image with no object gets the full soft_edges, misfit, impurity and low_contrast penalties (so it scores
at most 3.75). Clean renders score about 9.9; every knob lowers the mean score strictly (tested at 0, .25, .5,
.75, 1 over 20 scenes). Grain also raises other penalties (it roughens edges and background).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from spobench.toyworld.grammar import Scene, parse
from spobench.toyworld.pixels import (
    SIZE,
    _CONTRAST,
    _SATS,
    _background_surface,
    _hsv,
    classify_color,
    classify_colors,
    dilate,
    label,
    median3,
    to_array,
)
from spobench.toyworld.render import _gauss_blur, _inside

MIN_AREA = 12.0
SPECK_MIN_AREA = 1.0
MIN_CONTRAST = 40.0  # an object's colour differs from the background by at least this
REL_CONTRAST = 0.3  # ... and by at least this fraction of the most contrasted component's
SMALL_MAX_R = 0.15
LARGE_MIN_R = 0.23
_SHAPE_AREA = {"circle": np.pi, "square": 4.0, "triangle": 2.0}  # area / r^2


# -- analysis ---------------------------------------------------------------------------------------------

@dataclass
class Detected:
    """One object found in an image (positions and r as fractions of the side)."""

    color: str
    shape: str
    cx: float
    cy: float
    r: float
    area: float  # soft area, px at 32 x 32
    fit: float  # soft IoU with the best sharp template
    hue_error: float
    saturation: float  # of the core colour
    contrast: float  # peak colour distance to the background
    edge_width: float  # px

    def as_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


@dataclass
class Analysis:
    objects: list[Detected]
    n_specks: int
    noise: float
    bg_rgb: tuple[float, float, float]
    bg_spread: float  # std of the fitted background surface (grey levels)
    bg_texture: float  # robust std of the background's residual around the surface
    floor: float
    extra: dict = field(default_factory=dict)


def _core_colour(den: np.ndarray, a: np.ndarray, comp: np.ndarray) -> np.ndarray:
    for t in (0.75, 0.5, 0.0):
        sel = comp & (a >= t)
        if sel.sum() >= 1:
            w = a[sel][:, None]
            return (den[sel] * w).sum(0) / max(w.sum(), 1e-9)
    return den[comp].mean(0)


_FIT_BLURS = (0.0, 0.45, 0.9)  # px; templates are also tried blurred so blur does not change a shape


def _blur2d(t: np.ndarray, sigma: float) -> np.ndarray:
    return _gauss_blur(t, sigma) if sigma > 0 else t


def _iou(a: np.ndarray, t: np.ndarray) -> float:
    return float(np.minimum(a, t).sum() / max(np.maximum(a, t).sum(), 1e-9))


_SS = 4  # supersampling of the templates, as the renderer's
_SHIFT = 2  # centre refinement step in supersamples (0.5 px)


@lru_cache(maxsize=512)
def _box_down(n: int, offset: int) -> np.ndarray:
    """(n, n * SS + 2 SHIFT) matrix averaging supersamples offset..offset + n SS into n pixels."""
    m = np.zeros((n, n * _SS + 2 * _SHIFT))
    for i in range(n):
        m[i, offset + i * _SS:offset + (i + 1) * _SS] = 1.0 / _SS
    return m


def _fit_shape(a: np.ndarray) -> tuple[str, float, float, float, float, float]:
    """Best template for a soft mask ``a`` (32 x 32, zero outside the component).

    Each shape's template has the component's area; it is drawn anti-aliased (as the renderer draws)
    at the centroid and compared sharp and blurred (sigma 0.45 / 0.9 px), so blur does not change a
    shape; the leading shape (and any within 0.06 IoU of it) is then refined over 3 x 3 centre offsets
    of +-0.5 px. Returns (shape, best IoU, cx, cy, r, IoU of the best sharp template), in pixels.
    """
    area = float(a.sum())
    ys, xs = np.nonzero(a > 0)
    y0, y1 = max(0, ys.min() - 3), min(SIZE, ys.max() + 4)
    x0, x1 = max(0, xs.min() - 3), min(SIZE, xs.max() + 4)
    win = a[y0:y1, x0:x1]
    h, w = win.shape
    gy, gx = np.mgrid[y0:y1, x0:x1] + 0.5
    mx, my = float((win * gx).sum() / area), float((win * gy).sum() / area)
    e = _SHIFT  # the hi-res grid extends e supersamples beyond the window on every side
    sub = (np.arange(-e, w * _SS + e) + 0.5) / _SS + x0
    suby = (np.arange(-e, h * _SS + e) + 0.5) / _SS + y0
    X, Y = sub[None, :], suby[:, None]
    cands = []
    for shape, c in _SHAPE_AREA.items():
        r = float(np.sqrt(area / c))
        cy0 = my - r / 3 if shape == "triangle" else my
        hi = _inside(shape, X, Y, mx, cy0, r).astype(np.float64)
        rows = [_box_down(h, e - (i - 1) * e) @ hi for i in range(3)]
        cols = [_box_down(w, e - (j - 1) * e).T for j in range(3)]
        t0 = rows[1] @ cols[1]
        ious = {sg: _iou(win, _blur2d(t0, sg)) for sg in _FIT_BLURS}  # blur level at the centroid
        sigma = max(ious, key=ious.get)
        cands.append((ious[sigma], shape, r, cy0, sigma, rows, cols, ious[0.0]))
    cands.sort(key=lambda c: -c[0])
    # refine the centre (+-0.5 px) of the leading shape, and of the runner-up when it is close
    keep = [c for c in cands if c[0] >= cands[0][0] - 0.06]
    best = ("circle", -1.0, mx, my, 0.0)
    sharp = max(c[7] for c in cands)
    for _, shape, r, cy0, sigma, rows, cols, _ in keep:
        for i in range(3):
            for j in range(3):
                t = rows[i] @ cols[j]
                iou = _iou(win, _blur2d(t, sigma))
                sharp = max(sharp, iou if sigma == 0 else _iou(win, t))
                if iou > best[1]:
                    best = (shape, iou, mx + (j - 1) * 0.5, cy0 + (i - 1) * 0.5, r)
    return (*best, sharp)


def _perimeter(shape: str, r: float) -> float:
    return {"circle": 2 * np.pi * r, "square": 8 * r, "triangle": (2 + 2 * np.sqrt(5.0)) * r}[shape]


def analyze(image) -> Analysis:
    x = to_array(image)
    den = median3(x)
    border = np.concatenate([den[0], den[-1], den[1:-1, 0], den[1:-1, -1]])
    b0 = np.median(border, 0)
    d0 = np.linalg.norm(den - b0, axis=-1)
    bgmask = d0 < max(30.0, 2.5 * float(np.median(d0)))
    surf = _background_surface(den, bgmask)
    for it in range(2):
        d = np.linalg.norm(den - surf, axis=-1)
        med = float(np.median(d[bgmask])) if bgmask.any() else 0.0
        mad = float(np.median(np.abs(d[bgmask] - med))) if bgmask.any() else 0.0
        floor = max(20.0, med + 5 * 1.4826 * mad)
        bgmask = ~dilate(d >= floor)
        if it == 0:
            surf = _background_surface(den, bgmask)
    d = np.linalg.norm(den - surf, axis=-1)
    # coverage comes from the raw image: the median filter would round the corners of squares
    d_raw = np.linalg.norm(x - surf, axis=-1)
    n0 = float(np.median(d_raw[bgmask])) if bgmask.any() else float(np.median(d_raw))
    fg = d >= floor
    labels, n = label(fg)

    objects: list[Detected] = []
    n_specks = 0
    flat = np.ones((SIZE, SIZE), bool)
    bg_value = float(_hsv(surf.mean((0, 1)))[2])
    peaks = [float(np.percentile(d_raw[labels == k], 90)) for k in range(1, n + 1)]
    min_peak = max(MIN_CONTRAST, REL_CONTRAST * max(peaks, default=0.0))
    for k in range(1, n + 1):
        comp = labels == k
        peak = peaks[k - 1]
        if peak < min_peak and (comp.sum() >= MIN_AREA or peak < MIN_CONTRAST):
            continue  # a faint patch of background texture or noise: neither an object nor a speck
        region = dilate(comp) & ~(fg & ~comp)
        a = np.clip((d_raw - n0) / max(peak - n0, 1e-6), 0.0, 1.0) * region
        flat &= ~dilate(dilate(region))
        for part, pa in _split_cores(a, comp, region):
            if float(pa.sum()) < MIN_AREA:
                n_specks += float(pa.sum()) >= SPECK_MIN_AREA
                continue
            for part2, pa2 in _split_by_colour(den, pa, part, bg_value):
                objects.append(_describe(x, pa2, part2, peak, bg_value))
    resid = (x - den)[flat]
    noise = float(1.4826 * np.median(np.abs(resid - np.median(resid, 0)))) if len(resid) > 16 else 0.0
    bgpix = den[bgmask] if bgmask.any() else den.reshape(-1, 3)
    bg_texture = float(1.4826 * np.median(np.abs((den - surf)[bgmask]))) if bgmask.any() else 0.0
    return Analysis(objects, n_specks, noise, tuple(float(v) for v in bgpix.mean(0)),
                    float(np.linalg.norm(surf.reshape(-1, 3).std(0))), bg_texture, floor)


def _split_cores(a, comp, region):
    """Objects that touch only through a faint bridge (blur) are separate: one part per connected
    core (coverage >= 0.5), each with the region within 2 px of its core."""
    sub, m = label(comp & (a >= 0.5))
    if m <= 1:
        return [(comp, a)]
    parts = []
    for j in range(1, m + 1):
        terr = dilate(dilate(sub == j)) & region
        parts.append((terr & comp, a * terr))
    return parts


def _split_by_colour(den, a, comp, bg_value):
    core = comp & (a >= 0.95)  # deep core only: edge pixels blend with the background
    if core.sum() < 2 * MIN_AREA:
        return [(comp, a)]
    names = classify_colors(den[core], bg_value).astype(str)
    uniq, counts = np.unique(names, return_counts=True)
    big = (counts >= MIN_AREA) & (uniq != "unknown")
    if big.sum() < 2:
        return [(comp, a)]
    keep = uniq[big]
    cols = {u: den[core][names == u].mean(0) for u in keep}
    # every pixel of the component's region goes to the nearest of the colours
    region = a > 0
    keys = list(cols)
    dist = np.stack([np.linalg.norm(den - cols[u], axis=-1) for u in keys])
    nearest = np.argmin(dist, 0)
    parts = []
    for i, _u in enumerate(keys):
        m = region & (nearest == i)
        lab, n = label(m)
        for j in range(1, n + 1):
            pm = lab == j
            pa = a * pm
            if pa.sum() >= MIN_AREA:
                parts.append((pm & comp, pa))
    return parts or [(comp, a)]


def _describe(den, a, comp, peak, bg_value) -> Detected:
    rgb = _core_colour(den, a, comp)
    color, herr = classify_color(rgb, bg_value)
    shape, _, cx, cy, r, fit = _fit_shape(a)
    edge = float((4 * a * (1 - a)).sum()) / max(_perimeter(shape, r), 1e-6)
    return Detected(color, shape, cx / SIZE, cy / SIZE, r / SIZE, float(a.sum()), fit, herr,
                    float(_hsv(rgb)[1]), peak, edge)


# -- alignment ------------------------------------------------------------------------------------------

def _relation_holds(rel: str, a: Detected, b: Detected) -> bool:
    dx, dy = b.cx - a.cx, b.cy - a.cy  # from A to B
    if rel == "above":
        return dy > 0.1 and dy > abs(dx)
    if rel == "below":
        return -dy > 0.1 and -dy > abs(dx)
    if rel == "left of":
        return dx > 0.1 and dx > abs(dy)
    if rel == "right of":
        return -dx > 0.1 and -dx > abs(dy)
    raise ValueError(rel)


def _place_holds(place: str, o: Detected) -> bool:
    return {"left": o.cx < 0.4, "right": o.cx > 0.6, "top": o.cy < 0.4, "bottom": o.cy > 0.6,
            "center": abs(o.cx - 0.5) < 0.15 and abs(o.cy - 0.5) < 0.15}[place]


def check(analysis: Analysis, scene: Scene) -> tuple[bool, str]:
    """GenEval-style verdict of an analysed image against a scene, and the first failed check."""
    objs = analysis.objects
    if len(objs) != scene.n_instances:
        return False, f"found {len(objs)} objects, prompt has {scene.n_instances}"
    matched = []
    for o in scene.objects:
        m = [d for d in objs if d.shape == o.shape and (o.color is None or d.color == o.color)]
        what = f"{o.color + ' ' if o.color else ''}{o.shape}"
        if len(m) != o.count:
            return False, f"found {len(m)} {what}, want {o.count}"
        for d in m:
            if o.size == "small" and not d.r < SMALL_MAX_R:
                return False, f"{what} not small (r={d.r:.3f})"
            if o.size == "large" and not d.r > LARGE_MIN_R:
                return False, f"{what} not large (r={d.r:.3f})"
            if o.position and not _place_holds(o.position, d):
                return False, f"{what} not {o.position} (cx={d.cx:.2f}, cy={d.cy:.2f})"
        matched.append(m)
    if scene.relation is not None and not _relation_holds(scene.relation, matched[0][0], matched[1][0]):
        return False, f"relation {scene.relation!r} does not hold"
    return True, "ok"


def alignment(image, scene: Scene | str) -> tuple[float, dict]:
    """1.0 if the image passes every check of the scene (or prompt), else 0.0; with details."""
    scene = parse(scene) if isinstance(scene, str) else scene
    an = analyze(image)
    ok, reason = check(an, scene)
    return float(ok), {"tag": scene.tag, "reason": reason, "objects": [o.as_dict() for o in an.objects]}


# -- aesthetics -----------------------------------------------------------------------------------------

WEIGHTS = {"noise": 1.5, "soft_edges": 1.5, "misfit": 2.0, "impurity": 1.75, "low_contrast": 1.0,
           "specks": 1.5, "background": 1.25}


def _ramp(excess: float, scale: float) -> float:
    return float(1.0 - np.exp(-max(0.0, excess) / scale))


def penalties(an: Analysis) -> dict[str, float]:
    """Each penalty in [0, 1]; the offsets are the clean renders' levels (so they score ~10)."""
    p = {"noise": _ramp(an.noise - 0.5, 12.0), "specks": _ramp(an.n_specks, 4.0)}
    objs = [o for o in an.objects if o.color != "unknown"] or an.objects
    if objs:
        p["soft_edges"] = _ramp(float(np.mean([o.edge_width for o in objs])) - 0.62, 0.8)
        p["misfit"] = _ramp(1.0 - float(np.mean([o.fit for o in objs])) - 0.003, 0.12)
        imp = []
        contrast = []
        for o in objs:
            sat_loss = 0.0 if o.color in ("white", "unknown") else max(0.0, 1 - o.saturation / _SATS[o.color])
            imp.append(o.hue_error / 8.0 + sat_loss / 0.25)
            contrast.append(o.contrast / _CONTRAST.get(o.color, 200.0))
        p["impurity"] = _ramp(float(np.mean(imp)) - 0.02, 1.5)
        p["low_contrast"] = _ramp(1.0 - float(np.mean(contrast)) - 0.01, 0.3)
    else:
        p.update(soft_edges=1.0, misfit=1.0, impurity=1.0, low_contrast=1.0)
    bg_chroma = float(np.ptp(np.array(an.bg_rgb)))
    p["background"] = _ramp(bg_chroma / 20.0 + an.bg_spread / 10.0 + an.bg_texture / 6.0 - 0.05, 1.5)
    return p


def aesthetic(image) -> tuple[float, dict]:
    """Prompt-free quality on [0, 10] and the penalties behind it (see the module docstring)."""
    an = analyze(image)
    p = penalties(an)
    score = float(np.clip(10.0 - sum(WEIGHTS[k] * v for k, v in p.items()), 0.0, 10.0))
    return score, {"penalties": {k: round(v, 4) for k, v in p.items()}, "n_objects": len(an.objects),
                   "n_specks": an.n_specks, "noise": round(an.noise, 3)}
