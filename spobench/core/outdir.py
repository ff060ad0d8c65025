"""The one way a command claims its ``--out`` folder (train, generate, reproduce, train-spm, toy ...).

* **Check before work** (:func:`check`, reads only): the folder must be absent, empty, resumed
  (``--resume``) or replaced (``--overwrite``); its location must be writable (not under a file, not
  read-only). ``--overwrite`` replaces only a folder that spobench made: one holding the marker
  file :data:`MARKER` that :func:`claim` writes (what made it, when). Anything else - ``.`` with a
  user's files, ``$HOME`` - is refused with one line, never emptied. What ``--resume`` may continue
  differs per command and is said by parameters, not by a second guard: ``needs`` (reproduce: a
  folder holding its ``plan.json``), ``results`` (train: no restart over a finished run's LoRA).
* **A lock for the whole run** (:func:`claim`): ``fcntl.flock`` on the folder itself, non-blocking,
  so a second process on the same ``--out`` stops at once with one line instead of mixing its files
  with the first one's. flock rather than an O_EXCL pid file: the kernel drops the lock when its
  holder dies, so a SIGKILLed run leaves no stale lock to block ``--resume``, and locking the
  folder (not a file in it) adds no file that a failed run would leave behind.
* **Undo what a failed fresh run wrote** (``--overwrite`` included: the replaced run comes back): an error (a ``SpobenchError`` or an ``OSError``, which
  becomes one line naming the file) inside the claim removes a fresh run's folder again, unless
  ``keep()`` says it is worth resuming (a checkpoint exists). A resumed or kept folder keeps what it
  had; only a marker added by this run is taken back.
* **Stale temp files** that a killed atomic write left (``.NAME.xxxxxxxx.tmp``, ``.NAME.old``, see
  :mod:`spobench.core.io`) are removed when the folder is claimed: under the lock no writer can own them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from spobench.core.errors import InputError, OutputError, SpobenchError

MARKER = ".spobench-out.json"
REPLACED = ".spobench-replaced.old"  # what --overwrite set aside until the new run stands (a stale temp if killed)
_TEMP = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$|^\..+\.old$")  # io.atomic_file / atomic_dir leftovers


def is_temp(name: str) -> bool:
    """A name :mod:`spobench.core.io`'s atomic writers give their temp files and folders."""
    return bool(_TEMP.match(name))


def is_marked(out: Path) -> bool:
    return (Path(out) / MARKER).is_file()


def entries(out: Path) -> list[Path]:
    """What the folder holds besides spobench's marker (empty when absent)."""
    out = Path(out)
    if not out.is_dir():
        return []
    return [p for p in out.iterdir() if p.name != MARKER]


def _writable_location(out: Path) -> None:
    """``out`` can be created or written: the nearest existing ancestor is a writable folder."""
    if out.exists():
        if not os.access(out, os.W_OK | (os.X_OK if out.is_dir() else 0)):
            raise OutputError(f"{out}: cannot write it ({_why(out)})")
        return
    anc = out.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise OutputError(f"{out}: cannot create it: {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: cannot create it: {anc} is not writable ({_why(anc)})")


def _why(path: Path) -> str:
    try:
        st = os.statvfs(path)
        if st.f_flag & os.ST_RDONLY:
            return os.strerror(errno.EROFS)
    except OSError:
        pass
    return os.strerror(errno.EACCES)


def _dangerous(out: Path) -> bool:
    """Folders never replaced, marker or not: the file-system root and the user's home."""
    try:
        real = out.resolve()
    except OSError:
        return True
    return real == Path(real.anchor) or real == Path.home().resolve()


