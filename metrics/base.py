"""The metric interface every plugin implements, and where metric weights are looked up.

A metric scores a batch of PIL images against their prompts and returns one number per image
(plus, for GenEval-style metrics, a tag per image so that per-tag accuracy can be reported).
A metric whose weights are not on disk raises :class:`MissingWeightsError` naming the files and
where to put them; it never returns a made-up number.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np

from spobench.errors import MissingWeightsError


@dataclass
class MetricOutput:
    scores: np.ndarray  # (N,) one score per image; higher is better
    tags: list[str] | None = None  # (N,) category per image, for per-tag means (GenEval)
    details: list[dict] | None = None  # (N,) anything worth keeping per image


@dataclass
class MetricId:
    name: str
    version: str
    checkpoint_sha256: str | None = None
    options: dict = field(default_factory=dict)

    def key(self) -> str:
        """Cache key part: a score is reusable only for the same metric, version and checkpoint."""
        return f"{self.name}@{self.version}#{(self.checkpoint_sha256 or '')[:16]}"


class Metric:
    """Base class. Subclasses set ``name``/``version`` and implement ``load`` and ``score``."""

    name: ClassVar[str] = "base"
    version: ClassVar[str] = "1"
    needs_prompt: ClassVar[bool] = True
    higher_is_better: ClassVar[bool] = True

    def __init__(self, weights: str | Path | None = None, device: str = "cpu", batch_size: int = 16, **options):
        self.weights = weights
        self.device = device
        self.batch_size = batch_size
        self.options = options
        self.checkpoint_sha256: str | None = None

    def score(self, images: Sequence, prompts: Sequence[str], metadata: Sequence[dict] | None = None) -> MetricOutput:
        raise NotImplementedError

    def identity(self) -> MetricId:
        return MetricId(self.name, self.version, self.checkpoint_sha256, dict(self.options))


def weights_root() -> Path:
    """Where metric weights live: ``$SPOBENCH_WEIGHTS`` or ``~/.cache/spobench/weights``."""
    return Path(os.environ.get("SPOBENCH_WEIGHTS", Path.home() / ".cache" / "spobench" / "weights"))


def find_weights(metric: str, given: str | Path | None, files: Sequence[str], how_to_get: str) -> Path:
    """Return the folder holding ``files`` for ``metric`` or raise naming what is missing.

    ``given`` is the user's ``--weights`` path (a folder, or a file whose folder is used);
    otherwise ``weights_root()/metric`` is tried.
    """
    folder = Path(given) if given else weights_root() / metric
    if folder.is_file():
        folder = folder.parent
    missing = [f for f in files if not (folder / f).exists()]
    if missing:
        raise MissingWeightsError(
            f"metric {metric!r} needs {', '.join(missing)} in {folder} (not found). {how_to_get} "
            f"Put the files there or pass --weights DIR (or set SPOBENCH_WEIGHTS)."
        )
    return folder


def sha256_of(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
