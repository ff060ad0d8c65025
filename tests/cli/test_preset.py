"""`spobench train <trainer> --preset NAME|FILE.toml` and a recipe's ``preset``: named settings as data files
(spobench/assets/presets/), applied before --config and --set, recorded in the run's config.json; a bad
preset is one line naming its file and field."""

import json

import pytest

from clitools import run
from contract import assert_clean_failure

from spobench.core import catalog
from spobench.core.errors import InputError
from spobench.trainers import presets
from spobench.trainers.spo import SPOConfig

TINY_RUN = ["--backbone", "tiny", "--set", "prompts=tiny-train", "--set", "prompt_limit=1", "--set", "rollout_batch=1",
            "--set", "num_steps=3", "--set", "k=2", "--set", "max_rounds=1", "--set", "threshold=0"]


def test_paper_is_the_defaults_for_every_trainer():
    for name in catalog.TRAINERS.names():
        cls = catalog.TRAINERS.get(name).Config
        assert presets.apply_preset(cls, name, "paper") == cls.from_dict({})


def test_fast_is_the_tiny_measured_settings_and_refuses_other_backbones():
    fast = presets.apply_preset(SPOConfig, "spo", "fast", backbone="tiny")
    changed = {k: v for k, v in fast.to_dict().items() if v != getattr(SPOConfig(), k)}
    assert changed == {"lr": 5e-4}  # what results/fast_preset/ measured
    base = SPOConfig.from_dict({"k": 3})
    assert presets.apply_preset(SPOConfig, "spo", None, base) is base
    assert presets.apply_preset(SPOConfig, "spo", "fast", base, "tiny").k == 3  # over a base (a resumed run's own)
    with pytest.raises(InputError, match=r"fast\.toml: preset 'fast' is for spo on --backbone tiny only"):
        presets.apply_preset(SPOConfig, "spo", "fast", backbone="sd15")


def test_a_backbone_table_goes_over_the_trainer_table(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text('description = "x"\n[trainers.spo]\nk = 3\nbeta = 2.0\n[backbones.sd15.spo]\nk = 5\n')
    assert (presets.apply_preset(SPOConfig, "spo", str(f), backbone="sd15").k,
            presets.apply_preset(SPOConfig, "spo", str(f), backbone="tiny").k) == (5, 3)
    assert presets.apply_preset(SPOConfig, "spo", str(f), backbone="sd15").beta == 2.0
    f.write_text('description = "x"\n[trainers.spo]\n[backbones.sd15.spo]\nk = 1\n')
    with pytest.raises(InputError, match=r"p\.toml: backbones\.sd15\.spo\.k: must be >= 2"):
        presets.apply_preset(SPOConfig, "spo", str(f), backbone="sd15")


def test_settings_and_help_list_the_presets():
    r = run("train", "spo", "--settings")
    assert r.returncode == 0, r.stderr
    assert "presets (--preset NAME" in r.stdout and "\n  fast: " in r.stdout and "\n  paper: " in r.stdout
    r = run("train", "--help")
    assert r.returncode == 0 and "--preset" in r.stdout


def test_a_preset_is_applied_recorded_and_overridden_by_set(tmp_path):
    mine = tmp_path / "mine.toml"
    mine.write_text('description = "test"\n[trainers.spo]\ninner_epochs = 2\nkeep_top = 0.5\nbeta = 5.0\n')
    out = tmp_path / "run"
    r = run("train", "spo", *TINY_RUN, "--preset", mine, "--set", "keep_top=0.25", "--set", "train_batch_size=1",
            "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["inner_epochs"], cfg["beta"]) == (2, 5.0)  # from the preset
    assert cfg["keep_top"] == 0.25  # --set wins over the preset
    rounds = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    rnd = next(row for row in rounds if row["kind"] == "round")
    assert rnd["items"] >= 1 and rnd["steps"] == 2 * rnd["items"]  # 2 passes, one pair a micro-batch


BAD_VALUE = 'description = "x"\n[trainers.spo]\nlr = -1.0\n'


@pytest.mark.parametrize("preset, text, names", [
    ("fsat", None, ["unknown preset 'fsat'", "did you mean 'fast'"]),
    ("missing.toml", None, ["missing.toml", "not found"]),
    ("bad.toml", BAD_VALUE, ["bad.toml", "trainers.spo.lr", "must be > 0"]),
    ("bad.toml", 'description = "x"\n[trainers.spo]\nkepp_top = 0.5\n', ["bad.toml", "trainers.spo.kepp_top",
                                                                           "did you mean 'keep_top'"]),
    ("bad.toml", '[trainers.spo]\nk = 3\n', ["bad.toml", "description", "required"]),
    ("bad.toml", 'description = "x"\n[trainers.ddpo]\n', ["bad.toml", "no settings for trainer 'spo'", "ddpo"]),
    ("bad.toml", "description = \n", ["bad.toml", "invalid TOML"]),
])
def test_a_bad_preset_is_one_line_naming_file_and_field(tmp_path, preset, text, names):
    if text is not None:
        (tmp_path / preset).write_text(text)
    out = tmp_path / "run"
    r = run("train", "spo", *TINY_RUN, "--preset", preset, "--out", out, cwd=tmp_path)
    assert_clean_failure(r.returncode, r.stderr, names, out, None)
    assert r.returncode == 2


def test_set_overrides_a_preset_value_in_process():
    cfg = SPOConfig.load(None, ["lr=1e-3"], base=presets.apply_preset(SPOConfig, "spo", "fast", backbone="tiny"))
    assert cfg.lr == 1e-3


# -- recipes ---------------------------------------------------------------------------------------------
def _recipe(tmp_path, line):
    from recipe_fixtures import write_recipe

    return write_recipe(tmp_path, "pre", 'budget = "tiny: 1 round"', f'budget = "tiny: 1 round"\n{line}')


def test_a_recipe_preset_is_under_its_cells_settings(tmp_path):
    from spobench.reproduce.recipe import load_recipe, validate_settings

    default = validate_settings(load_recipe(_recipe(tmp_path, "")))["spo"]
    fast = validate_settings(load_recipe(_recipe(tmp_path, 'preset = "fast"')))["spo"]
    want = presets.apply_preset(SPOConfig, "spo", "fast", backbone="tiny")
    assert default.lr is None and fast.lr == want.lr == 5e-4  # None: the backbone's default, filled later
    assert fast.k == 4 == default.k  # the cell's own settings still apply
    assert {k: v for k, v in fast.to_dict().items() if k not in ("inner_epochs", "lr", "keep_top")} == \
        {k: v for k, v in default.to_dict().items() if k not in ("inner_epochs", "lr", "keep_top")}


def test_a_recipe_with_an_unknown_preset_names_the_field(tmp_path):
    from spobench.reproduce.recipe import load_recipe

    with pytest.raises(InputError, match=r"pre\.toml.*preset.*unknown preset 'quick'"):
        load_recipe(_recipe(tmp_path, 'preset = "quick"'))


def test_fast_on_a_backbone_it_was_not_measured_on_is_refused_before_loading(tmp_path):
    out = tmp_path / "run"
    r = run("train", "spo", "--backbone", "sd15", "--preset", "fast", "--out", out)
    assert_clean_failure(r.returncode, r.stderr, ["fast.toml", "--backbone tiny only", "'sd15'"], out, None)
