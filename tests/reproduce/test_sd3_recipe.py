"""The SD3-class comparison recipe (issue 18): it plans for `--backbone sd3` and, without the real weights,
names what to download in one line and writes nothing."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clitools import run  # noqa: E402
from contract import assert_clean_failure  # noqa: E402

from spobench.core.catalog import recipe_files  # noqa: E402
from spobench.reproduce.recipe import load_recipe, validate_settings  # noqa: E402


def test_sd3_comparison_cells_are_the_flow_methods():
    r = load_recipe(recipe_files()["sd3_comparison"], "sd3")
    assert [(c.id, c.method) for c in r.cell_list] == [("base", "base"), ("spo", "spo"), ("flow_grpo", "flow-grpo"),
                                                      ("dpo", "diffusion-dpo")]
    assert set(validate_settings(r)) == {"spo", "flow_grpo", "dpo"}
    assert "hpsv3" in r.evaluate.metrics and r.paper is None


def test_sd3_comparison_without_weights_is_one_line(tmp_path):
    out = tmp_path / "run"
    r = run("reproduce", "sd3_comparison", "--backbone", "sd3", "--out", out,
            env={"SPOBENCH_WEIGHTS": str(tmp_path / "w"), "HF_HUB_CACHE": str(tmp_path / "hf")})
    assert_clean_failure(r.returncode, r.stderr, ["stabilityai/stable-diffusion-3.5-medium", "hf download"], out, None)
