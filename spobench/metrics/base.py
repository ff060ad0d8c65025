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
from typing import ClassVar, Iterator, Sequence

import numpy as np

from spobench.core.config import Config, Source, parse_sets
from spobench.core.errors import InputError, MissingWeightsError


@dataclass
class MetricOutput:
    scores: np.ndarray  # (N,) one score per image; better is the metric's ``higher_is_better`` direction
    tags: list[str] | None = None  # (N,) category per image, for per-tag means (GenEval)
    details: list[dict] | None = None  # (N,) anything worth keeping per image


@dataclass
class MetricId:
    name: str
    version: str
    checkpoint_sha256: str | None = None
    options: dict = field(default_factory=dict)
    # the direction travels with the scores (results.json) so that compare and the report need no metric code
    higher_is_better: bool = True

    def key(self) -> str:
        """Cache key part: a score is reusable only for the same metric, version and checkpoint."""
        return f"{self.name}@{self.version}#{(self.checkpoint_sha256 or '')[:16]}"


class Metric:
    """Base class. Subclasses set ``name``/``version`` and implement ``load`` and ``score``."""

    name: ClassVar[str] = "base"
    version: ClassVar[str] = "1"
    needs_prompt: ClassVar[bool] = True
    # False for a loss-like metric (a distance, an error rate): compare counts the lower score as the win
    higher_is_better: ClassVar[bool] = True
    # the options a user may give (``spobench eval --option NAME.KEY=VALUE``), declared with ``setting(...)``;
    # None: the metric takes none
    Options: ClassVar[type[Config] | None] = None

    @classmethod
    def parse_options(cls, texts: dict[str, str]) -> dict:
        """``{key: text}`` from ``--option NAME.KEY=VALUE`` -> the constructor's keyword arguments, typed and
        checked by :attr:`Options` (an error names ``--option NAME`` and the key)."""
        if not texts:
            return {}
        if cls.Options is None:
            raise InputError(f"--option {cls.name}.{next(iter(texts))}: metric {cls.name!r} takes no options")
        return cls.Options.from_text(texts, Source(f"--option {cls.name}")).to_dict()

    def __init__(self, weights: str | Path | None = None, device: str = "cpu", batch_size: int = 16, **options):
        self.weights = weights
        self.device = device
        self.batch_size = batch_size
        self.options = options
        self.checkpoint_sha256: str | None = None

    def score(self, images: Sequence, prompts: Sequence[str] | None = None,
              metadata: Sequence[dict] | None = None) -> MetricOutput:
        """Scores of ``images`` (PIL) against ``prompts`` (optional when ``needs_prompt`` is false): by default ``batch_size`` images at a time through
        :meth:`score_batch` after :meth:`load`; metrics that score differently (rule-based ones) override."""
        import torch

        check_pairs(images, prompts, self.needs_prompt)
        if not len(images):
            return MetricOutput(scores=np.zeros(0))
        self.load()
        out = []
        with torch.no_grad():
            for sl in batches(len(images), self.batch_size):
                batch_prompts = None if prompts is None else list(prompts[sl])
                out.append(self.score_batch(list(images[sl]), batch_prompts).double().cpu())
        return MetricOutput(scores=torch.cat(out).numpy())

    def load(self):
        """Build the networks on first use (lazily, so that listing metrics costs nothing)."""

    def score_batch(self, images: list, prompts: list[str] | None):
        """One batch's scores as a 1-D tensor (called by :meth:`score`, under no_grad, after load)."""
        raise NotImplementedError

    def identity(self) -> MetricId:
        return MetricId(self.name, self.version, self.checkpoint_sha256, dict(self.options), self.higher_is_better)


def parse_option_items(items: Sequence[str]) -> dict[str, dict[str, str]]:
    """``["NAME.KEY=VALUE", ...]`` (the CLI's repeated ``--option``) -> {metric: {key: text}}."""
    out: dict[str, list[str]] = {}
    for item in items:
        dotted, eq, text = item.partition("=")
        name, dot, key = dotted.strip().partition(".")
        if not eq or not dot or not name or not key.strip():
            raise InputError(f"--option {item!r}: expected METRIC.KEY=VALUE (e.g. hpsv3.batch_size=4)")
        out.setdefault(name, []).append(f"{key.strip()}={text}")
    return {name: parse_sets(sets) for name, sets in out.items()}


def check_pairs(images: Sequence, prompts: Sequence[str] | None, need_prompts: bool = True) -> None:
    if need_prompts and (prompts is None or len(images) != len(prompts)):
        n = "no" if prompts is None else len(prompts)
        raise ValueError(f"{len(images)} images but {n} prompts")


def batches(n: int, size: int) -> Iterator[slice]:
    size = max(1, int(size))
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


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
