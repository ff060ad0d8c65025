"""Preference pairs in Pick-a-Pic's published format: ONE reader for every trainer that learns from
pairs (``train-spm``, ``train diffusion-dpo``, the tiny world's PickScore) and for SPM evaluation.

The format is that of the Hugging Face datasets ``yuvalkirstain/pickapic_v1`` and ``pickapic_v2``: a
folder of parquet shards (~1 GB each) with the columns :data:`PICKAPIC_COLUMNS`; ``jpg_0``/``jpg_1``
are encoded image bytes (JPEG, 512-1024 px), ``label_0``/``label_1`` the probability that image 0 /
image 1 is preferred (1/0, 0/1, or 0.5/0.5 for a tie), ``has_label`` false for rows the user left
without a choice. Only :data:`PAIR_COLUMNS` are required; any other column (the tiny world's analysis
columns, an ``__index_level_0__``) is ignored. The tiny world writes the same format
(:mod:`spobench.toyworld.pairs`, PNG bytes).

Which rows a trainer uses (:meth:`PairTable.usable`), following the reference code:

* ``has_label`` false: dropped (their labels carry no preference; SPO's and PickScore's validation
  keep only labelled rows, Diffusion-DPO's data has none).
* ties (0.5 / 0.5): Diffusion-DPO drops them (SalesforceAIResearch/DiffusionDPO ``train.py``: keeps
  ``label_0 in (0, 1)``); SPO's step-aware preference model trains on them with the soft label, as
  PickScore does (RockeyCoss/SPO ``step_aware_preference_model/trainer/criterions/spm_criterion.py``,
  ``label_0 * loss_0 + label_1 * loss_1``), so ``keep_ties`` is the trainer's choice.
  Either way the counts are printed (``pairs: ...``).

Memory. Opening a folder reads only the small columns (caption, labels, has_label) with a column
projection, a batch at a time, into an index of the rows (caption, labels, location). Images are
read when a batch of rows needs them, by row group (``iter_batches`` with the image columns only),
and at most :data:`CACHED_GROUPS` row groups are held. pyarrow reads a column chunk whole (measured:
a one-row-group file costs its whole image column even with ``batch_size=32``), so the bound is a
few row groups; Hugging Face's writer puts 100 rows in a row group of a binary dataset, about
100 MB for Pick-a-Pic. A shard written as one huge row group still works, costing that group; the
reader says so once (``pairs: ... row groups of up to N MB``).

Images are checked from their header before any pixel is decoded (:mod:`spobench.data.images`, the one image
opener eval uses too): a 4 KB
1 x 1,000,000 PNG would otherwise be decoded and resized to 32 x 32,000,000. A broken or absurd
image is an :class:`~spobench.core.errors.InputError` naming the shard, the column and the row.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from spobench.core.errors import InputError
from spobench.data.images import open_image, probe_image

# the published schema (HF yuvalkirstain/pickapic_v1, pickapic_v2 parquet shards)
PICKAPIC_COLUMNS = ("are_different", "best_image_uid", "caption", "created_at", "has_label", "image_0_uid",
                    "image_0_url", "image_1_uid", "image_1_url", "jpg_0", "jpg_1", "label_0", "label_1",
                    "model_0", "model_1", "ranking_id", "user_id", "num_example_per_prompt")
PAIR_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
IMAGE_COLUMNS = ("jpg_0", "jpg_1")
INDEX_BATCH = 65_536  # rows per batch of the small-column pass
CACHED_GROUPS = 2  # row groups of image bytes held at once: a batch may straddle two
BIG_GROUP_MB = 1024  # a row group with more image bytes than this is worth a note


def say(msg: str) -> None:
    """An information line on stderr (``pairs: ...``), kept apart from stdout's results."""
    print(msg, file=sys.stderr, flush=True)


