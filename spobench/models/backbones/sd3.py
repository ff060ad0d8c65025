"""The flow-matching backbone family: Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline`` folders).

A rectified-flow model is trained on x_t = (1 - t) x_0 + t eps and predicts the velocity
v = eps - x_0 (SD3 paper, Esser et al. 2024, Eq. 2-3 with the "RF" choice), so sampling integrates
dx/dt = v from t = 1 (noise) to t = 0. What the engine and the trainers use, on top of
:class:`~spobench.models.backbones.base.Backbone`:

* ``family = "flow"`` (the DDIM backbones are ``"diffusion"``): what a trainer dispatches on;
* ``velocity(x_t, t, cond)``: ONE transformer call, ``t`` in [0, 1] (the transformer sees t * 1000,
  as the SD3 pipeline passes ``scheduler.timesteps``);
* ``predict(x_t, t, cond, uncond=None, guidance_scale=1.0)``: v with classifier-free guidance, the
  unconditional and conditional rows in one call, u + w (c - u) as the SD3 pipeline combines them.
  NOTE the argument order differs from ``Backbone.predict`` (``uncond`` before ``guidance_scale``);
  pass both by keyword;
* ``sigmas(num_steps)``: the t grid of the SD3 sampler, 1 = t_0 > t_1 > ... > t_N = 0 (N + 1 values),
  with the scheduler's timestep ``shift`` (FlowMatchEulerDiscreteScheduler: t' = s t / (1 + (s - 1) t))
  or its resolution-dependent shift when the config asks for ``use_dynamic_shifting``;
* ``decode`` / ``encode_images``: images in [0, 1], exactly as ``Backbone.decode`` (the VAE's own
  [-1, 1] range is mapped; latents are un-scaled as the pipeline does: z / scaling_factor + shift_factor);
* LoRA on the transformer's attention projections (``SD3_LORA_TARGETS``), saved in the layout diffusers'
  SD3 LoRA training script writes (``transformer.<module>.lora_A.weight``) so that
  ``StableDiffusion3Pipeline.load_lora_weights`` reads it; ``lora_disabled()`` is the reference model.

The transformer is held in ``self.unet`` (also ``self.transformer``): the base class's LoRA, ``to()``,
counters and parameter plumbing then serve both families unchanged.

Prompt encoding follows ``StableDiffusion3Pipeline.encode_prompt`` (diffusers 0.42.1,
``pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py``): both CLIP encoders' penultimate hidden
states concatenated on features and zero-padded to ``joint_attention_dim``, then the T5 tokens (zeros of
``max_sequence_length`` tokens when there is no T5, as the pipeline does) on the sequence axis; the pooled
projections of both CLIPs concatenated. The unconditional branch encodes "" (SD3 has no
``force_zeros_for_empty_prompt``).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextModelWithProjection

from spobench.core.errors import InputError, ModelLoadError
from spobench.core.weights import load_pretrained
from spobench.models.backbones.base import BackboneDefaults, Conditioning
from spobench.models.backbones.diffusers_folder import _first_line, _weights_variant
from spobench.models.backbones.lora_files import LORA_WEIGHT_NAME
from spobench.models.backbones.sd import SD15Backbone

# diffusers examples/dreambooth/train_dreambooth_lora_sd3.py (default --lora_layers) and
# yifan123/flow_grpo @ 1f4ca40d01ebb7c207a8253a09c70865cd77a27f scripts/train_sd3.py: the joint attention's
# image (to_*) and context (add_*) projections. ("attn.to_q" does not match SD3.5's attn2 blocks.)
SD3_LORA_TARGETS = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                    "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v")


def read_transformer_lora(path: str | Path) -> tuple[Path, dict, dict]:
    """An SD3 transformer LoRA file -> (file, peft-keyed state dict, LoraConfig kwargs).

    Layouts read: ``transformer.<module>.lora_A.weight`` / ``lora_B`` (diffusers' SD3 LoRA script and
    ``save_lora`` here) and ``transformer.<module>.lora.down.weight`` / ``.up`` (older diffusers).
    Safetensors only; NaN/inf, text-encoder LoRA weights and non-LoRA keys are refused by name."""
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    from spobench.models.backbones.lora_files import open_lora_file

    file, state, metadata = open_lora_file(path, "transformer")
    other = sorted(k for k in state if not k.startswith("transformer."))
    if other:
        raise ModelLoadError(f"{file}: key {other[0]!r} is not a transformer. LoRA key (is it a UNet LoRA for "
                             "SD-1.5/SDXL?)")
    bad = sorted(k for k in state if "lora" not in k)
    if bad:
        raise ModelLoadError(f"{file}: key {bad[0]!r} is not a LoRA weight")
    state = convert_unet_state_dict_to_peft({k.removeprefix("transformer."): v for k, v in state.items()})
    ranks = {k.split(".lora_B.")[0]: v.shape[1] for k, v in state.items() if ".lora_B." in k and v.ndim > 1}
    if not ranks or not any(".lora_A." in k for k in state):
        raise ModelLoadError(f"{file}: holds no transformer LoRA weights (no lora down/up pairs)")
    try:
        packed = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except ValueError:
        raise ModelLoadError(f"{file}: its lora_adapter_metadata is not valid JSON") from None
    config = {k.removeprefix("transformer."): v for k, v in packed.items() if k.startswith("transformer.")} \
        if isinstance(packed, dict) else {}
    if config.get("r"):
        return file, state, {"r": config["r"], "lora_alpha": config.get("lora_alpha") or config["r"],
                             "target_modules": sorted(config.get("target_modules") or SD3_LORA_TARGETS),
                             "rank_pattern": config.get("rank_pattern") or {},
                             "alpha_pattern": config.get("alpha_pattern") or {}}
    r = max(set(ranks.values()), key=list(ranks.values()).count)  # the commonest rank; the rest per module
    return file, state, {"r": r, "lora_alpha": r, "target_modules": sorted(ranks),
                         "rank_pattern": {m: n for m, n in ranks.items() if n != r},
                         "alpha_pattern": {m: n for m, n in ranks.items() if n != r}}


class FlowBackbone(SD15Backbone):
    """Stable Diffusion 3 / 3.5: SD3Transformer2DModel (MMDiT), the 16-channel VAE, CLIP-L + CLIP-G
    (``CLIPTextModelWithProjection`` both) and an optional T5 encoder; rectified flow.

    Loading reuses the SD loader (hub id or folder, ``HF_HUB_OFFLINE``, the component-by-component
    check, every weight through ``spobench.core.weights``); what is SD3's is the component list, the
    transformer, the flow-matching scheduler and prompt encoding. The SD-1.5 class is the parent for
    that loading and saving code only: ``family`` says which sampler applies.

    Defaults (``sd3`` = SD3.5-Medium) follow Flow-GRPO's SD3.5-M configs (yifan123/flow_grpo @
    31c71b9dc2c31e684cb547e464c941094140ac19 config/grpo.py ``pickscore_sd3``/``geneval_sd3`` and
    config/base.py; LoRA from scripts/train_sd3.py @ 1f4ca40d): resolution 512, guidance 4.5, LoRA
    rank 32 / alpha 64 on ``SD3_LORA_TARGETS``, lr 3e-4, 10 sampling steps for training rollouts (its
    evaluation uses 40, as the SD3.5-Medium model card does).
    """

    name = "sd3"
    family = "flow"
    defaults = BackboneDefaults(lora_rank=32, lora_alpha=64, lr=3e-4, resolution=512, num_steps=10,
                                guidance_scale=4.5, ddpo_lr=3e-4)
    pipeline_class = StableDiffusion3Pipeline
    default_source: str | None = "stabilityai/stable-diffusion-3.5-medium"
    text_encoder_names: tuple[str, ...] = ("text_encoder", "text_encoder_2")
    tokenizer_names: tuple[str, ...] = ("tokenizer", "tokenizer_2")
    text_encoder_classes: tuple[type, ...] = (CLIPTextModelWithProjection, CLIPTextModelWithProjection)
    lora_targets: tuple[str, ...] = SD3_LORA_TARGETS
    max_sequence_length: int = 256  # T5 tokens (zeros without T5): the pipeline's default

    def __init__(self, *, transformer, vae, text_encoders: Sequence, tokenizers: Sequence, scheduler,
                 text_encoder_3=None, tokenizer_3=None, source: str = "", model_id: str | None = None,
                 revision: str | None = None, max_sequence_length: int | None = None):
        self.text_encoder_3 = text_encoder_3
        self.tokenizer_3 = tokenizer_3
        if max_sequence_length is not None:
            self.max_sequence_length = max_sequence_length
        super().__init__(unet=transformer, vae=vae, text_encoders=text_encoders, tokenizers=tokenizers,
                         scheduler=scheduler, source=source, model_id=model_id, revision=revision,
                         force_zeros_for_empty_prompt=False)

    # -- facts -------------------------------------------------------------------------------
    @property
    def transformer(self) -> SD3Transformer2DModel:
        return self.unet

    @property
    def prediction_type(self) -> str:
        return "flow"  # the velocity eps - x_0

    @property
    def alphas_cumprod(self):
        # a DDIM trainer or sampler reached a flow backbone: one CLI line, not a traceback from inside it
        raise InputError(f"{self.name} is a flow-matching backbone (family 'flow'): it has no alphas_cumprod, "
                         "so DDIM-based sampling and trainers do not apply to it")

    @property
    def final_alpha_cumprod(self):
        return self.alphas_cumprod

    @property
    def shift(self) -> float:
        return float(self.scheduler.config.get("shift", 1.0))

    def modules(self) -> dict[str, torch.nn.Module]:
        mods = super().modules()
        mods["transformer"] = mods.pop("unet")
        if self.text_encoder_3 is not None:
            mods["text_encoder_3"] = self.text_encoder_3
        return mods

    def identity(self) -> dict:
        ident = super().identity()
        ident.update(family=self.family, shift=self.shift, t5=self.text_encoder_3 is not None)
        return ident

    # -- the schedule --------------------------------------------------------------------------
    def sigmas(self, num_steps: int, resolution: int | None = None) -> torch.Tensor:
        """t_0 = 1 > ... > t_N = 0 (float32, N + 1 values): the scheduler's own grid, shifted as it
        shifts it (``shift`` of the config; with ``use_dynamic_shifting`` the pipeline's mu from the
        image token count), so the sampler steps exactly where ``StableDiffusion3Pipeline`` steps."""
        sched = copy.deepcopy(self.scheduler)
        kwargs = {}
        if sched.config.get("use_dynamic_shifting"):
            c, h, w = self.latent_shape(resolution)
            p = self.transformer.config.patch_size
            seq = (h // p) * (w // p)
            lo, hi = sched.config.get("base_image_seq_len", 256), sched.config.get("max_image_seq_len", 4096)
            b0, b1 = sched.config.get("base_shift", 0.5), sched.config.get("max_shift", 1.16)
            kwargs["mu"] = b0 + (seq - lo) * (b1 - b0) / (hi - lo)  # the pipeline's calculate_shift
        sched.set_timesteps(num_steps, device="cpu", **kwargs)
        return sched.sigmas.detach().float().clone()

    def timesteps(self, num_steps: int) -> torch.Tensor:
        """The transformer's timesteps of the sampler's steps, t * 1000 (N values, no terminal 0)."""
        return self.sigmas(num_steps)[:-1] * self.num_train_timesteps

    # -- the training objective's noising (offline trainers: Diffusion-DPO) -------------------------
    def training_timestep(self, generator: torch.Generator) -> float:
        """t in (0, 1) as SD3 is trained: logit-normal t = sigmoid(n), n ~ N(0, 1) (SD3 paper Sec. 3.1;
        diffusers' train_dreambooth_lora_sd3 default ``logit_normal``, also tiny-flow-base's pretraining), then
        the scheduler's static shift t' = s t / (1 + (s - 1) t), as that script reads t off the training
        scheduler's shifted sigmas (unshifted under ``use_dynamic_shifting``); continuous, not its 1000-grid."""
        u = torch.sigmoid(torch.randn(1, generator=generator))
        s = 1.0 if self.scheduler.config.get("use_dynamic_shifting") else self.shift
        return float(s * u / (1 + (s - 1) * u))

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor,
                        t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, the velocity target) on the rectified-flow path (SD3 paper Eq. 2-3, "RF"): x_t = (1 - t) x_0
        + t eps, v = eps - x_0; ``t`` (N,) in [0, 1]."""
        tt = torch.as_tensor(t, device=x0.device).to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
        return (1 - tt) * x0 + tt * noise, noise - x0

    # -- the transformer ------------------------------------------------------------------------
    def unet_forward(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """One transformer call at the transformer's timestep (t * 1000); counted in ``counters``."""
        self.counters.add_unet(x.shape[0], torch.is_grad_enabled())
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        c = cond.to(x.device, self.dtype)
        return self.unet(hidden_states=x, encoder_hidden_states=c.hidden, pooled_projections=c.pooled,
                         timestep=t.to(x.dtype), return_dict=False)[0]

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor | float, cond: Conditioning) -> torch.Tensor:
        """v_theta(x_t, t, c) for t in [0, 1] (0 = data, 1 = noise): one transformer call."""
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.float32)
        return self.unet_forward(x_t.to(self.dtype), t * self.num_train_timesteps, cond).to(x_t.dtype)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor | float, cond: Conditioning,
                uncond: Conditioning | None = None, guidance_scale: float = 1.0) -> torch.Tensor:
        """The guided velocity u + w (c - u) at t in [0, 1] (one transformer call for both branches).
        ``uncond`` None: the encoded empty prompt."""
        if isinstance(uncond, (int, float)) or isinstance(guidance_scale, Conditioning):
            raise TypeError("FlowBackbone.predict(x_t, t, cond, uncond, guidance_scale): pass them by keyword")
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.float32)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        if guidance_scale == 1.0:
            return self.velocity(x_t, t, cond)
        if uncond is None:
            uncond = self.encode_unconditional(x_t.shape[0])
        out = self.velocity(torch.cat([x_t, x_t]), torch.cat([t, t]), Conditioning.cat([uncond, cond]))
        u, c = out.chunk(2)
        return u + guidance_scale * (c - u)

    # -- prompts -------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], resolution: int | None = None) -> Conditioning:
        """``StableDiffusion3Pipeline.encode_prompt`` without its CFG half (see the module docstring)."""
        return self.encode_with_grad(prompts)

    def encode_with_grad(self, prompts: Sequence[str]) -> Conditioning:
        """The encoding of :meth:`encode_prompts` with autograd left as the caller has it (pretraining
        trains the text encoders)."""
        prompts = list(prompts)
        hidden, pooled = [], []
        length = self.tokenizers[0].model_max_length  # the pipeline pads both CLIPs to tokenizer 1's length
        for tokenizer, enc in zip(self.tokenizers, self.text_encoders):
            ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                            return_tensors="pt").input_ids.to(enc.device)
            out = enc(ids, output_hidden_states=True, return_dict=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        dtype = self.text_encoders[0].dtype
        clip = torch.cat([h.to(dtype) for h in hidden], dim=-1)
        width = self.transformer.config.joint_attention_dim
        clip = torch.nn.functional.pad(clip, (0, width - clip.shape[-1]))
        if self.text_encoder_3 is None:
            t5 = torch.zeros(len(prompts), self.max_sequence_length, width, dtype=dtype, device=clip.device)
        else:
            ids = self.tokenizer_3(prompts, padding="max_length", max_length=self.max_sequence_length,
                                   truncation=True, add_special_tokens=True, return_tensors="pt").input_ids
            t5 = self.text_encoder_3(ids.to(self.text_encoder_3.device))[0].to(dtype=dtype, device=clip.device)
        return Conditioning(torch.cat([clip, t5], dim=-2), torch.cat([p.to(dtype) for p in pooled], dim=-1))

    # -- LoRA ----------------------------------------------------------------------------------
    def add_lora(self, rank: int | None = None, alpha: float | None = None, targets: Sequence[str] | None = None,
                 seed: int = 0, rank_pattern: dict | None = None,
                 alpha_pattern: dict | None = None) -> list[torch.nn.Parameter]:
        """A peft LoRA on the transformer's attention projections (default: ``lora_targets``; rank: the
        backbone's default, Flow-GRPO's 32 for SD3.5-M). ``alpha`` None keeps the default's scale
        alpha / rank (Flow-GRPO: 64 / 32 = 2) at any rank; backbones without a published alpha: scale 1."""
        rank = rank or self.defaults.lora_rank
        alpha = alpha or rank * (self.defaults.lora_alpha or self.defaults.lora_rank) / self.defaults.lora_rank
        return super().add_lora(rank, alpha, targets=tuple(targets or self.lora_targets), seed=seed,
                                rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """peft keys (``<module>.lora_A.weight``), what diffusers' SD3 LoRA script saves."""
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(self.unet)

    def save_lora(self, directory: str | Path) -> Path:
        """``pytorch_lora_weights.safetensors`` with ``transformer.``-prefixed keys and the adapter's
        config as diffusers' ``lora_adapter_metadata`` (atomic, byte-identical for identical weights)."""
        from spobench.core.io import atomic_dir, canonical_safetensors

        with atomic_dir(directory) as tmp:
            self.pipeline_class.save_lora_weights(
                tmp, transformer_lora_layers=self.lora_state_dict(), weight_name=LORA_WEIGHT_NAME,
                safe_serialization=True, transformer_lora_adapter_metadata=self.lora_config())
            file = tmp / LORA_WEIGHT_NAME
            file.write_bytes(canonical_safetensors(file.read_bytes()))
        return Path(directory) / LORA_WEIGHT_NAME

    def _read_lora(self, path: str | Path) -> tuple[Path, dict, dict]:
        return read_transformer_lora(path)

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def model_components(cls) -> tuple[tuple[str, str], ...]:
        """The required weight-carrying components (T5, ``text_encoder_3``, is optional)."""
        return (("transformer", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                *((name, "model") for name in cls.text_encoder_names))

    @classmethod
    def hub_patterns(cls) -> list[str]:
        pats = super().hub_patterns()
        pats += ["text_encoder_3/config.json", "text_encoder_3/model.safetensors",
                 "text_encoder_3/model.safetensors.index.json", "text_encoder_3/model-*-of-*.safetensors",
                 "tokenizer_3/*.json", "tokenizer_3/spiece.model"]
        return pats

    @classmethod
    def download_hint(cls, hub_id: str) -> str:
        return super().download_hint(hub_id) + ' "tokenizer_3/*" "text_encoder_3/*" (T5: optional)'

    @classmethod
    def load(cls, source: str | os.PathLike | None = None, device="cpu", dtype: torch.dtype = torch.float32,
             *, unet: str | os.PathLike | None = None, vae: str | os.PathLike | None = None):
        """Load from a ``StableDiffusion3Pipeline`` folder or hub id (default SD3.5-Medium); ``vae``
        replaces the folder's VAE as for SD. T5 is loaded when the folder has ``text_encoder_3/``."""
        if unet is not None:
            raise ModelLoadError(f"{cls.name}: has a transformer, not a UNet; a --unet override does not apply")
        return super().load(source, device=device, dtype=dtype, vae=vae)

    @classmethod
    def _from_folder(cls, folder: Path, *, dtype: torch.dtype, source: str, model_id: str, revision: str | None,
                     overrides: dict | None = None):
        overrides = overrides or {}
        try:
            config = FlowMatchEulerDiscreteScheduler.load_config(str(folder), subfolder="scheduler",
                                                                 local_files_only=True)
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ModelLoadError(f"{cls.name}: cannot load scheduler/ from {source}: {_first_line(err)}") from None
        loaded: dict = {}
        for component, stem in cls.model_components():
            root, sub = folder, component
            if component in overrides:
                root, sub = overrides[component].root, overrides[component].subfolder
            variant = _weights_variant(root / sub if sub else root, stem, dtype)[1]
            what = f"{cls.name} {component}"
            if component == "transformer":
                loaded[component] = load_pretrained(SD3Transformer2DModel, root, subfolder=sub, torch_dtype=dtype,
                                                    variant=variant, what=what)
            elif component == "vae":
                loaded[component] = load_pretrained(AutoencoderKL, root, subfolder=sub, torch_dtype=dtype,
                                                    variant=variant, what=what)
            else:
                loaded[component] = load_pretrained(CLIPTextModelWithProjection, root, subfolder=sub, dtype=dtype,
                                                    variant=variant, what=what,
                                                    ignore_unexpected=("text_model.embeddings.position_ids",))
        t5, tok3 = cls._load_t5(folder, dtype=dtype, source=source)
        tokenizers = cls._load_tokenizers(folder, source)
        bb = cls(transformer=loaded["transformer"], vae=loaded["vae"],
                 text_encoders=[loaded[n] for n in cls.text_encoder_names], tokenizers=tokenizers,
                 scheduler=scheduler, text_encoder_3=t5, tokenizer_3=tok3, source=source, model_id=model_id,
                 revision=revision)
        bb.overrides = {c: o.identity() for c, o in overrides.items()}
        bb.check_shapes(where=source + "".join(f" + {c} {o.model_id}" for c, o in overrides.items()))
        return bb

    @classmethod
    def _load_tokenizers(cls, folder: Path, source: str) -> list:
        from transformers import CLIPTokenizer

        out = []
        for component in cls.tokenizer_names:
            try:
                out.append(CLIPTokenizer.from_pretrained(str(folder), subfolder=component, local_files_only=True))
            except (OSError, ValueError, KeyError, RuntimeError, TypeError) as err:
                raise ModelLoadError(f"{cls.name}: cannot load {component}/ from {source}: {_first_line(err)}") from None
        return out

    @classmethod
    def _load_t5(cls, folder: Path, *, dtype: torch.dtype, source: str):
        """(T5EncoderModel, T5TokenizerFast) when the folder has ``text_encoder_3/``, else (None, None)."""
        d = folder / "text_encoder_3"
        if not d.is_dir():
            return None, None
        if not (d / "config.json").exists() or not _weights_variant(d, "model", dtype)[0]:
            raise ModelLoadError(f"{cls.name}: {source} has text_encoder_3/ without config.json + model.safetensors; "
                                 "complete it or remove the folder (T5 is optional: zeros replace it)")
        if not (folder / "tokenizer_3").is_dir():
            raise ModelLoadError(f"{cls.name}: {source} has text_encoder_3/ (T5) but no tokenizer_3/")
        from transformers import T5EncoderModel, T5TokenizerFast

        model = load_pretrained(T5EncoderModel, folder, subfolder="text_encoder_3", dtype=dtype,
                                variant=_weights_variant(d, "model", dtype)[1], what=f"{cls.name} text_encoder_3",
                                ignore_missing=("encoder.embed_tokens.weight",))  # tied to shared.weight
        try:
            tok = T5TokenizerFast.from_pretrained(str(folder), subfolder="tokenizer_3", local_files_only=True)
        except (OSError, ValueError, KeyError, RuntimeError, TypeError) as err:
            raise ModelLoadError(f"{cls.name}: cannot load tokenizer_3/ from {source}: {_first_line(err)}") from None
        return model, tok

    def check_shapes(self, where: str) -> None:
        """The text widths must fit the transformer: CLIP widths within ``joint_attention_dim`` (T5's
        width equal to it), the pooled projections summing to ``pooled_projection_dim``, and the VAE's
        latent channels the transformer's input channels."""
        cfg = self.transformer.config
        clip = sum(enc.config.hidden_size for enc in self.text_encoders)
        pooled = sum(enc.config.projection_dim for enc in self.text_encoders)
        problems = []
        if clip > cfg.joint_attention_dim:
            problems.append(f"CLIP widths {clip} exceed joint_attention_dim {cfg.joint_attention_dim}")
        if pooled != cfg.pooled_projection_dim:
            problems.append(f"pooled projections {pooled} != pooled_projection_dim {cfg.pooled_projection_dim}")
        if self.text_encoder_3 is not None and self.text_encoder_3.config.d_model != cfg.joint_attention_dim:
            problems.append(f"T5 width {self.text_encoder_3.config.d_model} != joint_attention_dim "
                            f"{cfg.joint_attention_dim}")
        if not self.pixel_space and self.vae.config.latent_channels != cfg.in_channels:
            problems.append(f"VAE latent channels {self.vae.config.latent_channels} != transformer in_channels "
                            f"{cfg.in_channels}")
        if problems:
            raise ModelLoadError(f"{self.name}: {where}: {'; '.join(problems)}; is it an SD3 model folder?")

    def _pipeline_kwargs(self) -> dict:
        return {"transformer": self.transformer, "scheduler": copy.deepcopy(self.scheduler), "vae": self.vae,
                "text_encoder": self.text_encoders[0], "tokenizer": self.tokenizers[0],
                "text_encoder_2": self.text_encoders[1], "tokenizer_2": self.tokenizers[1],
                "text_encoder_3": self.text_encoder_3, "tokenizer_3": self.tokenizer_3}
