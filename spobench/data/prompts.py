"""Prompt files: plain text (one prompt a line), JSON (a list of strings, or of objects with a
"caption" as in the official SPO 4k training list) or JSONL. Bad files fail with the file and line."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

from spobench.core.errors import InputError

MAX_PROMPT_CHARS = 2000  # CLIP sees 77 tokens; a line far longer than that is a broken file


def _visible(ch: str) -> bool:
    """A character that shows: letters, digits, punctuation, symbols. Not spaces, separators,
    combining marks on their own, controls or format characters (zero-width space/joiners, BOMs,
    bidi marks), which a tokenizer drops or turns into nothing a model was trained on."""
    return unicodedata.category(ch)[0] in "LNPS"


def _check(prompt: object, where: str) -> str:
    if not isinstance(prompt, str):
        raise InputError(f"{where}: expected a prompt string, got {type(prompt).__name__}")
    prompt = prompt.strip()
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InputError(f"{where}: prompt is {len(prompt)} characters long (limit {MAX_PROMPT_CHARS})")
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
