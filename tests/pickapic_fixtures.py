"""Rows for shards in Pick-a-Pic's published schema (``spobench.pairs_data.write_shard``) with real
JPEG bytes: tests/test_pickapic.py and tests/robustness/test_bad_pairs.py."""

from __future__ import annotations

import io


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