# -- images ---------------------------------------------------------------------------------------
def _encoded(data, where: str) -> bytes:
    """The encoded bytes of one image cell (size and format limits: :mod:`spobench.data.images`)."""
    if isinstance(data, dict):  # HF datasets' Image feature: {"bytes": ..., "path": ...}
        data = data.get("bytes")
    if not isinstance(data, (bytes, bytearray)):
        raise InputError(f"{where}: not encoded image bytes ({type(data).__name__})")
    return bytes(data)


def image_size(data, where: str) -> tuple[int, int]:
    """(width, height) of encoded image bytes, from the header only."""
    info = probe_image(_encoded(data, where), where)
    return info.width, info.height


def crop_box(width: int, height: int, resolution: int) -> tuple[int, int, int, int]:
    """(resized width, resized height, left, top) of the short-side resize to ``resolution`` and
    the centre crop that :func:`decode_image` applies."""
    s = resolution / min(width, height)
    nw, nh = max(resolution, round(width * s)), max(resolution, round(height * s))
    return nw, nh, (nw - resolution) // 2, (nh - resolution) // 2


def decode_image(data, resolution: int, where: str) -> torch.Tensor:
    """Encoded bytes -> (3, res, res) float in [0, 1]: short side resized (bicubic), centre crop."""
    from PIL import Image

    rgb = open_image(_encoded(data, where), where)
    nw, nh, left, top = crop_box(*rgb.size, resolution)
    rgb = rgb.resize((nw, nh), Image.Resampling.BICUBIC)
    rgb = rgb.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(rgb, dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 255


# -- the table ------------------------------------------------------------------------------------
def _shard_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.glob("*.parquet") if p.is_file())
        if not files:
            raise InputError(f"{path}: no *.parquet files in this folder")
        return files
    if path.is_file():
        return [path]
    raise InputError(f"{path}: pairs parquet not found")


