"""The official SPO step-aware preference model, imported unchanged (issue 13, part 1).

A tiny CLIP's weights are written in exactly the official checkpoint's layout (RockeyCoss/SPO
@ecb68d886bf566552271e51f0a0410828438630e, time_conditioned_clip.py), with non-zero modulation weights
and gate biases away from 1; the imported SPM's scores are checked against the official equations,
restated here from that file and step_aware_preference_model.py's get_preference_score - not by calling
spobench's adaLN forward."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from spobench.core.errors import InputError, ModelLoadError
from spobench.models.spm import StepAwarePreferenceModel
from spobench.models.spm_preprocess import preprocess_images
from spobench.toyworld.tiny_clip import make_tiny_clip_folder

PROMPTS = ["a red circle", "two blue squares", "a green triangle"]
T = torch.tensor([0, 421, 999])


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip_folder(tmp_path_factory.mktemp("pickscore") / "pickscore", seed=5, hidden=32, layers=2)


def official_state_dict(clip_dir, seed=0, legacy_buffers=True) -> dict[str, torch.Tensor]:
    """The tiny CLIP in the official layout: ``model.`` + CLIPModel keys, t_embedder, adaLN heads."""
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(str(clip_dir))
    d = clip.config.vision_config.hidden_size
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.2):
        return torch.randn(*shape, generator=g) * std

    sd = {f"model.{k}": v.clone() for k, v in clip.state_dict().items()}
    if legacy_buffers:  # what transformers 4.27 wrote
        sd["model.text_model.embeddings.position_ids"] = torch.arange(77)[None]
        sd["model.vision_model.embeddings.position_ids"] = torch.arange((32 // 8) ** 2 + 1)[None]
    sd["model.t_embedder.mlp.0.weight"] = rnd(d, 256, std=0.05)
    sd["model.t_embedder.mlp.0.bias"] = rnd(d)
    sd["model.t_embedder.mlp.2.weight"] = rnd(d, d)
    sd["model.t_embedder.mlp.2.bias"] = rnd(d)
    for i in range(clip.config.vision_config.num_hidden_layers):
        bias = rnd(6 * d)
        bias[2 * d:3 * d] += 1.0  # the gates start at 1 in the official init; trained ones wander off it
        bias[5 * d:] += 0.6
        sd[f"model.vision_model.encoder.layers.{i}.adaLN_modulation.1.weight"] = rnd(6 * d, d)
        sd[f"model.vision_model.encoder.layers.{i}.adaLN_modulation.1.bias"] = bias
    sd["model.vision_model.adaLN_modulation.1.weight"] = rnd(2 * d, d)
    sd["model.vision_model.adaLN_modulation.1.bias"] = rnd(2 * d)
    return sd


def official_scores(sd, clip_dir, images01, t, prompts):
    """The official equations, restated. ``images01`` in [0, 1] as spobench's backbones decode them; the
    official code receives the VAE's [-1, 1] output."""
    from transformers import AutoTokenizer, CLIPModel

    clip = CLIPModel.from_pretrained(str(clip_dir)).eval()
    clip.load_state_dict({k[len("model."):]: v for k, v in sd.items()
                          if not k.startswith(("model.t_embedder", "model.vision_model.adaLN"))
                          and "adaLN_modulation" not in k and "position_ids" not in k})
    pp = json.loads((clip_dir / "preprocessor_config.json").read_text())
    size = pp["size"]["shortest_edge"]
    x = images01 * 2 - 1
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    new = (int(h * scale + 0.5), int(w * scale + 0.5))
    x = F.interpolate(x, size=new, mode="bicubic", align_corners=False)
    if new[0] != new[1]:  # torchvision CenterCrop: int(round((side - size) / 2))
        top, left = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
        x = x[..., top:top + size, left:left + size]
    x = (x / 2 + 0.5).clamp(0, 1)
    mean = torch.tensor(pp["image_mean"]).view(1, 3, 1, 1)
    std = torch.tensor(pp["image_std"]).view(1, 3, 1, 1)
    x = (x - mean) / std

    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    c = F.linear(F.silu(F.linear(emb, sd["model.t_embedder.mlp.0.weight"], sd["model.t_embedder.mlp.0.bias"])),
                 sd["model.t_embedder.mlp.2.weight"], sd["model.t_embedder.mlp.2.bias"])
    with torch.no_grad():
        vm = clip.vision_model
        hs = vm.pre_layrnorm(vm.embeddings(x))
        for i, layer in enumerate(vm.encoder.layers):
            pre = f"model.vision_model.encoder.layers.{i}.adaLN_modulation.1."
            sh1, sc1, g1, sh2, sc2, g2 = (m[:, None] for m in F.linear(F.silu(c), sd[pre + "weight"],
                                                                       sd[pre + "bias"]).chunk(6, dim=1))
            y = layer.self_attn(hidden_states=layer.layer_norm1(hs) * (1 + sc1) + sh1)[0]
            hs = hs + y * g1
            y = layer.mlp(layer.layer_norm2(hs) * (1 + sc2) + sh2)
            hs = hs + y * g2
        pooled = vm.post_layernorm(hs[:, 0])
        shift, scl = F.linear(F.silu(c), sd["model.vision_model.adaLN_modulation.1.weight"],
                              sd["model.vision_model.adaLN_modulation.1.bias"]).chunk(2, dim=1)
        img = clip.visual_projection(pooled * (1 + scl) + shift)
        tok = AutoTokenizer.from_pretrained(str(clip_dir))
        ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        txt = clip.text_projection(clip.text_model(input_ids=ids).pooler_output)
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    return clip.logit_scale.exp() * (img * txt).sum(-1)


