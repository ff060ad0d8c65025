"""Tiny stand-ins for real model folders, for tests that must run offline in about a second.

``make_sd15_folder`` / ``make_sdxl_folder`` write diffusers folders with the SAME layout, component
classes and config keys as ``stable-diffusion-v1-5/stable-diffusion-v1-5`` and
``stabilityai/stable-diffusion-xl-base-1.0`` (PNDM / Euler scheduler configs byte-for-byte as those
repos ship them, CLIPTextModel (+ CLIPTextModelWithProjection), CLIP tokenizers, a 2-block
AutoencoderKL, an SDXL UNet with ``addition_embed_type="text_time"``...), only with tiny widths and
random weights. So the real loaders (``SD15Backbone.load``, ``SDXLBackbone.load``) and diffusers'
own pipelines are exercised on them exactly as on the real checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# As shipped in stable-diffusion-v1-5/stable-diffusion-v1-5 (scheduler/scheduler_config.json).
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}

# As shipped in stabilityai/stable-diffusion-xl-base-1.0 (scheduler/scheduler_config.json).
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}

# Real: 77 tokens. Kept, so that the sd15/sdxl fakes differ from the tiny backbone's 32.
MAX_TOKENS = 77


def _vae(latent_channels: int = 4, **kw):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), layers_per_block=1, norm_num_groups=8,
        sample_size=16, **kw,
    )


def _write_scheduler(path: Path, config: dict) -> None:
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(config, indent=2) + "\n")


def make_sd15_folder(path: str | Path, seed: int = 0) -> Path:
    """An SD-1.5-shaped diffusers folder (random weights; 16 px images -> 8x8x4 latents)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from spobench.models.backbones.tiny import tiny_text_config, tiny_tokenizer

    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = tiny_tokenizer(model_max_length=MAX_TOKENS)
        text_encoder = CLIPTextModel(tiny_text_config(tokenizer, hidden_size=32, max_positions=MAX_TOKENS))
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=1, cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8,
        )
        vae = _vae(scaling_factor=0.18215)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    _write_scheduler(path, SD15_SCHEDULER_CONFIG)
    return path


def make_sdxl_folder(path: str | Path, seed: int = 0) -> Path:
    """An SDXL-base-shaped diffusers folder: two text encoders (32 + 32 wide -> 64 cross-attention),
    a 32-wide pooled projection and 6 x 8 time-id features -> ``projection_class_embeddings_input_dim`` 80."""
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from spobench.models.backbones.tiny import tiny_text_config, tiny_tokenizer

    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = tiny_tokenizer(model_max_length=MAX_TOKENS)
        tokenizer_2 = tiny_tokenizer(model_max_length=MAX_TOKENS, pad_token="!")  # SDXL's tokenizer_2 pads with "!"
        text_encoder = CLIPTextModel(tiny_text_config(tokenizer, hidden_size=32, max_positions=MAX_TOKENS))
        text_encoder_2 = CLIPTextModelWithProjection(
            tiny_text_config(tokenizer_2, hidden_size=32, max_positions=MAX_TOKENS, projection_dim=32))
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            layers_per_block=1, transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64, norm_num_groups=8,
        )
        vae = _vae(scaling_factor=0.13025, force_upcast=True)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG),
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    _write_scheduler(path, SDXL_SCHEDULER_CONFIG)
    return path


def make_tiny_folder(path: str | Path, seed: int = 0) -> Path:
    """A tiny-backbone folder (random weights from ``TinyBackbone.build(seed)``), as save_pretrained writes it."""
    from spobench.models.backbones.tiny import TinyBackbone

    return TinyBackbone.build(seed).save_pretrained(path)


# The SD3 / SD3.5 scheduler config's values (stabilityai/stable-diffusion-3.5-medium, scheduler/): no dynamic shift.
SD3_SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.31.0.dev0",
                        "num_train_timesteps": 1000, "shift": 3.0}


