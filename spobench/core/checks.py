"""Numbers and devices a user gives, checked in one place: trainer settings, recipe fields, the
preference-model trainers' configs and command-line options all say what is wrong the same way.

Why a module of its own: NaN passes every range check written as ``v < low`` (comparisons with NaN
are false), so each range check is also a finiteness check, and the two must not drift apart.
Imports no torch until a device has to be looked up."""

from __future__ import annotations

import math
import re
from typing import Any

from spobench.core.errors import InputError

SEED_MAX = 2**63 - 1  # torch generators take 64 bits (image n of a run uses seed + n); numpy's SeedSequence any


def number_problem(value: Any, *, min: float | None = None, max: float | None = None, gt: float | None = None,
                   lt: float | None = None, finite: bool = True) -> str | None:
    """What is wrong with ``value`` as a number in the given bounds (``min``/``max`` inclusive,
    ``gt``/``lt`` exclusive), e.g. ``"must be > 0 (got nan)"``; None when it is fine. Anything that
    is not an int or float (None, strings, bools) is left to the type checks."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if finite and isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number (got {value!r})"
    for bound, bad, word in ((min, lambda b: value < b, ">="), (max, lambda b: value > b, "<="),
                             (gt, lambda b: value <= b, ">"), (lt, lambda b: value >= b, "<")):
        if bound is not None and bad(bound):
            return f"must be {word} {bound} (got {value!r})"
    return None


def check_number(label: str, value: Any, **bounds) -> Any:
    """``value``, or an InputError ``"<label> must be ..."`` (``label`` names the field or flag)."""
    problem = number_problem(value, **bounds)
    if problem:
        raise InputError(f"{label} {problem}")
    return value


_DEVICE = re.compile(r"^(cpu|cuda|mps)(:(\d+))?$")


def parse_device(text: str, label: str = "--device", *, allow_auto: bool = False) -> str:
    """A torch device string the machine has: ``cpu``, ``cuda``, ``cuda:N``, ``mps`` (and ``auto``
    where a command picks one itself). Refused up front, because torch fails deep inside the first
    ``.to()`` with a multi-line error (or loads everything before saying CUDA is absent)."""
    text = str(text).strip()
    if allow_auto and text == "auto":
        return text
    m = _DEVICE.match(text)
    known = "auto, cpu, cuda, cuda:N, mps" if allow_auto else "cpu, cuda, cuda:N, mps"
    if not m:
        raise InputError(f"{label} {text!r}: not a device (expected one of {known})")
    kind, index = m.group(1), m.group(3)
    if kind == "cpu":
        if index not in (None, "0"):
            raise InputError(f"{label} {text!r}: there is one CPU device (cpu)")
        return text
    import torch

    if kind == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{label} {text!r}: CUDA is not available on this machine (torch "
                             f"{torch.__version__}, {'built without CUDA' if torch.version.cuda is None else 'no GPU found'}); "
                             "use --device cpu")
        n = torch.cuda.device_count()
        if index is not None and int(index) >= n:
            raise InputError(f"{label} {text!r}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
        return text
    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_available():
        raise InputError(f"{label} {text!r}: MPS is not available on this machine; use --device cpu")
    return text


TINY_CLIP_IMAGE = 32  # the tiny world's images (spobench.toyworld.render); CLIP's vision tower sees them whole
TINY_CLIP_HEADS = 4  # `spobench toy clip` and the toy PickScore's random CLIP


def tiny_clip_problem(*, hidden: int, patch: int, image_size: int = TINY_CLIP_IMAGE,
                      heads: int = TINY_CLIP_HEADS) -> list[tuple[str, str]]:
    """(field, what is wrong) for a tiny CLIP's shape: transformers builds any shape, but a patch
    that does not tile the image drops pixels (or, larger than it, leaves no patch at all) and a width
    that the heads do not divide fails at the first forward, long after the folder was written."""
    out = []
    if patch > image_size or image_size % patch:
        out.append(("patch", f"must divide the image size {image_size} (got {patch})"))
    if hidden % heads:
        out.append(("hidden", f"must be a multiple of the {heads} attention heads (got {hidden})"))
    return out