@pytest.fixture(scope="module")
def official(clip_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("official")
    sd = official_state_dict(clip_dir)
    torch.save(sd, root / "sd-v1-5_step-aware_preference_model.bin")
    return root / "sd-v1-5_step-aware_preference_model.bin", sd


@pytest.mark.parametrize("shape", [(32, 32), (32, 39), (70, 50)])
def test_imported_scores_follow_the_official_equations(official, clip_dir, tmp_path, shape):
    from spobench.models.spm_official import import_official

    file, sd = official
    out = import_official(file, clip_dir, tmp_path / "spm")
    spm = StepAwarePreferenceModel.load(out).eval()
    assert spm.preprocess_cfg["resize"] == "spo"
    images = torch.rand(3, 3, *shape, generator=torch.Generator().manual_seed(1))
    want = official_scores(sd, clip_dir, images, T, PROMPTS)
    with torch.no_grad():
        got = spm(images, T, PROMPTS)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-5)
    assert want.std() > 1e-3  # scores that differ: the check has something to compare


def test_time_conditioning_and_gates_matter(official, clip_dir):
    """The restatement discriminates: a timestep, and the gate convention, change the scores."""
    from spobench.models.spm_official import load_official

    file, sd = official
    spm = load_official(file, clip_dir)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        at_t = spm(images, T, PROMPTS)
        assert (spm(images, torch.tensor([500, 500, 500]), PROMPTS) - at_t).abs().max() > 1e-3
        for head in spm.layer_mods:  # read the gates as spobench's 1 + g without the conversion
            d = head[1].bias.shape[0] // 6
            head[1].bias[2 * d:3 * d] += 1
            head[1].bias[5 * d:] += 1
        assert (spm(images, T, PROMPTS) - at_t).abs().max() > 1e-3


def test_without_legacy_buffers_and_record_of_origin(clip_dir, tmp_path):
    from spobench.models.spm_official import import_official

    sd = official_state_dict(clip_dir, seed=3, legacy_buffers=False)
    torch.save(sd, tmp_path / "sdxl_step-aware_preference_model.bin")
    out = import_official(tmp_path / "sdxl_step-aware_preference_model.bin", clip_dir, tmp_path / "spm")
    cfg = json.loads((out / "spm_config.json").read_text())
    assert cfg["origin"]["kind"].startswith("official SPO")
    assert len(cfg["origin"]["sha256"]) == 64
    assert cfg["preprocess"]["resize"] == "spo"
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = StepAwarePreferenceModel.load(out).eval()(images, T[:2], PROMPTS[:2])
    torch.testing.assert_close(got, official_scores(sd, clip_dir, images, T[:2], PROMPTS[:2]), atol=2e-4, rtol=1e-5)
    # the folder is an ordinary SPM folder: the scorer spec of train spo/mspo and recipes takes it
    from spobench.engine.scoring import load_step_scorer

    assert load_step_scorer(str(out)).preprocess_cfg["resize"] == "spo"


