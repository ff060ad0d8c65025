"""Presets: named sets of trainer settings kept as data files (``spobench/assets/presets/<name>.toml``),
chosen with ``spobench train <trainer> --preset NAME`` (or ``--preset FILE.toml``, one of your own in the same
format) or a recipe's ``preset = "NAME"``.

A preset file has a ``description`` and one table per trainer it is made for::

    description = "what it is for and what it was measured to give"
    [trainers.spo]
    inner_epochs = 3
    [backbones.tiny.spo]     # over [trainers.spo] on that backbone only
    lr = 3e-4

Its values go through the trainer's own schema (``spobench.core.config``) like any other source, so a bad
value is named by the file and the field (``.../fast.toml: trainers.spo.lr: must be > 0``). Order: the
defaults, then the preset, then ``--config``, then ``--set`` (the last word wins); the resolved settings
are what the run records in its ``config.json``. ``paper`` sets nothing: the defaults follow the paper and
the official code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spobench.core.config import MISSING, Config, Source, did_you_mean, read_toml, setting
from spobench.core.errors import InputError

PRESETS = Path(__file__).resolve().parents[1] / "assets" / "presets"
DEFAULT = "paper"


@dataclass(kw_only=True)
class PresetFile(Config):
    noun = "key"

    description: str = setting(MISSING, "what the preset is for and what it was measured to give")
    trainers: dict[str, dict[str, Any]] = setting(None, "trainer name -> its settings", factory=dict)
    backbones: dict[str, dict[str, dict[str, Any]]] = setting(
        None, "backbone -> trainer name -> settings over [trainers.<name>] on that backbone (a learning rate is "
        "a backbone's own)", factory=dict)
    backbones_only: bool = setting(False, "refuse backbones without a [backbones.<name>] table (a preset measured "
                                   "only there)")


def names() -> list[str]:
    """The shipped presets."""
    return sorted(p.stem for p in PRESETS.glob("*.toml"))


def preset_file(name: str) -> Path:
    """A shipped preset's file, or ``name`` itself when it is a .toml file of the same format."""
    if name.endswith(".toml"):
        if not Path(name).is_file():
            raise InputError(f"{name}: preset file not found")
        return Path(name)
    path = PRESETS / f"{name}.toml"
    if not path.is_file():
        raise InputError(f"unknown preset {name!r}{did_you_mean(name, names())} (known: {', '.join(names())})")
    return path


def read_preset(name: str) -> tuple[Path, PresetFile]:
    path = preset_file(name)
    return path, PresetFile.from_dict(read_toml(path, "preset"), Source(str(path), ""))


def apply_preset(config_cls: type[Config], trainer: str, name: str | None, base: Config | None = None,
                 backbone: str | None = None) -> Config | None:
    """``base`` (or the defaults) with preset ``name``'s settings for ``trainer`` (then those for ``trainer`` on
    ``backbone``); ``base`` itself when ``name`` is None. A preset made for other trainers is refused (naming
    them)."""
    if name is None:
        return base
    path, spec = read_preset(name)
    if trainer not in spec.trainers:
        made = ", ".join(sorted(spec.trainers)) or "no trainer"
        raise InputError(f"{path}: preset {name!r} has no settings for trainer {trainer!r} (it is for: {made})")
    if spec.backbones_only and backbone is not None and trainer not in spec.backbones.get(backbone, {}):
        made = ", ".join(sorted(b for b, t in spec.backbones.items() if trainer in t))
        raise InputError(f"{path}: preset {name!r} is for {trainer} on --backbone {made} only (measured there); "
                         f"not {backbone!r}")
    cfg = config_cls.from_dict(spec.trainers[trainer], Source(str(path), f"trainers.{trainer}"), base)
    own = spec.backbones.get(backbone or "", {}).get(trainer)
    if own:
        cfg = config_cls.from_dict(own, Source(str(path), f"backbones.{backbone}.{trainer}"), cfg)
    return cfg


def describe() -> str:
    """One line per preset, for ``--help`` texts and ``--settings``."""
    return "\n".join(f"{n}: {read_preset(n)[1].description}" for n in names())
