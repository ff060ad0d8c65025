"""The one prompt loader: :func:`load_prompts` takes a prompt file or a registered prompt set name
(``spobench ls prompt-sets``; the paper's sets are read by :mod:`spobench.data.prompt_sets`) for
every command - training settings, ``generate --prompts/--prompt-set`` and recipes.

Prompt files: plain text (one prompt a line), JSON (a list of strings, or of objects with a
"caption" as in the official SPO 4k training list) or JSONL. Bad files fail with the file and line."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path
from typing import Sequence

from spobench.core.errors import InputError

MAX_PROMPT_CHARS = 2000  # CLIP sees 77 tokens; a line far longer than that is a broken file
SUFFIXES = (".txt", ".json", ".jsonl")


def _visible(ch: str) -> bool:
    """A character that shows: letters, digits, punctuation, symbols. Not spaces, separators,
    combining marks on their own, controls or format characters (zero-width space/joiners, BOMs,
    bidi marks), which a tokenizer drops or turns into nothing a model was trained on."""
    return unicodedata.category(ch)[0] in "LNPS"


def clean(prompt: object, where: str) -> str:
    """A prompt string, stripped, and not absurdly long (every source of prompts checks this much)."""
    if not isinstance(prompt, str):
        raise InputError(f"{where}: expected a prompt string, got {type(prompt).__name__}")
    prompt = prompt.strip()
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InputError(f"{where}: prompt is {len(prompt)} characters long (limit {MAX_PROMPT_CHARS})")
    return prompt


def _check(prompt: object, where: str) -> str:
    """:func:`clean`, and for a user's file also no control characters and something visible (the
    published sets are read as published)."""
    prompt = clean(prompt, where)
    control = next((c for c in prompt if unicodedata.category(c) == "Cc" and c not in "\t\n\r"), None)
    if control is not None:
        raise InputError(f"{where}: prompt contains the control character U+{ord(control):04X}")
    if prompt and not any(_visible(c) for c in prompt):
        codes = " ".join(f"U+{ord(c):04X}" for c in prompt[:4])
        raise InputError(f"{where}: prompt has no visible characters ({codes}{' ...' if len(prompt) > 4 else ''})")
    return prompt


def load_prompt_file(path: str | Path) -> list[str]:
    """Prompts from ``path``; blank lines in text files are skipped."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: prompt file not found")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot read the prompt file ({e.strerror})") from None
    nul = raw.find(b"\x00")  # anywhere: a text file glued to binary data is still not a prompt file
    if nul >= 0:
        line = raw[:nul].count(b"\n") + 1
        raise InputError(f"{path}:{line}: looks binary (NUL bytes), not a prompt file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not valid UTF-8") from None

    prompts: list[str] = []
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise InputError(f"{path}: expected a JSON list of prompts")
        for i, item in enumerate(data):
            item = item.get("caption") if isinstance(item, dict) else item
            prompts.append(_check(item, f"{path}: item {i}"))
    elif path.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: invalid JSON ({e.msg})") from None
            item = item.get("caption", item.get("prompt")) if isinstance(item, dict) else item
            prompts.append(_check(item, f"{path}:{n}"))
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                prompts.append(_check(line, f"{path}:{n}"))
    prompts = [p for p in prompts if p]
    if not prompts:
        raise InputError(f"{path}: no prompts in file")
    return prompts


def load_prompts(spec: str | Path, limit: int | None = None, *, file: bool | None = None,
                 what: str = "setting 'prompts'", example: str = "prompts=./prompts.txt") -> Sequence[str]:
    """The prompts of a file or a registered prompt set, only the first ``limit`` when given.

    ``file``: True - ``spec`` is a file (``--prompts``); False - a registered name (``--prompt-set``);
    None (a setting) - a registered name always means the set, so a file of that name in the current
    folder cannot stand in for it (``./name`` reads the file); otherwise a path with a prompt-file
    suffix, or one that exists, is read, and anything else is looked up (an unknown name lists the
    known ones). ``what`` / ``example``: how the user gave it, for the messages. A registered set comes
    back as its loader gives it (a :class:`~spobench.data.prompt_sets.PromptSet` keeps its name,
    version and metadata), a file as a list."""
    from spobench.core import catalog

    spec = str(spec)
    if not file and not spec.strip():
        raise InputError(f"{what} is empty: give a prompt file or a prompt set name")
    if not file and spec == "file":  # the registry's entry for files takes the file itself
        raise InputError(f"{what} 'file': give the prompt file's path (e.g. {example})")
    if file is None:
        file = spec not in catalog.PROMPT_SETS and (Path(spec).suffix in SUFFIXES or Path(spec).exists())
    prompts = load_prompt_file(spec) if file else catalog.PROMPT_SETS.get(spec)()
    if not all(isinstance(p, str) for p in prompts):
        raise InputError(f"prompts {spec!r}: expected prompt strings")
    prompts = first(prompts, limit)
    if not prompts:
        raise InputError(f"prompts {spec!r}: no prompts")
    return prompts


def first(prompts: Sequence[str], limit: int | None) -> Sequence[str]:
    """The first ``limit`` prompts (all for None); a prompt set stays one, its version saying so."""
    if limit is None:
        return prompts
    if hasattr(prompts, "subset"):
        return prompts.subset(range(min(limit, len(prompts))), f"first{limit}")
    return list(prompts)[:limit]
