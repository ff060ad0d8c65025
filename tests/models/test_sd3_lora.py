"""Transformer LoRA of the flow backbones: on the attention projections diffusers' SD3 LoRA script targets,
saved in diffusers' SD3 format and read back by both spobench and StableDiffusion3Pipeline.load_lora_weights;
bad LoRA files are one ModelLoadError line and leave the model as it was."""

import json

import pytest
import torch

from spobench.core.errors import ModelLoadError
from spobench.models.backbones import load_backbone
from spobench.models.backbones.sd3 import SD3_LORA_TARGETS
from spobench.models.backbones.tiny_flow import TinyFlowBackbone


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    from spobench.models.backbones.testing import make_sd3_folder

    return make_sd3_folder(tmp_path_factory.mktemp("sd3") / "sd3")


def _inputs(bb, n=2, res=16):
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, *bb.latent_shape(res), generator=g), bb.encode_prompts(["a red circle", "two squares"][:n])


def _trained_lora(bb, rank=4, alpha=8.0):
    params = bb.add_lora(rank, alpha=alpha)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in params:  # lora_B starts at zero: give both factors weight, so the LoRA changes the output
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return params


def test_targets_and_trainable_parameters(sd3_dir):
    bb = load_backbone("sd3", str(sd3_dir))
    params = bb.add_lora(4)
    names = {n.split(".lora_")[0] for n, p in bb.transformer.named_parameters() if "lora_" in n}
    leaves = {n.split("attn.", 1)[1] for n in names}
    assert leaves == {t.removeprefix("attn.") for t in SD3_LORA_TARGETS}
    assert not any(".attn2." in n for n in names)  # SD3.5's second (image-only) attention: not a target
    assert bb.trainable_parameters() == params and all(p.dtype == torch.float32 for p in params)
    assert bb.lora_config()["lora_alpha"] == 8  # alpha keeps the default scale 64 / 32 at rank 4


def test_sd3_defaults_are_flow_grpos():
    from spobench.models.backbones.sd3 import FlowBackbone

    d = FlowBackbone.defaults
    assert (d.lora_rank, d.lora_alpha, d.guidance_scale, d.resolution) == (32, 64, 4.5, 512)


def test_round_trip_and_disabled(sd3_dir, tmp_path):
    bb = load_backbone("sd3", str(sd3_dir))
    x, cond = _inputs(bb)
    base = bb.velocity(x, 0.6, cond)
    _trained_lora(bb)
    tuned = bb.velocity(x, 0.6, cond)
    assert not torch.allclose(tuned, base, atol=1e-4)
    with bb.lora_disabled():
        assert torch.equal(bb.velocity(x, 0.6, cond), base)
    file = bb.save_lora(tmp_path / "lora")
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    packed = json.loads(meta["lora_adapter_metadata"])
    assert packed["transformer.r"] == 4 and packed["transformer.lora_alpha"] == 8.0
    assert file.read_bytes() == bb.save_lora(tmp_path / "again").read_bytes()  # byte-identical

    fresh = load_backbone("sd3", str(sd3_dir))
    fresh.load_lora(tmp_path / "lora")
    assert fresh.lora_rank == 4 and torch.allclose(fresh.velocity(x, 0.6, cond), tuned, atol=1e-6)


def test_diffusers_pipeline_reads_our_lora(sd3_dir, tmp_path):
    """StableDiffusion3Pipeline.from_pretrained + load_lora_weights gives our LoRA'd transformer's output."""
    from diffusers import StableDiffusion3Pipeline

    bb = load_backbone("sd3", str(sd3_dir))
    x, cond = _inputs(bb)
    _trained_lora(bb, rank=2, alpha=6.0)
    ours = bb.velocity(x, 0.3, cond)
    bb.save_lora(tmp_path / "lora")
    pipe = StableDiffusion3Pipeline.from_pretrained(str(sd3_dir), local_files_only=True, text_encoder_3=None,
                                                    tokenizer_3=None)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    theirs = pipe.transformer(hidden_states=x, encoder_hidden_states=cond.hidden, pooled_projections=cond.pooled,
                              timestep=torch.full((2,), 300.0), return_dict=False)[0]
    assert torch.allclose(theirs, ours, atol=1e-5)


