"""The bad-input contract every tests/robustness case asserts: exit code != 0, ONE error line naming the
offending input, no traceback, and the --out folder absent afterwards or unchanged."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

NOISE = re.compile(r"\d+%\||it/s\]|^\s*$|rounds\s|^pairs: ")  # progress bars and info lines on stderr


def snapshot(path: Path):
    """Everything under ``path`` (names and contents); None when it does not exist."""
    if not path.exists():
        return None
    if path.is_file():
        return hashlib.sha1(path.read_bytes()).hexdigest()
    return {str(p.relative_to(path)): (hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(path.rglob("*"))}


def assert_clean_failure(code: int, stderr: str, names, out: Path | None, before) -> str:
    """The catalogue's contract; returns the error line."""
    assert code not in (0, None), stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [ln for ln in re.split(r"[\r\n]", stderr) if not NOISE.search(ln) and "torchvision" not in ln]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr[-2000:]  # one line, the last word
    for name in names:
        assert str(name) in errors[0], (name, errors[0])
    if out is not None:
        assert snapshot(out) == before, f"{out} was left changed: {snapshot(out)}"
    return errors[0]
