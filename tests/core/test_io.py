import json

import pytest

from spobench.core.io import atomic_dir, atomic_file, atomic_write_json, provenance


def test_atomic_file_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as f:
            f.write(b"half")
            raise RuntimeError("crash")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_atomic_dir_replaces_whole(tmp_path):
    d = tmp_path / "ckpt"
    with atomic_dir(d) as tmp:
        (tmp / "x").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(d) as tmp:
            (tmp / "x").write_text("2")
            raise RuntimeError
    assert (d / "x").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_json_and_provenance(tmp_path):
    atomic_write_json(tmp_path / "r.json", {"b": 1, **provenance()})
    r = json.loads((tmp_path / "r.json").read_text())
    assert "torch" in r["versions"] and "git" in r
