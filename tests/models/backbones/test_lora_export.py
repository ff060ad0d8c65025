"""export-lora's files load back where users load LoRAs: each export of a LoRA on the tiny SD-1.5- and
SDXL-shaped folders, read by diffusers' own pipelines (``load_lora_weights``, which parses kohya files),
gives the trained adapter's UNet outputs; kohya alphas (also per module) survive; and the official SPO
LoRAs' layout (RockeyCoss/SPO's save hook) is one that ``--lora`` and recipe cells read."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from spobench.models.backbones import load_backbone
from spobench.models.backbones.lora_export import export_lora, find_run_lora, kohya_state
from spobench.models.backbones.lora_files import LORA_WEIGHT_NAME, read_lora
from spobench.models.backbones.testing import make_lora_file


def _out(bb, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, *bb.latent_shape(16), generator=g)
    with torch.no_grad():
        return bb.predict(x, 500, bb.encode_prompts(["a red cat", "a blue car"], 16), guidance_scale=1.0)


def _trained(backbone, base, rank=4, alpha=8.0, seed=5):
    """A backbone with a LoRA whose up AND down weights are random (a freshly added one has zero up)."""
    bb = load_backbone(backbone, str(base))
    bb.add_lora(rank, alpha=alpha)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in bb.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return bb


def _meta(file):
    with safe_open(str(file), "pt") as f:
        return f.metadata()


@pytest.mark.parametrize("backbone", ["sd15", "sdxl"])
@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_export_loads_back_through_diffusers_with_the_same_unet(backbone, fmt, request, tmp_path, offline):
    base = request.getfixturevalue(f"{backbone}_dir")
    bb = _trained(backbone, base)  # alpha 8 / rank 4: a scale of 2 that a lost alpha would show
    want = _out(bb)
    bb.save_lora(tmp_path / "lora")
    out = export_lora(find_run_lora(tmp_path / "lora"), fmt, tmp_path / f"x-{fmt}.safetensors")
    sd, meta = load_file(str(out)), _meta(out)
    if fmt == "kohya":
        assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
                   for k in sd)
        assert "lora_unet_down_blocks_{}_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight".format(
            0 if backbone == "sd15" else 1) in sd
        alphas = {k: v for k, v in sd.items() if k.endswith(".alpha")}
        assert len(alphas) * 3 == len(sd) and all(v.ndim == 0 and float(v) == 8.0 for v in alphas.values())
        assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8.0"
        assert meta["ss_network_module"] == "networks.lora"
    else:
        assert all(k.startswith("unet.") and (".lora.down.weight" in k or ".lora.up.weight" in k) for k in sd)
        assert len(sd) == len(bb.lora_state_dict())
    plain = load_backbone(backbone, str(base))
    assert not torch.allclose(_out(plain), want, atol=1e-4)  # the LoRA does something
    pipe = plain.pipeline()
    pipe.load_lora_weights(str(out))  # diffusers' own loader (kohya names go through its converter)
    torch.testing.assert_close(_out(plain), want, rtol=0, atol=1e-5)
    again = load_backbone(backbone, str(base))
    again.load_lora(out)  # and spobench's --lora reads both
    torch.testing.assert_close(_out(again), want, rtol=0, atol=1e-5)


def test_per_module_kohya_alphas_survive_the_round_trip(sd15_dir, tmp_path, offline):
    plain = load_backbone("sd15", str(sd15_dir))
    f = make_lora_file(tmp_path / "in", plain, style="kohya", rank=4)
    sd = load_file(str(f))
    halved = sorted(k for k in sd if k.endswith(".alpha") and "attn2" in k)
    for k in halved:
        sd[k] = torch.tensor(2.0)
    save_file(sd, str(f), metadata={"format": "pt"})
    bb = load_backbone("sd15", str(sd15_dir))
    bb.load_lora(f)  # alpha_pattern: attn2 modules at alpha 2, the rest at 4
    want = _out(bb)
    bb.save_lora(tmp_path / "lora")
    src = find_run_lora(tmp_path / "lora")
    back = load_file(str(export_lora(src, "kohya", tmp_path / "k.safetensors")))
    assert {k: float(back[k]) for k in halved} == {k: 2.0 for k in halved}
    assert {float(v) for k, v in back.items() if k.endswith(".alpha") and "attn2" not in k} == {4.0}
    # what ComfyUI / A1111 add to each weight: up @ down * alpha / rank, the trained adapter's own delta
    modules = dict(bb.unet.named_modules())
    stems = {k.rsplit(".", 2)[0] for k in back if k.endswith(".lora_down.weight")}
    assert len(stems) * 3 == len(back)
    for stem in stems:
        name = next(n for n in modules if "lora_unet_" + n.replace(".", "_") == stem)
        up, down, alpha = back[f"{stem}.lora_up.weight"], back[f"{stem}.lora_down.weight"], back[f"{stem}.alpha"]
        torch.testing.assert_close(up @ down * (float(alpha) / down.shape[0]),
                                   modules[name].get_delta_weight("default"), rtol=0, atol=1e-7)
    # diffusers' own layout keeps the per-module alphas too (lora_adapter_metadata's alpha_pattern)
    fresh = load_backbone("sd15", str(sd15_dir))
    fresh.pipeline().load_lora_weights(str(export_lora(src, "diffusers", tmp_path / "d.safetensors")))
    torch.testing.assert_close(_out(fresh), want, rtol=0, atol=1e-5)


def test_kohya_names_are_diffusers_own_inverse(sd15_dir, offline):
    """Every name goes back to its module through diffusers' converter (no module left unnamed)."""
    from diffusers import StableDiffusionPipeline

    bb = _trained("sd15", sd15_dir)
    from peft.utils import get_peft_model_state_dict

    peft_sd = get_peft_model_state_dict(bb.unet)
    config = {"r": 4, "lora_alpha": 8.0, "alpha_pattern": {}}
    state, alphas = StableDiffusionPipeline.lora_state_dict(kohya_state(peft_sd, config))
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    back = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state.items()})
    assert set(back) == set(peft_sd) and all(torch.equal(back[k], peft_sd[k]) for k in peft_sd)
    assert set(alphas.values()) == {8.0} and len(alphas) == len(peft_sd) // 2


