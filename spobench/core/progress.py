"""What long work tells a person, in a terminal or in a log file.

On a terminal, :class:`Progress` is a rich bar. Anywhere else (CI, ``nohup``, ``> log.txt``) a bar prints
nothing until it ends, so it writes one plain line instead at the start, then at most every
``SPOBENCH_PROGRESS_SECONDS`` seconds (default 10; 0: on every update), and at the end::

    spo rounds 12/40  0.35 round/s  eta 1:20  loss 0.6931

:func:`make_console` gives a console that is never cut to 80 columns when it is not a terminal (rich's
default there), so tables in a log are whole. :func:`status` is a spinner's plain-text twin, and
:func:`quiet_libraries` keeps transformers', diffusers' and huggingface_hub's own bars and loading chatter
out of spobench's output: spobench's progress is the only progress.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from typing import Callable, Iterator

from rich.console import Console, ConsoleDimensions

from spobench.core.errors import InputError

INTERVAL_ENV = "SPOBENCH_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 10.0
WIDE = 1000  # columns of a console that is not a terminal (a table wider than this is cut even in a log)


class _LogConsole(Console):
    """rich's Console, ``WIDE`` columns wide when it writes to something that is not a terminal (and
    no width or COLUMNS was given), decided on each print: the CLI's consoles outlive a swapped stdout."""

    @property
    def size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)
        if self._width is None and not self.is_terminal:
            return ConsoleDimensions(WIDE, size.height)
        return size

    @size.setter
    def size(self, new_size) -> None:
        Console.size.fset(self, new_size)


def make_console(stderr: bool = False, **kwargs) -> Console:
    return _LogConsole(stderr=stderr, **kwargs)


def interval_seconds() -> float:
    """Seconds between plain progress lines (``SPOBENCH_PROGRESS_SECONDS``)."""
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return DEFAULT_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value < 0:
        raise InputError(f"{INTERVAL_ENV} must be a number of seconds >= 0 (got {raw!r})")
    return value


def clock_text(seconds: float) -> str:
    """``1:20`` or ``2:03:04``."""
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def rate_text(per_second: float, unit: str) -> str:
    """Items per second, or seconds per item when that reads better (slow work)."""
    if per_second <= 0:
        return f"- {unit}/s"
    if per_second >= 0.1:
        return f"{per_second:.2f} {unit}/s" if per_second < 100 else f"{per_second:.0f} {unit}/s"
    return f"{1 / per_second:.1f} s/{unit}"


