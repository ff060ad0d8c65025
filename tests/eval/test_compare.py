"""compare_results on synthetic results files in the layout evaluate_folder writes."""

import json

import numpy as np
import pytest
from PIL import Image

from spobench.eval.compare import CompareResult, compare_results, pair_rows, sign_test
from spobench.core.errors import InputError

ID = {"name": "pickscore", "version": "1", "checkpoint_sha256": "ab" * 32, "options": {}}


def results(rows, metrics=("pickscore",), ids=None):
    """A results dict like evaluate_folder's: rows are (prompt, seed, {metric: score})."""
    ids = ids or {}
    per_image = [{"file": f"{i:05d}.png", "prompt": p, "seed": s, **scores} for i, (p, s, scores) in enumerate(rows)]
    return {"images": "imgs", "n_images": len(rows), "per_image": per_image,
            "metrics": {m: {"mean": 0.0, "std": 0.0, "ci95": [0, 0], "id": ids.get(m, {**ID, "name": m})}
                        for m in metrics}}


def write(path, res):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res))
    return path


def run(tmp_path, rows_a, rows_b, **kw):
    ra, rb = kw.pop("ra", None), kw.pop("rb", None)
    a = write(tmp_path / "a" / "results.json", ra or results(rows_a))
    b = write(tmp_path / "b" / "results.json", rb or results(rows_b))
    return a, b, compare_results(a, b, **kw)


def test_a_better_everywhere(tmp_path):
    rows_b = [(f"p{i}", i, {"pickscore": float(i)}) for i in range(20)]
    rows_a = [(p, s, {"pickscore": v["pickscore"] + 0.5}) for p, s, v in rows_b]
    a, _, res = run(tmp_path, rows_a, rows_b)
    m = res["metrics"]["pickscore"]
    assert m["win_rate"] == 1.0 and m["win_rate_ci95"] == [1.0, 1.0]
    assert m["mean_diff"] == pytest.approx(0.5) and m["mean_diff_ci95"] == pytest.approx([0.5, 0.5])
    assert m["pairs"] == {"n": 20, "a_wins": 20, "ties": 0, "b_wins": 0}
    assert m["sign_test_p"] == pytest.approx(2 / 2 ** 20)
    assert m["id"] == ID
    assert res["pairing"] == "seed" and res["n_pairs"] == 20 and res["n_prompts"] == 20
    on_disk = json.loads((a.parent / "compare.json").read_text())
    assert on_disk["metrics"]["pickscore"]["win_rate"] == 1.0 and "git" in on_disk


def test_ties_count_half_and_prompts_weigh_equally(tmp_path):
    # p0: 2 wins -> 1; p1: win + loss -> 0.5; p2: 2 ties -> 0.5; p3: 1 loss -> 0 (one image only)
    rows_a = [("p0", 0, {"pickscore": 2.0}), ("p0", 1, {"pickscore": 2.0}),
              ("p1", 2, {"pickscore": 2.0}), ("p1", 3, {"pickscore": 0.0}),
              ("p2", 4, {"pickscore": 1.0}), ("p2", 5, {"pickscore": 1.0}),
              ("p3", 6, {"pickscore": 0.0})]
    rows_b = [(p, s, {"pickscore": 1.0}) for p, s, _ in rows_a]
    _, _, res = run(tmp_path, rows_a, rows_b)
    m = res["metrics"]["pickscore"]
    assert m["win_rate"] == pytest.approx((1 + 0.5 + 0.5 + 0) / 4)
    # per-prompt mean differences: +1, 0, 0, -1
    assert m["mean_diff"] == pytest.approx(0.0)
    assert m["pairs"] == {"n": 7, "a_wins": 3, "ties": 2, "b_wins": 2}
    assert m["prompts"] == {"n": 4, "a_wins": 1, "ties": 2, "b_wins": 1}
    assert m["sign_test_p"] == 1.0
    assert m["mean_a"] == pytest.approx(8 / 7) and m["mean_b"] == 1.0
    lo, hi = m["win_rate_ci95"]
    assert 0.0 <= lo <= 0.5 <= hi <= 1.0


def test_identical_runs_are_all_ties(tmp_path):
    rows = [(f"p{i}", i, {"pickscore": float(i % 3)}) for i in range(10)]
    _, _, res = run(tmp_path, rows, rows)
    m = res["metrics"]["pickscore"]
    assert m["win_rate"] == 0.5 and m["win_rate_ci95"] == [0.5, 0.5] and m["mean_diff"] == 0.0


