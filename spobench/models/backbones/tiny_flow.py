"""The tiny flow world's model: an SD3-shaped rectified-flow transformer small enough for two CPU cores.

The flow counterpart of ``tiny.py``: the same classes as SD3.5 (``SD3Transformer2DModel`` with qk RMS-norm
and one MMDiT-X dual-attention block, two ``CLIPTextModelWithProjection`` encoders, no T5, the
``FlowMatchEulerDiscreteScheduler``, diffusers' SD3 LoRA files), only sizes differ, plus the tiny world's
choices:

* **Pixel space**, as the tiny U-Net: the model moves 32x32 RGB images in [-1, 1]; the folder carries a
  1-block placeholder ``AutoencoderKL`` (3 latent channels, scaling 1, shift 0) because
  ``StableDiffusion3Pipeline`` needs one to load and save; the backbone never runs it.
* **Patch 4**: 8 x 8 = 64 image tokens (patch 2 would be 256 tokens and ~2x the CPU time a step for
  the same width, measured on this machine before choosing).
* **No T5 and 16 CLIP tokens**: tiny-world prompts are at most 15 tokens with BOS/EOS; the pipeline's
  T5 zeros would be 256 tokens of nothing (``max_sequence_length = 0``).
* **shift 1**: SD3's shift 3 moves steps toward noise for 1024 px latents (the SD3 paper's
  resolution-dependent shift, Sec. 5.3.2); at 32x32x3 the unshifted grid is the natural one.

The shipped ``assets/tiny-flow-base`` (8.4 MB) was made by ``spobench toy pretrain --backbone tiny-flow
--steps 1500 --seed 0`` (``toyworld/flow_pretrain.py``; its ``pretrain.json`` records the command, wall time,
final loss and the quick check of ``toyworld/flow_check.py``). Its samples get colours right and shapes
roughly: it is a weak base, as a 1500-step MMDiT is, much weaker than the tiny U-Net's ``tiny-base``.
"""

from __future__ import annotations

import logging
import os

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from transformers import CLIPTextModelWithProjection

from spobench import ASSETS
from spobench.models.backbones.base import BackboneDefaults
from spobench.models.backbones.sd3 import FlowBackbone
from spobench.models.backbones.tiny import tiny_text_config, tiny_tokenizer

log = logging.getLogger(__name__)

PRETRAINED_DIR = ASSETS / "tiny-flow-base"  # the shipped trained weights, when present

RESOLUTION = 32
CLIP_WIDTH = 32  # each of the two CLIPs; joint_attention_dim = pooled width = 2 * 32
MAX_TOKENS = 16

SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 1.0}

TRANSFORMER_CONFIG = {
    "sample_size": RESOLUTION, "patch_size": 4, "in_channels": 3, "out_channels": 3, "num_layers": 6,
    "attention_head_dim": 24, "num_attention_heads": 4, "joint_attention_dim": 2 * CLIP_WIDTH,
    "caption_projection_dim": 96, "pooled_projection_dim": 2 * CLIP_WIDTH, "pos_embed_max_size": RESOLUTION // 4,
    "qk_norm": "rms_norm", "dual_attention_layers": (0,),
}

VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 3, "block_out_channels": (8,),
    "down_block_types": ("DownEncoderBlock2D",), "up_block_types": ("UpDecoderBlock2D",),
    "layers_per_block": 1, "norm_num_groups": 8, "sample_size": RESOLUTION, "scaling_factor": 1.0,
    "shift_factor": 0.0, "mid_block_add_attention": False, "use_quant_conv": False, "use_post_quant_conv": False,
}


class TinyFlowBackbone(FlowBackbone):
    """The tiny flow world's model: 32x32 pixel space, rectified flow, ~2M-parameter MMDiT."""

    name = "tiny-flow"
    # the tiny U-Net's choices where they are about the world, not the model (tiny.py); LoRA alpha = rank
    defaults = BackboneDefaults(lora_rank=4, lr=1e-4, spo_threshold=0.1, resolution=RESOLUTION, num_steps=20,
                                guidance_scale=4.5, prompts="tiny-train", scorer=str(ASSETS / "tiny-spm"),
                                reward="metric:toy_aesthetic", d3po_lr=1e-4, ddpo_lr=3e-4, dpo_lr=1e-4, spm_lr=1e-4,
                                spm_init="toy_pickscore", spm_init_shipped="toy-pickscore")
    default_source = None
    pixel_space_model = True
    requires_marker = True
    max_sequence_length = 0

    @classmethod
    def build(cls, seed: int = 0) -> TinyFlowBackbone:
        """A fresh, randomly initialised tiny flow backbone; the same seed gives identical weights (the
        global RNG is forked)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            tok = tiny_tokenizer(model_max_length=MAX_TOKENS)
            tok2 = tiny_tokenizer(model_max_length=MAX_TOKENS, pad_token="!")  # SD3's tokenizer_2 pads with "!"
            encoders = [CLIPTextModelWithProjection(tiny_text_config(t, hidden_size=CLIP_WIDTH, max_positions=MAX_TOKENS,
                                                                     projection_dim=CLIP_WIDTH)) for t in (tok, tok2)]
            transformer = SD3Transformer2DModel(**TRANSFORMER_CONFIG)
            vae = AutoencoderKL(**VAE_CONFIG)
        return cls(transformer=transformer, vae=vae, text_encoders=encoders, tokenizers=[tok, tok2],
                   scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), source=f"build(seed={seed})",
                   model_id=f"tiny-flow-random-seed{seed}")

    @classmethod
    def load(cls, source: str | os.PathLike | None = None, device="cpu", dtype: torch.dtype = torch.float32,
             *, unet=None, vae=None):
        """A folder written by ``save_pretrained``; ``None``: the shipped ``assets/tiny-flow-base`` when
        present, else ``build(seed=0)`` with a warning. Never touches the network."""
        if source is None:
            if PRETRAINED_DIR.is_dir():
                source = PRETRAINED_DIR
            else:
                log.warning("tiny-flow: no pretrained weights at %s; using randomly initialised weights "
                            "(TinyFlowBackbone.build(seed=0))", PRETRAINED_DIR)
                return cls.build(seed=0).to(device=device, dtype=dtype)
        return super().load(source, device=device, dtype=dtype, unet=unet, vae=vae)
