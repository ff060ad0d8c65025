"""Bad inputs to `spobench eval` and `spobench eval --compare` (issue 14), through the installed executable:
--weights for a metric that is not scored, an image folder and a manifest that disagree, manifest paths
that leave --images, broken images, malformed manifest / score cache / results.json lines, and results
files that cannot be written. Each case asserts the contract of tests/contract.py: exit 2, ONE error
line naming the input, and the whole case folder (images, cache, results, --out) exactly as before.

The unit-level forms are in tests/eval/test_evaluate.py, tests/eval/test_compare.py and tests/data/test_images.py.
Only the cheap tiny-world metrics are used, so a case costs about one process start.
"""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clitools import run
from contract import assert_clean_failure, snapshot

PROMPTS = ["a red circle", "two green triangles", "a yellow square and a blue circle"]
METRICS = ["--metrics", "toy_aesthetic,toy_alignment"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A folder of tiny-world images with its manifest, and two scored copies (results for --compare)."""
    from spobench.core import catalog
    from spobench.eval.evaluate import evaluate_folder
    from spobench.toyworld import grammar
    from spobench.toyworld.render import Knobs, render

    root = tmp_path_factory.mktemp("bad-eval")
    images = root / "images"
    images.mkdir()
    rows = []
    for i, p in enumerate(PROMPTS):
        Image.fromarray(render(grammar.parse(p), Knobs(), i)).save(images / f"{i:05d}.png")
        rows.append({"index": i, "file": f"{i:05d}.png", "prompt": p, "prompt_index": i, "seed": i})
    _write_rows(images, rows)
    classes = {n: catalog.METRICS.get(n) for n in ("toy_aesthetic", "toy_alignment")}
    for run_name in ("a", "b"):
        shutil.copytree(images, root / run_name)
        evaluate_folder(root / run_name, classes)
    return root


def _write_rows(folder: Path, rows) -> None:
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _rows(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "manifest.jsonl").read_text().splitlines()]


def _set_line(path: Path, n: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[n - 1] = text
    path.write_text("\n".join(lines) + "\n")


def _with_header_size(path: Path, width: int, height: int) -> None:
    """Rewrite a PNG's IHDR to claim another size (valid CRC): a bomb in a few hundred bytes."""
    png = path.read_bytes()
    data = struct.pack(">II", width, height) + png[24:29]
    path.write_bytes(png[:16] + data + struct.pack(">I", zlib.crc32(b"IHDR" + data)) + png[33:])


def _truncate(path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path)
    path.write_bytes(path.read_bytes()[:500])


def _eval(t: Path, *extra) -> list:
    return ["eval", *METRICS, "--images", t / "images", *extra]


# id -> build(case folder) -> (argv, names the error line must hold); the case folder starts as a copy of
# the base images folder (t/images) and the two scored runs (t/a, t/b)
def _unlisted(t):
    Image.new("RGB", (32, 32)).save(t / "images" / "stray.png")
    return _eval(t), [t / "images" / "stray.png", "not listed"]


def _escape(file):
    def build(t):
        Image.new("RGB", (32, 32)).save(t / "x.png")
        rows = _rows(t / "images")
        rows[1]["file"] = file
        _write_rows(t / "images", rows)
        return _eval(t), ["manifest.jsonl:2", repr(file), "outside"]
    return build


def _symlink_escape(t):
    Image.new("RGB", (32, 32)).save(t / "secret.png")
    (t / "images" / "00001.png").unlink()
    (t / "images" / "00001.png").symlink_to(t / "secret.png")
    return _eval(t), ["manifest.jsonl:2", "'00001.png'", "outside"]


def _manifest_line(n, text, *names):
    def build(t):
        _set_line(t / "images" / "manifest.jsonl", n, text)
        return _eval(t), [f"manifest.jsonl:{n}", *names]
    return build


def _manifest_bytes(data: bytes, *names):
    def build(t):
        (t / "images" / "manifest.jsonl").write_bytes(data)
        return _eval(t), ["manifest.jsonl", *names]
    return build


def _no_manifest(t):
    (t / "images" / "manifest.jsonl").unlink()
    return _eval(t), [t / "images", "manifest.jsonl"]


def _broken(how, *names):
    def build(t):
        path = t / "images" / "00002.png"
        how(path)
        return _eval(t), [path, *names]
    return build


def _as_folder(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _cache_line(text, *names):
    def build(t):
        _set_line(t / "a" / ".score_cache.jsonl", 2, text)
        return ["eval", *METRICS, "--images", t / "a"], [".score_cache.jsonl:2", *names]
    return build


def _cache_folder(t):
    _as_folder(t / "a" / ".score_cache.jsonl")
    return ["eval", *METRICS, "--images", t / "a"], [".score_cache.jsonl", "Is a directory"]


def _results(mutate, *names):
    def build(t):
        path = t / "a" / "results.json"
        mutate(path)
        return ["eval", "--compare", t / "a", t / "b"], [path, *names]
    return build


def _edit_results(change):
    def mutate(path):
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))
    return mutate


