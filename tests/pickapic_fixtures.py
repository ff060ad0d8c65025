"""Rows for shards in Pick-a-Pic's published schema (``spobench.data.pairs.write_shard``) with real
JPEG bytes (tests/data/test_pickapic.py, tests/robustness/test_bad_pairs.py), and small PNG pairs whose
winner is the brighter image (tests/trainers/test_spm.py, tests/eval/test_spm_eval.py)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40), (40, 220, 220), (220, 40, 220)]


def jpeg(color, size=(48, 40)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def shard_columns(n: int, offset: int = 0, *, ties=(), unlabelled=()) -> dict:
    """``n`` rows; row i: jpg_0 colour i, jpg_1 colour i+1, image 0 preferred on even rows."""
    cols = {"caption": [f"prompt {offset + i}" for i in range(n)],
            "jpg_0": [jpeg(COLORS[(offset + i) % 6]) for i in range(n)],
            "jpg_1": [jpeg(COLORS[(offset + i + 1) % 6], (40, 56)) for i in range(n)],
            "label_0": [1.0 if (offset + i) % 2 == 0 else 0.0 for i in range(n)],
            "has_label": [True] * n}
    for i in ties:
        cols["label_0"][i] = 0.5
    for i in unlabelled:  # as stored for a row without a choice: no valid label at all
        cols["has_label"][i], cols["label_0"][i] = False, 0.0
    cols["label_1"] = [1.0 - v for v in cols["label_0"]]
    for i in unlabelled:
        cols["label_1"][i] = 0.0
    return cols


def png_bytes(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_pairs(path, n=16, seed=0, ties=2, row_group_size=None, **override):
    """Synthetic pairs whose winner is the brighter image (the last ``ties`` pairs are ties)."""
    rng = np.random.default_rng(seed)
    rows = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": []}
    for i in range(n):
        base = rng.integers(0, 256, size=(12, 12, 3))
        dark = np.clip(base * 0.35, 0, 255).astype(np.uint8)
        bright = np.clip(base * 0.35 + 150, 0, 255).astype(np.uint8)
        first_wins = bool(rng.integers(0, 2))
        a, b = (bright, dark) if first_wins else (dark, bright)
        tie = i >= n - ties
        rows["caption"].append(f"a {['red', 'blue', 'green', 'white'][i % 4]} circle number {i}")
        rows["jpg_0"].append(png_bytes(a))
        rows["jpg_1"].append(png_bytes(b))
        rows["label_0"].append(0.5 if tie else float(first_wins))
        rows["label_1"].append(0.5 if tie else float(not first_wins))
    rows.update(override)
    pq.write_table(pa.table(rows), path, row_group_size=row_group_size)
    return path