def _spo_release(bb, folder, seed=7):
    """The official SPO LoRA file as RockeyCoss/SPO's train_scripts/train_spo.py (and _sdxl) save_model_hook
    writes it (commit 27a8642, diffusers 0.26.1): a peft adapter LoraConfig(r, lora_alpha=r,
    init_lora_weights="gaussian", target_modules=[to_k, to_q, to_v, to_out.0]) on the UNet,
    convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)) through the pipeline's
    save_lora_weights with no adapter metadata. Returns the UNet's outputs with that adapter."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    bb.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                   target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in bb.unet.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    want = _out(bb)
    bb.pipeline_class.save_lora_weights(folder, unet_lora_layers=convert_state_dict_to_diffusers(
        get_peft_model_state_dict(bb.unet)))
    return want


@pytest.mark.parametrize("backbone", ["sd15", "sdxl"])
def test_the_official_spo_lora_layout_loads(backbone, request, tmp_path, offline):
    base = request.getfixturevalue(f"{backbone}_dir")
    want = _spo_release(load_backbone(backbone, str(base)), tmp_path / "spo")
    file = tmp_path / "spo" / LORA_WEIGHT_NAME
    keys = list(load_file(str(file)))
    assert _meta(file) == {"format": "pt"}  # 0.26.1 wrote this header too: no rank, no alpha
    assert all(k.startswith("unet.") and k.endswith((".lora.down.weight", ".lora.up.weight")) for k in keys)
    assert "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.lora.up.weight" in keys
    _, _, config = read_lora(tmp_path / "spo", load_backbone(backbone, str(base)).pipeline_class)  # recipe cells
    assert config["r"] == 4 and config["lora_alpha"] == 4
    bb = load_backbone(backbone, str(base))
    bb.load_lora(tmp_path / "spo")  # what generate --lora does
    torch.testing.assert_close(_out(bb), want, rtol=0, atol=1e-5)
    # ... and it exports to the UIs' names like a run's own LoRA
    out = export_lora(find_run_lora(tmp_path / "spo"), "kohya", tmp_path / "spo-kohya.safetensors")
    ui = load_backbone(backbone, str(base))
    ui.pipeline().load_lora_weights(str(out))
    torch.testing.assert_close(_out(ui), want, rtol=0, atol=1e-5)


def test_a_corrupt_or_foreign_lora_is_refused_by_name(sd15_dir, tmp_path, offline):
    from spobench.core.errors import InputError, ModelLoadError

    bb = _trained("sd15", sd15_dir)
    f = bb.save_lora(tmp_path / "bad")
    sd = load_file(str(f))
    key = sorted(sd)[0]
    sd[key] = torch.full_like(sd[key], float("nan"))
    save_file(sd, str(f))
    with pytest.raises(ModelLoadError, match="NaN") as err:
        export_lora(find_run_lora(tmp_path / "bad"), "kohya", tmp_path / "x.safetensors")
    assert key in str(err.value) and str(f) in str(err.value) and not (tmp_path / "x.safetensors").exists()
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text("{}")
    with pytest.raises(InputError, match="whole model folder"):
        find_run_lora(tmp_path / "model")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "lora").mkdir()
    (tmp_path / "run" / "summary.json").write_text("{not json")
    (tmp_path / "run" / "lora" / LORA_WEIGHT_NAME).write_bytes(f.read_bytes())
    with pytest.raises(InputError, match="summary.json: corrupt"):
        find_run_lora(tmp_path / "run")
    (tmp_path / "young").mkdir()  # a run killed before its first checkpoint
    for name in (".spobench-out.json", "config.json", "log.jsonl"):
        (tmp_path / "young" / name).write_text("{}")
    with pytest.raises(InputError, match="no LoRA yet"):
        find_run_lora(tmp_path / "young")


def _sgm_name(module: str, layers_per_block: int) -> str:
    """A diffusers UNet module path -> the Stability (sgm) block names kohya-ss' SDXL trainer uses
    (``down_blocks.1.attentions.0`` -> ``input_blocks.<1 + 1 * (layers + 1) + 0>.1``): the inverse of
    diffusers 0.42's ``_maybe_map_sgm_blocks_to_diffusers``."""
    parts = module.split(".")
    per = layers_per_block + 1
    if parts[0] == "down_blocks":
        return ".".join(["input_blocks", str(1 + int(parts[1]) * per + int(parts[3])), "1", *parts[4:]])
    if parts[0] == "up_blocks":
        return ".".join(["output_blocks", str(int(parts[1]) * per + int(parts[3])), "1", *parts[4:]])
    return ".".join(["middle_block", "1", *parts[3:]])  # mid_block.attentions.0.<rest>


