"""What a recipe may name: plain names, paths confined to the run's roots, hub ids, model sources.

Each check returns what is wrong with a value (None when it is fine), so that the schema
(:mod:`spobench.reproduce.schema`, as ``setting(check=...)``) and the loader name the field.
Paths may start with ``{weights}`` (metric weights root, ``$SPOBENCH_WEIGHTS``), ``{data}``
(``$SPOBENCH_DATA``), ``{run}`` or ``{assets}`` (models shipped in the package); any other path is
relative to the run directory and may not leave it (no absolute paths, no ``..``, no ``~``).
"""

from __future__ import annotations

import re
from pathlib import Path

from spobench import ASSETS
from spobench.core.errors import InputError

ROOTS = ("{weights}", "{data}", "{run}", "{assets}")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_PATHLIKE_SUFFIXES = (".txt", ".json", ".jsonl", ".parquet", ".toml", ".safetensors")
# a Hugging Face repo id: [owner/]name, letters, digits, '-', '_', '.' (the hub's own rule, without '--'/'..')
_HUB_ID = re.compile(r"^(?!.*(\.\.|--))[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
                     r"(?:/[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?)?$")


def name_problem(value: str) -> str | None:
    if not _NAME.match(value) or ".." in value:
        return (f"{value!r} is not a plain name (letters, digits, '_', '-', '.'; it becomes a folder name under "
                "the run directory)")
    return None


def path_problem(value: str) -> str | None:
    """A recipe path: ``{weights}/...``, ``{data}/...``, ``{run}/...`` or relative to the run directory,
    never absolute, never with ``..`` or ``~`` (a recipe cannot reach outside its roots)."""
    rest = value
    for root in ROOTS:
        if value.startswith(root):
            rest = value[len(root):]
            if rest and not rest.startswith("/"):
                return f"{value!r}: expected {root}/<path>"
            rest = rest.lstrip("/")
            break
    else:
        if "{" in value or "}" in value:
            return f"{value!r}: unknown placeholder (known: {', '.join(ROOTS)})"
    p = rest.replace("\\", "/")
    if value.startswith("/") or value.startswith("~") or re.match(r"^[A-Za-z]:", value):
        return (f"{value!r}: absolute paths are not allowed in recipes; use {{weights}}/..., {{data}}/... or a "
                "path inside the run directory")
    if any(part == ".." for part in p.split("/")):
        return f"{value!r}: paths in recipes cannot escape the run directory ('..')"
    return None


def hub_id_problem(value: str) -> str | None:
    """``hub:<id>`` must be a hub id and nothing else: the model loaders take any existing folder
    for a source, so ``hub:/abs/path`` or ``hub:../x`` would read outside the recipe's roots, and an id
    that is also a folder in the current directory would load that folder instead of the hub's."""
    hub_id = value.removeprefix("hub:")
    if not _HUB_ID.match(hub_id):
        return (f"{value!r}: not a hub id (expected hub:<owner>/<name>, e.g. hub:runwayml/stable-diffusion-v1-5; "
                "folders are written as paths)")
    if Path(hub_id).exists():
        return (f"{value!r}: {Path(hub_id).resolve()} exists in the current directory and would be loaded instead "
                "of the hub model; run from another directory")
    return None


def model_problem(value: str) -> str | None:
    """A recipe's ``model``: default, hub:<id>, random:<seed> or a recipe path."""
    if value == "default":
        return None
    if value.startswith("hub:"):
        return hub_id_problem(value)
    if value.startswith("random:"):
        if not value.removeprefix("random:").isdigit():
            return f"{value!r}: expected random:<seed> (a non-negative integer)"
        return None
    return path_problem(value)


def source_problem(value: str) -> str | None:
    """An external cell's ``unet``/``vae``/``lora``: ``hub:<id>`` or a recipe path."""
    return hub_id_problem(value) if value.startswith("hub:") else path_problem(value)


def is_pathlike(value: str) -> bool:
    return ("/" in value or "\\" in value or value.startswith((".", "~", "{")) or value.endswith(_PATHLIKE_SUFFIXES)
            or Path(value).is_absolute())


def resolve_path(value: str, run_dir: Path) -> Path:
    """A checked recipe path as a real path (relative paths are inside ``run_dir``)."""
    from spobench.data.prompt_sets import data_root
    from spobench.metrics.base import weights_root

    roots = {"{weights}": weights_root(), "{data}": data_root(), "{run}": Path(run_dir),
             "{assets}": ASSETS}  # models shipped in the package
    for root, base in roots.items():
        if value.startswith(root):
            rest = value[len(root):].lstrip("/")
            return base / rest if rest else base
    run_dir = Path(run_dir).resolve()
    p = (run_dir / value).resolve()
    if p != run_dir and run_dir not in p.parents:  # a symlink inside the run dir pointing out of it
        raise InputError(f"{value!r} resolves to {p}, outside the run directory {run_dir}")
    return p
