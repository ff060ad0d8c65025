"""Bad step-aware preference models through the installed CLI (issue 13 part 1, issue 14): official
checkpoints for `spobench spm import` with a missing, extra or wrong-shaped key, truncated, or a pickle
of more than tensors; SPM folders for `eval-spm` and `--set scorer=` with a malformed spm_config.json,
a pickle-only clip/, broken time-conditioning weights. Each gives exit 2, ONE error line naming the
input, no traceback, and leaves --out as it was (tests/contract.py)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from clitools import run
from contract import assert_clean_failure, snapshot

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from test_spm_official import official_state_dict  # noqa: E402

slow = pytest.mark.slow
BIN = "sd-v1-5_step-aware_preference_model.bin"
# each case is one CLI start (~5 s on a quiet 2-core machine); the brief's named cases run by default
QUICK = {"missing-key", "extra-key", "wrong-shape", "truncated", "pickled-object", "nested-state-dict",
         "config-not-json", "config-time-conditioned-string", "pickle-only-clip", "time-weights-truncated"}


def _cases(items):
    return [pytest.param(k, marks=[] if k in QUICK else [slow]) for k in items]

TRAIN = ["k=2", "num_steps=4", "kappa=800", "threshold=0.0", "rollout_batch=1", "train_batch_size=2",
         "prompts=tiny-train", "prompt_limit=2", "epochs=1", "max_rounds=1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny PickScore folder, its official-layout checkpoint, the imported SPM folder and pairs."""
    from spobench.toyworld.tiny_clip import make_tiny_clip_folder
    from spobench.models.spm_official import import_official
    from spobench.toyworld.pairs import make_dataset

    root = tmp_path_factory.mktemp("bad-spm")
    clip = make_tiny_clip_folder(root / "pickscore", seed=5)
    sd = official_state_dict(clip)
    torch.save(sd, root / BIN)
    import_official(root / BIN, clip, root / "spm")
    make_dataset(root / "pairs", n_pairs=8, seed=0)
    return {"root": root, "clip": clip, "sd": sd, "bin": root / BIN, "spm": root / "spm",
            "pairs": root / "pairs" / "pairs.parquet"}


def _checkpoint(w, t: Path, edit) -> Path:
    sd = dict(w["sd"])
    obj = edit(sd)
    torch.save(sd if obj is None else obj, t / BIN)
    return t / BIN


def _drop(key):
    def edit(sd):
        del sd[key]
    return edit


def _set(key, value):
    return lambda sd: sd.__setitem__(key, value)


class _NotATensor:  # a pickled class: torch.load(weights_only=True) must refuse it unread
    pass


def _bytes(w, t: Path, data: bytes) -> Path:
    (t / BIN).write_bytes(data)
    return t / BIN


def _import(w, t, file):
    return ["spm", "import", file, "--clip", w["clip"], "--out", t / "out"]