def test_reads_a_lora_saved_by_diffusers(sd3_dir, tmp_path):
    """A LoRA made the way diffusers' SD3 LoRA script makes one (peft adapter, save_lora_weights, no
    metadata) loads with rank and targets read from the weights."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusion3Pipeline.from_pretrained(str(sd3_dir), local_files_only=True, text_encoder_3=None,
                                                    tokenizer_3=None)
    pipe.transformer.add_adapter(LoraConfig(r=3, lora_alpha=3, target_modules=["attn.to_q", "attn.to_v"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pipe.transformer.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    StableDiffusion3Pipeline.save_lora_weights(tmp_path / "theirs",
                                               transformer_lora_layers=get_peft_model_state_dict(pipe.transformer))
    bb = load_backbone("sd3", str(sd3_dir))
    bb.load_lora(tmp_path / "theirs")
    assert bb.lora_rank == 3 and sorted(bb.lora_config()["target_modules"])[0].endswith("attn.to_q")
    x, cond = _inputs(bb)
    theirs = pipe.transformer(hidden_states=x, encoder_hidden_states=cond.hidden, pooled_projections=cond.pooled,
                              timestep=torch.full((2,), 500.0), return_dict=False)[0]
    assert torch.allclose(bb.velocity(x, 0.5, cond), theirs, atol=1e-5)


def _write(path, state, metadata=None):
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / "pytorch_lora_weights.safetensors"), metadata=metadata or {"format": "pt"})
    return path


def test_unet_lora_refused(tmp_path):
    from spobench.models.backbones.testing import make_lora_file
    from spobench.models.backbones.tiny import TinyBackbone

    file = make_lora_file(tmp_path / "unet-lora", TinyBackbone.build(0))
    bb = TinyFlowBackbone.build(0)
    with pytest.raises(ModelLoadError, match="not a transformer. LoRA key") as err:
        bb.load_lora(file)
    assert "\n" not in str(err.value) and not bb.has_lora


@pytest.mark.parametrize("case", ["nan", "text-encoder", "not-lora", "empty-pairs"])
def test_bad_lora_files(case, tmp_path):
    key = "transformer.transformer_blocks.0.attn.to_q"
    a, b = torch.randn(2, 96), torch.randn(96, 2)
    state = {f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b}
    if case == "nan":
        state[f"{key}.lora_A.weight"] = torch.full_like(a, float("nan"))
    elif case == "text-encoder":
        state["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = a.clone()
    elif case == "not-lora":
        state[f"{key}.weight"] = torch.randn(96, 96)
    else:
        state = {f"{key}.lora_A.weight": a}
    bb = TinyFlowBackbone.build(0)
    with pytest.raises(ModelLoadError) as err:
        bb.load_lora(_write(tmp_path / case, state))
    msg = str(err.value)
    assert "\n" not in msg and "pytorch_lora_weights.safetensors" in msg
    assert {"nan": "NaN", "text-encoder": "text-encoder", "not-lora": "not a LoRA weight",
            "empty-pairs": "no transformer LoRA"}[case] in msg
    assert not bb.has_lora


def test_lora_of_another_transformer_leaves_the_model_unchanged(sd3_dir, tmp_path):
    """A tiny-flow LoRA (width 96) into the sd3 folder's transformer (width 16): wrong shapes, refused, and
    the adapter this load added is removed again."""
    tiny = TinyFlowBackbone.build(0)
    _trained_lora(tiny)
    tiny.save_lora(tmp_path / "tiny-lora")
    bb = load_backbone("sd3", str(sd3_dir))
    x, cond = _inputs(bb)
    before = bb.velocity(x, 0.5, cond)
    with pytest.raises(ModelLoadError) as err:
        bb.load_lora(tmp_path / "tiny-lora")
    msg = str(err.value)
    assert "\n" not in msg and "tiny-lora" in msg
    assert not bb.has_lora and torch.equal(bb.velocity(x, 0.5, cond), before)