class Progress:
    """One piece of work counted in items: ``with Progress("spo rounds", total=40, unit="round",
    console=c) as bar: ... bar.update(completed=n, info="loss 0.69")``.

    ``completed``: items done before this session (a resumed run). The rate counts this session's items
    from there; when it is not given, from the first ``update`` (a caller that learns what was done before
    only once it starts reports that first). ``console=None`` or ``enabled=False``: silent (another process
    of a distributed run). ``clock``: seconds, monotonic (tests pass a fake one)."""

    def __init__(self, description: str, total: int | None = None, *, completed: int | None = None,
                 unit: str = "item", console: Console | None = None, enabled: bool = True, info: str = "",
                 interval: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.description, self.total, self.unit = description, total, unit
        self.completed = completed or 0
        self.console, self.info, self.clock = console, info, clock
        self.enabled = enabled and console is not None
        self.interval = interval_seconds() if interval is None else interval
        self._bar = self._task = None
        self._t0 = self._last = 0.0
        self._base: tuple[int, float] | None = None  # (count, time) the rate is measured from
        self._rebase = completed is None
        self._said = -1  # the count of the last plain line

    @property
    def plain(self) -> bool:
        return self.enabled and not self.console.is_terminal

    def __enter__(self) -> "Progress":
        if not self.enabled:
            return self
        self._t0 = self._last = self.clock()
        self._base = (self.completed, self._t0)
        if self.plain:
            self._say("started")
            return self
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        self._bar = Bar(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                        console=self.console, transient=False)
        self._bar.__enter__()
        self._task = self._bar.add_task(self.description, total=self.total, completed=self.completed,
                                        info=self.info)
        return self

    def update(self, completed: int | None = None, *, advance: int | None = None, total: int | None = None,
               info: str | None = None) -> None:
        if completed is not None:
            self.completed = completed
        if advance is not None:
            self.completed += advance
        if total is not None:
            self.total = total
        if info is not None:
            self.info = info
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=self.completed, total=self.total, info=self.info)
            return
        now = self.clock()
        if self._rebase:
            self._rebase = False
            self._base = (self.completed, now)
        finished = self.total is not None and self.completed >= self.total
        # at most one line per interval, none for a count already shown; the end line comes from __exit__
        if now - self._last >= self.interval and not finished and self.completed != self._said:
            self._last = now
            self._say()

    def __exit__(self, *exc) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.__exit__(*exc)
            self._bar = None
            return
        self._say(("done" if exc[0] is None else "stopped") + f" in {clock_text(self.clock() - self._t0)}")

    # -- the plain line ------------------------------------------------------------------------------
    def rate(self) -> float | None:
        """Items per second in this session, or None before any."""
        if self._base is None:
            return None
        count, since = self._base
        done, elapsed = self.completed - count, self.clock() - since
        return done / elapsed if done > 0 and elapsed > 0 else None

    def line(self, note: str | None = None) -> str:
        """``description done/total  [note]  rate  eta  info`` (rate and eta once an item is done)."""
        parts = [f"{self.description} {self.completed}" + (f"/{self.total}" if self.total is not None else "")]
        if note is not None:
            parts.append(note)
        rate = self.rate()
        if rate is not None:
            parts.append(rate_text(rate, self.unit))
            if self.total is not None and self.completed < self.total and note is None:
                parts.append(f"eta {clock_text((self.total - self.completed) / rate)}")
        if self.info:
            parts.append(str(self.info))
        return "  ".join(parts)

    def _say(self, note: str | None = None) -> None:
        self._said = self.completed
        self.console.print(self.line(note), markup=False, highlight=False, soft_wrap=True)


@contextlib.contextmanager
def status(console: Console | None, text: str, *, clock: Callable[[], float] = time.monotonic) -> Iterator[None]:
    """A spinner on a terminal; elsewhere ``text ...`` before and ``text: done in 0:12`` after."""
    if console is None:
        yield
        return
    if console.is_terminal:
        with console.status(text):
            yield
        return
    t0 = clock()
    console.print(f"{text} ...", markup=False, highlight=False, soft_wrap=True)
    yield  # a failure is the CLI's one error line: no "done" after it
    console.print(f"{text}: done in {clock_text(clock() - t0)}", markup=False, highlight=False, soft_wrap=True)


@contextlib.contextmanager
def quiet_libraries(*, downloads: bool = False) -> Iterator[None]:
    """transformers', diffusers' and huggingface_hub's progress bars ("Loading weights", "Writing model
    shards", downloads) off and their loggers at ERROR while a model loads, saves or casts; put back after.
    Only libraries already imported are touched (importing one here would cost seconds).
    ``downloads=True``: a download of gigabytes, whose bar is real progress: kept when stderr is a terminal.
    ``HF_HUB_DISABLE_PROGRESS_BARS=0`` (the libraries' own switch) keeps their bars."""
    undo: list[Callable[[], None]] = []
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").strip().lower() in ("0", "false", "no", "off") or (
            downloads and sys.stderr is not None and sys.stderr.isatty()):
        yield  # asked for by name (the hub would warn on every load that it cannot turn them off)
        return
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

        # transformers' enable_progress_bar (below, on the way out) turns the hub's on too: the hub's own
        # state is put back last
        undo.append(disable_progress_bars if are_progress_bars_disabled() else enable_progress_bars)
        disable_progress_bars()
    for lib in ("transformers", "diffusers"):
        if lib not in sys.modules:
            continue
        log = __import__(f"{lib}.utils.logging", fromlist=["logging"])
        level, bars = log.get_verbosity(), log.is_progress_bar_enabled()
        log.set_verbosity_error()
        log.disable_progress_bar()
        undo.append(lambda log=log, level=level, bars=bars: (log.set_verbosity(level),
                                                             log.enable_progress_bar() if bars else None))
    try:
        yield
    finally:
        for fn in reversed(undo):
            fn()
