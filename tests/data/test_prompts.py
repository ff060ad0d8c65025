import json

import pytest

from spobench.core.errors import InputError
from spobench.data.prompts import load_prompt_file


def test_text_json_jsonl(tmp_path):
    (tmp_path / "p.txt").write_text("a red circle\n\n  two blue squares  \n")
    assert load_prompt_file(tmp_path / "p.txt") == ["a red circle", "two blue squares"]
    (tmp_path / "p.json").write_text(json.dumps([{"caption": "x", "trainset_idx": 0}, {"caption": "y"}]))
    assert load_prompt_file(tmp_path / "p.json") == ["x", "y"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n"b"\n')
    assert load_prompt_file(tmp_path / "p.jsonl") == ["a", "b"]


@pytest.mark.parametrize("name,content,match", [
    ("empty.txt", b"\n\n", "no prompts"),
    ("bin.txt", b"\x89PNG\x00\x00", "binary"),
    ("latin.txt", b"ok\ncaf\xe9\n", r"latin.txt:2: not valid UTF-8"),
    ("huge.txt", b"ok\n" + b"x" * 5000 + b"\n", r"huge.txt:2: prompt is 5000 characters"),
    ("bad.json", b"[1, ", "invalid JSON"),
    ("obj.json", b'{"a": 1}', "JSON list"),
    ("bad.jsonl", b'"a"\n{oops\n', r"bad.jsonl:2: invalid JSON"),
])
def test_bad_prompt_files_name_file_and_line(tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(InputError, match=match):
        load_prompt_file(tmp_path / name)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_prompt_file(tmp_path / "nope.txt")


@pytest.mark.parametrize("name,content,match", [
    # a NUL past the first 8 KiB (a text file with binary data glued on): named with its line
    ("late-nul.txt", b"a red circle\n" * 1000 + b"two squares\x00\n", r"late-nul.txt:1001: looks binary"),
    ("zw.txt", "ok\n\u200b\u200c\u200d\n".encode(), r"zw.txt:2: prompt has no visible characters \(U\+200B"),
    ("bom-only.txt", "ok\n\ufeff\u2060\n".encode(), r"bom-only.txt:2: prompt has no visible characters"),
    ("zw.json", json.dumps(["ok", "\u200b"]).encode(), r"zw.json: item 1: prompt has no visible"),
    ("zw.jsonl", '"ok"\n{"prompt": "\\u200d\\u200d"}\n'.encode(), r"zw.jsonl:2: prompt has no visible"),
    ("esc.txt", b"ok\na \x1b[31mred\n", r"esc.txt:2: prompt contains the control character U\+001B"),
    ("utf16.txt", "a red circle\n".encode("utf-16"), r"utf16.txt:1: looks binary"),
])
def test_invisible_and_binary_prompts_are_refused(tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(InputError, match=match) as e:
        load_prompt_file(tmp_path / name)
    assert "\n" not in str(e.value)


def test_visible_unicode_prompts_pass(tmp_path):
    # zero-width joiners inside real text (emoji sequences, scripts that need them) are fine
    (tmp_path / "u.txt").write_text("caf\u00e9 au lait\n\U0001F469\u200d\U0001F52C in a lab\n\u0915\u094d\u200d\u0937\n",
                                    encoding="utf-8")
    assert len(load_prompt_file(tmp_path / "u.txt")) == 3


def test_a_registered_prompt_set_name_is_never_a_file(tmp_path, monkeypatch):
    """load_prompts (as a setting gives it): a file named like a prompt set in the current folder does not replace it."""
    from spobench.data.prompts import load_prompts

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-train").write_text("a planted prompt\n")
    assert "a planted prompt" not in load_prompts("tiny-train")
    assert load_prompts("./tiny-train") == ["a planted prompt"]
    with pytest.raises(InputError, match="setting 'prompts' is empty"):
        load_prompts("  ")
    with pytest.raises(InputError, match="setting 'prompts' 'file': give the prompt file's path"):
        load_prompts("file")


def test_load_prompts_file_or_set_as_each_command_gives_it(tmp_path, monkeypatch):
    """The one loader: ``file=True`` (--prompts) always reads a file, ``file=False`` (--prompt-set) always
    looks the name up, and the limit keeps a prompt set's provenance (its version says so)."""
    from spobench.core.registry import UnknownNameError
    from spobench.data.prompt_sets import PromptSet
    from spobench.data.prompts import first, load_prompts

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-val").write_text("a planted prompt\nanother\n")
    assert load_prompts("tiny-val", file=True) == ["a planted prompt", "another"]
    assert load_prompts("tiny-val", 1, file=True) == ["a planted prompt"]
    assert "a planted prompt" not in load_prompts("tiny-val", file=False)
    (tmp_path / "p.txt").write_text("x\n")
    with pytest.raises(UnknownNameError, match="unknown prompt set 'p.txt'"):
        load_prompts("p.txt", file=False)
    with pytest.raises(InputError, match="--prompt-set 'file': give the prompt file's path \\(e.g. --prompts FILE\\)"):
        load_prompts("file", file=False, what="--prompt-set", example="--prompts FILE")
    ps = PromptSet(["a", "b", "c"], "demo", "here")
    head = first(ps, 2)
    assert head == ["a", "b"] and head.version == f"{ps.version}/first2" and head.name == "demo"
    assert first(["a", "b"], 5) == ["a", "b"] and first(ps, None) is ps


def test_published_sets_and_files_share_the_basic_prompt_check(tmp_path):
    """prompt_sets reads the published files with the same length/type check as a user's file (and no
    more: a published set is read as published)."""
    from spobench.data.prompt_sets import spo_training_prompts

    (tmp_path / "4k_training_prompts.json").write_text(json.dumps([{"caption": "x" * 2001, "trainset_idx": 0}]))
    with pytest.raises(InputError, match=r"item 0: prompt is 2001 characters long \(limit 2000\)"):
        spo_training_prompts(tmp_path / "4k_training_prompts.json")
