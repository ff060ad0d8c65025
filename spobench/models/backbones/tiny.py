"""The tiny backbone: a Stable-Diffusion-shaped model small enough to train on two CPU cores.

Why it exists: every trainer and metric runs end to end on it in minutes, with exactly the code
paths of SD-1.5 (same diffusers UNet class, CLIP text encoder, DDIM scheduler, peft LoRA, diffusers
LoRA files). Only sizes differ, plus two deliberate choices:

* **Pixel space.** The model denoises 32x32 RGB images directly (``pixel_space=True``: latents are
  images in [-1, 1], ``decode`` is ``x / 2 + 0.5``). A VAE at this size would be a second model
  to train for nothing. The folder still carries a 1-block ``AutoencoderKL`` with 3 latent
  channels and ``scaling_factor=1.0`` (so ``vae_scale_factor == 1``) because diffusers'
  ``StableDiffusionPipeline`` needs one to load/save; the backbone never runs it.
* **v-prediction.** At 32x32 with 1000 steps the high-noise end is where epsilon-prediction is
  worst conditioned; v keeps the targets unit-scale at every t. The rest of the scheduler is
  SD-1.5's (scaled_linear 0.00085..0.012, "leading" spacing, steps_offset=1), so 20 steps are
  951, ..., 1 exactly as for the real models.

The tokenizer is a real ``CLIPTokenizer`` over a 699-token vocabulary (``assets/tiny_tokenizer``):
one token per tiny-world word, byte fallback for any other text.
"""

from __future__ import annotations

import logging
import os

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from spobench import ASSETS
from spobench.models.backbones.base import BackboneDefaults
from spobench.models.backbones.sd import SD15Backbone

log = logging.getLogger(__name__)

TOKENIZER_DIR = ASSETS / "tiny_tokenizer"
PRETRAINED_DIR = ASSETS / "tiny-base"  # the shipped trained weights, when present

RESOLUTION = 32
TEXT_WIDTH = 64
MAX_TOKENS = 32

# SD-1.5's noise schedule and spacing (see module docstring), with v-prediction.
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "steps_offset": 1, "timestep_spacing": "leading", "set_alpha_to_one": False, "clip_sample": False,
    "prediction_type": "v_prediction",
}

# 1.06M parameters: attention only at 16x16 and 8x8 (none at full resolution, where it would cost
# the most and buy least), one resnet per level.
UNET_CONFIG = {
    "sample_size": RESOLUTION, "in_channels": 3, "out_channels": 3, "block_out_channels": (16, 32, 64),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "layers_per_block": 1, "cross_attention_dim": TEXT_WIDTH, "attention_head_dim": 4, "norm_num_groups": 8,
}

# The placeholder VAE (never run by the backbone): as small as AutoencoderKL allows.
VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 3, "block_out_channels": (8,),
    "down_block_types": ("DownEncoderBlock2D",), "up_block_types": ("UpDecoderBlock2D",),
    "layers_per_block": 1, "norm_num_groups": 8, "sample_size": RESOLUTION, "scaling_factor": 1.0,
    "mid_block_add_attention": False,
}


def tiny_tokenizer(model_max_length: int = MAX_TOKENS, **kwargs) -> CLIPTokenizer:
    """The shipped tiny-world CLIP tokenizer (``kwargs`` override e.g. ``pad_token``)."""
    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), model_max_length=model_max_length,
                                         local_files_only=True, **kwargs)


def tiny_text_config(tokenizer: CLIPTokenizer, hidden_size: int = TEXT_WIDTH, num_layers: int = 2,
                     max_positions: int = MAX_TOKENS, projection_dim: int | None = None) -> CLIPTextConfig:
    """A small CLIP text config whose special token ids match ``tokenizer`` (the pooled output is
    read at the first ``eos_token_id``, so it must be the tokenizer's)."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, max_position_embeddings=max_positions,
        projection_dim=projection_dim or hidden_size, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


class TinyBackbone(SD15Backbone):
    """The tiny-world model: 32x32 pixel space, v-prediction, ~1M-parameter UNet."""

    name = "tiny"
    # spo_threshold 0.1: the shipped tiny SPM's pool score gaps are ~0.07 logits (0.3 would keep no pair);
    # at 0.1 SPO keeps ~7% of pools and raised toy_aesthetic (results/tiny-experiment)
    # scorer: the shipped SPM trained on generic tiny-world pairs, as the paper's SPO uses an SPM (not the
    # toy_aesthetic oracle, which would let SPO see the truth); reward: the oracle, as DDPO optimises a metric
    defaults = BackboneDefaults(lora_rank=4, lr=1e-4, spo_threshold=0.1, resolution=RESOLUTION,
                                prompts="tiny-train", scorer=str(ASSETS / "tiny-spm"), reward="metric:toy_aesthetic",
                                d3po_lr=1e-4, ddpo_lr=3e-4, dpo_lr=1e-4, spm_lr=1e-4, spm_init="toy_pickscore",
                                spm_init_shipped="toy-pickscore")
    default_source = None  # the shipped folder, or random weights (see load)
    pixel_space_model = True
    requires_marker = True

    @classmethod
    def build(cls, seed: int = 0) -> TinyBackbone:
        """A fresh, randomly initialised tiny backbone; the same seed gives identical weights.

        The global RNG is forked, so building does not disturb the caller's random stream.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            tokenizer = tiny_tokenizer()
            text_encoder = CLIPTextModel(tiny_text_config(tokenizer))
            unet = UNet2DConditionModel(**UNET_CONFIG)
            vae = AutoencoderKL(**VAE_CONFIG)
        scheduler = DDIMScheduler(**SCHEDULER_CONFIG)
        return cls(unet=unet, vae=vae, text_encoders=[text_encoder], tokenizers=[tokenizer], scheduler=scheduler,
                   source=f"build(seed={seed})", model_id=f"tiny-random-seed{seed}")

    @classmethod
    def load(cls, source: str | os.PathLike | None = None, device="cpu", dtype: torch.dtype = torch.float32):
        """Load a folder written by :meth:`save_pretrained`.

        ``source=None``: the shipped pretrained folder ``spobench/assets/tiny-base`` if present,
        else random weights from ``build(seed=0)`` with a warning (samples will be noise until it
        is trained). Never touches the network.
        """
        if source is None:
            if PRETRAINED_DIR.is_dir():
                source = PRETRAINED_DIR
            else:
                log.warning("tiny: no pretrained weights at %s; using randomly initialised weights "
                            "(TinyBackbone.build(seed=0))", PRETRAINED_DIR)
                return cls.build(seed=0).to(device=device, dtype=dtype)
        return super().load(source, device=device, dtype=dtype)