def _file_in_the_way(t):
    (t / "afile").write_text("not a folder")
    return _eval(t, "--out", t / "afile" / "r.json"), [t / "afile" / "r.json", "not a folder"]


def _folder_out(t):
    (t / "adir").mkdir()
    return _eval(t, "--out", t / "adir"), [t / "adir", "is a folder"]


CASES = {
    # --weights
    "weights-typo": lambda t: (_eval(t, "--weights", f"toy_aesthetc={t}"), ["toy_aesthetc", "did you mean 'toy_aesthetic'"]),
    "weights-metric-not-scored": lambda t: (_eval(t, "--weights", f"pickscore={t}"), ["'pickscore'", "not one of the metrics"]),
    "weights-no-folder": lambda t: (_eval(t, "--weights", "toy_aesthetic"), ["'toy_aesthetic'", "metric=DIR"]),
    "weights-twice": lambda t: (_eval(t, "--weights", f"toy_aesthetic={t}", "--weights", f"toy_aesthetic={t}/x"),
                                ["toy_aesthetic", "given twice"]),
    # the folder and its manifest
    "images-not-found": lambda t: (["eval", *METRICS, "--images", t / "nope"], [t / "nope", "not found"]),
    "images-is-a-file": lambda t: (["eval", *METRICS, "--images", t / "images" / "00000.png"], ["00000.png", "not a folder"]),
    "no-manifest": _no_manifest,
    "unlisted-png": _unlisted,
    "manifest-parent-path": _escape("../x.png"),
    "manifest-absolute-path": _escape("/etc/x.png"),
    "manifest-symlink-escape": _symlink_escape,
    "manifest-bad-json": _manifest_line(2, '{"index": 1, "file": ', "corrupt manifest line"),
    "manifest-not-an-object": _manifest_line(3, '"00002.png"', "JSON object"),
    "manifest-missing-field": _manifest_line(2, '{"index": 1, "file": "00001.png"}', "'prompt'"),
    "manifest-wrong-type": _manifest_line(1, '{"index": "0", "file": "00000.png", "prompt": "a red circle"}', "'index'"),
    "manifest-seed-wrong-type": _manifest_line(1, '{"index": 0, "file": "00000.png", "prompt": "a red circle", "seed": 1.5}',
                                               "'seed'"),
    "manifest-nul-in-path": _manifest_line(2, '{"index": 1, "file": "0000\\u0000.png", "prompt": "two green triangles"}',
                                           "not a usable path"),
    "manifest-prompt-number": _manifest_line(2, '{"index": 1, "file": "00001.png", "prompt": 7}', "'prompt'", "string"),
    "manifest-duplicate-file": _manifest_line(3, '{"index": 2, "file": "00000.png", "prompt": "a red circle"}',
                                              "'00000.png'", "already on line 1"),
    "manifest-utf16": _manifest_bytes('{"index": 0}\n'.encode("utf-16"), "UTF-8"),
    "manifest-empty": _manifest_bytes(b"\n\n", "lists no images"),
    "manifest-listed-missing": _broken(lambda p: p.unlink(), "missing"),
    # broken images
    "image-truncated": _broken(_truncate, "truncated"),
    "image-0-bytes": _broken(lambda p: p.write_bytes(b""), "0 bytes"),
    "image-bomb-aspect": _broken(lambda p: Image.new("L", (1, 1_000_000)).save(p), "1 x 1000000"),
    "image-bomb-size": _broken(lambda p: _with_header_size(p, 60_000, 60_000), "pixels"),
    "image-is-a-folder": _broken(_as_folder, "is a folder"),
    "image-not-an-image": _broken(lambda p: p.write_text("hello"), "not an image"),
    # the score cache
    "cache-corrupt-line": _cache_line("{torn", "corrupt score cache line"),
    "cache-wrong-type": _cache_line('{"image": "' + "0" * 64 + '", "metric": "m", "score": "9", "tag": null}',
                                    "not a score cache entry"),
    "cache-is-a-folder": _cache_folder,
    # where results go
    "out-under-a-file": _file_in_the_way,
    "out-is-a-folder": _folder_out,
    "out-is-the-manifest": lambda t: (_eval(t, "--out", t / "images" / "manifest.jsonl"), ["manifest.jsonl", "inputs"]),
    # --compare
    "compare-results-bad-json": _results(lambda p: p.write_text('{"metrics": {'), "invalid JSON"),
    "compare-results-utf16": _results(lambda p: p.write_bytes(p.read_text().encode("utf-16")), "UTF-8"),
    "compare-results-not-results": _results(lambda p: p.write_text("[]"), "not a spobench results file"),
    "compare-results-seed-list": _results(_edit_results(lambda d: d["per_image"][0].update(seed=[0])),
                                          "per_image[0].seed"),
    "compare-results-metric-not-object": _results(_edit_results(lambda d: d["metrics"].update(toy_aesthetic=3)),
                                                  "metrics['toy_aesthetic']"),
    "compare-results-missing": lambda t: (["eval", "--compare", t / "nope.json", t / "b"], ["nope.json", "not found"]),
    "compare-out-is-b": lambda t: (["eval", "--compare", t / "a", t / "b", "--out", t / "b" / "results.json"],
                                   ["results.json", "inputs"]),
    "compare-out-is-a-folder": lambda t: (["eval", "--compare", t / "a", t / "b", "--out", t / "b"], [t / "b", "is a folder"]),
    "compare-with-images": lambda t: (["eval", "--compare", t / "a", t / "b", "--images", t / "images"], ["--images"]),
    "compare-with-weights": lambda t: (["eval", "--compare", t / "a", t / "b", "--weights", f"toy_aesthetic={t}"],
                                       ["--weights"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_eval_input(case, base, tmp_path):
    for name in ("images", "a", "b"):
        shutil.copytree(base / name, tmp_path / name, symlinks=True)
    argv, names = CASES[case](tmp_path)
    before = snapshot(tmp_path)
    r = run(*argv)
    assert r.returncode == 2, r.stderr[-2000:]
    assert_clean_failure(r.returncode, r.stderr, names, tmp_path, before)


def test_the_good_folder_scores(base, tmp_path):
    """The cases above start from a folder that eval accepts (so each refusal is the edit's doing)."""
    shutil.copytree(base / "images", tmp_path / "images")
    r = run("eval", *METRICS, "--images", tmp_path / "images", "--out", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "r.json").read_text())["n_images"] == len(PROMPTS)
    r = run("eval", "--compare", base / "a", base / "b", "--out", tmp_path / "c.json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "c.json").read_text())["metrics"]["toy_aesthetic"]["win_rate"] == 0.5