def check(out: str | Path, *, resume: bool = False, overwrite: bool = False, resumable: bool = True,
          how: str | None = None, needs: str | None = None, command: str | None = None,
          results: Sequence[str] = ()) -> None:
    """Refuse an ``--out`` this command may not write (reads only; call before minutes of loading).

    ``resumable``: the command has a ``--resume`` (the error message offers it); ``how``: what the
    message about a non-empty folder tells the user to do instead. What a ``--resume`` may continue:

    * ``needs`` (reproduce: ``plan.json``): a file every folder of ``command`` holds; a non-empty
      folder without it is another command's, and continuing in it would mix two runs' files.
    * ``results`` (train: ``summary.json``, ``lora``): what a finished run leaves. The command resumes
      from :mod:`spobench.core.checkpoint` checkpoints; with no complete one left it would start over,
      so a folder that holds a finished run's results or once held checkpoints is refused (starting
      over would delete its log and replace its LoRA). One with no checkpoint ever (killed before
      its first) starts over: the same rounds are redone identically."""
    out = Path(out)
    if resume and overwrite:
        raise InputError("give only one of --resume and --overwrite")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    _writable_location(out)
    if not entries(out):
        return
    if overwrite:
        if _dangerous(out) or not is_marked(out):
            raise InputError(f"{out}: --overwrite refused: this folder was not made by spobench (it has no {MARKER}),"
                             " so nothing in it is deleted; empty it yourself or choose another --out")
        return
    if not resume:
        how = how or ("pass --resume or --overwrite (continue it, or replace it)" if resumable else
                      "pass --overwrite to replace it")
        raise InputError(f"{out}: output folder exists and is not empty; {how}")
    if needs is not None and not (out / needs).exists():
        raise InputError(f"{out}: not a `spobench {command}` run folder (no {needs}); choose another --out")
    if results:
        _check_restart(out, results)


def _check_restart(out: Path, results: Sequence[str]) -> None:
    from spobench.core.checkpoint import CHECKPOINTS, latest_checkpoint

    if latest_checkpoint(out) is not None:
        return
    ckpts = out / CHECKPOINTS
    held = [p.name for p in (out / r for r in results) if p.exists()]
    if ckpts.is_dir() and any(not is_temp(p.name) for p in ckpts.iterdir()):
        held.append(f"{CHECKPOINTS}/ without a complete checkpoint")
    if held:
        raise InputError(f"{out}: --resume cannot continue this run: it has no complete checkpoint in "
                         f"{ckpts} (it holds {', '.join(held)}); starting over would replace them; "
                         "pass --overwrite to start again, or choose another --out")


def remove_stale_temps(root: str | Path) -> list[Path]:
    """Delete what killed atomic writes left anywhere under ``root`` (call with the lock held)."""
    stale = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            if _TEMP.match(name):
                stale.append(Path(dirpath) / name)
        dirnames[:] = [d for d in dirnames if not _TEMP.match(d)]
    for p in stale:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    return stale


@dataclass
class Claim:
    """A claimed ``--out``: the folder, whether this run started it afresh, and the lock's fd."""

    path: Path
    fresh: bool
    fd: int
    depth: int = 1


_HELD: dict[tuple[int, int], Claim] = {}  # (st_dev, st_ino) -> claim: nested claims in one process share it


