"""`spobench toy data` and `spobench toy pretrain` as a user runs them (tiny settings)."""

import json

import pyarrow.parquet as pq

from clitools import run

PICKAPIC_COLUMNS = {"caption", "jpg_0", "jpg_1", "label_0", "label_1", "has_label", "are_different"}


def test_toy_data_writes_pickapic_parquet_and_prompt_lists(tmp_path):
    out = tmp_path / "data"
    r = run("toy", "data", "--out", out, "--pairs", "24", "--base-samples", "0.25")
    assert r.returncode == 0, r.stderr
    table = pq.read_table(out / "pairs.parquet")
    assert PICKAPIC_COLUMNS <= set(table.column_names) and table.num_rows == 24
    assert "generator_0" in table.column_names and "extra" in set(table.column("generator_0").to_pylist()
                                                                   + table.column("generator_1").to_pylist())
    train = json.loads((out / "train_prompts.json").read_text())
    assert {"caption", "trainset_idx"} <= set(train[0])
    val = json.loads((out / "val_prompts.json").read_text())
    assert len(val) == 500 and not {t["caption"] for t in train} & {v if isinstance(v, str) else v["caption"] for v in val}
    assert "disagreement_rate" in r.stdout
    again = run("toy", "data", "--out", out, "--pairs", "24")
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_toy_pretrain_runs_resumes_and_exports(tmp_path):
    out = tmp_path / "pt"
    r = run("toy", "pretrain", "--out", out, "--steps", "2", "--batch-size", "4", "--checkpoint-every", "1")
    assert r.returncode == 0, r.stderr
    assert (out / "model" / "unet").is_dir() and (out / "checkpoints" / "checkpoint-000002" / "manifest.json").exists()
    r = run("toy", "pretrain", "--out", out, "--steps", "3", "--batch-size", "4", "--resume")
    assert r.returncode == 0 and "resumed at step 2" in r.stdout
    assert json.loads((out / "model" / "pretrain.json").read_text())["step"] == 3
    gen = run("generate", "--model", out / "model", "--prompt-set", "tiny-val", "--limit", "2", "--steps", "2",
              "--out", tmp_path / "g")
    assert gen.returncode == 0, gen.stderr