def test_tie_tolerance(tmp_path):
    rows_b = [(f"p{i}", i, {"pickscore": 1.0}) for i in range(4)]
    rows_a = [(p, s, {"pickscore": 1.0 + 1e-9}) for p, s, _ in rows_b]
    assert run(tmp_path, rows_a, rows_b)[2]["metrics"]["pickscore"]["win_rate"] == 1.0
    assert run(tmp_path, rows_a, rows_b, tie_tol=1e-6)[2]["metrics"]["pickscore"]["win_rate"] == 0.5


def test_pairs_by_prompt_and_seed_whatever_the_row_order(tmp_path):
    rows_b = [(f"p{i // 2}", i, {"pickscore": float(i)}) for i in range(8)]
    rows_a = [(p, s, {"pickscore": v["pickscore"] + s * 0.1}) for p, s, v in reversed(rows_b)]
    _, _, res = run(tmp_path, rows_a, rows_b)
    m = res["metrics"]["pickscore"]
    assert res["pairing"] == "seed" and res["n_pairs"] == 8 and res["n_prompts"] == 4
    assert m["mean_diff"] == pytest.approx(np.mean([np.mean([0.1 * s, 0.1 * (s + 1)]) for s in range(0, 8, 2)]))
    assert m["pairs"]["a_wins"] == 7 and m["pairs"]["ties"] == 1  # seed 0 adds 0


def test_different_seeds_pair_by_prompt_occurrence(tmp_path):
    rows_b = [("x", 100, {"pickscore": 0.0}), ("y", 101, {"pickscore": 0.0}), ("y", 102, {"pickscore": 5.0})]
    rows_a = [("y", 7, {"pickscore": 1.0}), ("y", 8, {"pickscore": 1.0}), ("x", 9, {"pickscore": 1.0})]
    _, _, res = run(tmp_path, rows_a, rows_b)
    assert res["pairing"] == "prompt" and res["n_pairs"] == 3
    # pairs: (y#0: 1 vs 0), (y#1: 1 vs 5), (x#0: 1 vs 0) -> prompt y: 0.5, prompt x: 1
    assert res["metrics"]["pickscore"]["win_rate"] == pytest.approx(0.75)
    with pytest.raises(InputError, match="no image pairs.*pair_by='prompt'"):
        run(tmp_path, rows_a, rows_b, pair_by="seed")


def test_auto_pairing_takes_the_mode_with_more_pairs():
    a = [{"prompt": f"p{i}", "seed": i} for i in range(4)]  # 1 image per prompt, seeds 0..3
    b = [{"prompt": f"p{i // 4}", "seed": i} for i in range(16)]  # 4 per prompt, seeds 0..15
    mode, pairs = pair_rows(a, b)
    assert mode == "prompt" and pairs == [(0, 0), (1, 4), (2, 8), (3, 12)]
    mode, pairs = pair_rows(a, b, "seed")
    assert mode == "seed" and pairs == [(0, 0)]
    with pytest.raises(InputError, match="pair_by"):
        pair_rows(a, b, "index")


def test_partial_overlap_reports_unpaired(tmp_path):
    rows_a = [(f"p{i}", i, {"pickscore": 1.0}) for i in range(6)]
    rows_b = [(f"p{i}", i, {"pickscore": 0.0}) for i in range(3, 10)]
    _, _, res = run(tmp_path, rows_a, rows_b)
    assert res["n_pairs"] == 3 and res["unpaired"] == {"a": 3, "b": 4}


def test_no_shared_prompt_is_refused(tmp_path):
    with pytest.raises(InputError, match=r"a/results.json and .*b/results.json share no prompt"):
        run(tmp_path, [("cat", 0, {"pickscore": 1.0})], [("dog", 0, {"pickscore": 1.0})])


@pytest.mark.parametrize("field,value", [("version", "2"), ("checkpoint_sha256", "cd" * 32),
                                         ("options", {"version": "v2.0"})])
def test_different_metric_identity_is_refused(tmp_path, field, value):
    rows = [("cat", 0, {"pickscore": 1.0})]
    rb = results(rows, ids={"pickscore": {**ID, field: value}})
    with pytest.raises(InputError, match=rf"'pickscore' differs between the runs \({field}\).*a/results.json.*b/results.json"):
        run(tmp_path, rows, rows, rb=rb)


