"""The one config schema: trainer settings, recipe tables, the preference-model trainers' configs.

A config is a dataclass deriving from :class:`Config` whose fields are declared with :func:`setting`
(default, help, bounds, per-backbone default, resumable, an extra per-value check). From that one
declaration come the type coercion, the range checks (finite first: NaN passes any ``v < bound``,
see :mod:`spobench.core.checks`), unknown keys with a did-you-mean, the help text of ``--settings``
(:meth:`Config.describe`) and per-backbone defaults (:meth:`Config.resolve` with the backbone's
``BackboneDefaults``).

Every error names where the value came from, a :class:`Source`: a TOML file, ``--set``, a
checkpoint's ``config.json`` (``<origin>: setting 'k' must be ...``), or a recipe table
(``<file> [tiny]: cells.spo.train.k: must be ...``). A config's own cross-field checks raise
:class:`SettingError` (a key and a problem), which the loader renders for its source, so a value
checked in a recipe is named by its recipe field without any re-parsing of messages.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Sequence

from spobench.core.errors import InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MISSING = dataclasses.MISSING


def setting(default: Any = MISSING, help: str = "", *, min: float | None = None, max: float | None = None,
            gt: float | None = None, lt: float | None = None, backbone: str | tuple[str, ...] | None = None,
            resumable: bool = False, check: Callable[[Any], str | None] | None = None,
            factory: Callable[[], Any] | None = None) -> Any:
    """A config field. ``min``/``max`` are inclusive bounds, ``gt``/``lt`` exclusive ones (on every
    number of a list too); ``backbone`` names the ``BackboneDefaults`` attribute (or attributes, the
    first that is not None) used when the value is None; ``resumable`` fields may change when a run is
    resumed (e.g. ``epochs``); ``check(value)`` returns what is wrong with a value (or None);
    ``factory`` makes a mutable default. Without a default the field is required."""
    meta = {"help": help, "min": min, "max": max, "gt": gt, "lt": lt, "backbone": backbone,
            "resumable": resumable, "check": check}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


class SettingError(InputError):
    """One field's value is wrong: ``key`` (a field name, ``name[i]`` for a list item, '' for the
    config as a whole) and what is wrong. Rendered for its :class:`Source` by the loader; read
    directly it says ``setting 'key' <problem>``."""

    def __init__(self, key: str, problem: str):
        self.key, self.problem = key, problem
        super().__init__(f"setting {key!r} {problem}" if key else problem)


@dataclass(frozen=True)
class Source:
    """Where values come from. ``origin``: a file, ``--set``, ``<recipe> [tiny]`` ('' for Python
    callers). ``table``: the recipe table the values sit in (fields are then named ``table.key``);
    None for flat settings (named ``setting 'key'``)."""

    origin: str = ""
    table: str | None = None

    def sub(self, key: str) -> "Source":
        """The source of a nested table (a recipe's ``generate``, ``cells.x``, ``rows[0]``)."""
        return Source(self.origin, _join(self.table or "", key))

    def _say(self, text: str) -> InputError:
        return InputError(f"{self.origin}: {text}" if self.origin else text)

    def error(self, key: str, problem: str, what: str = "") -> InputError:
        if self.table is not None:
            at = _join(self.table, key)
            return self._say(f"{at}: {problem}" if at else problem)
        if not key:
            return self._say(problem)
        return self._say(f"{what + ' ' if what else ''}setting {key!r} {problem}")

    def unknown(self, key: str, known: Sequence[str], noun: str = "setting", what: str = "") -> InputError:
        hint = did_you_mean(key, known)
        if self.table is None:
            return self._say(f"unknown {what + ' ' if what else ''}setting {key!r}{hint}")
        at = _join(self.table, key)
        if noun == "setting":
            return self._say(f"{at}: unknown setting {key!r}{hint}")
        return self._say(f"{at}: unknown key{hint}; known: {', '.join(sorted(known))}")


def _join(table: str, key: str) -> str:
    if not table or not key:
        return table or key
    return f"{table}{key}" if key.startswith("[") else f"{table}.{key}"


# Names a user brings from another trainer or from other tools, which difflib cannot match by spelling
# (D3PO/DDPO judge x_0 with a `reward`, SPO scores pools with a `scorer`).
SAME_MEANING = {"scorer": ("reward",), "reward": ("scorer",), "learning_rate": ("lr",), "rank": ("lora_rank",),
                "batch_size": ("train_batch_size", "rollout_batch"), "steps": ("num_steps",),
                "cfg": ("guidance_scale",), "guidance": ("guidance_scale",), "epoch": ("epochs",)}


def did_you_mean(key: str, known: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for an unknown key: a known name of the same meaning, else the closest
    spelling; '' when nothing is close."""
    known = list(known)
    close = [k for k in SAME_MEANING.get(key, ()) if k in known]
    close = close or difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# -- types ---------------------------------------------------------------------------------------------
def _args(tp) -> tuple:
    return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)


def type_phrase(tp) -> str:
    """``tp`` as errors say it: 'an integer', 'a list of strings', 'a string or none'."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_phrase(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        item = typing.get_args(tp)[0]
        plural = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}.get(item)
        return f"a list of {plural}" if plural else "a list"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "a table"
    if tp is type(None):
        return "none"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def type_label(tp) -> str:
    """``tp`` as ``--settings`` lists it: 'int', 'float | None', "'mean' | 'sum'"."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_label(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "None"
    if tp is Ellipsis:
        return "..."
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_label(a) for a in typing.get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def coerce(tp, value: Any, key: str, source: Source, empty_ok: bool = True) -> Any:
    """``value`` (from TOML, JSON or Python) as type ``tp``; SettingError(key, ...) if it is not one.
    Integral floats are integers (TOML/JSON round trips); numbers are not strings, strings not
    numbers (text from ``--set`` is read by :func:`parse_text` first)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is not type(None):
                try:
                    return coerce(a, value, key, source, empty_ok)
                except SettingError as e:
                    errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise SettingError(key, f"must be {type_phrase(tp)} (got {value!r})")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise SettingError(key, f"must be {type_phrase(tp)} (got {value!r})")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise SettingError(key, f"must be {type_phrase(tp)} (got {value!r})")
        item = typing.get_args(tp)[0]
        items = [coerce(item, v, f"{key}[{i}]", source, empty_ok) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise SettingError(key, f"must be a table (got {value!r})")
        item = typing.get_args(tp)[1]
        return {k: coerce(item, v, _join(key, k), source, empty_ok) for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, Config):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise SettingError(key, f"must be a table (got {value!r})")
        return tp.from_dict(value, source.sub(key))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            if not empty_ok and not value.strip():  # `--set prompts=` would mean the folder "."
                raise SettingError(key, "is empty (give a value, or none for the default)")
            return value
    else:  # pragma: no cover - a schema bug, not a user error
        raise TypeError(f"unsupported config type {tp!r} for {key}")
    raise SettingError(key, f"must be {type_phrase(tp)} (got {value!r})")


def parse_text(tp, text: str) -> Any:
    """A ``--set`` value for a field of type ``tp``: ``none``/``null`` where None is allowed, a TOML
    literal (4, 1e-5, true, "x"), yes/no for booleans; a field that takes strings gets the text as
    written when it does not take what the literal is (``prompts=123`` is the file "123")."""
    text = text.strip()
    args = _args(tp)
    if type(None) in args and text.lower() in ("none", "null"):
        return None
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    if isinstance(value, str):
        if bool in args and value.lower() in ("yes", "no"):
            return value.lower() == "yes"
        return value
    takes = tuple(a for a in args if isinstance(a, type) and a is not type(None))
    if str in args and not (isinstance(value, takes) and not (isinstance(value, bool) and bool not in takes)):
        return text
    return value


def check_value(key: str, meta, value: Any) -> None:
    """Bounds (and finiteness) of a number or of every number in a list; the field's own check."""
    from spobench.core.checks import number_problem

    items = value if isinstance(value, (list, tuple)) else [value]
    for i, v in enumerate(items):
        problem = number_problem(v, min=meta.get("min"), max=meta.get("max"), gt=meta.get("gt"), lt=meta.get("lt"))
        if problem:
            raise SettingError(f"{key}[{i}]" if isinstance(value, (list, tuple)) else key, problem)
    check = meta.get("check")
    if check is not None and value is not None:
        for i, v in enumerate(items):
            problem = check(v)
            if problem:
                raise SettingError(f"{key}[{i}]" if isinstance(value, (list, tuple)) else key, problem)


def read_toml(path: str | Path, what: str = "config") -> dict:
    """A TOML file as a dict; one line naming the file (and line) when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {what} file not found")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot read the {what} file ({e.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")  # TOML is UTF-8; a UTF-16 file (Windows editors) is not
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not valid UTF-8 (TOML files are UTF-8; re-save it as UTF-8)") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path}: invalid TOML ({e})") from None


def parse_sets(items: Sequence[str]) -> dict[str, str]:
    """``--set key=value`` items -> {key: text}."""
    out = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise InputError(f"--set {item!r}: expected key=value")
        out[key.strip()] = text
    return out


# -- the base class ----------------------------------------------------------------------------------
class Config:
    """Base of every config dataclass. Class attributes say how its fields are named in errors:
    ``noun`` ('setting' or 'key': an unknown recipe key lists the known ones) and ``what`` (e.g.
    'SPM training': ``SPM training setting 'lr' must be ...``); ``empty_strings`` whether a string
    may be blank."""

    noun: ClassVar[str] = "setting"
    what: ClassVar[str] = ""
    empty_strings: ClassVar[bool] = True

    @classmethod
    def fields(cls) -> dict[str, dataclasses.Field]:
        """The fields a user may set (in declaration order)."""
        return {f.name: f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}

    @classmethod
    def _hints(cls) -> dict:
        return typing.get_type_hints(cls)

    @classmethod
    def from_dict(cls, values: dict, source: Source | str = Source(), base: "Config | None" = None):
        """``base`` (or the defaults) updated with ``values``, validated; errors name ``source``."""
        source = Source(source) if isinstance(source, str) else source
        hints, known = cls._hints(), cls.fields()
        kwargs = {n: getattr(base, n) for n in known} if base is not None else {}
        try:
            for key, value in values.items():
                if key not in known:
                    raise source.unknown(key, list(known), cls.noun, cls.what)
                kwargs[key] = coerce(hints[key], value, key, source, cls.empty_strings)
            missing = [n for n, f in known.items() if n not in kwargs and f.default is MISSING
                       and f.default_factory is MISSING]
            if missing:
                raise SettingError(missing[0], "is required")
            cfg = cls(**kwargs)
            cfg.validate()
        except SettingError as e:
            raise source.error(e.key, e.problem, cls.what) from None
        except InputError as e:  # a check that names no field: say where the values came from
            if source.origin and str(e).startswith(f"{source.origin}: "):
                raise
            raise source.error("", str(e)) from None
        return cfg

    @classmethod
    def from_text(cls, sets: dict[str, str], source: Source | str = Source("--set"), base: "Config | None" = None):
        """``base`` updated with ``--set`` texts (each read for its field's type)."""
        source = Source(source) if isinstance(source, str) else source
        hints = cls._hints()
        return cls.from_dict({k: parse_text(hints[k], v) if k in hints else v for k, v in sets.items()},
                             source, base)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: Sequence[str] = (), base: "Config | None" = None):
        """Defaults (or ``base``) <- TOML file <- ``--set key=value`` overrides, validated."""
        cfg = base
        if path is not None:
            cfg = cls.from_dict(read_toml(path), Source(str(path)), cfg)
        sets = parse_sets(overrides)
        return cls.from_text(sets, Source("--set"), cfg) if (sets or cfg is None) else cfg

    @classmethod
    def coerce(cls, config: "Config | dict | None", source: Source | str = Source()):
        """None (the defaults), a dict or an instance -> a checked instance."""
        if config is None:
            return cls.from_dict({}, source)
        if isinstance(config, dict):
            return cls.from_dict(config, source)
        source = Source(source) if isinstance(source, str) else source
        try:
            config.validate()
        except SettingError as e:
            raise source.error(e.key, e.problem, cls.what) from None
        return config

    def validate(self) -> None:
        """Types, bounds and each field's check, then :meth:`check` (cross-field rules); raises
        SettingError. Values set in Python are coerced too (an int for a float field)."""
        hints = self._hints()
        for name, f in self.fields().items():
            value = coerce(hints[name], getattr(self, name), name, Source(), self.empty_strings)
            setattr(self, name, value)
            check_value(name, f.metadata, value)
        self.check()

    def check(self) -> None:
        """Rules between fields (subclasses); raise SettingError(key, problem)."""

    def resolve(self, defaults):
        """Fill None fields that have a per-backbone default from ``defaults`` (BackboneDefaults)."""
        for name, f in self.fields().items():
            attrs = f.metadata.get("backbone")
            if not attrs or getattr(self, name) is not None:
                continue
            for attr in (attrs,) if isinstance(attrs, str) else attrs:
                if getattr(defaults, attr, None) is not None:
                    setattr(self, name, getattr(defaults, attr))
                    break
        self.validate()
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check_resume(self, stored: "Config") -> None:
        """Only ``resumable`` settings may differ from the run being resumed."""
        for name, f in self.fields().items():
            if not f.metadata.get("resumable") and getattr(self, name) != getattr(stored, name):
                raise InputError(f"setting {name!r} differs from the run being resumed "
                                 f"({getattr(stored, name)!r} -> {getattr(self, name)!r}); start a new --out")

    @classmethod
    def describe(cls) -> str:
        """One line per field: name (type, default): help."""
        hints = cls._hints()
        lines = []
        for n, f in cls.fields().items():
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            shown = ("required" if default is MISSING else "a table of its own" if isinstance(default, Config)
                     else f"default {default!r}")
            lines.append(f"{n} ({type_label(hints[n])}, {shown}): {f.metadata.get('help', '')}")
        return "\n".join(lines)