def test_resize_modes_differ_only_where_they_should():
    x = torch.rand(2, 3, 32, 39, generator=torch.Generator().manual_seed(4))
    mean, std = [0.0] * 3, [1.0] * 3
    spo, clip = preprocess_images(x, 32, 32, mean, std, "spo"), preprocess_images(x, 32, 32, mean, std, "clip")
    torch.testing.assert_close(spo, x[..., 4:36])  # (39 - 32) / 2 = 3.5 rounds to 4 (torchvision)
    torch.testing.assert_close(clip, x[..., 3:35])  # CLIPImageProcessor floors
    square = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    plain = F.interpolate(square, size=(32, 32), mode="bicubic", align_corners=False).clamp(0, 1)
    torch.testing.assert_close(preprocess_images(square, 32, 32, mean, std, "spo"), plain)
    with pytest.raises(InputError):
        preprocess_images(square, 32, 32, mean, std, "lanczos")


def test_file_given_as_scorer_points_to_the_import(official):
    from spobench.engine.scoring import load_step_scorer
    from spobench.eval.spm_eval import load_scorer

    file, _ = official
    for load in (load_step_scorer, load_scorer):
        with pytest.raises(InputError, match="spobench spm import"):
            load(str(file))


def test_wrong_layout_names_the_official_key(official, clip_dir, tmp_path):
    from spobench.models.spm_official import load_official

    _, sd = official
    bad = dict(sd)
    bad["model.vision_model.adaLN_modulation.1.weight"] = bad["model.vision_model.adaLN_modulation.1.weight"][:, :8]
    torch.save(bad, tmp_path / "bad.bin")
    with pytest.raises(ModelLoadError, match=r"wrong shape .*model\.vision_model\.adaLN_modulation\.1\.weight"):
        load_official(tmp_path / "bad.bin", clip_dir)
    bad = dict(sd)
    bad["model.text_model.embeddings.position_ids"] = torch.arange(77)[None].flip(-1)
    torch.save(bad, tmp_path / "pos.bin")
    with pytest.raises(ModelLoadError, match="position_ids"):
        load_official(tmp_path / "pos.bin", clip_dir)


# -- the SPM folder itself (issue 14): every file checked, one line naming it ---------------------------
@pytest.fixture(scope="module")
def spm_folder(official, clip_dir, tmp_path_factory):
    from spobench.models.spm_official import import_official

    return import_official(official[0], clip_dir, tmp_path_factory.mktemp("folder") / "spm")


@pytest.mark.parametrize("edit, field", [
    (lambda c: "{ not json", "not valid JSON"),
    (lambda c: json.dumps(c | {"time_conditioned": 1}), "time_conditioned"),
    (lambda c: json.dumps(c | {"max_length": "77"}), "max_length"),
    (lambda c: json.dumps(c | {"preprocess": c["preprocess"] | {"size": 0}}), "size"),
    (lambda c: json.dumps(c | {"preprocess": c["preprocess"] | {"mean": [0.5, "x", 0.5]}}), "mean"),
    (lambda c: json.dumps(c | {"format_version": 99}), "format_version"),
])
def test_malformed_spm_config_names_file_and_field(spm_folder, tmp_path, edit, field):
    import shutil

    from spobench.core.errors import SpobenchError

    spm = shutil.copytree(spm_folder, tmp_path / "spm")
    cfg = json.loads((spm / "spm_config.json").read_text())
    (spm / "spm_config.json").write_text(edit(cfg))
    with pytest.raises(SpobenchError) as e:
        StepAwarePreferenceModel.load(spm)
    msg = str(e.value)
    assert "spm_config.json" in msg and field in msg and "\n" not in msg, msg


def test_pickle_only_spm_folder_is_refused_unread(spm_folder, tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import load_file

    from spobench.core.errors import MissingWeightsError

    spm = shutil.copytree(spm_folder, tmp_path / "spm")
    state = load_file(str(spm / "clip" / "model.safetensors"))
    (spm / "clip" / "model.safetensors").unlink()
    torch.save(state, spm / "clip" / "pytorch_model.bin")
    unpickled = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: unpickled.append(a))
    with pytest.raises(MissingWeightsError) as e:
        StepAwarePreferenceModel.load(spm)
    assert "pickled .bin" in str(e.value) and "\n" not in str(e.value)
    assert not unpickled