def test_kohya_sdxl_files_in_sgm_block_names_load_too(sdxl_dir, tmp_path, offline):
    """What kohya-ss trains SDXL LoRAs into (input_blocks / middle_block / output_blocks): --lora reads it."""
    bb = _trained("sdxl", sdxl_dir)
    want = _out(bb)
    bb.save_lora(tmp_path / "lora")
    kohya = load_file(str(export_lora(find_run_lora(tmp_path / "lora"), "kohya", tmp_path / "k.safetensors")))
    lpb = bb.unet.config.layers_per_block
    rename = {}
    for stem in {k.split(".")[0] for k in kohya}:
        name = next(n for n, _ in bb.unet.named_modules() if "lora_unet_" + n.replace(".", "_") == stem)
        rename[stem] = "lora_unet_" + _sgm_name(name, lpb).replace(".", "_")
    sgm = {rename[k.split(".")[0]] + k[len(k.split(".")[0]):]: v for k, v in kohya.items()}
    assert any(k.startswith("lora_unet_input_blocks_") for k in sgm) and any("middle_block_1" in k for k in sgm)
    (tmp_path / "sgm").mkdir()
    save_file(sgm, str(tmp_path / "sgm" / "spo_sdxl_webui.safetensors"), metadata={"format": "pt"})
    again = load_backbone("sdxl", str(sdxl_dir))
    again.load_lora(tmp_path / "sgm")
    torch.testing.assert_close(_out(again), want, rtol=0, atol=1e-5)


def test_the_base_model_goes_into_the_metadata(sdxl_dir, tmp_path, offline):
    """A run's summary.json (as BaseTrainer.finish writes it) names the base model, a released UNet it
    trained on top of and the resolution; RUN, RUN/lora and the file itself say the same."""
    import json

    from spobench.models.backbones.testing import make_unet_folder

    released = make_unet_folder(tmp_path / "dpo", sdxl_dir, layout="unet")
    bb = load_backbone("sdxl", str(sdxl_dir), unet=str(released))
    bb.add_lora(4)
    run = tmp_path / "run"
    bb.save_lora(run / "lora")
    (run / "summary.json").write_text(json.dumps({"trainer": "mspo", "backbone": bb.identity(),
                                                  "config": {"resolution": 16}}))
    for where in (run, run / "lora", run / "lora" / LORA_WEIGHT_NAME):
        src = find_run_lora(where)
        assert (src.name, src.backbone, src.trainer) == ("run", "sdxl", "mspo")
        meta = _meta(export_lora(src, "kohya", tmp_path / f"{where.name}.safetensors"))
        assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
        assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
        assert meta["ss_sd_model_name"] == meta["spobench_base_model"] == str(sdxl_dir.resolve())
        assert json.loads(meta["spobench_base_overrides"]) == {"unet": str(released.resolve())}
        assert meta["modelspec.resolution"] == "16x16" and meta["spobench_trainer"] == "mspo"
    meta = _meta(export_lora(src, "diffusers", tmp_path / "d.safetensors"))
    assert json.loads(meta["lora_adapter_metadata"])["unet.r"] == 4 and meta["spobench_backbone"] == "sdxl"
