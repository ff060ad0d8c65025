"""Streaming Pick-a-Pic shards through spobench's pairs reader: rows/s and peak RSS.

Run (not CI; a few minutes)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_pickapic.py            # ~2 GB, 512 px JPEGs
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_pickapic.py --gb 0.5   # a smaller set

1. Writes a synthetic shard set in the published schema (``spobench.data.pairs.write_shard``) under
   /tmp: ``--shards`` shards of ``--gb / --shards`` GB, 100-row row groups (what Hugging Face's writer
   uses for binary data), real 512 x 512 JPEG bytes (smooth colour fields plus noise, quality 90, so
   a JPEG is ~100-200 KB as SD samples are; a pool of distinct images reused across rows, written
   without dictionary encoding, so the bytes on disk and read are the full size). 5 % ties, 2 % unlabelled.
2. In a FRESH process per mode (so its peak RSS is the loader's alone), opens the folder
   (``PairTable``: the small-column index pass) and walks one epoch in ``BatchOrder`` order, 8
   pairs a batch, as ``train-spm`` does:

   * ``raw``: the stored bytes of both images of every row (``PairTable.raw``): I/O + parquet;
   * ``decode``: both images decoded, resized and centre-cropped to 512 (``PairTable.images``): what a
     trainer pays before the VAE; the whole epoch, or its first ``--decode-rows`` rows.

3. Writes ``benchmarks/results/pickapic_stream.json`` (the command, the machine and its load average
   before and after, the data set's size, and per mode: index seconds, rows, rows/s, peak RSS) and
   deletes the shards.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "pickapic_stream.json"


def _jpegs(n: int, px: int, seed: int) -> list[bytes]:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    yy, xx = np.mgrid[0:px, 0:px] / px
    for _ in range(n):
        base = np.stack([np.sin(6.3 * (a * xx + b * yy) + c) for a, b, c in rng.uniform(-2, 2, (3, 3))], -1)
        img = (127 + 90 * base + rng.normal(0, 18, (px, px, 3))).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_set(folder: Path, gb: float, shards: int, px: int, pool: int = 48) -> dict:
    import numpy as np

    import pyarrow.parquet as pq

    from spobench.data.pairs import pickapic_schema, shard_table

    images = _jpegs(pool, px, 0)
    per_row = 2 * float(np.mean([len(b) for b in images]))
    rows = max(1, int(gb * 2**30 / per_row / shards))
    rng = np.random.default_rng(1)
    for s in range(shards):
        i0 = rng.integers(pool, size=rows)
        i1 = (i0 + 1 + rng.integers(pool - 1, size=rows)) % pool
        label_0 = rng.choice([1.0, 0.0, 0.5], size=rows, p=[0.475, 0.475, 0.05])
        has_label = rng.random(rows) >= 0.02
        # one row group at a time, so that writing does not hold a shard in memory either
        # no dictionary encoding: the pool's repeats would shrink the file; real images never repeat
        with pq.ParquetWriter(folder / f"train-{s:05d}-of-{shards:05d}.parquet", pickapic_schema(),
                              use_dictionary=False) as w:
            for g in range(0, rows, 100):
                sl = slice(g, min(rows, g + 100))
                w.write_table(shard_table({
                    "caption": [f"synthetic prompt {s}-{r}" for r in range(sl.start, sl.stop)],
                    "jpg_0": [images[i] for i in i0[sl]], "jpg_1": [images[i] for i in i1[sl]],
                    "label_0": label_0[sl].tolist(), "label_1": (1 - label_0[sl]).tolist(),
                    "has_label": has_label[sl].tolist()}, f"s{s}-g{g}"))
    files = sorted(folder.glob("*.parquet"))
    return {"shards": len(files), "rows": rows * shards, "row_group_rows": 100, "image_px": px,
            "mean_jpeg_bytes": round(per_row / 2), "bytes": sum(f.stat().st_size for f in files)}


def stream(folder: str, mode: str, limit: int = 0, batch: int = 8, resolution: int = 512) -> dict:
    """One epoch through the reader in this process; returns rows/s and this process's peak RSS."""
    from spobench.data.pairs import BatchOrder, PairTable

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    pairs = PairTable(folder)
    rows, counts = pairs.usable(keep_ties=True)
    t_index = time.perf_counter() - t0
    order = BatchOrder(pairs, rows, batch, seed=0)
    n_steps = len(rows) // batch if not limit else min(len(rows), limit) // batch
    t1 = time.perf_counter()
    nbytes = 0
    for step in range(n_steps):
        b = order.batch(step)
        if mode == "raw":
            nbytes += sum(len(pairs.raw(r, c)) for r in b for c in ("jpg_0", "jpg_1"))
        else:
            a, c = pairs.images(b, resolution)
            nbytes += a.numel() + c.numel()
    dt = time.perf_counter() - t1
    done = n_steps * batch
    return {"mode": mode, "index_s": round(t_index, 2), "counts": counts, "rows": done, "stream_s": round(dt, 2),
            "rows_per_s": round(done / dt, 1), "mb_per_s": round(nbytes / dt / 2**20, 1) if mode == "raw" else None,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "rss_before_reader_mb": round(rss0 / 1024)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--px", type=int, default=512)
    ap.add_argument("--modes", default="raw,decode")
    ap.add_argument("--decode-rows", type=int, default=0,
                    help="rows decoded in the decode mode (0: all); raw always walks the whole epoch")
    ap.add_argument("--out", type=Path, default=RESULT)
    ap.add_argument("--_stream", nargs=3, metavar=("FOLDER", "MODE", "LIMIT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._stream:
        folder, mode, limit = args._stream
        print(json.dumps(stream(folder, mode, int(limit))))
        return

    from spobench.core.io import provenance

    command = "OMP_NUM_THREADS=%s python benchmarks/bench_pickapic.py %s" % (
        os.environ.get("OMP_NUM_THREADS", ""), " ".join(sys.argv[1:]))
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="spobench-pickapic-", dir="/tmp"))
    try:
        t0 = time.perf_counter()
        data = write_set(tmp, args.gb, args.shards, args.px)
        data["write_s"] = round(time.perf_counter() - t0, 1)
        print(f"wrote {data['bytes'] / 2**30:.2f} GB: {data['rows']} rows in {data['shards']} shards "
              f"({data['write_s']} s)", flush=True)
        modes = []
        for mode in args.modes.split(","):
            limit = args.decode_rows if mode == "decode" else 0
            r = subprocess.run([sys.executable, __file__, "--_stream", str(tmp), mode, str(limit)],
                               capture_output=True, text=True)
            if r.returncode:
                sys.exit(r.stderr)
            modes.append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(json.dumps(modes[-1]), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {"command": command, "data": data, "modes": modes,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "load_avg_before": [round(x, 2) for x in load_before],
                          "load_avg_after": [round(x, 2) for x in os.getloadavg()]},
              "provenance": provenance()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