def test_missing_id_is_refused(tmp_path):
    rows = [("cat", 0, {"pickscore": 1.0})]
    rb = results(rows)
    del rb["metrics"]["pickscore"]["id"]
    with pytest.raises(InputError, match="b/results.json: metric 'pickscore' has no id"):
        run(tmp_path, rows, rows, rb=rb)


def test_metric_selection(tmp_path):
    rows_a = [("cat", 0, {"pickscore": 1.0, "hpsv2": 0.3})]
    rows_b = [("cat", 0, {"pickscore": 0.0, "aesthetic": 5.0})]
    ra, rb = results(rows_a, ("pickscore", "hpsv2")), results(rows_b, ("pickscore", "aesthetic"))
    _, _, res = run(tmp_path, rows_a, rows_b, ra=ra, rb=rb)
    assert list(res["metrics"]) == ["pickscore"]
    assert set(res["skipped_metrics"]) == {"hpsv2", "aesthetic"}
    with pytest.raises(InputError, match="b/results.json: has no scores for metric 'hpsv2'"):
        run(tmp_path, rows_a, rows_b, ra=ra, rb=rb, metrics=["pickscore", "hpsv2"])
    rb2 = results(rows_b, ("aesthetic",))
    with pytest.raises(InputError, match="no metric in common"):
        run(tmp_path, rows_a, rows_b, ra=ra, rb=rb2)


def test_invalid_score_and_files(tmp_path):
    rows_a = [("cat", 0, {"pickscore": float("nan")})]
    with pytest.raises(InputError, match="00000.png has no valid 'pickscore' score"):
        run(tmp_path, rows_a, [("cat", 0, {"pickscore": 1.0})])
    with pytest.raises(InputError, match="results file not found"):
        compare_results(tmp_path / "nope", tmp_path / "b")
    bad = tmp_path / "bad.json"
    bad.write_text("{\n oops")
    with pytest.raises(InputError, match=r"bad.json:2: invalid JSON"):
        compare_results(bad, bad)
    bad.write_text("[1, 2]")
    with pytest.raises(InputError, match="not a spobench results file"):
        compare_results(bad, bad)


def test_bootstrap_ci_brackets_a_noisy_win_rate(tmp_path):
    rng = np.random.default_rng(1)
    rows_b = [(f"p{i}", i, {"pickscore": float(v)}) for i, v in enumerate(rng.normal(size=200))]
    rows_a = [(p, s, {"pickscore": sc["pickscore"] + float(rng.normal(0.3, 1.0))}) for p, s, sc in rows_b]
    _, _, res = run(tmp_path, rows_a, rows_b, out=tmp_path / "cmp" / "x.json")
    m = res["metrics"]["pickscore"]
    lo, hi = m["win_rate_ci95"]
    assert lo < m["win_rate"] < hi and 0.5 < lo and hi - lo < 0.2
    dlo, dhi = m["mean_diff_ci95"]
    assert dlo < m["mean_diff"] < dhi and 0 < dlo
    assert m["sign_test_p"] < 0.05
    assert (tmp_path / "cmp" / "x.json").exists()
    _, _, again = run(tmp_path, rows_a, rows_b)
    assert again["metrics"]["pickscore"]["win_rate_ci95"] == [lo, hi]  # seeded: reproducible


def test_sign_test_values():
    assert sign_test(0, 0) == 1.0
    assert sign_test(5, 5) == 1.0
    assert sign_test(10, 0) == pytest.approx(2 / 1024)
    assert sign_test(1, 9) == pytest.approx(2 * 11 / 1024)


def test_rich_summary(tmp_path):
    from rich.console import Console

    rows_b = [(f"p{i}", i, {"pickscore": 0.0}) for i in range(5)]
    rows_a = [(p, s, {"pickscore": 1.0}) for p, s, _ in rows_b]
    _, _, res = run(tmp_path, rows_a, rows_b)
    assert isinstance(res, CompareResult)
    console = Console(record=True, width=200)
    console.print(res)
    text = console.export_text()
    assert "pickscore" in text and "100.0%" in text and "+1.0000" in text and "paired by seed" in text


