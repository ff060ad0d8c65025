import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spobench.metrics.base import Metric, MetricOutput
from spobench.eval.evaluate import bootstrap_ci, evaluate_folder


class Brightness(Metric):
    name = "brightness"
    version = "1"
    calls = 0

    def score(self, images, prompts, metadata=None):
        Brightness.calls += len(images)
        return MetricOutput(np.array([np.asarray(im, dtype=float).mean() / 255 for im in images]),
                            tags=["dark" if "dark" in p else "light" for p in prompts])


def _folder(tmp_path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (p, v) in enumerate([("dark a", 10), ("dark b", 30), ("light a", 200), ("light b", 240)]):
        Image.new("RGB", (8, 8), (v, v, v)).save(tmp_path / f"{i:05d}.png")
        rows.append({"index": i, "file": f"{i:05d}.png", "prompt": p, "prompt_index": i, "seed": i})
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_evaluate_writes_means_cis_tags_and_caches(tmp_path):
    folder = _folder(tmp_path)
    Brightness.calls = 0
    res = evaluate_folder(folder, {"brightness": Brightness})
    m = res["metrics"]["brightness"]
    expect = np.mean([10, 30, 200, 240]) / 255
    assert m["mean"] == pytest.approx(expect)
    assert m["ci95"][0] <= expect <= m["ci95"][1]
    assert m["per_tag"]["dark"] == pytest.approx(20 / 255)
    assert m["overall"] == pytest.approx((20 + 220) / 2 / 255)
    assert m["id"]["name"] == "brightness"
    on_disk = json.loads((folder / "results.json").read_text())
    assert on_disk["per_image"][2]["brightness"] == pytest.approx(200 / 255)
    assert "git" in on_disk and "versions" in on_disk


def test_bootstrap_ci_groups_and_degenerate():
    s = np.array([1.0, 1.0, 3.0, 3.0])
    lo, hi = bootstrap_ci(s, groups=np.array([0, 0, 1, 1]))
    assert 1.0 <= lo <= 2.0 <= hi <= 3.0
    assert bootstrap_ci(np.ones(5)) == (1.0, 1.0)


def test_missing_manifest(tmp_path):
    from spobench.core.errors import InputError

    with pytest.raises(InputError, match="manifest"):
        evaluate_folder(tmp_path, {"brightness": Brightness})


def test_second_run_uses_the_cache_and_keeps_tags(tmp_path):
    folder = _folder(tmp_path)
    Brightness.calls = 0
    first = evaluate_folder(folder, {"brightness": Brightness})
    assert Brightness.calls == 4
    second = evaluate_folder(folder, {"brightness": Brightness})
    assert Brightness.calls == 4  # nothing rescored
    assert second["metrics"]["brightness"]["per_tag"] == first["metrics"]["brightness"]["per_tag"]
    Image.new("RGB", (8, 8), (0, 0, 0)).save(folder / "00001.png")  # a changed image is rescored
    third = evaluate_folder(folder, {"brightness": Brightness})
    assert Brightness.calls == 5
    assert third["per_image"][1]["brightness"] == 0.0


# -- what eval reads: the folder, its manifest, the cache, --weights and --out -----------------------------
from contract import snapshot  # noqa: E402
from spobench.core.errors import OutputError  # noqa: E402
from spobench.eval.evaluate import CACHE, check_weights, parse_weights  # noqa: E402


def _refused(folder, match, err=None, **kw):
    from spobench.core.errors import InputError

    before = snapshot(folder)
    with pytest.raises(err or InputError, match=match) as e:
        evaluate_folder(folder, {"brightness": Brightness}, **kw)
    assert snapshot(folder) == before and "\n" not in str(e.value)
    return str(e.value)


def _rows(folder):
    return [json.loads(x) for x in (folder / "manifest.jsonl").read_text().splitlines()]


def _write_rows(folder, rows):
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_an_unlisted_image_is_refused_not_skipped(tmp_path):
    folder = _folder(tmp_path)
    Image.new("RGB", (8, 8)).save(folder / "extra.png")
    msg = _refused(folder, "not listed")
    assert str(folder / "extra.png") in msg and "manifest.jsonl" in msg
    (folder / "extra.png").unlink()
    (folder / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(folder / "sub" / "deep.jpg")
    assert str(folder / "sub" / "deep.jpg") in _refused(folder, "not listed")


def test_files_that_are_not_images_and_hidden_temp_files_are_not_unlisted_images(tmp_path):
    folder = _folder(tmp_path)
    (folder / "notes.txt").write_text("mine")
    (folder / ".00004.png.abc.tmp").write_bytes(b"half")
    (folder / ".trash").mkdir()
    Image.new("RGB", (8, 8)).save(folder / ".trash" / "old.png")
    assert evaluate_folder(folder, {"brightness": Brightness})["n_images"] == 4


@pytest.mark.parametrize("file", ["../x.png", "/tmp/x.png", "sub/../../x.png", "", "."])
def test_manifest_paths_must_stay_inside_the_folder(tmp_path, file):
    folder = _folder(tmp_path / "images")
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    rows = _rows(folder)
    rows[2]["file"] = file
    _write_rows(folder, rows)
    assert f"manifest.jsonl:3: file {file!r}" in _refused(folder, "outside" if file.strip(".") else "does not name")


def test_a_symlink_cannot_lead_out_of_the_folder(tmp_path):
    folder = _folder(tmp_path / "images")
    Image.new("RGB", (8, 8)).save(tmp_path / "secret.png")
    (folder / "00002.png").unlink()
    (folder / "00002.png").symlink_to(tmp_path / "secret.png")
    assert str(tmp_path / "secret.png") in _refused(folder, "manifest.jsonl:3: .*outside")
    (folder / "00002.png").unlink()  # a link that stays inside is fine
    (folder / "00002.png").symlink_to(folder / "00003.png")
    assert evaluate_folder(folder, {"brightness": Brightness})["per_image"][2]["brightness"] == pytest.approx(240 / 255)


@pytest.mark.parametrize("line, match", [
    ("{not json", r"manifest.jsonl:2: corrupt manifest line"),
    ("[1, 2]", r"manifest.jsonl:2: a manifest line must be a JSON object"),
    ('{"index": 1, "prompt": "dark b"}', r"manifest.jsonl:2: missing field 'file'"),
    ('{"index": 1, "file": "00001.png"}', r"manifest.jsonl:2: missing field 'prompt'"),
    ('{"file": "00001.png", "prompt": "p"}', r"manifest.jsonl:2: missing field 'index'"),
    ('{"index": "1", "file": "00001.png", "prompt": "p"}', r"manifest.jsonl:2: field 'index' must be an integer"),
    ('{"index": 1, "file": 7, "prompt": "p"}', r"manifest.jsonl:2: field 'file' must be a string"),
    ('{"index": 1, "file": "00001.png", "prompt": null}', r"manifest.jsonl:2: field 'prompt' must be a string"),
    ('{"index": 1, "file": "00001.png", "prompt": "p", "seed": [1]}', r"manifest.jsonl:2: field 'seed' must be an integer or null"),
    ('{"index": 1, "file": "00001.png", "prompt": "p", "prompt_index": true}', r"field 'prompt_index' must be"),
    ('{"index": 0, "file": "00001.png", "prompt": "p"}', r"manifest.jsonl:2: index 0 is already on line 1"),
    ('{"index": 1, "file": "00000.png", "prompt": "p"}', r"manifest.jsonl:2: file '00000.png' is already on line 1"),
    ('{"index": 1, "file": "./00000.png", "prompt": "p"}', r"manifest.jsonl:2: file './00000.png' is already on line 1"),
    ("[" * 100_000, r"manifest.jsonl:2: corrupt manifest line"),
])
def test_malformed_manifest_lines_name_file_and_line(tmp_path, line, match):
    folder = _folder(tmp_path)
    lines = (folder / "manifest.jsonl").read_text().splitlines()
    lines[1] = line
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    _refused(folder, match)


def test_manifest_files_that_are_not_json_lines(tmp_path):
    folder = _folder(tmp_path)
    (folder / "manifest.jsonl").write_bytes("\n".join(map(json.dumps, _rows(folder))).encode("utf-16"))
    _refused(folder, "manifest.jsonl: not valid UTF-8")
    (folder / "manifest.jsonl").write_text("\n\n")
    _refused(folder, "manifest.jsonl: lists no images")
    (folder / "manifest.jsonl").unlink()
    (folder / "manifest.jsonl").mkdir()
    _refused(folder, "manifest.jsonl: is a folder")


def test_generate_reads_manifests_through_the_same_checks(tmp_path):
    from spobench.core.errors import InputError
    from spobench.data.manifest import read_manifest

    folder = _folder(tmp_path)
    assert [r["index"] for r in read_manifest(folder)] == [0, 1, 2, 3]
    assert read_manifest(tmp_path / "nothing-here") == []
    rows = _rows(folder)
    rows[0]["file"] = "../../elsewhere.png"
    _write_rows(folder, rows)
    with pytest.raises(InputError, match="manifest.jsonl:1: file '../../elsewhere.png' resolves to"):
        read_manifest(folder)


@pytest.mark.parametrize("case, match", [
    ("truncated", "00002.png: truncated or corrupt"),
    ("empty", "00002.png: empty file"),
    ("folder", "00002.png: is a folder"),
    ("bomb", "00002.png: image is 1 x 1000000 pixels"),
    ("text", "00002.png: not an image"),
    ("missing", "00002.png: listed in the manifest but missing"),
])
def test_broken_images_are_refused_before_any_scoring(tmp_path, case, match):
    folder = _folder(tmp_path)
    path = folder / "00002.png"
    if case == "truncated":
        noise = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(noise).save(path)
        path.write_bytes(path.read_bytes()[:400])
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "folder":
        path.unlink()
        path.mkdir()
    elif case == "bomb":
        Image.new("L", (1, 1_000_000)).save(path)
    elif case == "text":
        path.write_text("hello")
    else:
        path.unlink()
    Brightness.calls = 0
    _refused(folder, match)
    assert Brightness.calls == 0 or case == "truncated"  # only decoding finds a truncated body


@pytest.mark.parametrize("line, match", [
    ("{torn", r"score_cache.jsonl:2: corrupt score cache line"),
    ('{"image": "abc", "metric": "m", "score": 1.0, "tag": null}', r"score_cache.jsonl:2: not a score cache entry"),
    ('{"image": "' + "a" * 64 + '", "metric": "m", "score": "1.0", "tag": null}', "not a score cache entry"),
    ('{"image": "' + "a" * 64 + '", "metric": "m", "score": NaN, "tag": null}', "not a score cache entry"),
    ('{"image": "' + "a" * 64 + '", "metric": "m", "score": 1.0, "tag": 3}', "not a score cache entry"),
    ("null", "not a score cache entry"),
])
def test_a_malformed_score_cache_is_refused_not_half_trusted(tmp_path, line, match):
    folder = _folder(tmp_path)
    evaluate_folder(folder, {"brightness": Brightness})
    lines = (folder / CACHE).read_text().splitlines()
    lines[1] = line
    (folder / CACHE).write_text("\n".join(lines) + "\n")
    assert "delete" in _refused(folder, match)


def test_non_finite_scores_are_not_recorded(tmp_path):
    class Broken(Brightness):
        def score(self, images, prompts, metadata=None):
            return MetricOutput(np.full(len(images), np.nan))

    folder = _folder(tmp_path)
    before = snapshot(folder)
    from spobench.core.errors import InputError

    with pytest.raises(InputError, match="00000.png: metric 'broken' gave a non-finite score"):
        evaluate_folder(folder, {"broken": Broken})
    assert snapshot(folder) == before


def test_weights_for_a_metric_not_scored_are_refused_with_the_close_name(tmp_path):
    from spobench.core.errors import InputError

    folder = _folder(tmp_path)
    msg = _refused(folder, "not one of the metrics being scored", weights={"brightnes": "w"})
    assert "did you mean 'brightness'?" in msg and "--weights brightnes=w" in msg
    assert "add it to --metrics" in _refused(folder, "not one", weights={"pickscore": "w"})
    check_weights({"a": "x"}, ["a", "b"])
    assert parse_weights(["a=x", "b = y/z"]) == {"a": "x", "b": "y/z"}
    for bad, match in ((["a"], "expected metric=DIR"), (["a="], "expected"), (["=x"], "expected"),
                       (["a=x", "a=y"], "given twice")):
        with pytest.raises(InputError, match=match):
            parse_weights(bad)


def test_out_that_cannot_be_written_is_refused_before_scoring(tmp_path):
    folder = _folder(tmp_path / "images")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    Brightness.calls = 0
    assert "afile is not a folder" in _refused(folder, "cannot write it", OutputError, out=tmp_path / "afile" / "r.json")
    assert "give a file name" in _refused(folder, "is a folder", OutputError, out=tmp_path / "adir")
    _refused(folder, "is one of this command's inputs", OutputError, out=folder / "manifest.jsonl")
    _refused(folder, "is one of this command's inputs", OutputError, out=folder / "00001.png")
    assert Brightness.calls == 0
    assert (tmp_path / "afile").read_text() == "x" and not any((tmp_path / "adir").iterdir())


def test_a_write_that_fails_late_is_one_output_error(tmp_path, monkeypatch):
    import spobench.eval.evaluate as ev

    folder = _folder(tmp_path)

    def read_only(path, obj):
        raise PermissionError(13, "Read-only file system", str(path))

    monkeypatch.setattr(ev, "atomic_write_json", read_only)
    with pytest.raises(OutputError, match=r"results.json: cannot write it: Read-only file system"):
        evaluate_folder(folder, {"brightness": Brightness})


def test_images_folder_itself(tmp_path):
    from spobench.core.errors import InputError

    with pytest.raises(InputError, match="nope: images folder not found"):
        evaluate_folder(tmp_path / "nope", {"brightness": Brightness})
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="f: not a folder"):
        evaluate_folder(tmp_path / "f", {"brightness": Brightness})


def test_a_read_only_images_folder_is_found_before_scoring(tmp_path, monkeypatch):
    import os

    import spobench.eval.evaluate as ev

    folder = _folder(tmp_path / "images")
    real = os.access
    monkeypatch.setattr(ev.os, "access", lambda p, mode: False if Path(p) == folder else real(p, mode))
    Brightness.calls = 0
    msg = _refused(folder, "score_cache.jsonl: cannot write it", OutputError, out=tmp_path / "r.json")
    assert "not writable" in msg and Brightness.calls == 0 and not (tmp_path / "r.json").exists()


def test_a_score_cache_that_is_a_folder(tmp_path):
    folder = _folder(tmp_path)
    (folder / CACHE).mkdir()
    assert "delete" in _refused(folder, "score_cache.jsonl: cannot read the score cache")


def test_a_bad_image_found_late_leaves_cache_and_results_as_they_were(tmp_path):
    """Images 0-2 are scored (one per batch) before image 3's truncated body is found: nothing is kept."""
    from spobench.core.errors import InputError

    class OneAtATime(Brightness):
        def __init__(self, **kw):
            super().__init__(**kw, batch_size=1)

    folder = _folder(tmp_path)
    noise = np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "00003.png")
    (folder / "00003.png").write_bytes((folder / "00003.png").read_bytes()[:400])
    before = snapshot(folder)
    Brightness.calls = 0
    with pytest.raises(InputError, match="00003.png: truncated or corrupt image"):
        evaluate_folder(folder, {"brightness": OneAtATime})
    assert Brightness.calls == 3 and snapshot(folder) == before


def test_prompt_metadata_must_match_the_manifest(tmp_path):
    from spobench.core.errors import InputError

    folder = _folder(tmp_path)
    with pytest.raises(InputError, match="lists 4 images but 3 prompt metadata rows"):
        evaluate_folder(folder, {"brightness": Brightness}, metadata=[{}] * 3)


def test_write_manifest_writes_what_read_manifest_reads_in_index_order(tmp_path):
    from spobench.data.manifest import MANIFEST, read_manifest, write_manifest

    rows = [{"index": 1, "file": "00001.png", "prompt": "b", "seed": None, "sampler": {"eta": 0.0}},
            {"index": 0, "file": "00000.png", "prompt": "a", "prompt_index": 0, "seed": 7}]
    write_manifest(tmp_path, rows)
    assert read_manifest(tmp_path) == sorted(rows, key=lambda r: r["index"])
    assert [p.name for p in tmp_path.iterdir()] == [MANIFEST]  # no temp file left beside it