def make_sd3_folder(path: str | Path, seed: int = 0, t5: bool = False) -> Path:
    """A StableDiffusion3Pipeline-shaped folder with SD3.5-Medium's component classes and layout choices
    (SD3Transformer2DModel with qk RMS-norm and a dual-attention block, the 16-channel VAE with its
    scaling 1.5305 / shift 0.0609 and no quant convs, two CLIPTextModelWithProjection, the flow-matching
    scheduler with shift 3), tiny widths, random weights: 16 px images -> 16 x 8 x 8 latents.
    ``t5``: also a tiny T5EncoderModel + T5TokenizerFast (``text_encoder_3/``, ``tokenizer_3/``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    from spobench.models.backbones.tiny import tiny_text_config, tiny_tokenizer

    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = tiny_tokenizer(model_max_length=MAX_TOKENS)
        tokenizer_2 = tiny_tokenizer(model_max_length=MAX_TOKENS, pad_token="!")
        encoders = [CLIPTextModelWithProjection(tiny_text_config(t, hidden_size=32, max_positions=MAX_TOKENS,
                                                                 projection_dim=32)) for t in (tokenizer, tokenizer_2)]
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=64,
            pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0,))
        vae = _vae(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                   use_post_quant_conv=False)
        text_encoder_3, tokenizer_3 = (tiny_t5(d_model=64) if t5 else (None, None))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_CONFIG),
        vae=vae, text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1], tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
    from spobench.core.progress import quiet_libraries

    with quiet_libraries():
        pipe.save_pretrained(path, safe_serialization=True)
    _write_scheduler(path, SD3_SCHEDULER_CONFIG)
    return path


def tiny_t5(d_model: int = 64):
    """A 1-layer T5EncoderModel and a T5TokenizerFast over the tiny tokenizer's words (a Unigram model built
    here: no sentencepiece file is needed), with T5's special tokens pad=0, eos=1, unk=2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    from spobench.models.backbones.tiny import tiny_tokenizer

    words = sorted(k.removesuffix("</w>") for k in tiny_tokenizer().get_vocab() if k.endswith("</w>") and len(k) > 5)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in words]
    vocab += [(chr(c), -10.0) for c in range(32, 127)] + [("\u2581", -5.0)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                extra_ids=0, model_max_length=512)
    model = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1,
                                    num_heads=2, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    return model, tokenizer


def make_tiny_flow_folder(path: str | Path, seed: int = 0) -> Path:
    """A tiny-flow folder (random weights from ``TinyFlowBackbone.build(seed)``), as save_pretrained writes it."""
    from spobench.models.backbones.tiny_flow import TinyFlowBackbone

    return TinyFlowBackbone.build(seed).save_pretrained(path)


# -- released checkpoints in their published layouts ------------------------------------------------------
def make_unet_folder(path: str | Path, model: str | Path, layout: str = "top", seed: int = 1) -> Path:
    """A UNet-only folder like a released fine-tune: the UNet of ``model`` (a folder written above) with
    fresh random weights of the same shapes. ``layout="unet"``: ``unet/config.json`` +
    ``unet/diffusion_pytorch_model.safetensors`` (``mhdang/dpo-sd1.5-text2image-v1``,
    ``mhdang/dpo-sdxl-text2image-v1``); ``"top"``: both files at the top (``mapo-t2i/mapo-beta``)."""
    from diffusers import UNet2DConditionModel

    path = Path(path)
    config = UNet2DConditionModel.load_config(str(model), subfolder="unet")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(config)
    unet.save_pretrained(path / "unet" if layout == "unet" else path, safe_serialization=True)
    return path


def make_vae_folder(path: str | Path, model: str | Path, seed: int = 2, layout: str = "top") -> Path:
    """A VAE-only folder like ``madebyollin/sdxl-vae-fp16-fix`` (config.json +
    diffusion_pytorch_model.safetensors at the top, ``force_upcast`` false as that repo ships it): the
    VAE of ``model`` with fresh random weights."""
    from diffusers import AutoencoderKL

    path = Path(path)
    config = dict(AutoencoderKL.load_config(str(model), subfolder="vae"))
    config["force_upcast"] = False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL.from_config(config)
    vae.save_pretrained(path / "vae" if layout == "vae" else path, safe_serialization=True)
    return path