def test_folders_written_by_evaluate(tmp_path):
    """End to end with evaluate_folder's real output: two folders of images scored by a toy metric."""
    from spobench.metrics.base import Metric, MetricOutput

    from spobench.eval.evaluate import evaluate_folder

    class Mean(Metric):
        name, version = "mean", "1"

        def score(self, images, prompts, metadata=None):
            return MetricOutput(np.array([np.asarray(im, dtype=float).mean() for im in images]))

    for name, shift in (("a", 20), ("b", 0)):
        folder = tmp_path / name
        folder.mkdir()
        rows = []
        for i in range(6):
            Image.new("RGB", (4, 4), (10 * i + shift,) * 3).save(folder / f"{i:05d}.png")
            rows.append({"index": i, "file": f"{i:05d}.png", "prompt": f"p{i // 2}", "prompt_index": i // 2, "seed": i})
        (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        evaluate_folder(folder, {"mean": Mean})
    res = compare_results(tmp_path / "a", tmp_path / "b")
    m = res["metrics"]["mean"]
    assert m["win_rate"] == 1.0 and m["mean_diff"] == pytest.approx(20.0) and res["n_prompts"] == 3
    assert (tmp_path / "a" / "compare.json").exists()


ROWS = [(f"p{i}", i, {"pickscore": float(i)}) for i in range(4)]


@pytest.mark.parametrize("mutate, match", [
    (lambda r: r["metrics"].update(pickscore=[1, 2]), r"metrics\['pickscore'\] must be an object"),
    (lambda r: r["per_image"][1].update(seed=[1]), r"per_image\[1\].seed must be an integer or null"),
    (lambda r: r["per_image"][2].update(seed="2"), r"per_image\[2\].seed must be an integer or null"),
    (lambda r: r["per_image"][0].pop("prompt"), r"per_image\[0\] has no prompt"),
    (lambda r: r.update(per_image={"a": 1}), "not a spobench results file"),
])
def test_malformed_results_are_one_line_naming_the_file(tmp_path, mutate, match):
    ra = results(ROWS)
    mutate(ra)
    a = write(tmp_path / "a" / "results.json", ra)
    b = write(tmp_path / "b" / "results.json", results(ROWS))
    with pytest.raises(InputError, match=match) as e:
        compare_results(a, b)
    assert str(a) in str(e.value) and not (tmp_path / "a" / "compare.json").exists()


def test_results_that_are_not_json_text(tmp_path):
    a = tmp_path / "results.json"
    a.write_bytes(json.dumps(results(ROWS)).encode("utf-16"))
    with pytest.raises(InputError, match="results.json: not valid UTF-8"):
        compare_results(a, a)
    a.write_text("[" * 100_000)
    with pytest.raises(InputError, match="results.json: invalid JSON"):
        compare_results(a, a)


def test_compare_out_that_cannot_be_written(tmp_path):
    from spobench.core.errors import OutputError

    a = write(tmp_path / "a" / "results.json", results(ROWS))
    b = write(tmp_path / "b" / "results.json", results(ROWS))
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is one of this command's inputs"):
        compare_results(a, b, out=b)
    with pytest.raises(OutputError, match="is a folder"):
        compare_results(a, b, out=tmp_path / "a")
    with pytest.raises(OutputError, match=r"cannot write it: .*file is not a folder"):
        compare_results(a, b, out=tmp_path / "file" / "c.json")
    assert json.loads(b.read_text()) == results(ROWS) and (tmp_path / "file").read_text() == "x"


# -- direction: Metric.higher_is_better -----------------------------------------------------------
def _scored_folders(tmp_path, metric_class, brighter: str):
    """Two image folders scored by evaluate_folder; run ``brighter`` has the brighter images."""
    from spobench.eval.evaluate import evaluate_folder

    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        rows = []
        for i in range(6):
            Image.new("RGB", (4, 4), (10 * i + (20 if name == brighter else 0),) * 3).save(folder / f"{i:05d}.png")
            rows.append({"index": i, "file": f"{i:05d}.png", "prompt": f"p{i // 2}", "prompt_index": i // 2, "seed": i})
        (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        evaluate_folder(folder, {metric_class.name: metric_class})
    return tmp_path / "a", tmp_path / "b"


def _darkness_metric():
    from spobench.metrics.base import Metric, MetricOutput

    class Darkness(Metric):
        """A loss-like fake metric: mean grey level, where less is better."""
        name, version = "darkness", "1"
        higher_is_better = False

        def score(self, images, prompts, metadata=None):
            return MetricOutput(np.array([np.asarray(im, dtype=float).mean() for im in images]))

    return Darkness


def test_lower_is_better_metric_counts_the_lower_score_as_the_win(tmp_path):
    Darkness = _darkness_metric()
    a, b = _scored_folders(tmp_path, Darkness, brighter="b")  # A darker = A better
    on_disk = json.loads((a / "results.json").read_text())
    assert on_disk["metrics"]["darkness"]["id"]["higher_is_better"] is False  # recorded with the scores
    res = compare_results(a, b)
    m = res["metrics"]["darkness"]
    assert m["higher_is_better"] is False
    assert m["win_rate"] == 1.0 and m["win_rate_ci95"] == [1.0, 1.0]
    assert m["pairs"] == {"n": 6, "a_wins": 6, "ties": 0, "b_wins": 0}
    assert m["prompts"]["a_wins"] == 3 and m["prompts"]["b_wins"] == 0
    assert m["mean_diff"] == pytest.approx(-20.0)  # the raw difference A - B keeps its sign
    # and from B's side: B loses every pair
    back = compare_results(b, a, out=tmp_path / "ba.json")["metrics"]["darkness"]
    assert back["win_rate"] == 0.0 and back["pairs"]["b_wins"] == 6 and back["mean_diff"] == pytest.approx(20.0)


def test_lower_is_better_ties_and_tolerance(tmp_path):
    ids = {"loss": {**ID, "name": "loss", "higher_is_better": False}}
    rows_b = [(f"p{i}", i, {"loss": 1.0}) for i in range(4)]
    rows_a = [(p, s, {"loss": 1.0 - 1e-9}) for p, s, _ in rows_b]
    ra, rb = results(rows_a, ("loss",), ids), results(rows_b, ("loss",), ids)
    assert run(tmp_path, rows_a, rows_b, ra=ra, rb=rb)[2]["metrics"]["loss"]["win_rate"] == 1.0
    assert run(tmp_path, rows_a, rows_b, ra=ra, rb=rb, tie_tol=1e-6)[2]["metrics"]["loss"]["win_rate"] == 0.5


def test_higher_is_better_stays_the_default(tmp_path):
    # results written before the direction was recorded (no higher_is_better in the id) are higher-is-better,
    # and compare with new ones that say so explicitly
    rows_b = [(f"p{i}", i, {"pickscore": 0.0}) for i in range(3)]
    rows_a = [(p, s, {"pickscore": 1.0}) for p, s, _ in rows_b]
    rb = results(rows_b, ids={"pickscore": {**ID, "higher_is_better": True}})
    m = run(tmp_path, rows_a, rows_b, rb=rb)[2]["metrics"]["pickscore"]
    assert m["higher_is_better"] is True and m["win_rate"] == 1.0


def test_runs_scored_in_opposite_directions_are_refused(tmp_path):
    rows = [("cat", 0, {"pickscore": 1.0})]
    rb = results(rows, ids={"pickscore": {**ID, "higher_is_better": False}})
    with pytest.raises(InputError, match=r"'pickscore' differs between the runs \(higher_is_better\)"):
        run(tmp_path, rows, rows, rb=rb)


def test_rich_summary_colours_by_the_metric_direction(tmp_path):
    from rich.console import Console

    Darkness = _darkness_metric()
    a, b = _scored_folders(tmp_path, Darkness, brighter="b")
    console = Console(record=True, width=200, color_system="truecolor")
    console.print(compare_results(a, b))
    text = console.export_text(clear=False)
    assert "darkness (lower is better)" in text and "100.0%" in text and "-20.0000" in text
    assert "\x1b[32m100.0%" in console.export_text(styles=True)  # A's win is shown as a win (green)


def test_metric_identity_carries_the_direction():
    Darkness = _darkness_metric()
    ident = Darkness().identity()
    assert ident.higher_is_better is False
    assert ident.key() == "darkness@1#"  # the score cache key does not change with it
    from spobench.metrics.base import Metric

    assert Metric().identity().higher_is_better is True


def test_report_names_a_lower_is_better_metric():
    from spobench.eval.report_tables import compare_table

    def cell(cid, cmp):
        return {"id": cid, "label": cid, "metrics": {}, "compare": cmp}

    win = {"win_rate": 1.0, "win_rate_ci95": [1.0, 1.0], "mean_diff": -2.0, "mean_diff_ci95": [-2.0, -2.0]}
    data = {"compare_to": "base", "metrics": ["darkness", "pickscore"],
            "cells": [cell("base", None), cell("spo", {"darkness": {**win, "higher_is_better": False},
                                                       "pickscore": win})]}
    head, rows = compare_table(data)
    assert head[1] == "darkness (lower is better): win rate vs base [95% CI]"
    assert head[3] == "pickscore: win rate vs base [95% CI]"
    assert rows == [["spo"] + ["1.000 [1.000, 1.000]", "-2.0000 [-2.0000, -2.0000]"] * 2]
