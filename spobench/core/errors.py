"""User-facing errors. The CLI prints ``str(err)`` on one line and exits non-zero (no traceback
unless ``--debug``); anything that is not a ``SpobenchError`` is a bug and keeps its traceback."""

from __future__ import annotations


class SpobenchError(Exception):
    """An error the user can act on; the message names the offending input."""

    exit_code = 2


class NotImplementedYet(SpobenchError):
    """A registered name whose implementation has not been built."""

    exit_code = 3


class MissingWeightsError(SpobenchError):
    """Weights a model or metric needs are not on disk; the message says what to download."""


class ModelLoadError(SpobenchError):
    """A model folder or hub id that cannot be loaded (missing component, wrong backbone...)."""


class InputError(SpobenchError):
    """A bad input file or field (prompt file, recipe, parquet...)."""


class OutputError(SpobenchError):
    """An output that cannot be written (no space left on the device, quota exceeded...)."""
