"""The image manifest: ``manifest.jsonl`` beside the PNGs, one JSON object a line, one line an image.

``spobench generate`` writes it (and reads it back to ``--resume``), ``spobench eval`` scores what it
lists, the reproduce runner counts it and the report draws its grids from it: all through
:func:`read_manifest` / :func:`write_manifest`. A row holds at least

=================  ==================  ===================================================
field              type                meaning
=================  ==================  ===================================================
``index``          int >= 0            the image's number in the run (unique)
``file``           str                 its path inside the folder (unique, never outside it)
``prompt``         str                 the prompt it was made from
``prompt_index``   int >= 0, optional  the prompt's number (images of one prompt share it)
``seed``           int or null, opt.   the seed of its generator
=================  ==================  ===================================================

plus whatever made the image (sampler, backbone, LoRA, provenance): ``--resume`` compares those.
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path
from typing import Iterable

from spobench.core.errors import InputError
from spobench.core.io import atomic_write_text

MANIFEST = "manifest.jsonl"

_FIELDS = (("index", int, True), ("file", str, True), ("prompt", str, True),
           ("prompt_index", int, False), ("seed", (int, type(None)), False))


def read_manifest(folder: str | Path) -> list[dict]:
    """The rows of ``folder/manifest.jsonl`` ([] when there is none), each checked: one JSON object per
    line with the fields above, no index or file twice, and every file inside ``folder`` once symlinks
    are resolved (a manifest cannot make eval score, or generate skip, a file elsewhere). Errors name
    the line."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists() and not path.is_symlink():
        return []
    try:
        text = path.read_bytes().decode("utf-8")
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, not a manifest file") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not valid UTF-8 (a manifest is JSON lines)") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read it: {e.strerror}") from None
    root = folder.resolve()
    rows, where = [], {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: corrupt manifest line ({e.msg})") from None
        except RecursionError:
            raise InputError(f"{path}:{n}: corrupt manifest line (nested too deeply)") from None
        _check_row(row, f"{path}:{n}", root)
        for key, value in (("index", row["index"]), ("file", posixpath.normpath(row["file"]))):  # ./a.png is a.png
            if (key, value) in where:
                raise InputError(f"{path}:{n}: {key} {row[key]!r} is already on line {where[key, value]}")
            where[key, value] = n
        rows.append(row)
    return rows


def write_manifest(folder: str | Path, rows: Iterable[dict]) -> None:
    """Write ``rows`` as ``folder/manifest.jsonl`` in index order, atomically: a killed run leaves the
    previous manifest whole, never half of a new one."""
    rows = sorted(rows, key=lambda r: r["index"])
    atomic_write_text(Path(folder) / MANIFEST, "".join(json.dumps(r) + "\n" for r in rows))


def _check_row(row, at: str, root: Path) -> None:
    if not isinstance(row, dict):
        raise InputError(f"{at}: a manifest line must be a JSON object, got {type(row).__name__}")
    for key, kinds, need in _FIELDS:
        if key not in row:
            if need:
                raise InputError(f"{at}: missing field {key!r}")
            continue
        if isinstance(row[key], bool) or not isinstance(row[key], kinds):
            want = {int: "an integer", str: "a string"}.get(kinds, "an integer or null")
            raise InputError(f"{at}: field {key!r} must be {want}, got {json.dumps(row[key])[:60]}")
    if row["index"] < 0 or row.get("prompt_index", 0) < 0:
        raise InputError(f"{at}: index and prompt_index must be >= 0")
    file = row["file"]
    try:
        target = (root / file).resolve()
    except (OSError, ValueError, RuntimeError) as e:  # a NUL byte, a symlink loop
        raise InputError(f"{at}: file {file!r} is not a usable path ({e})") from None
    if not file.strip() or target == root:
        raise InputError(f"{at}: file {file!r} does not name a file in {root}")
    if not target.is_relative_to(root):
        raise InputError(f"{at}: file {file!r} resolves to {target}, outside {root} (manifest paths must stay "
                         "inside the folder)")
