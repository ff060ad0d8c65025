"""Every metric refuses weights that do not fit, with one line naming the file and the key (issue 14).

For each metric, a tiny model in the official layout (:mod:`official_weights`, built from each
metric's test fixtures) is spoiled one way at a time: a key removed, an extra key, a wrong shape, a
truncated file, a pickle holding a non-tensor, a NaN weight. Each must be a ``ModelLoadError`` (never a
score from a model that transformers re-initialised at random, which is what a removed key used to give).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import official_weights as ow  # noqa: E402
from official_weights import BUILD, EXTRA, SCORE, TARGET_IDS, TARGETS  # noqa: E402
from spobench.core.errors import ModelLoadError  # noqa: E402
from spobench.metrics import geneval  # noqa: E402


@pytest.fixture(autouse=True)
def empty_hub_cache(tmp_path, monkeypatch):
    """No metric may fall back on a real Hugging Face cache here."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """metric -> an intact weights folder (built once per module)."""
    built: dict[str, Path] = {}

    def get(metric: str) -> Path:
        if metric not in built:
            folder = tmp_path_factory.mktemp(metric)
            BUILD[metric](folder)
            built[metric] = folder
        return built[metric]

    return get


def _copy(pristine, metric, tmp_path) -> Path:
    folder = tmp_path / metric
    shutil.copytree(pristine(metric), folder)
    return folder


def _refused(metric: str, folder: Path) -> str:
    with pytest.raises(ModelLoadError) as err:
        SCORE[metric](folder)
    message = str(err.value)
    assert "\n" not in message, message
    return message


# -- intact weights score (so the failures below are the spoiling's doing) ---------------------------

@pytest.mark.parametrize("metric", sorted(BUILD))
def test_intact_official_layout_scores(metric, pristine, tmp_path):
    scores = SCORE[metric](_copy(pristine, metric, tmp_path))
    assert scores.shape == (1,) and np.isfinite(scores).all()


# -- one spoiling at a time --------------------------------------------------------------------------

@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_removed_key(target, pristine, tmp_path):
    folder = _copy(pristine, target.metric, tmp_path)
    ow.edit(folder / target.file, target, lambda sd: sd.pop(target.key))
    msg = _refused(target.metric, folder)
    assert str(folder / target.file) in msg and target.key in msg and "missing" in msg, msg


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_extra_key(target, pristine, tmp_path):
    folder = _copy(pristine, target.metric, tmp_path)
    ow.edit(folder / target.file, target, lambda sd: sd.__setitem__(EXTRA, torch.zeros(3)))
    msg = _refused(target.metric, folder)
    assert str(folder / target.file) in msg and EXTRA in msg and "unexpected" in msg, msg


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_wrong_shape(target, pristine, tmp_path):
    folder = _copy(pristine, target.metric, tmp_path)
    ow.edit(folder / target.file, target,
            lambda sd: sd.__setitem__(target.shape_key, ow.wrong_shape(sd[target.shape_key])))
    msg = _refused(target.metric, folder)
    assert str(folder / target.file) in msg and target.shape_key in msg and "wrong shape" in msg, msg


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_truncated_file(target, pristine, tmp_path):
    folder = _copy(pristine, target.metric, tmp_path)
    path = folder / target.file
    ow.truncate(path)
    msg = _refused(target.metric, folder)
    assert str(path) in msg, msg


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_non_tensor_pickle(target, pristine, tmp_path):
    """A pickle that ``weights_only`` accepts may still hold an int where a tensor belongs. Where the
    official format is safetensors, a pickle in its place is refused whatever it holds."""
    folder = _copy(pristine, target.metric, tmp_path)
    path = folder / target.file
    if target.pickle:
        ow.edit(path, target, lambda sd: sd.__setitem__(target.key, 3))
        msg = _refused(target.metric, folder)
        assert str(path) in msg and target.key in msg and "not a tensor" in msg, msg
    else:
        path.unlink()
        torch.save({target.key: 3}, path.parent / "pytorch_model.bin")
        msg = _refused(target.metric, folder)
        assert str(path.parent / "pytorch_model.bin") in msg and "model.safetensors" in msg, msg


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_nan_weight(target, pristine, tmp_path):
    folder = _copy(pristine, target.metric, tmp_path)
    ow.edit(folder / target.file, target, lambda sd: ow.poison(sd, target.key))
    msg = _refused(target.metric, folder)
    assert str(folder / target.file) in msg and target.key in msg and "NaN" in msg, msg


@pytest.mark.parametrize("target", [t for t in TARGETS if t.pickle], ids=[i for t, i in zip(TARGETS, TARGET_IDS)
                                                                          if t.pickle])
def test_pickle_of_something_else(target, pristine, tmp_path):
    folder = _copy(pristine, target.metric, tmp_path)
    path = folder / target.file
    torch.save([1, 2, 3], path)
    msg = _refused(target.metric, folder)
    assert str(path) in msg and "list" in msg, msg


# -- the original bug --------------------------------------------------------------------------------

@pytest.mark.parametrize("target", [t for t in TARGETS if not t.pickle], ids=[i for t, i in zip(TARGETS, TARGET_IDS)
                                                                              if not t.pickle])
def test_removed_key_is_not_reinitialised_and_scored(target, pristine, tmp_path):
    """transformers loads a folder missing a key by initialising that key at random (and warning on a
    logger the CLI hides); the metric used to score with it (PickScore moved from -11.5 to 14.5)."""
    from transformers import CLIPModel

    folder = _copy(pristine, target.metric, tmp_path)
    ow.edit(folder / target.file, target, lambda sd: sd.pop(target.key))
    klass = geneval._instance_model_class() if target.file.startswith(geneval.DETECTOR_DIR) else CLIPModel
    _, info = klass.from_pretrained(str((folder / target.file).parent), output_loading_info=True)
    assert target.key in info["missing_keys"]  # plain from_pretrained accepts the folder: the bug's premise
    msg = _refused(target.metric, folder)
    assert target.key in msg


# -- the root stays fixed: no metric loads weights around spobench.core.weights ----------------------------

def test_metrics_load_weights_only_through_spobench_weights():
    """A new ``Model.from_pretrained`` or ``torch.load`` in metrics/ would skip the checks above; only
    tokenizers and image processors (no weights) may be loaded directly."""
    import ast

    root = Path(__file__).resolve().parents[2] / "spobench" / "metrics"
    weightless = {"CLIPTokenizer", "CLIPImageProcessorPil", "BertTokenizer", "AutoTokenizer",
                  "Qwen2VLConfig"}  # a config.json: no weights
    bad = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.Call):
                continue
            if isinstance(node.func, ast.Name) and node.func.id in ("load_file", "safe_open", "load"):
                bad.append(f"{path.name}:{node.lineno}: {node.func.id}")
            if not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value
            owner_name = owner.id if isinstance(owner, ast.Name) else ast.unparse(owner)
            if node.func.attr == "from_pretrained" and owner_name not in weightless:
                bad.append(f"{path.name}:{node.lineno}: {owner_name}.from_pretrained")
            if node.func.attr in ("load", "load_file", "safe_open") and owner_name in ("torch", "safetensors.torch"):
                bad.append(f"{path.name}:{node.lineno}: {owner_name}.{node.func.attr}")
    assert len(list(root.glob("*.py"))) >= 10
    assert not bad, f"weights loaded around spobench.core.weights: {bad}"
