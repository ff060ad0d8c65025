"""The paper's evaluation prompt sets, read from local copies of the official files.

Each loader returns a :class:`PromptSet`: a ``list[str]`` of prompts (so it is usable wherever a prompt
list is) that also records where the prompts came from and a version string, plus per-prompt metadata
where the source has some (HPSv2 style, PartiPrompts category/challenge, SPO ``trainset_idx``).

====================================  ==========================================  ===============
set                                   local file(s)                               official size
====================================  ==========================================  ===============
Pick-a-Pic v1 ``validation_unique``   ``pickapic/validation_unique*.parquet``     500
HPSv2 benchmark                       ``hpsv2/benchmark/{anime,concept-art,       4 x 800
                                      paintings,photo}.json``
PartiPrompts                          ``partiprompts/PartiPrompts.tsv``           1632
SPO 4k training prompts               ``spo/4k_training_prompts.json``            4000
====================================  ==========================================  ===============

Paths are relative to ``$SPOBENCH_DATA`` (default ``~/.cache/spobench/data``); every loader also takes an
explicit path (a file or the folder holding it). Nothing is downloaded: a missing file raises
:class:`~spobench.core.errors.InputError` naming the file expected and the data set to get it from. No
prompt is ever made up.

The version string is ``<set>/<loader version>+<sha256 of the prompts>[:12]``: two runs whose prompt
sets print the same version used the same prompts in the same order, whatever file packaging they
came in.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

from spobench.core.errors import InputError
from spobench.data.prompts import clean as _clean

LOADER_VERSION = "1"

PICKAPIC_HUB = "yuvalkirstain/pickapic_v1"
PICKAPIC_HOW = (
    f"Download the validation_unique split of the Hugging Face data set {PICKAPIC_HUB} "
    "(data/validation_unique-00000-of-00001-*.parquet, 500 rows; only its 'caption' column is read), e.g. "
    f"`huggingface-cli download {PICKAPIC_HUB} --repo-type dataset --include 'data/validation_unique*' "
    "--local-dir DIR`, then pass DIR or set SPOBENCH_DATA so that the file is in $SPOBENCH_DATA/pickapic/."
)
HPSV2_HUB = "zhwang/HPDv2"
HPSV2_STYLES = ("anime", "concept-art", "paintings", "photo")
HPSV2_HOW = (
    f"Download benchmark/anime.json, benchmark/concept-art.json, benchmark/paintings.json and "
    f"benchmark/photo.json from the Hugging Face data set {HPSV2_HUB} (what hpsv2.benchmark_prompts() reads), "
    "into $SPOBENCH_DATA/hpsv2/benchmark/ or a folder you pass."
)
PARTI_HUB = "nateraw/parti-prompts"
PARTI_HOW = (
    "Download PartiPrompts.tsv from github.com/google-research/parti (also on the Hugging Face hub as the "
    f"data set {PARTI_HUB}) into $SPOBENCH_DATA/partiprompts/ or pass its path."
)
PARTI_COLUMNS = ("Prompt", "Category", "Challenge", "Note")
SPO_HOW = (
    "The official SPO list is spo_training_and_inference/assets/prompts/4k_training_prompts.json in "
    "github.com/RockeyCoss/SPO (4000 Pick-a-Pic v1 training captions, each with its trainset_idx); put it in "
    "$SPOBENCH_DATA/spo/ or pass its path."
)

OFFICIAL_SIZES = {"pickapic-validation-unique": 500, "hpsv2-benchmark": 3200, "partiprompts": 1632, "spo-4k": 4000}


class PromptSet(list):
    """A list of prompts that knows its name, version, source and (optionally) per-prompt metadata.

    Slicing gives a plain ``list``; use :meth:`subset` to keep the provenance.
    """

    def __init__(self, prompts: Iterable[str], name: str, source: str, metadata: Sequence[dict] | None = None,
                 version: str | None = None):
        super().__init__(prompts)
        if metadata is not None and len(metadata) != len(self):
            raise ValueError(f"{len(metadata)} metadata rows for {len(self)} prompts")
        self.name = name
        self.source = source
        self.metadata = list(metadata) if metadata is not None else None
        self.version = version or f"{name}/{LOADER_VERSION}+{prompts_sha256(self)[:12]}"

    @property
    def official_size(self) -> int | None:
        return OFFICIAL_SIZES.get(self.name)

    @property
    def is_official_size(self) -> bool:
        """False when the local file holds a different number of prompts than the published set."""
        return self.official_size is None or len(self) == self.official_size

    def info(self) -> dict:
        """What a run should record about the prompts it used."""
        return {"name": self.name, "version": self.version, "source": self.source, "n": len(self),
                "official_size": self.official_size}

    def subset(self, indices: Sequence[int], tag: str) -> PromptSet:
        meta = [self.metadata[i] for i in indices] if self.metadata is not None else None
        return PromptSet([self[i] for i in indices], self.name, self.source, meta,
                         version=f"{self.version}/{tag}")

    def __repr__(self) -> str:
        return f"PromptSet({self.name!r}, n={len(self)}, version={self.version!r}, source={self.source!r})"


def prompts_sha256(prompts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


def data_root() -> Path:
    """Where local data sets live: ``$SPOBENCH_DATA`` or ``~/.cache/spobench/data``."""
    return Path(os.environ.get("SPOBENCH_DATA", Path.home() / ".cache" / "spobench" / "data"))


def sample(prompt_set: PromptSet, n: int, seed: int = 0) -> PromptSet:
    """``n`` prompts drawn without replacement with a fixed seed, kept in their original order (the paper's
    user study uses 100 PartiPrompts and 200 HPSv2 benchmark prompts)."""
    if not 1 <= n <= len(prompt_set):
        raise InputError(f"cannot sample {n} prompts from {prompt_set.name} ({len(prompt_set)} prompts)")
    idx = sorted(random.Random(seed).sample(range(len(prompt_set)), n))
    return prompt_set.subset(idx, f"sample{n}-seed{seed}")


# -- helpers ------------------------------------------------------------------------------------

def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise InputError(f"{path}: not valid UTF-8") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def _missing(what: str, expected: Sequence[Path], how: str) -> InputError:
    where = " or ".join(str(p) for p in expected)
    return InputError(f"{what}: {where} not found. {how}")


# -- Pick-a-Pic v1 validation_unique ------------------------------------------------------------

def _pickapic_files(path: str | Path | None) -> list[Path]:
    if path is not None:
        path = Path(path)
        if path.is_file():
            return [path]
        folders = [path, path / "data", path / "pickapic"]
    else:
        folders = [data_root() / "pickapic", data_root() / "pickapic" / "data"]
    for folder in folders:
        found = sorted(folder.glob("validation_unique*.parquet"))
        if found:
            return found
    raise _missing("Pick-a-Pic validation_unique", [f / "validation_unique*.parquet" for f in folders], PICKAPIC_HOW)


def pickapic_validation_unique(path: str | Path | None = None) -> PromptSet:
    """Pick-a-Pic v1 ``validation_unique`` captions, de-duplicated in order (the paper's 500 validation
    prompts). ``path``: a parquet file or a folder with ``validation_unique*.parquet`` (shards are read
    in name order); default ``$SPOBENCH_DATA/pickapic/``."""
    import pyarrow.parquet as pq

    files = _pickapic_files(path)
    prompts: list[str] = []
    seen: set[str] = set()
    for f in files:
        try:
            schema = pq.read_schema(f)
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError on a broken file
            raise InputError(f"{f}: cannot be read as parquet ({e})") from None
        if "caption" not in schema.names:
            raise InputError(f"{f}: no 'caption' column (columns: {', '.join(schema.names)}); "
                             f"expected a Pick-a-Pic parquet. {PICKAPIC_HOW}")
        column = pq.read_table(f, columns=["caption"]).column("caption").to_pylist()
        for i, caption in enumerate(column):
            if caption is None:
                raise InputError(f"{f}: row {i}: caption is null")
            caption = _clean(caption, f"{f}: row {i}")
            if caption and caption not in seen:
                seen.add(caption)
                prompts.append(caption)
    if not prompts:
        raise InputError(f"{', '.join(map(str, files))}: no captions")
    source = str(files[0]) if len(files) == 1 else f"{files[0].parent}/validation_unique*.parquet ({len(files)} files)"
    return PromptSet(prompts, "pickapic-validation-unique", source)


# -- HPSv2 benchmark ----------------------------------------------------------------------------

def _hpsv2_folder(path: str | Path | None) -> Path:
    if path is not None:
        path = Path(path)
        candidates = [path.parent if path.is_file() else path, path / "benchmark"]
    else:
        candidates = [data_root() / "hpsv2" / "benchmark", data_root() / "hpsv2"]
        hps_root = os.environ.get("HPS_ROOT")  # where the hpsv2 package keeps its downloads
        candidates.append(Path(hps_root or Path.home() / ".cache" / "hpsv2") / "datasets" / "benchmark")
    for folder in candidates:
        if all((folder / f"{s}.json").is_file() for s in HPSV2_STYLES):
            return folder
    first = candidates[0]
    missing = [first / f"{s}.json" for s in HPSV2_STYLES if not (first / f"{s}.json").is_file()]
    raise InputError(f"HPSv2 benchmark: {', '.join(map(str, missing))} not found"
                     + (f" (also looked in {', '.join(map(str, candidates[1:]))})" if len(candidates) > 1 else "")
                     + f". {HPSV2_HOW}")


def hpsv2_benchmark(path: str | Path | None = None, styles: Sequence[str] = HPSV2_STYLES) -> PromptSet:
    """The HPSv2 benchmark prompts: anime, concept-art, paintings, photo (800 each), concatenated in that
    order; ``metadata[i]["style"]`` says which file prompt ``i`` came from (HPSv2 reports a score per
    style). ``path``: the folder of the four JSON lists (or one of the files in it)."""
    bad = [s for s in styles if s not in HPSV2_STYLES]
    if bad or not styles:
        raise InputError(f"HPSv2 benchmark: unknown style(s) {', '.join(bad) or '(none given)'} "
                         f"(choose from {', '.join(HPSV2_STYLES)})")
    folder = _hpsv2_folder(path)
    prompts: list[str] = []
    meta: list[dict] = []
    for style in styles:
        f = folder / f"{style}.json"
        data = _read_json(f)
        if not isinstance(data, list):
            raise InputError(f"{f}: expected a JSON list of prompt strings, got {type(data).__name__}")
        for i, item in enumerate(data):
            prompts.append(_clean(item, f"{f}: item {i}"))
            meta.append({"style": style, "style_index": i})
    name = "hpsv2-benchmark"
    ps = PromptSet(prompts, name, str(folder), meta)
    if tuple(styles) != HPSV2_STYLES:
        ps.version = f"{ps.version}/styles={','.join(styles)}"
    return ps


# -- PartiPrompts -------------------------------------------------------------------------------

def _parti_file(path: str | Path | None) -> Path:
    if path is not None:
        path = Path(path)
        candidates = [path / "PartiPrompts.tsv"] if path.is_dir() else [path]
    else:
        candidates = [data_root() / "partiprompts" / "PartiPrompts.tsv", data_root() / "PartiPrompts.tsv"]
    for c in candidates:
        if c.is_file():
            return c
    raise _missing("PartiPrompts", candidates, PARTI_HOW)


def partiprompts(path: str | Path | None = None) -> PromptSet:
    """PartiPrompts (Yu et al., 2022) in file order, duplicates kept as published; ``metadata[i]`` holds
    ``category``, ``challenge`` and ``note``. The TSV is read raw (tabs only, no quote handling: prompts
    contain double quotes)."""
    f = _parti_file(path)
    try:
        text = f.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{f}: not valid UTF-8") from None
    rows = list(csv.reader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows or tuple(c.strip() for c in rows[0][:4]) != PARTI_COLUMNS:
        got = "\t".join(rows[0]) if rows else "(empty file)"
        raise InputError(f"{f}:1: expected the header {' / '.join(PARTI_COLUMNS)} (tab-separated), got {got!r}")
    prompts: list[str] = []
    meta: list[dict] = []
    for n, row in enumerate(rows[1:], 2):
        if not any(c.strip() for c in row):
            continue
        if len(row) < 3 or len(row) > 4:
            raise InputError(f"{f}:{n}: expected 4 tab-separated columns ({', '.join(PARTI_COLUMNS)}), got {len(row)}")
        prompt = _clean(row[0], f"{f}:{n}")
        if not prompt:
            raise InputError(f"{f}:{n}: empty prompt")
        prompts.append(prompt)
        meta.append({"category": row[1].strip(), "challenge": row[2].strip(),
                     "note": row[3].strip() if len(row) > 3 else ""})
    if not prompts:
        raise InputError(f"{f}: no prompts in file")
    return PromptSet(prompts, "partiprompts", str(f), meta)


# -- the official SPO 4k training list ----------------------------------------------------------

def spo_training_prompts(path: str | Path | None = None) -> PromptSet:
    """The official SPO training prompt list: a JSON list of ``{"caption", "trainset_idx"}`` (what
    SPO's ``PromptDataset`` reads), in file order, duplicates kept; ``metadata[i]["trainset_idx"]`` is the
    row of Pick-a-Pic v1's train split the caption came from."""
    if path is None:
        f = data_root() / "spo" / "4k_training_prompts.json"
    else:
        f = Path(path)
        if f.is_dir():
            f = f / "4k_training_prompts.json"
    if not f.is_file():
        raise _missing("SPO training prompts", [f], SPO_HOW)
    data = _read_json(f)
    if not isinstance(data, list):
        raise InputError(f"{f}: expected a JSON list of {{\"caption\", \"trainset_idx\"}} objects")
    prompts: list[str] = []
    meta: list[dict] = []
    for i, item in enumerate(data):
        if not isinstance(item, dict) or "caption" not in item:
            raise InputError(f"{f}: item {i}: expected an object with a \"caption\" (and \"trainset_idx\")")
        idx = item.get("trainset_idx")
        if idx is not None and (isinstance(idx, bool) or not isinstance(idx, int)):
            raise InputError(f"{f}: item {i}: trainset_idx must be an integer, got {idx!r}")
        caption = _clean(item["caption"], f"{f}: item {i}")
        if not caption:
            raise InputError(f"{f}: item {i}: empty caption")
        prompts.append(caption)
        meta.append({"trainset_idx": idx})
    if not prompts:
        raise InputError(f"{f}: no prompts in file")
    return PromptSet(prompts, "spo-4k", str(f), meta)
