"""Files that survive a crash: atomic writes (temp file + fsync + rename), atomic directories,
JSONL manifests, and the provenance every output records (package versions, git hash)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator[Any]:
    """Open a temp file beside ``path``; on success fsync and rename over it, on error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        _raise_if_disk_full(e, path)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp directory beside ``path``; on success it replaces ``path`` (old one removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_if_disk_full(e, path)
        raise


DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


def _raise_if_disk_full(err: BaseException, path: Path) -> None:
    """A full disk is the user's to fix: one line naming the file or folder being written (whose
    temp file is already gone; a file inside an ``atomic_dir`` is reported as the folder)."""
    from spobench.errors import OutputError

    cause = err.__cause__ if isinstance(err, OutputError) else err
    if isinstance(cause, OSError) and cause.errno in DISK_FULL:
        raise OutputError(f"{path}: cannot write it: {os.strerror(cause.errno)}; nothing partial was left "
                          "behind; free some space and run again (--resume continues a run)") from cause


@contextlib.contextmanager
def removed_on_error(path: str | Path, *, fresh: bool | None = None, keep=None, enabled: bool = True) -> Iterator[None]:
    """Around the part of a command that writes the run folder ``path``: when the block raises a
    ``SpobenchError`` (bad input found late, non-finite loss, full disk...) and the run is fresh
    (``fresh``; None: ``path`` is absent or empty when the block begins, and is then left so), what
    the block wrote is removed, so a failed fresh run leaves no partial output behind. ``keep()``
    true (e.g. a checkpoint was written) keeps it for ``--resume``."""
    from spobench.errors import SpobenchError

    path = Path(path)
    was_empty_dir = path.is_dir() and not any(path.iterdir())
    if fresh is None:
        fresh = not path.exists() or was_empty_dir
    try:
        yield
    except SpobenchError:
        if enabled and fresh and path.is_dir() and not (keep is not None and keep()):
            shutil.rmtree(path, ignore_errors=True)
            if was_empty_dir:
                path.mkdir(exist_ok=True)
        raise


@lru_cache(maxsize=1)
def git_hash() -> str | None:
    """The commit of the spobench checkout, with '+dirty' when it has uncommitted changes."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("spobench", "torch", "diffusers", "transformers", "peft", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def cpu_name() -> str:
    """The CPU's model name (for benchmark records)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def provenance() -> dict[str, Any]:
    return {"git": git_hash(), "versions": package_versions()}
