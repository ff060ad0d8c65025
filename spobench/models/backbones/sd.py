"""Stable Diffusion 1.5 and SDXL backbones, loaded from a local diffusers folder or a hub id.

Loading is deliberately narrow, because a failed load should read as one actionable line, not a
traceback from inside diffusers:

* a hub id is first resolved to a local snapshot with ``huggingface_hub.snapshot_download``
  restricted to the files we read (configs, tokenizers and the plain ``*.safetensors`` weights —
  never the multi-GB ``.ckpt``/``.bin``/EMA extras), with ``local_files_only`` whenever
  ``HF_HUB_OFFLINE`` is set (read at call time, so a late ``os.environ`` change is honoured too);
* the folder is checked component by component before anything is built, so a missing ``unet/``
  or ``text_encoder_2/`` is reported by name together with how to get it;
* every component is then loaded with ``local_files_only=True`` and ``use_safetensors=True``
  from its own class (never ``trust_remote_code``, never pickle).

The scheduler is always a :class:`DDIMScheduler` built from the folder's scheduler config (SD ships
PNDM, SDXL Euler): the rollout engine and the log-probabilities of SPO/D3PO/DDPO are DDIM's. The
config's ``timestep_spacing`` ("leading"), ``steps_offset`` (1) and ``set_alpha_to_one`` (False) are
kept, so 20 steps are 951, 901, ..., 1 as in the diffusers pipelines; ``clip_sample`` is forced
off because SD's latents are not in [-1, 1].
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from spobench.core.errors import ModelLoadError, SpobenchError
from spobench.core.weights import load_pretrained
from spobench.models.backbones.base import Backbone, BackboneDefaults, Conditioning
from spobench.models.backbones.diffusers_folder import MARKER_FILE, DiffusersFolder, _first_line, _weights_variant



class SD15Backbone(DiffusersFolder, Backbone):
    """Stable Diffusion 1.5: CLIP ViT-L text encoder (last hidden state), 4-channel VAE latents.

    ``text_encoders``/``tokenizers`` are lists so that SDXL (two of each) is a subclass that only
    overrides what differs: its component names, prompt encoding and the unconditional branch.
    """

    name = "sd15"
    defaults = BackboneDefaults(lora_rank=4, lr=6e-5, spo_threshold=0.3, resolution=512, d3po_lr=3e-5, ddpo_lr=3e-4,
                                dpo_lr=2.048e-5, dpo_warmup=500, dpo_hflip=True, spm_lr=3e-6)
    pipeline_class = StableDiffusionPipeline
    default_source: str | None = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    text_encoder_names: tuple[str, ...] = ("text_encoder",)
    tokenizer_names: tuple[str, ...] = ("tokenizer",)
    text_encoder_classes: tuple[type, ...] = (CLIPTextModel,)
    pixel_space_model = False  # the tiny backbone: images are the latents, the VAE never runs
    requires_marker = False  # the tiny backbone: only folders spobench saved can be tiny ones

    def __init__(self, *, unet, vae, text_encoders: Sequence, tokenizers: Sequence, scheduler,
                 source: str = "", model_id: str | None = None, revision: str | None = None,
                 force_zeros_for_empty_prompt: bool = True):
        super().__init__(unet=unet, scheduler=scheduler, vae=vae, pixel_space=self.pixel_space_model,
                         source=source)
        self.text_encoders = list(text_encoders)
        self.tokenizers = list(tokenizers)
        self.model_id = model_id or source
        self.revision = revision
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.overrides: dict[str, str] = {}  # component -> the released checkpoint that replaced it
        # The base model is frozen: LoRA (add_lora) is the only thing trained, and frozen text
        # encoders never need an autograd graph.
        for module in self.modules().values():
            module.requires_grad_(False)
            module.eval()

    # -- components --------------------------------------------------------------------------
    @property
    def text_encoder(self):
        return self.text_encoders[0]

    @property
    def tokenizer(self):
        return self.tokenizers[0]

    def modules(self) -> dict[str, torch.nn.Module]:
        """Every torch module, so that ``to()`` moves the text encoders as well as UNet and VAE."""
        mods = super().modules()
        for name, enc in zip(self.text_encoder_names, self.text_encoders):
            mods[name] = enc
        return mods

    def to(self, device=None, dtype=None) -> SD15Backbone:
        """As :meth:`Backbone.to`; a VAE whose config asks for ``force_upcast`` (SDXL's overflows in
        fp16 and decodes to NaN/black) stays float32, as the diffusers pipelines upcast it."""
        super().to(device=device, dtype=dtype)
        if (self.vae is not None and dtype == torch.float16
                and getattr(self.vae.config, "force_upcast", False)):
            self.vae.to(dtype=torch.float32)
        return self

    def identity(self) -> dict:
        ident = super().identity()
        ident.update(model_id=self.model_id, revision=self.revision)
        if self.overrides:
            ident["overrides"] = dict(self.overrides)
        return ident

    # -- prompts -----------------------------------------------------------------------------
    def _token_ids(self, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
        """Tokenise as the pipelines do: pad to ``model_max_length`` and truncate longer prompts."""
        return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], resolution: int | None = None) -> Conditioning:
        """SD-1.5: the text encoder's LAST hidden state (what ``StableDiffusionPipeline`` feeds the
        UNet). Runs without grad: text encoders are frozen in every trainer here."""
        enc = self.text_encoder
        ids = self._token_ids(self.tokenizer, prompts).to(enc.device)
        mask = None
        if getattr(enc.config, "use_attention_mask", False):  # as the pipeline does; SD-1.5: off
            mask = (ids != self.tokenizer.pad_token_id).long()
        hidden = enc(ids, attention_mask=mask, return_dict=True).last_hidden_state
        return Conditioning(hidden)

    # -- loading -----------------------------------------------------------------------------
    @classmethod
    def model_components(cls) -> tuple[tuple[str, str], ...]:
        """(folder, safetensors file stem) of every weight-carrying component."""
        return (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                *((name, "model") for name in cls.text_encoder_names))

    @classmethod
    def hub_patterns(cls) -> list[str]:
        """The files a hub snapshot needs (and nothing else: no .ckpt, .bin, EMA or fp16 extras)."""
        pats = ["model_index.json", MARKER_FILE, "scheduler/scheduler_config.json"]
        for comp, stem in cls.model_components():
            pats += [f"{comp}/config.json", f"{comp}/{stem}.safetensors", f"{comp}/{stem}.safetensors.index.json",
                     f"{comp}/{stem}-*-of-*.safetensors"]
        for tok in cls.tokenizer_names:
            pats += [f"{tok}/*.json", f"{tok}/merges.txt"]
        return pats

    @classmethod
    def download_hint(cls, hub_id: str) -> str:
        weights = " ".join(f'"{comp}/{stem}.safetensors"' for comp, stem in cls.model_components())
        return f'hf download {hub_id} --include "*.json" "*.txt" {weights}'

    @classmethod
    def load(cls, source: str | os.PathLike | None = None, device="cpu", dtype: torch.dtype = torch.float32,
             *, unet: str | os.PathLike | None = None, vae: str | os.PathLike | None = None):
        """Load from a diffusers folder or a hub id (default: the official weights' hub id).

        ``unet`` / ``vae``: a component that replaces the base model's, as released checkpoints ship
        them (Diffusion-DPO's and MaPO's UNet-only repos, ``madebyollin/sdxl-vae-fp16-fix``): a folder
        or hub id holding ``config.json`` + ``diffusion_pytorch_model.safetensors`` at its top level or
        under ``unet/`` / ``vae/``. The base folder then needs no component of its own for it.

        Raises :class:`ModelLoadError` (one line: the folder or id, what is missing, how to get it)
        for a missing folder, a hub id that is not cached while offline, a missing component, or a
        folder that belongs to another backbone.
        """
        if source is None:
            source = cls.default_source
        source = str(source)
        overrides = {}
        for comp, value in (("unet", unet), ("vae", vae)):
            if value is not None:
                overrides[comp] = cls.resolve_component(comp, str(value))
        folder, model_id, revision = cls._resolve(source)
        cls.check_folder(folder, source, skip=tuple(overrides))
        bb = cls._from_folder(folder, dtype=dtype, source=source, model_id=model_id, revision=revision,
                              overrides=overrides)
        return bb.to(device=device, dtype=dtype)

    @staticmethod
    def ddim_from_config(config: dict) -> DDIMScheduler:
        """DDIM from any SD-family scheduler config (PNDM, Euler...), keeping its spacing/offset."""
        config = {k: v for k, v in dict(config).items() if not k.startswith("_")}
        config["clip_sample"] = False
        return DDIMScheduler.from_config(config)

    @classmethod
    def _from_folder(cls, folder: Path, *, dtype: torch.dtype, source: str, model_id: str, revision: str | None,
                     overrides: dict | None = None):
        overrides = overrides or {}
        try:
            scheduler = cls.ddim_from_config(DDIMScheduler.load_config(str(folder), subfolder="scheduler",
                                                                       local_files_only=True))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ModelLoadError(f"{cls.name}: cannot load scheduler/ from {source}: {_first_line(err)}") from None
        loaded: dict = {}
        for component, _stem in cls.model_components():
            # every weight goes through spobench.core.weights: missing/unexpected/wrong-shape keys and NaN refused
            root, sub = folder, component
            if component in overrides:
                root, sub = overrides[component].root, overrides[component].subfolder
            variant = _weights_variant(root / sub if sub else root, _stem, dtype)[1]
            if component in ("unet", "vae"):
                klass = UNet2DConditionModel if component == "unet" else AutoencoderKL
                loaded[component] = load_pretrained(klass, root, subfolder=sub, torch_dtype=dtype, variant=variant,
                                                    what=f"{cls.name} {component}")
            else:
                klass = cls.text_encoder_classes[cls.text_encoder_names.index(component)]
                # position_ids: a buffer older transformers saved and current ones rebuild
                loaded[component] = load_pretrained(klass, root, subfolder=sub, dtype=dtype, variant=variant,
                                                    what=f"{cls.name} {component}",
                                                    ignore_unexpected=("text_model.embeddings.position_ids",))
        tokenizers = []
        try:
            for component in cls.tokenizer_names:
                tokenizers.append(CLIPTokenizer.from_pretrained(str(folder), subfolder=component,
                                                                local_files_only=True))
        except (OSError, ValueError, KeyError, RuntimeError, TypeError) as err:
            raise ModelLoadError(f"{cls.name}: cannot load {component}/ from {source}: {_first_line(err)}") from None
        force_zeros = True
        if (folder / "model_index.json").exists():
            try:
                force_zeros = bool(json.loads((folder / "model_index.json").read_text())
                                   .get("force_zeros_for_empty_prompt", True))
            except (OSError, ValueError, AttributeError):
                pass
        bb = cls(unet=loaded["unet"], vae=loaded["vae"],
                 text_encoders=[loaded[n] for n in cls.text_encoder_names], tokenizers=tokenizers,
                 scheduler=scheduler, source=source, model_id=model_id, revision=revision,
                 force_zeros_for_empty_prompt=force_zeros)
        bb.overrides = {c: o.identity() for c, o in overrides.items()}
        bb.check_shapes(where=source + "".join(f" + {c} {o.model_id}" for c, o in overrides.items()))
        return bb

    def check_shapes(self, where: str) -> None:
        """The text encoder width must be the UNet's cross-attention width (else: wrong folder mix)."""
        width = sum(enc.config.hidden_size for enc in self.text_encoders)
        if self.unet.config.cross_attention_dim != width:
            raise ModelLoadError(f"{self.name}: {where}: text encoder width {width} does not match the UNet's "
                                 f"cross_attention_dim {self.unet.config.cross_attention_dim}; is it a "
                                 f"{self.name} model?")

    # -- saving ------------------------------------------------------------------------------
    def _pipeline_kwargs(self) -> dict:
        return {"vae": self.vae, "text_encoder": self.text_encoder, "tokenizer": self.tokenizer, "unet": self.unet,
                "scheduler": copy.deepcopy(self.scheduler), "safety_checker": None, "feature_extractor": None,
                "requires_safety_checker": False}

    def pipeline(self):
        """A diffusers pipeline sharing this backbone's modules (DDIM, no safety checker).

        For diffusers-side tools: ``load_lora_weights``, ``save_pretrained``, or sampling with
        diffusers for a cross-check. The modules are shared, not copied: a LoRA on our UNet is on
        the pipeline's UNet. (The tiny backbone's VAE is a placeholder; see ``tiny.py``.)
        """
        return self.pipeline_class(**self._pipeline_kwargs())

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write a diffusers folder (safetensors) plus ``spobench_backbone.json`` naming the backbone.

        Atomic (temp dir + rename). Refuses while a LoRA is attached: that would write peft-wrapped
        UNet weights no diffusers loader reads; save the adapter with :meth:`save_lora` instead.
        """
        from spobench.core.io import atomic_dir, atomic_write_json
        from spobench.core.progress import quiet_libraries

        if self.has_lora:
            raise SpobenchError(f"{self.name}: save_pretrained saves the base model; a LoRA is attached "
                                "(save it with save_lora)")
        with atomic_dir(path) as tmp:
            with quiet_libraries():  # transformers' "Writing model shards" bar
                self.pipeline().save_pretrained(tmp, safe_serialization=True)
            atomic_write_json(tmp / MARKER_FILE, {"backbone": self.name, "pixel_space": self.pixel_space})
        return Path(path)


class SDXLBackbone(SD15Backbone):
    """SDXL base: two CLIP text encoders (penultimate hidden states, concatenated), the second's
    pooled projection and the (original size, crop, target size) micro-conditioning ids.

    Training defaults follow the official SDXL config (RockeyCoss/SPO @ 27a86428edcff3b25dcce8001be94a7a01608f58,
    spo_training_and_inference/configs/spo_sdxl_4k-prompts_num-sam-2_3-is_10ep_bs2_gradacc2.py), which is
    what trained the released SDXL LoRA, where the paper is silent or differs:
    k = 2 candidates (the config keeps basic_config's ``num_sample_each_step = 2``; the paper's k = 4
    is its SD-1.5 ablation, Table 6), LoRA rank 64, lr 1e-5, threshold 0.4. The inner steps agree:
    the config's ``num_inner_step = 3`` counts the steps after a segment's first, so its segments
    have 4 transitions, the paper's j = 4 (MSPO's default). The official runs swap in the
    ``madebyollin/sdxl-vae-fp16-fix`` VAE because SDXL's own VAE overflows in fp16; spobench keeps
    the folder's VAE and runs it in fp32 when its config asks for ``force_upcast`` (see ``to``), so
    the stock VAE is safe; to match the official decodes, give that VAE to the model folder.
    """

    name = "sdxl"
    # k = 2: the official SDXL config (see the class docstring), not the paper's SD-1.5 k = 4
    defaults = BackboneDefaults(lora_rank=64, lr=1e-5, spo_threshold=0.4, resolution=1024, spo_k=2, d3po_lr=3e-5,
                                ddpo_lr=3e-4, dpo_lr=2.048e-5, dpo_warmup=500, dpo_hflip=True, spm_lr=1e-6)
    pipeline_class = StableDiffusionXLPipeline
    default_source = "stabilityai/stable-diffusion-xl-base-1.0"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    tokenizer_names = ("tokenizer", "tokenizer_2")
    text_encoder_classes = (CLIPTextModel, CLIPTextModelWithProjection)

    @property
    def text_encoder_2(self):
        return self.text_encoders[1]

    @property
    def tokenizer_2(self):
        return self.tokenizers[1]

    def time_ids(self, n: int, resolution: int | None, dtype, device) -> torch.Tensor:
        """``add_time_ids`` = original_size + crop top-left + target_size, as the pipeline builds
        them for an uncropped square image: (res, res, 0, 0, res, res) per row."""
        res = resolution or self.defaults.resolution
        return torch.tensor([[res, res, 0, 0, res, res]], dtype=dtype, device=device).repeat(n, 1)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], resolution: int | None = None) -> Conditioning:
        hidden_states = []
        pooled = None
        for tokenizer, enc in zip(self.tokenizers, self.text_encoders):
            out = enc(self._token_ids(tokenizer, prompts).to(enc.device), output_hidden_states=True, return_dict=True)
            hidden_states.append(out.hidden_states[-2])  # SDXL always uses the penultimate layer
            pooled = getattr(out, "text_embeds", None)  # the pooled projection of the LAST encoder
        hidden = torch.cat([h.to(hidden_states[-1].dtype) for h in hidden_states], dim=-1)
        return Conditioning(hidden, pooled, self.time_ids(len(prompts), resolution, hidden.dtype, hidden.device))

    def encode_unconditional(self, n: int, resolution: int | None = None) -> Conditioning:
        """SDXL base's pipeline zeroes the negative branch when there is no negative prompt
        (``force_zeros_for_empty_prompt`` in model_index.json) — both the hidden states and the
        pooled embedding; the time ids stay. Folders that set it False encode "" like SD-1.5."""
        if not self.force_zeros_for_empty_prompt:
            return super().encode_unconditional(n, resolution)
        key = ("zeros", resolution, self.device, self.dtype)
        if key not in self._uncond_cache:
            enc2 = self.text_encoder_2
            length = self.tokenizers[0].model_max_length
            width = sum(enc.config.hidden_size for enc in self.text_encoders)
            dev, dt = enc2.device, enc2.dtype
            self._uncond_cache[key] = Conditioning(
                torch.zeros(1, length, width, dtype=dt, device=dev),
                torch.zeros(1, enc2.config.projection_dim, dtype=dt, device=dev),
                self.time_ids(1, resolution, dt, dev),
            )
        return self._uncond_cache[key].expand(n)

    def check_shapes(self, where: str) -> None:
        """Also: the UNet's added-embedding input must be 6 time ids + the pooled width (a refiner,
        with 5 time ids and one text encoder, or an SD-2 UNet fails here instead of mid-sampling)."""
        super().check_shapes(where)
        cfg = self.unet.config
        want = 6 * (cfg.addition_time_embed_dim or 0) + self.text_encoder_2.config.projection_dim
        if cfg.addition_embed_type != "text_time" or cfg.projection_class_embeddings_input_dim != want:
            raise ModelLoadError(f"{self.name}: {where}: the UNet is not an SDXL base UNet (addition_embed_type="
                                 f"{cfg.addition_embed_type!r}, projection_class_embeddings_input_dim="
                                 f"{cfg.projection_class_embeddings_input_dim}, expected {want})")

    def _pipeline_kwargs(self) -> dict:
        kw = super()._pipeline_kwargs()
        for k in ("safety_checker", "requires_safety_checker"):
            kw.pop(k)
        kw.update(text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2, image_encoder=None,
                  force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt, add_watermarker=False)
        return kw