LAYER0 = "model.vision_model.encoder.layers.0.adaLN_modulation.1.weight"
IMPORTS = {
    "missing-key": lambda w, t: (_checkpoint(w, t, _drop("model.t_embedder.mlp.2.bias")),
                                 ["missing 1 key", "model.t_embedder.mlp.2.bias"]),
    "extra-key": lambda w, t: (_checkpoint(w, t, _set("model.vision_model.extra.weight", torch.zeros(3))),
                               ["unexpected 1 key", "model.vision_model.extra.weight"]),
    "wrong-shape": lambda w, t: (_checkpoint(w, t, _set(LAYER0, torch.zeros(12, 32))), ["wrong shape", LAYER0]),
    "nan-weight": lambda w, t: (_checkpoint(w, t, _set(LAYER0, torch.full((192, 32), float("nan")))),
                                ["NaN", LAYER0]),
    "truncated": lambda w, t: (_bytes(w, t, w["bin"].read_bytes()[: w["bin"].stat().st_size // 2]), ["truncated"]),
    "truncated-tail": lambda w, t: (_bytes(w, t, w["bin"].read_bytes()[:-100]), ["truncated"]),
    "empty-file": lambda w, t: (_bytes(w, t, b""), ["truncated"]),
    "pickled-object": lambda w, t: (_checkpoint(w, t, _set("model.logit_scale", _NotATensor())),
                                    ["other than tensors", "_NotATensor"]),
    "nested-state-dict": lambda w, t: (_checkpoint(w, t, lambda sd: {"state_dict": dict(sd), "epoch": 3}),
                                       ["more than tensors", "'state_dict'"]),
    "not-a-dict": lambda w, t: (_checkpoint(w, t, lambda sd: [torch.zeros(1)]), ["list"]),
    "no-such-file": lambda w, t: (t / "nowhere.bin", ["nowhere.bin", "hf download"]),
}


@pytest.mark.parametrize("case", _cases(IMPORTS))
def test_bad_official_checkpoint(case, world, tmp_path):
    file, names = IMPORTS[case](world, tmp_path)
    before = snapshot(tmp_path / "out")
    r = run(*_import(world, tmp_path, file))
    assert r.returncode == 2, r.stderr[-2000:]
    assert_clean_failure(r.returncode, r.stderr, [file.name, *names], tmp_path / "out", before)


@slow
def test_clip_folder_without_config(world, tmp_path):
    (tmp_path / "pickscore").mkdir()
    r = run("spm", "import", world["bin"], "--clip", tmp_path / "pickscore", "--out", tmp_path / "out")
    assert r.returncode == 2
    assert_clean_failure(r.returncode, r.stderr, ["config.json", "PickScore"], tmp_path / "out", None)


@slow
def test_existing_out_is_left_alone(world, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    before = snapshot(tmp_path / "out")
    r = run(*_import(world, tmp_path, world["bin"]))
    assert r.returncode == 2
    assert_clean_failure(r.returncode, r.stderr, [tmp_path / "out", "--overwrite"], tmp_path / "out", before)


# -- SPM folders that eval-spm and the trainers load ---------------------------------------------------
def _spm_copy(w, t: Path) -> Path:
    return Path(shutil.copytree(w["spm"], t / "spm"))


def _config_edit(edit):
    def build(w, t):
        spm = _spm_copy(w, t)
        file = spm / "spm_config.json"
        cfg = json.loads(file.read_text())
        edit(cfg)
        file.write_text(json.dumps(cfg))
        return spm, [file]
    return build


def _raw_config(text):
    def build(w, t):
        spm = _spm_copy(w, t)
        (spm / "spm_config.json").write_text(text)
        return spm, [spm / "spm_config.json"]
    return build


def _pickle_only(w, t):
    from safetensors.torch import load_file

    spm = _spm_copy(w, t)
    state = load_file(str(spm / "clip" / "model.safetensors"))
    (spm / "clip" / "model.safetensors").unlink()
    torch.save({**state, "extra": _NotATensor()}, spm / "clip" / "pytorch_model.bin")
    return spm, [spm / "clip", "pickled .bin"]


def _time_weights(edit):
    def build(w, t):
        from safetensors.torch import load_file, save_file

        spm = _spm_copy(w, t)
        file = spm / "time_conditioning.safetensors"
        state = load_file(str(file))
        edit(state)
        save_file(state, str(file))
        return spm, [file]
    return build


def _truncate(rel):
    def build(w, t):
        spm = _spm_copy(w, t)
        file = spm / rel
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
        return spm, [file]
    return build


def _clip_weights_missing_key(w, t):
    from safetensors.torch import load_file, save_file

    spm = _spm_copy(w, t)
    file = spm / "clip" / "model.safetensors"
    state = load_file(str(file))
    state.pop("visual_projection.weight")
    save_file(state, str(file), metadata={"format": "pt"})
    return spm, [file, "visual_projection.weight"]


FOLDERS = {
    "config-not-json": _raw_config("{ not json"),
    "config-not-object": _raw_config("[1, 2]"),
    "config-time-conditioned-string": _config_edit(lambda c: c.__setitem__("time_conditioned", "yes")),
    "config-freq-dim-negative": _config_edit(lambda c: c["time_embedding"].__setitem__("freq_dim", -4)),
    "config-std-zero": _config_edit(lambda c: c["preprocess"].__setitem__("std", [0, 0.2, 0.2])),
    "config-mean-short": _config_edit(lambda c: c["preprocess"].__setitem__("mean", [0.5])),
    "config-resize-unknown": _config_edit(lambda c: c["preprocess"].__setitem__("resize", "lanczos")),
    "config-crop-mismatch": _config_edit(lambda c: c["preprocess"].update(size=48, crop=48)),
    "config-wrong-format": _config_edit(lambda c: c.__setitem__("format", "something-else")),
    "pickle-only-clip": _pickle_only,
    "clip-weights-missing-key": _clip_weights_missing_key,
    "clip-weights-truncated": _truncate("clip/model.safetensors"),
    "time-weights-truncated": _truncate("time_conditioning.safetensors"),
    "time-weights-missing-key": _time_weights(lambda s: s.pop("pooled_mod.1.bias")),
    "time-weights-wrong-shape": _time_weights(lambda s: s.__setitem__("pooled_mod.1.bias", torch.zeros(5))),
    "time-weights-nan": _time_weights(lambda s: s["pooled_mod.1.bias"].fill_(float("nan"))),
}
FIELDS = {"config-time-conditioned-string": "time_conditioned", "config-freq-dim-negative": "freq_dim",
          "config-std-zero": "std", "config-mean-short": "mean", "config-resize-unknown": "resize",
          "config-crop-mismatch": "crop", "time-weights-missing-key": "pooled_mod.1.bias",
          "time-weights-wrong-shape": "pooled_mod.1.bias", "time-weights-nan": "NaN"}


@pytest.mark.parametrize("case", _cases(FOLDERS))
def test_bad_spm_folder_in_eval_spm(case, world, tmp_path):
    spm, names = FOLDERS[case](world, tmp_path)
    out = tmp_path / "result.json"
    r = run("eval-spm", spm, "--pairs", world["pairs"], "--max", "4", "--out", out)
    assert r.returncode == 2, r.stderr[-2000:]
    assert_clean_failure(r.returncode, r.stderr, [*names, *([FIELDS[case]] if case in FIELDS else [])], out, None)


@slow
def test_bad_spm_folder_as_scorer(world, tmp_path):
    spm, names = _pickle_only(world, tmp_path)
    r = run("train", "spo", "--out", tmp_path / "run", *[a for s in TRAIN + [f"scorer={spm}"] for a in ("--set", s)])
    assert r.returncode == 2, r.stderr[-2000:]
    assert_clean_failure(r.returncode, r.stderr, names, tmp_path / "run", None)


def test_official_file_as_scorer_points_to_the_import(world, tmp_path):
    r = run("train", "spo", "--out", tmp_path / "run",
            *[a for s in TRAIN + [f"scorer={world['bin']}"] for a in ("--set", s)])
    assert r.returncode == 2, r.stderr[-2000:]
    assert_clean_failure(r.returncode, r.stderr, ["scorer", BIN, "spobench spm import"], tmp_path / "run", None)
    r = run("eval-spm", world["bin"], "--pairs", world["pairs"])
    assert_clean_failure(r.returncode, r.stderr, [BIN, "spobench spm import"], None, None)


# -- and the good path, as a user types it --------------------------------------------------------------
@slow
def test_import_then_eval_spm_and_train_spo(world, tmp_path):
    r = run(*_import(world, tmp_path, world["bin"]))
    assert r.returncode == 0, r.stderr[-2000:]
    spm = tmp_path / "out"
    assert json.loads((spm / "spm_config.json").read_text())["preprocess"]["resize"] == "spo"
    r = run("eval-spm", world["clip"], spm, "--pairs", world["pairs"], "--max", "4", "--timesteps", "0,500",
            "--out", tmp_path / "res.json")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "res.json").read_text())
    assert res["models"][str(spm)]["time_conditioned"] is True
    r = run("train", "spo", "--out", tmp_path / "run", *[a for s in TRAIN + [f"scorer={spm}"] for a in ("--set", s)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "run").is_dir()