def _open_parquet(f: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(f)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for bad files
        raise InputError(f"{f}: not a readable parquet file ({type(e).__name__}: {e})") from None


class PairTable:
    """Pick-a-Pic-format pairs from one parquet file or a folder of shards (see the module docstring).

    Rows are numbered over the files in name order, every row of every file (so columns read
    elsewhere stay row-aligned); :meth:`usable` says which ones to train on. ``labels`` is (N, 2);
    rows without a label have theirs as stored, unchecked (NaN when null).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.files = _shard_files(self.path)
        captions: list[str] = []
        labels: list[np.ndarray] = []
        labelled: list[np.ndarray] = []
        loc: list[np.ndarray] = []  # (file, row group, row in group, row in file)
        big = 0.0
        for fi, f in enumerate(self.files):
            pf = _open_parquet(f)
            names = set(pf.schema_arrow.names)
            missing = [c for c in PAIR_COLUMNS if c not in names]
            if missing:
                raise InputError(f"{f}: missing column(s) {', '.join(missing)} (a Pick-a-Pic pairs file needs "
                                 f"{', '.join(PAIR_COLUMNS)})")
            cols = ["caption", "label_0", "label_1"] + (["has_label"] if "has_label" in names else [])
            start = len(captions)
            for batch in self._batches(pf, f, cols, row_groups=None):
                offset = len(captions) - start
                captions += self._captions(batch, f, offset)
                labels.append(self._labels(batch, f, offset))
                labelled.append(self._has_label(batch) if "has_label" in cols else np.ones(batch.num_rows, bool))
            row = 0
            for g in range(pf.num_row_groups):
                md = pf.metadata.row_group(g)
                n = md.num_rows
                loc.append(np.stack([np.full(n, fi), np.full(n, g), np.arange(n), row + np.arange(n)], axis=1))
                row += n
                big = max(big, sum(md.column(j).total_compressed_size for j in range(md.num_columns)
                                   if md.column(j).path_in_schema in IMAGE_COLUMNS) / 2**20)
            if row != len(captions) - start:
                raise InputError(f"{f}: the file's metadata says {row} rows but {len(captions) - start} were read")
        self.captions = captions
        self.labels = np.concatenate(labels) if labels else np.zeros((0, 2))
        self.labelled = np.concatenate(labelled) if labelled else np.zeros(0, bool)
        self.loc = np.concatenate(loc).astype(np.int64) if loc else np.zeros((0, 4), np.int64)
        self._check_labels()
        if big > BIG_GROUP_MB:
            say(f"pairs: {self.path}: row groups of up to {big:.0f} MB of images; memory follows the row "
                f"group (pyarrow reads one whole), so shards with ~100-row groups use less")
        self._groups: dict[tuple[int, int], dict] = {}

    # -- reading --------------------------------------------------------------------------------------
    @staticmethod
    def _batches(pf, f: Path, columns: list[str], row_groups):
        """``iter_batches`` with a projection; a truncated or corrupt file is a named error."""
        try:
            yield from pf.iter_batches(batch_size=INDEX_BATCH, columns=columns, row_groups=row_groups,
                                       use_threads=False)
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 - pyarrow: OSError, ArrowInvalid... for damaged pages
            where = "" if row_groups is None else f" row group {row_groups[0]}"
            raise InputError(f"{f}:{where} cannot read columns {', '.join(columns)} "
                             f"({type(e).__name__}: {e})") from None

    @staticmethod
    def _captions(batch, f: Path, offset: int) -> list[str]:
        caps = batch.column("caption").to_pylist()
        for r, c in enumerate(caps):
            if not isinstance(c, str):
                raise InputError(f"{f}: column caption row {offset + r}: not a string ({c!r})")
        return caps

    @staticmethod
    def _labels(batch, f: Path, offset: int) -> np.ndarray:
        out = []
        for col in ("label_0", "label_1"):
            try:
                out.append(np.asarray(batch.column(col).to_numpy(zero_copy_only=False), dtype=np.float64))
            except (TypeError, ValueError) as e:
                raise InputError(f"{f}: column {col} rows {offset}+: labels must be numbers ({e})") from None
        return np.stack(out, axis=1)

    @staticmethod
    def _has_label(batch) -> np.ndarray:
        return np.asarray([bool(v) for v in batch.column("has_label").to_pylist()], dtype=bool)

    def _check_labels(self) -> None:
        """Labelled rows: labels in [0, 1] summing to 1 (ties 0.5 / 0.5); named by file and row."""
        a, b = self.labels[:, 0], self.labels[:, 1]
        for col, arr in (("label_0", a), ("label_1", b)):
            bad = np.flatnonzero(self.labelled & (~np.isfinite(arr) | (arr < 0) | (arr > 1)))
            if bad.size:
                raise InputError(f"{self._where(int(bad[0]), col)}: label {arr[bad[0]]} is not in [0, 1]")
        bad = np.flatnonzero(self.labelled & (np.abs(a + b - 1) > 1e-3))
        if bad.size:
            r = int(bad[0])
            raise InputError(f"{self._where(r)}: label_0 + label_1 = {a[r] + b[r]} (must be 1; ties are 0.5/0.5)")

    def _where(self, i: int, column: str | None = None) -> str:
        fi, _, _, row = (int(v) for v in self.loc[i])
        return f"{self.files[fi]}: {'column ' + column + ' ' if column else ''}row {row}"

    # -- rows -------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.captions)

    def is_tie(self, i: int) -> bool:
        return bool(abs(self.labels[i, 0] - self.labels[i, 1]) < 1e-6)

    def ties(self) -> np.ndarray:
        return np.abs(self.labels[:, 0] - self.labels[:, 1]) < 1e-6

    def usable(self, keep_ties: bool, limit: int | None = None) -> tuple[list[int], dict]:
        """Rows to train on (labelled; decided unless ``keep_ties``), the first ``limit`` of them, and
        the counts: ``rows``, ``unlabeled``, ``ties`` (among labelled rows), ``used``."""
        ties = self.ties()
        keep = self.labelled & (keep_ties | ~ties)
        rows = np.flatnonzero(keep).tolist()
        if limit:
            rows = rows[:limit]
        return rows, {"rows": len(self), "unlabeled": int((~self.labelled).sum()),
                      "ties": int((self.labelled & ties).sum()), "used": len(rows)}

    def describe(self, counts: dict, keep_ties: bool) -> str:
        """The one ``pairs: ...`` line a trainer prints."""
        return (f"pairs: {counts['used']} of {counts['rows']} rows ({counts['ties']} ties "
                f"{'kept' if keep_ties else 'dropped'}, {counts['unlabeled']} unlabeled)")

    def group_of(self, i: int) -> tuple[int, int]:
        """(file, row group) of row ``i``: the unit images are read in (:class:`BatchOrder` keeps them together)."""
        return int(self.loc[i, 0]), int(self.loc[i, 1])

    # -- images -----------------------------------------------------------------------------------------
    def row_group(self, key: tuple[int, int]) -> dict:
        """The image columns of row group ``key`` = (file, row group) (:meth:`group_of`): column ->
        arrow arrays by read batch, and ``starts``, each batch's first row; at most ``CACHED_GROUPS``
        are held."""
        if key not in self._groups:
            while len(self._groups) >= CACHED_GROUPS:
                self._groups.pop(next(iter(self._groups)))
            f = self.files[key[0]]
            batches = list(self._batches(_open_parquet(f), f, list(IMAGE_COLUMNS), row_groups=[key[1]]))
            self._groups[key] = {c: [b.column(c) for b in batches] for c in IMAGE_COLUMNS} | {
                "starts": np.cumsum([0] + [b.num_rows for b in batches])}
        return self._groups[key]

    def raw(self, i: int, column: str):
        """The stored bytes of one image (no decoding)."""
        fi, g, r, _ = (int(v) for v in self.loc[i])
        grp = self.row_group((fi, g))
        k = int(np.searchsorted(grp["starts"], r, side="right")) - 1
        return grp[column][k][r - int(grp["starts"][k])].as_py()

    def image(self, i: int, column: str, resolution: int) -> torch.Tensor:
        """Decode one image -> (3, res, res) float in [0, 1] (short side resized, centre crop)."""
        return decode_image(self.raw(i, column), resolution, self._where(i, column))

    def image_size(self, i: int, column: str) -> tuple[int, int]:
        """(width, height) of one image as stored, from its header."""
        return image_size(self.raw(i, column), self._where(i, column))

    def images(self, rows: Sequence[int], resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.stack([self.image(i, "jpg_0", resolution) for i in rows])
        b = torch.stack([self.image(i, "jpg_1", resolution) for i in rows])
        return a, b


# -- splits and order -----------------------------------------------------------------------------
def _caption_hash(caption: str) -> float:
    return int.from_bytes(hashlib.blake2b(caption.encode(), digest_size=8).digest(), "big") / 2**64


def split_rows(pairs: PairTable, val_fraction: float, rows: Sequence[int] | None = None) -> tuple[list[int], list[int]]:
    """(train, val) among ``rows`` (default all): a pair is held out when its caption hashes below
    ``val_fraction``, so a caption is never on both sides and the split does not depend on the seed."""
    if not 0 <= val_fraction < 1:
        raise InputError(f"val_fraction must be in [0, 1) (got {val_fraction})")
    rows = np.arange(len(pairs)) if rows is None else np.asarray(rows, dtype=np.int64)
    caps = [pairs.captions[int(r)] for r in rows]
    h = np.array([_caption_hash(c) for c in caps])
    val_mask = h < val_fraction
    if val_fraction > 0 and not val_mask.any() and len(set(caps)) > 1:
        val_mask = h == h.min()  # at least one held-out caption
    train = [int(r) for r in rows[~val_mask]]
    val = [int(r) for r in rows[val_mask][np.argsort(h[val_mask], kind="stable")]]
    return train, val


class BatchOrder:
    """Step ``s`` -> rows. Each epoch shuffles the row groups, then the rows inside each group, so
    consecutive batches read the same row group (images are read a row group at a time); epoch
    ``e`` uses ``default_rng([seed, e])``."""

    def __init__(self, pairs: PairTable, rows: Sequence[int], batch_size: int, seed: int):
        if not rows:
            raise InputError(f"{pairs.path}: no training pairs left after the held-out split")
        self.pairs, self.rows, self.batch_size, self.seed = pairs, list(rows), batch_size, seed
        self._epoch: tuple[int, list[int]] | None = None

    def _order(self, epoch: int) -> list[int]:
        if self._epoch is None or self._epoch[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            groups: dict[tuple[int, int], list[int]] = {}
            for r in self.rows:
                groups.setdefault(self.pairs.group_of(r), []).append(r)
            keys = list(groups)
            order: list[int] = []
            for k in rng.permutation(len(keys)):
                members = groups[keys[k]]
                order += [members[j] for j in rng.permutation(len(members))]
            self._epoch = (epoch, order)
        return self._epoch[1]

    def batch(self, step: int) -> list[int]:
        n = len(self.rows)
        return [self._order(pos // n)[pos % n] for pos in range(step * self.batch_size, (step + 1) * self.batch_size)]


# -- writing (tests, benchmarks) ------------------------------------------------------------------
def pickapic_schema():
    """The published shards' arrow schema (column order and types of pickapic_v1/v2's parquet)."""
    import pyarrow as pa

    types = {"are_different": pa.bool_(), "best_image_uid": pa.string(), "caption": pa.string(),
             "created_at": pa.timestamp("ns"), "has_label": pa.bool_(), "image_0_uid": pa.string(),
             "image_0_url": pa.string(), "image_1_uid": pa.string(), "image_1_url": pa.string(),
             "jpg_0": pa.binary(), "jpg_1": pa.binary(), "label_0": pa.float64(), "label_1": pa.float64(),
             "model_0": pa.string(), "model_1": pa.string(), "ranking_id": pa.int64(), "user_id": pa.int64(),
             "num_example_per_prompt": pa.int64()}
    return pa.schema([(c, types[c]) for c in PICKAPIC_COLUMNS])


def shard_table(columns: dict, uid_prefix: str = "img"):
    """An arrow table in the published schema from ``columns`` (name -> list); columns not given are
    filled as the dataset would (uids from the row, ``has_label``/``are_different`` true, ...)."""
    import datetime

    import pyarrow as pa

    n = len(columns["caption"])
    l0 = list(columns["label_0"])
    uid0 = [f"{uid_prefix}-{i}-0" for i in range(n)]
    uid1 = [f"{uid_prefix}-{i}-1" for i in range(n)]
    base = {"are_different": [True] * n, "has_label": [True] * n, "image_0_uid": uid0, "image_1_uid": uid1,
            "best_image_uid": [a if v == 1 else (b if v == 0 else "") for a, b, v in zip(uid0, uid1, l0)],
            "created_at": [datetime.datetime(2023, 1, 1)] * n,
            "image_0_url": [f"https://example.invalid/{u}.jpg" for u in uid0],
            "image_1_url": [f"https://example.invalid/{u}.jpg" for u in uid1],
            "model_0": ["sd-1.5"] * n, "model_1": ["sdxl"] * n, "ranking_id": list(range(n)),
            "user_id": [7] * n, "num_example_per_prompt": [1] * n}
    data = base | dict(columns)
    schema = pickapic_schema()
    return pa.table({c: data[c] for c in schema.names}, schema=schema)


def write_shard(path: str | Path, columns: dict, row_group_size: int = 100) -> None:
    """Write one shard in the published schema (:func:`shard_table`); ``row_group_size`` 100 is what
    Hugging Face's writer uses for binary data."""
    import pyarrow.parquet as pq

    pq.write_table(shard_table(columns, Path(path).stem), path, row_group_size=row_group_size)
