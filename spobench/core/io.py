"""Files that survive a crash: atomic writes (temp file + fsync + rename), atomic directories,
JSONL manifests, and the provenance every output records (package versions, git hash)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

from spobench.core.errors import InputError


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator[Any]:
    """Open a temp file beside ``path``; on success fsync and rename over it, on error remove it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _output_error(e, path, None) from e
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        _reraise_as_output_error(e, path, tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp directory beside ``path``; on success it replaces ``path`` (old one removed).
    A killed process leaves ``.NAME.xxxxxxxx.tmp`` (or ``.NAME.old``) behind: ``spobench.core.outdir``
    removes those when the run folder is next claimed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise _output_error(e, path, None) from e
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
        _reraise_as_output_error(e, path, tmp)
        raise


DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


def _output_error(err: OSError, path: Path, tmp) -> Exception:
    """An OSError while writing ``path`` (full disk, read-only file system, a folder where the file
    goes...) as one line naming ``path``; the temp file it happened in is already gone."""
    from spobench.core.errors import OutputError

    if err.errno in DISK_FULL:
        return OutputError(f"{path}: cannot write it: {os.strerror(err.errno)}; nothing partial was left "
                           "behind; free some space and run again (--resume continues a run)")
    name = str(err.filename) if err.filename else str(path)
    if tmp is not None and name.startswith(str(tmp)):  # a file inside the temp (or the temp): its final name
        name = str(path) + name[len(str(tmp)):]
    name = _TEMP_NAME.sub(r"\1", name)
    if isinstance(err, (FileExistsError, NotADirectoryError)) and name != str(path) and Path(name).is_file():
        return OutputError(f"{path}: cannot write it: {name} is a file, not a folder")
    what = f" ({name})" if name != str(path) else ""
    return OutputError(f"{path}: cannot write it{what}: {err.strerror or err}")


_TEMP_NAME = re.compile(r"\.([^/]+)\.[A-Za-z0-9_]{8}\.tmp(?=/|$)")


def _reraise_as_output_error(err: BaseException, path: Path, tmp) -> None:
    """An OSError in a writer - or one an inner writer already turned into an OutputError about its
    temp path - is raised again naming the outer ``path``."""
    from spobench.core.errors import OutputError

    cause = err if isinstance(err, OSError) else err.__cause__ if isinstance(err, OutputError) else None
    if isinstance(cause, OSError):
        raise _output_error(cause, path, tmp) from cause


def save_torch(path: str | Path, obj: Any) -> None:
    """``torch.save`` through :func:`atomic_file`: given a path, torch reports a full disk as a
    RuntimeError from its C++ writer; given a file object the OSError comes through."""
    import torch

    with atomic_file(path) as f:
        torch.save(obj, f)


def read_json_object(path: str | Path, what: str = "") -> dict:
    """A JSON file holding one object (a config, a summary); anything else is one line naming the file."""
    path = Path(path)
    label = f"corrupt {what}" if what else "corrupt"
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: {label} ({getattr(e, 'msg', None) or e})") from None
    if not isinstance(value, dict):
        raise InputError(f"{path}: {label} (expected a JSON object)")
    return value


def canonical_safetensors(blob: bytes) -> bytes:
    """The same safetensors file with its JSON header sorted and compact, so that the same tensors
    and metadata always give the same bytes: safetensors' writer orders the ``__metadata__`` keys by
    a per-process hash, and two identical runs gave LoRA files with different sha256. The data
    bytes are untouched (layout per the safetensors format: a little-endian u64 header length, the
    JSON header padded with spaces to a multiple of 8, then the data)."""
    import struct

    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + blob[8 + n:]


def write_safetensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` atomically, in :func:`canonical_safetensors` form."""
    from safetensors.torch import save

    blob = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    with atomic_file(path) as f:
        f.write(canonical_safetensors(blob))


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