def _lock(out: Path) -> int:
    fd = os.open(out, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        made = ""
        with contextlib.suppress(OSError, ValueError, AttributeError):
            made = f" (`{json.loads((out / MARKER).read_text())['command']}`)"
        raise OutputError(f"{out}: another spobench process{made} is writing this folder (it holds its lock); "
                          "wait for it to finish or choose another --out") from None
    st = os.stat(out)
    if (st.st_dev, st.st_ino) != (os.fstat(fd).st_dev, os.fstat(fd).st_ino):  # replaced while we locked it
        os.close(fd)
        raise OutputError(f"{out}: the folder was replaced while this run was locking it; run again")
    return fd


def write_marker(out: Path, command: str) -> None:
    from spobench.core.io import atomic_write_json

    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("spobench")
    except PackageNotFoundError:
        v = None
    atomic_write_json(out / MARKER, {"made_by": "spobench", "version": v, "command": command,
                                     "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def _as_output_error(err: OSError, out: Path) -> OutputError:
    from spobench.core.io import DISK_FULL

    name = err.filename or out
    tail = "; nothing partial was left behind; free some space and run again (--resume continues a run)" \
        if err.errno in DISK_FULL else ""
    return OutputError(f"{name}: {err.strerror or err}{tail}")


@contextlib.contextmanager
def claim(out: str | Path, *, command: str, resume: bool = False, overwrite: bool = False, resumable: bool = True,
          how: str | None = None, keep: Callable[[], bool] | None = None,
          enabled: bool = True) -> Iterator[Claim | None]:
    """Check, create and lock ``out`` for the block; empty it for ``overwrite``; mark it as spobench's.

    On an error in the block a fresh run's folder is removed again (an absent folder stays absent,
    an empty one stays empty) unless ``keep()``; an ``OSError`` leaves as one-line ``OutputError``.
    ``enabled=False`` (a non-main process of a multi-process run) does nothing."""
    if not enabled:
        yield None
        return
    out = Path(out)
    if out.is_dir():
        st = os.stat(out)
        held = _HELD.get((st.st_dev, st.st_ino))
        if held is not None:  # this process claimed it already (reproduce -> train, cli -> library)
            held.depth += 1
            try:
                yield held
            finally:
                held.depth -= 1
            return
    check(out, resume=resume, overwrite=overwrite, resumable=resumable, how=how)
    top = out  # the topmost folder this call creates (removed again when a fresh run fails)
    while not top.parent.exists() and top.parent != top.parent.parent:
        top = top.parent
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            out.mkdir()
            created = True
        except FileExistsError:
            created = False
            top = out
    except OSError as e:
        raise _as_output_error(e, out) from None
    try:
        fd = _lock(out)
    except OutputError:
        if created:  # ours and empty: another process locked it the moment after we made it
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino)
    added_marker = moved = False
    aside = out / REPLACED
    c = Claim(out, fresh=True, fd=fd)
    try:
        try:
            check(out, resume=resume, overwrite=overwrite, resumable=resumable, how=how)  # again, under the lock
            c.fresh = created or overwrite or not entries(out)
            remove_stale_temps(out)
            if overwrite and any(out.iterdir()):  # set aside, not deleted: a run that fails gets it back
                aside.mkdir()
                moved = True
                for p in list(out.iterdir()):
                    if p != aside:
                        os.rename(p, aside / p.name)
            if not is_marked(out):
                write_marker(out, command)
                added_marker = True
        except BaseException:  # undo only this call's own steps: what is in the folder may be another run's
            if added_marker:
                (out / MARKER).unlink(missing_ok=True)
            if moved:
                _put_back(out, aside)
            if created:
                shutil.rmtree(top, ignore_errors=True)
            raise
        _HELD[key] = c
        try:
            yield c
        except (SpobenchError, OSError) as e:
            if c.fresh and not (keep is not None and _safe(keep)):
                if created:
                    shutil.rmtree(top, ignore_errors=True)
                else:  # it was empty, or its old contents are aside: only this run's files are removed
                    _put_back(out, aside)
            elif added_marker and not c.fresh:
                (out / MARKER).unlink(missing_ok=True)
            if isinstance(e, OSError) and not isinstance(e, SpobenchError):
                raise _as_output_error(e, out) from e
            raise
        finally:
            _HELD.pop(key, None)
            if moved:  # the replaced run, once the new one stands (or it is back)
                shutil.rmtree(aside, ignore_errors=True)
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _put_back(out: Path, aside: Path) -> None:
    """Remove what this run wrote in ``out`` and move back what ``--overwrite`` set aside."""
    with contextlib.suppress(OSError):
        for p in list(out.iterdir()):
            if p == aside:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        if aside.is_dir():
            for p in list(aside.iterdir()):
                os.rename(p, out / p.name)
            aside.rmdir()


def _safe(keep: Callable[[], bool]) -> bool:
    try:
        return bool(keep())
    except OSError:
        return False


def check_file(path: str | Path, flag: str = "--out") -> None:
    """An output FILE (``eval-spm --out x.json``) that can be written: not a folder, not under a
    file, in a writable folder. Call it before the work whose result it receives."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{flag} {path}: is a folder; give a file name (e.g. {path / 'result.json'})")
    _writable_location(path)
