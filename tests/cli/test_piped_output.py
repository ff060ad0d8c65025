"""The installed CLI with stdout and stderr going to files, as under CI, nohup or `> log.txt`: progress comes as
plain lines with rate and ETA, tables are whole (not cut to 80 columns), and no library's own progress bar
("Loading weights", "Writing model shards") leaks in. COLUMNS is emptied: clitools sets 200, which would hide
rich's 80-column default."""

import re
import textwrap

import pytest

from clitools import run

PIPED = {"COLUMNS": "", "SPOBENCH_PROGRESS_SECONDS": "0"}  # 0: a line on every update, so no test waits
BARS = ("Loading weights", "Writing model shards", "Fetching", "it/s]")  # tqdm: "[00:00<00:00, 70.9it/s]"


def _no_bars(text: str) -> None:
    for bar in BARS:
        assert bar not in text, (bar, text[-3000:])
    for ln in text.splitlines():  # "━" in a table's head rule only, never as a rich bar
        assert "━" not in ln or "╇" in ln, ln


def test_tables_are_not_cut_when_piped():
    r = run("ls", env=PIPED)
    assert r.returncode == 0, r.stderr[-2000:]
    longest = "tiny world: a tiny CLIP trained on the tiny world's pairs (PickScore's loss)"
    line = next(ln for ln in r.stdout.splitlines() if ln.lstrip().startswith("toy_pickscore"))
    assert longest in line and len(line) > 80, line  # the whole description on its row's one line
    assert "…" not in r.stdout


def test_generate_piped_prints_progress_lines_with_rate_and_eta(tmp_path):
    (tmp_path / "p.txt").write_text("a red circle\ntwo blue squares\n")
    r = run("generate", "--prompts", tmp_path / "p.txt", "--out", tmp_path / "o", "-n", "2", "--steps", "2",
            "--batch-size", "1", env=PIPED)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stderr.splitlines()
    assert "generating 0/4  started" in lines
    middle = [ln for ln in lines if re.fullmatch(r"generating [123]/4  [\d.]+ (image/s|s/image)  eta \d+:\d\d", ln)]
    assert len(middle) == 3, r.stderr
    assert any(re.fullmatch(r"generating 4/4  done in \d+:\d\d  [\d.]+ (image/s|s/image)", ln) for ln in lines), r.stderr
    _no_bars(r.stdout + r.stderr)
    assert "wrote 4 images" in r.stdout
    r = run("eval", "--images", tmp_path / "o", "--metrics", "toy_aesthetic,toy_alignment", env=PIPED)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("scoring ")]  # 4 images x 2 metrics
    assert lines[0] == "scoring 0  started" and len(lines) == 3, r.stderr
    assert re.fullmatch(r"scoring 4/8  [\d.]+ (score/s|s/score)  eta \d+:\d\d", lines[1]), r.stderr
    assert re.fullmatch(r"scoring 8/8  done in \d+:\d\d  [\d.]+ (score/s|s/score)", lines[-1]), r.stderr
    _no_bars(r.stdout + r.stderr)


def test_a_bad_progress_interval_is_one_error_line(tmp_path):
    (tmp_path / "p.txt").write_text("a red circle\n")
    r = run("generate", "--prompts", tmp_path / "p.txt", "--out", tmp_path / "o", "--steps", "1",
            env={**PIPED, "SPOBENCH_PROGRESS_SECONDS": "often"})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert errors == ["error: SPOBENCH_PROGRESS_SECONDS must be a number of seconds >= 0 (got 'often')"], r.stderr
    assert not (tmp_path / "o").exists()  # refused before any work


SMALL = """\
name = "piped"
title = "a piped run"
backbones = ["tiny"]
model = "random:0"
budget = "tiny: 2 rounds"
[train]
prompts = "tiny-train"
prompt_limit = 2
max_rounds = 2
rollout_batch = 2
train_batch_size = 4
num_steps = 4
threshold = 0.0
[generate]
prompt_set = "tiny-val"
limit = 2
steps = 2
[evaluate]
metrics = ["toy_aesthetic", "toy_alignment"]
[cells.base]
label = "the base model, as the tiny world ships it"
method = "base"
[cells.spo]
label = "SPO with the toy aesthetic score as its step scorer"
method = "spo"
train = { k = 2, kappa = 800, scorer = "metric:toy_aesthetic" }
"""


@pytest.mark.slow
def test_reproduce_piped_has_round_lines_whole_tables_and_no_bars(tmp_path):
    (tmp_path / "piped.toml").write_text(textwrap.dedent(SMALL))
    r = run("reproduce", tmp_path / "piped.toml", "--out", tmp_path / "run", env=PIPED, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    err = r.stderr.splitlines()
    assert "spo rounds 0/2  started" in err, r.stderr
    assert any(re.fullmatch(r"spo rounds 1/2  [\d.]+ (round/s|s/round)  eta \d+:\d\d  .*loss.*", ln) for ln in err), \
        r.stderr
    assert any(ln.startswith("spo rounds 2/2  done in ") for ln in err), r.stderr
    spo = "SPO with the toy aesthetic score as its step scorer"  # the cell's label names its stages
    assert any(re.fullmatch(rf"generating {spo} 2/2  done in \d+:\d\d  [\d.]+ (image/s|s/image)", ln) for ln in err), \
        r.stderr
    assert f"scoring {spo} with toy_aesthetic, toy_alignment ..." in err
    _no_bars(r.stdout + r.stderr)
    # the results table: both long labels whole, on the same line as their numbers
    rows = [ln for ln in r.stdout.splitlines() if "SPO with the toy aesthetic score as its step scorer" in ln]
    assert len(rows) == 1 and re.search(r"\d\.\d{4}.*\d\.\d{4}", rows[0]), r.stdout
    assert "…" not in r.stdout
