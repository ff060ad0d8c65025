import json

import pytest

from spobench.errors import InputError
from spobench.prompts import load_prompt_file


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
