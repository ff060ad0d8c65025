"""HPSv3 on a tiny Qwen2-VL in the official layout (tests/metrics/test_hpsv3_fixtures.py): the score against
an independent re-statement, where the weights come from, the bad files, the CPU refusal, and
``spobench eval --metrics hpsv3`` through the installed CLI.

Parity with the hpsv3 package's own forward (transformers 4.45.2, separate venv): benchmarks/parity/hpsv3.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import test_hpsv3_fixtures as hf  # noqa: E402
from clitools import run  # noqa: E402
from contract import assert_clean_failure, snapshot  # noqa: E402

from spobench.core.errors import InputError, MissingWeightsError, ModelLoadError  # noqa: E402
from spobench.metrics import hpsv3  # noqa: E402
from spobench.metrics.base import sha256_of  # noqa: E402
from spobench.metrics.hpsv3_model import PIXELS, fetch_size, user_text  # noqa: E402

PROMPTS = ["a red cat", "the image of a dog, 4k", "Café!!"]


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return hf.build_hpsv3(tmp_path_factory.mktemp("hpsv3"))


@pytest.fixture
def weights(tmp_path, pristine, empty_hub_cache):
    import shutil

    return Path(shutil.copytree(pristine, tmp_path / "hpsv3"))


def _by_hand(root: Path, images, prompts) -> np.ndarray:
    """transformers 5's own Qwen2VLForConditionalGeneration (the checkpoint renamed onto it), its PIL image
    processor, the chat template written out, 1-D positions, and the head as matrix products."""
    from PIL import Image
    from transformers import AutoTokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize

    qwen = root / hf.QWEN_DIR
    tok = AutoTokenizer.from_pretrained(str(qwen), padding_side="right")
    tok.add_special_tokens({"additional_special_tokens": ["<|Reward|>"]})
    config = Qwen2VLConfig.from_pretrained(str(qwen))
    config.text_config.vocab_size = len(tok)
    model = Qwen2VLForConditionalGeneration(config).eval()
    state = load_file(str(root / hf.CHECKPOINT))
    renamed = {("model." + k if k.startswith("visual.") else "model.language_model." + k[6:] if k.startswith("model.")
                else k): v for k, v in state.items() if not k.startswith("rm_head.")}
    model.load_state_dict(renamed, strict=True)
    proc = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056)
    out = []
    for image, prompt in zip(images, prompts):
        h, w = smart_resize(image.height, image.width, 28, PIXELS, PIXELS)
        pix = proc(images=[image.convert("RGB").resize((w, h), Image.BICUBIC)], return_tensors="pt")
        n = int(pix["image_grid_thw"].prod()) // 4
        text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
                + "<|image_pad|>" * n + "<|vision_end|>" + user_text(prompt)
                + "<|im_end|>\n<|im_start|>assistant\n")
        ids = tok(text, return_tensors="pt").input_ids
        pos = torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, 1, -1)
        with torch.no_grad():
            hidden = model.model(input_ids=ids, pixel_values=pix["pixel_values"], image_grid_thw=pix["image_grid_thw"],
                                 position_ids=pos).last_hidden_state[0]
        x = hidden[ids[0] == tok.convert_tokens_to_ids("<|Reward|>")][0]
        for i, layer in enumerate(("0", "3", "5")):
            x = x @ state[f"rm_head.{layer}.weight"].T + state[f"rm_head.{layer}.bias"]
            x = torch.relu(x) if i < 2 else x
        out.append(float(x[0]))
    return np.array(out)


def test_score_equals_restatement(weights):
    images = hf.images(3)
    metric = hpsv3.HPSv3(weights=weights, batch_size=3)
    res = metric.score(images, PROMPTS)
    assert res.scores.shape == (3,) and res.scores.dtype == np.float64 and np.isfinite(res.scores).all()
    np.testing.assert_allclose(res.scores, _by_hand(weights, images, PROMPTS), atol=2e-5)
    # right padding within a batch does not move a score
    np.testing.assert_allclose(hpsv3.HPSv3(weights=weights, batch_size=1).score(images, PROMPTS).scores,
                               res.scores, atol=2e-5)
    assert metric.identity().checkpoint_sha256 == sha256_of(weights / hf.CHECKPOINT)
    assert metric.identity().options["model"] == "MizzenAI/HPSv3"


def test_image_sizes_follow_the_pixel_budget():
    """hpsv3 fixes min_pixels = max_pixels = 256*28*28: squares become 448x448 (256 merged patches)."""
    assert fetch_size(512, 512) == (448, 448) and fetch_size(1024, 1024) == (448, 448)
    for h, w in [(48, 64), (380, 500), (90, 30), (200, 1000), (768, 1344)]:
        rh, rw = fetch_size(h, w)
        assert rh % 28 == 0 and rw % 28 == 0 and 0.8 * PIXELS <= rh * rw <= 1.2 * PIXELS
    with pytest.raises(InputError, match="aspect ratio"):
        fetch_size(10, 2500)


def test_missing_weights_names_what_to_download(tmp_path, empty_hub_cache):
    with pytest.raises(MissingWeightsError) as e:
        hpsv3.HPSv3(weights=tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "HPSv3.safetensors" in msg and "hf download MizzenAI/HPSv3" in msg
    assert "hf download Qwen/Qwen2-VL-7B-Instruct" in msg and "not its weights" in msg
    hf.write_qwen_folder(tmp_path / hf.QWEN_DIR)  # only the checkpoint missing: only it is named
    with pytest.raises(MissingWeightsError) as e:
        hpsv3.HPSv3(weights=tmp_path)
    assert "MizzenAI/HPSv3" in str(e.value) and "Qwen/Qwen2-VL-7B-Instruct" not in str(e.value)


def test_found_in_the_local_hub_cache(tmp_path, pristine, empty_hub_cache, monkeypatch):
    """Offline, from the cache: the same score as from a folder."""
    import shutil

    for repo, files in (("MizzenAI/HPSv3", [hf.CHECKPOINT]), ("Qwen/Qwen2-VL-7B-Instruct", None)):
        snap = empty_hub_cache / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
        snap.mkdir(parents=True)
        (snap.parents[1] / "refs").mkdir()
        (snap.parents[1] / "refs" / "main").write_text("0" * 40)
        if files:
            shutil.copy(pristine / hf.CHECKPOINT, snap / hf.CHECKPOINT)
        else:
            shutil.copytree(pristine / hf.QWEN_DIR, snap, dirs_exist_ok=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    image = hf.images(1)
    got = hpsv3.HPSv3(weights=tmp_path / "nothing-here").score(image, PROMPTS[:1]).scores
    np.testing.assert_allclose(got, hpsv3.HPSv3(weights=pristine).score(image, PROMPTS[:1]).scores, atol=1e-6)


def _edit(path: Path, fn) -> None:
    state = load_file(str(path))
    fn(state)
    save_file(state, str(path), metadata={"format": "pt"})


BAD = {
    "missing": (lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"), "missing 1 key(s): model.layers.1.mlp.up_proj.weight"),
    "unexpected": (lambda sd: sd.update({"rm_head.7.weight": torch.zeros(2)}), "unexpected 1 key(s): rm_head.7.weight"),
    "shape": (lambda sd: sd.update({"visual.merger.mlp.2.weight": torch.zeros(64, 129)}),
              "wrong shape for 1 key(s): visual.merger.mlp.2.weight"),
    "lm_head": (lambda sd: sd.update({"lm_head.weight": torch.zeros(400, 64)}), "lm_head.weight (400, 64)"),
    "nan": (lambda sd: sd["rm_head.3.weight"].view(-1).__setitem__(0, float("nan")), "rm_head.3.weight holds NaN"),
}


@pytest.mark.parametrize("how", list(BAD))
def test_bad_checkpoint_is_one_named_line(weights, how):
    spoil, expected = BAD[how]
    _edit(weights / hf.CHECKPOINT, spoil)
    with pytest.raises(ModelLoadError) as e:
        hpsv3.HPSv3(weights=weights).score(hf.images(1), PROMPTS[:1])
    assert str(weights / hf.CHECKPOINT) in str(e.value) and expected in str(e.value) and "\n" not in str(e.value)


def test_truncated_checkpoint(weights):
    path = weights / hf.CHECKPOINT
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="cannot be read as a weights-only state dict"):
        hpsv3.HPSv3(weights=weights).score(hf.images(1), PROMPTS[:1])


def test_pickles(weights):
    """hpsv3 also loads a torch.save'd file ({"model": state} or the state itself): read weights-only; one
    holding code or a non-tensor entry is refused."""
    import collections

    state = load_file(str(weights / hf.CHECKPOINT))
    good = weights / "HPSv3.pth"
    torch.save({"model": state}, good)
    image = hf.images(1)
    np.testing.assert_allclose(hpsv3.HPSv3(weights=good).score(image, PROMPTS[:1]).scores,
                               hpsv3.HPSv3(weights=weights).score(image, PROMPTS[:1]).scores, atol=1e-6)
    code = weights / "code.pth"
    torch.save({"model": collections.Counter(a=1)}, code)
    with pytest.raises(ModelLoadError, match="not a weights-only pickle|not a tensor"):
        hpsv3.HPSv3(weights=code).score(image, PROMPTS[:1])
    extra = weights / "extra.pth"
    torch.save({**state, "step": 3}, extra)
    with pytest.raises(ModelLoadError, match="entry step is of type int"):
        hpsv3.HPSv3(weights=extra).score(image, PROMPTS[:1])


def test_cpu_refuses_a_real_size_model_unless_forced(weights, monkeypatch):
    cfg_path = weights / hf.QWEN_DIR / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(InputError) as e:
        hpsv3.HPSv3(weights=weights, device="cpu")
    assert "B-parameter model" in str(e.value) and "--option hpsv3.allow_cpu=true" in str(e.value)
    hpsv3.HPSv3(weights=weights, device="cpu", allow_cpu=True)  # forced: builds (nothing is loaded yet)
    hpsv3.HPSv3(weights=weights, device="cpu", **hpsv3.HPSv3.parse_options({"allow_cpu": "true"}))
    with pytest.raises(InputError, match=r"--option hpsv3: hpsv3 setting 'allow_cpu'"):
        hpsv3.HPSv3.parse_options({"allow_cpu": "maybe"})


def test_options_and_bad_prompts(weights, monkeypatch):
    assert hpsv3.HPSv3(weights=weights, device="cpu")._dtype == torch.float32
    assert hpsv3.HPSv3(weights=weights, device="cuda")._dtype == torch.bfloat16  # the official dtype on a GPU
    assert hpsv3.HPSv3(weights=weights, **hpsv3.HPSv3.parse_options({"batch_size": "3"})).batch_size == 3
    for bad, says in (({"dtype": "fp64"}, "setting 'dtype' must be one of"), ({"batch_size": "0"}, "'batch_size'"),
                      ({"batchsize": "2"}, "did you mean 'batch_size'")):
        with pytest.raises(InputError, match=says):
            hpsv3.HPSv3.parse_options(bad)
    bf16 = hpsv3.HPSv3(weights=weights, dtype="bf16")
    image = hf.images(1)
    np.testing.assert_allclose(bf16.score(image, PROMPTS[:1]).scores,
                               hpsv3.HPSv3(weights=weights).score(image, PROMPTS[:1]).scores, atol=0.3)
    with pytest.raises(InputError, match="special token"):
        bf16.score(image, ["a cat <|Reward|>"])


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rows = []
    for i, (image, prompt) in enumerate(zip(hf.images(2), PROMPTS)):
        image.save(folder / f"{i:05d}.png")
        rows.append({"index": i, "file": f"{i:05d}.png", "prompt": prompt, "prompt_index": i, "seed": i})
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.mark.slow  # two CLI starts + model loads: ~20 s on a loaded 2-core machine
def test_cli_eval_end_to_end(tmp_path, pristine, image_folder):
    from PIL import Image

    out = tmp_path / "results.json"
    r = run("eval", "--images", image_folder, "--metrics", "hpsv3", "--weights", f"hpsv3={pristine}", "--out", out,
            "--option", "hpsv3.batch_size=1")  # one image per forward: the scores of the default batch of 8
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    api = hpsv3.HPSv3(weights=pristine).score([Image.open(image_folder / f"{i:05d}.png") for i in range(2)],
                                              PROMPTS[:2]).scores
    np.testing.assert_allclose([row["hpsv3"] for row in data["per_image"]], api, atol=1e-5)
    np.testing.assert_allclose(data["metrics"]["hpsv3"]["mean"], api.mean(), atol=1e-5)
    assert "hpsv3" in r.stdout


@pytest.mark.slow
def test_cli_bad_weights_is_one_line(tmp_path, pristine, image_folder):
    import shutil

    bad = Path(shutil.copytree(pristine, tmp_path / "bad"))
    _edit(bad / hf.CHECKPOINT, lambda sd: sd.pop("rm_head.5.bias"))
    before = snapshot(image_folder)
    r = run("eval", "--images", image_folder, "--metrics", "hpsv3", "--weights", f"hpsv3={bad}",
            "--out", tmp_path / "r.json")
    line = assert_clean_failure(r.returncode, r.stderr, [bad / hf.CHECKPOINT, "rm_head.5.bias"], image_folder, before)
    assert "missing 1 key(s)" in line and not (tmp_path / "r.json").exists()
    r = run("eval", "--images", image_folder, "--metrics", "hpsv3", "--weights", f"hpsv3={tmp_path / 'none'}",
            "--out", tmp_path / "r.json", env={"HF_HOME": str(tmp_path / "hf")})
    assert_clean_failure(r.returncode, r.stderr, ["hf download MizzenAI/HPSv3"], image_folder, before)
    assert not (tmp_path / "r.json").exists()
    for option, says in (("hpsv3.batch_size=0", "--option hpsv3: hpsv3 setting 'batch_size'"),
                         ("hpsv3.dtyp=bf16", "did you mean 'dtype'"), ("pickscore.batch_size=2", "not one of the metrics"),
                         ("hpsv3=bf16", "expected METRIC.KEY=VALUE")):
        r = run("eval", "--images", image_folder, "--metrics", "hpsv3", "--weights", f"hpsv3={pristine}",
                "--out", tmp_path / "r.json", "--option", option)
        assert_clean_failure(r.returncode, r.stderr, [says], image_folder, before)
        assert not (tmp_path / "r.json").exists()
