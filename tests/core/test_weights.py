"""spobench.core.weights: the one strict loader every outside weight goes through (issue 14)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from spobench.core.errors import MissingWeightsError, ModelLoadError
from spobench.core.weights import check_finite, check_state_dict, load_pretrained


def _tiny_clip_folder(path):
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      vocab_size=50, max_position_embeddings=16),
                     vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8), projection_dim=8)
    CLIPModel(cfg).save_pretrained(path)
    return path


def _edit(folder, fn, name="model.safetensors"):
    f = folder / name
    sd = load_file(f)
    fn(sd)
    save_file(sd, f, metadata={"format": "pt"})


@pytest.fixture
def clip(tmp_path):
    return _tiny_clip_folder(tmp_path / "clip")


def _load(folder, **kw):
    from transformers import CLIPModel

    return load_pretrained(CLIPModel, folder, **kw)


def test_intact_folder_loads(clip):
    assert _load(clip).config.projection_dim == 8


def test_missing_key_is_refused_with_the_file_and_key(clip):
    _edit(clip, lambda sd: sd.pop("text_projection.weight"))
    with pytest.raises(ModelLoadError, match=r"model\.safetensors.*missing 1 key.*text_projection\.weight"):
        _load(clip)


def test_unexpected_key_is_refused(clip):
    _edit(clip, lambda sd: sd.__setitem__("foo.bar", torch.zeros(2)))
    with pytest.raises(ModelLoadError, match=r"unexpected 1 key.*foo\.bar"):
        _load(clip)
    assert _load(clip, ignore_unexpected=("foo.",)) is not None


def test_wrong_shape_is_refused(clip):
    _edit(clip, lambda sd: sd.__setitem__("visual_projection.weight", torch.zeros(3, 3)))
    with pytest.raises(ModelLoadError, match=r"model\.safetensors.*(shape|visual_projection)"):
        _load(clip)


def test_nan_weights_are_refused(clip):
    def poison(sd):
        sd["logit_scale"] = torch.tensor(float("nan"))
    _edit(clip, poison)
    with pytest.raises(ModelLoadError, match=r"logit_scale holds NaN"):
        _load(clip)


def test_truncated_file_is_one_line(clip):
    f = clip / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors"):
        _load(clip)


def test_pickle_only_folder_is_refused_where_safetensors_are_required(clip):
    import pickle

    (clip / "model.safetensors").unlink()
    (clip / "pytorch_model.bin").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises((MissingWeightsError, ModelLoadError), match=str(clip)):
        _load(clip)
    # allowed format: transformers reads it with weights_only=True, and a non-tensor pickle is still refused
    with pytest.raises(ModelLoadError, match="pytorch_model.bin"):
        _load(clip, safetensors_only=False)


def test_missing_folder_names_it(tmp_path):
    with pytest.raises(MissingWeightsError, match="nowhere"):
        _load(tmp_path / "nowhere")


def test_diffusers_missing_key_is_refused(tmp_path):
    from diffusers import UNet2DConditionModel

    u = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                             layers_per_block=1, cross_attention_dim=8, norm_num_groups=4, attention_head_dim=2,
                             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    u.save_pretrained(tmp_path / "unet")
    assert load_pretrained(UNet2DConditionModel, tmp_path / "unet") is not None
    _edit(tmp_path / "unet", lambda sd: sd.pop("conv_norm_out.weight"), "diffusion_pytorch_model.safetensors")
    with pytest.raises(ModelLoadError, match=r"diffusion_pytorch_model\.safetensors.*conv_norm_out\.weight"):
        load_pretrained(UNet2DConditionModel, tmp_path / "unet")


def test_check_state_dict_and_finite():
    lin = torch.nn.Linear(2, 3)
    check_state_dict(lin, lin.state_dict(), "f.bin")
    with pytest.raises(ModelLoadError, match=r"f\.bin.*missing 1 key.*bias"):
        check_state_dict(lin, {"weight": lin.weight}, "f.bin")
    with pytest.raises(ModelLoadError, match=r"wrong shape.*weight \(3, 3\) vs \(3, 2\)"):
        check_state_dict(lin, {"weight": torch.zeros(3, 3), "bias": lin.bias}, "f.bin")
    with pytest.raises(ModelLoadError, match=r"f\.bin: weight bias holds NaN"):
        check_finite({"bias": torch.tensor([float("inf")])}, "f.bin")
