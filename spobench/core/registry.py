"""One typed, lazy registry for trainers, metrics, backbones, prompt sets and recipes.

Entries are declared by name with a ``"module:object"`` target, so listing them (``spobench ls``)
imports nothing heavy. The object is imported on first ``get``. Modules may also register
themselves with the decorators (``@register_trainer("spo")``); a decorator that fills a declared
entry with the very object it points to is not a duplicate, anything else under a taken name is.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import Callable, Generic, Iterator, TypeVar

from spobench.core.errors import NotImplementedYet, SpobenchError

T = TypeVar("T")


class UnknownNameError(SpobenchError, KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class DuplicateNameError(SpobenchError, ValueError):
    pass


@dataclass
class Entry:
    name: str
    target: str | None  # "module:object"; None = planned, not built yet
    summary: str = ""
    obj: object | None = None

    @property
    def status(self) -> str:
        return "ready" if (self.target or self.obj is not None) else "planned"


class Registry(Generic[T]):
    """Name -> object, with lazy ``module:object`` targets and did-you-mean errors."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    # -- declaring ---------------------------------------------------------------------------
    def declare(self, name: str, target: str | None, summary: str = "") -> None:
        if name in self._entries:
            raise DuplicateNameError(f"{self.kind} {name!r} is already registered")
        if target is not None and ":" not in target:
            raise ValueError(f"lazy target must be 'module:object', got {target!r}")
        self._entries[name] = Entry(name, target, summary)

    def register(self, name: str, summary: str = "") -> Callable[[T], T]:
        def deco(obj: T) -> T:
            entry = self._entries.get(name)
            here = f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', '?')}"
            if entry is None:
                self._entries[name] = Entry(name, here, summary or _first_line(obj), obj)
            elif entry.obj is obj or (entry.obj is None and entry.target == here):
                entry.obj = obj
            else:
                raise DuplicateNameError(
                    f"{self.kind} {name!r} is already registered to {entry.target}; cannot register {here}"
                )
            return obj

        return deco

    # -- reading -----------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entry(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self._entries), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            known = ", ".join(self.names()) or "none"
            raise UnknownNameError(f"unknown {self.kind} {name!r}{hint} (known: {known})") from None

    def get(self, name: str) -> T:
        entry = self.entry(name)
        if entry.obj is None:
            if entry.target is None:
                raise NotImplementedYet(f"not implemented yet: {self.kind} {name!r}")
            module, _, attr = entry.target.partition(":")
            obj: object = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
            entry.obj = obj
        return entry.obj  # type: ignore[return-value]


def _first_line(obj: object) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""