LORA_KEY_STYLES = ("diffusers", "peft", "attn-procs", "attn-procs-unprefixed", "kohya")


def make_lora_file(path: str | Path, backbone, style: str = "diffusers", rank: int = 4, seed: int = 3,
                   metadata: bool = False) -> Path:
    """``pytorch_lora_weights.safetensors`` for ``backbone``'s UNet (non-zero up AND down weights, so a
    loaded LoRA changes the output), in one of the key layouts published LoRAs use:

    * ``diffusers``: ``unet.<module>.lora.down.weight`` / ``.lora.up.weight``, what
      ``save_lora_weights`` writes from ``convert_state_dict_to_diffusers`` (the SPO LoRAs);
    * ``peft``: ``unet.<module>.lora_A.weight`` / ``.lora_B.weight``;
    * ``attn-procs``: ``unet.<...>.attn1.processor.to_q_lora.down.weight`` (diffusers < 0.21);
    * ``attn-procs-unprefixed``: the same without ``unet.`` (``save_attn_procs``, diffusers < 0.17);
    * ``kohya``: ``lora_unet_<module with _>.lora_down.weight`` / ``.lora_up.weight`` + ``.alpha``.

    ``metadata``: also write diffusers' ``lora_adapter_metadata`` (rank, alpha, targets). Returns the
    file. The peft module names are those of ``add_lora``'s default targets."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from spobench.models.backbones.lora_files import DEFAULT_LORA_TARGETS, LORA_WEIGHT_NAME

    if style not in LORA_KEY_STYLES:
        raise ValueError(f"style must be one of {LORA_KEY_STYLES}")
    probe = copy_unet(backbone)
    from peft import LoraConfig

    probe.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(DEFAULT_LORA_TARGETS)))
    g = torch.Generator().manual_seed(seed)
    peft_sd = {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in sorted(get_peft_model_state_dict(probe).items())}
    out: dict[str, torch.Tensor] = {}
    for k, v in peft_sd.items():
        module, _, rest = k.partition(".lora_")  # "<module>", "A.weight"
        down = rest.startswith("A")
        if style == "peft":
            out[f"unet.{k}"] = v
        elif style == "diffusers":
            out[f"unet.{module}.lora.{'down' if down else 'up'}.weight"] = v
        elif style.startswith("attn-procs"):
            parent, _, leaf = module.rpartition(".")  # "...attn1", "to_q" | "...attn1.to_out", "0"
            if leaf == "0":
                parent, leaf = parent.rpartition(".")[0], "to_out"
            name = f"{parent}.processor.{leaf}_lora.{'down' if down else 'up'}.weight"
            out[name if style.endswith("unprefixed") else f"unet.{name}"] = v
        else:  # kohya
            stem = "lora_unet_" + module.replace(".", "_")
            out[f"{stem}.lora_{'down' if down else 'up'}.weight"] = v
            out[f"{stem}.alpha"] = torch.tensor(float(rank))
    meta = {"format": "pt"}
    if metadata:
        import json

        meta["lora_adapter_metadata"] = json.dumps({"unet.r": rank, "unet.lora_alpha": rank,
                                                    "unet.target_modules": list(DEFAULT_LORA_TARGETS)})
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path / LORA_WEIGHT_NAME), metadata=meta)
    return path / LORA_WEIGHT_NAME


def copy_unet(backbone):
    """A fresh UNet of ``backbone``'s config (random weights; for building files only)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_config(backbone.unet.config)


def fake_hub_cache(cache: str | Path, repo_id: str, folder: str | Path, commit: str = "0" * 40) -> Path:
    """Put ``folder``'s files into ``cache`` laid out as huggingface_hub's cache holds a downloaded repo
    (``models--org--name/snapshots/<commit>/...`` and ``refs/main``), so that hub ids resolve offline
    (``HF_HUB_OFFLINE=1``, ``HF_HUB_CACHE=cache``) exactly as after ``hf download``."""
    import shutil

    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    shutil.copytree(folder, snap, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snap
