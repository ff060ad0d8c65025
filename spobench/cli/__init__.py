"""The ``spobench`` command line (``spobench.cli:main``): the app and its one-line errors in ``app.py``,
the commands by kind in ``run.py``, ``spm.py`` and ``toy.py``, shared option checks in ``common.py``."""

from spobench.cli.app import app, main

__all__ = ["app", "main"]
