"""The step-aware preference model (SPM, paper Sec. 4.2): a CLIP/PickScore whose vision encoder is
conditioned on the diffusion timestep.

Time conditioning is DiT-style adaptive LayerNorm (adaLN):

* the integer timestep t -> a 256-d sinusoidal embedding (cos | sin, max period 10000) -> MLP
  (Linear, SiLU, Linear) -> a time vector ``c`` of the vision width;
* every vision encoder layer gets a modulation head ``SiLU -> Linear(6 D)`` giving shift/scale/gate
  for its attention branch and its MLP branch:
  ``h = h + (1 + g1) * attn(LN1(h) * (1 + s1) + b1)``, ``h = h + (1 + g2) * mlp(LN2(h) * (1 + s2) + b2)``;
* the pooled (post-LayerNorm CLS) output gets a shift/scale ``SiLU -> Linear(2 D)`` before the visual
  projection.

Every modulation head's final Linear is zero-initialised and the gates are parameterised as
``1 + g``, so at initialisation the SPM computes EXACTLY the underlying CLIP (PickScore) score. (The
official SPO checkpoints use gates that multiply the branch directly; ``spobench spm import``,
``spobench/models/spm_official.py``, converts them.)

The CLIP vision layers are not copied: each layer's ``forward`` is patched on the instance to a
short adaLN wrapper that calls the layer's own ``layer_norm1/self_attn/layer_norm2/mlp``; the time
vector reaches it as the keyword ``spm_time_cond``, which ``CLIPVisionModel -> CLIPEncoder`` pass
through to every layer. Called without it (e.g. ``clip.get_image_features``) a patched layer runs
CLIP's own forward, so the wrapped ``CLIPModel`` remains the plain model.

The score is PickScore's: ``logit_scale.exp() * cos(image_emb, text_emb)``.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from spobench.core.errors import InputError
from spobench.models.spm_files import (
    CLIP_SUBDIR,
    CONFIG_NAME,
    SPM_FORMAT,
    SPM_FORMAT_VERSION,
    TIME_WEIGHTS,
    _load_clip,
    _load_tokenizer,
    _read_time_weights,
    _resolve_folder,
    _tokenizer_and_preprocess,
    read_spm_config,
)
from spobench.models.spm_preprocess import (
    check_preprocess,
    preprocess_images,
    read_preprocess,
    write_preprocessor_config,
)


# -- time embedding -----------------------------------------------------------------------------
def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: (N,) -> (N, dim), [cos | sin] (DiT)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        nn.init.normal_(self.mlp[0].weight, std=0.02)
        nn.init.normal_(self.mlp[2].weight, std=0.02)
        nn.init.zeros_(self.mlp[0].bias)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype)
        return self.mlp(emb)


def _modulation_head(cond_dim: int, n_out: int) -> nn.Sequential:
    head = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, n_out))
    nn.init.zeros_(head[1].weight)  # zero shift/scale and unit gates (1 + 0) at init: exactly CLIP
    nn.init.zeros_(head[1].bias)
    return head


def _adaln_block(layer, head, attention_mask, kwargs, hidden_states, cond):
    shift1, scale1, gate1, shift2, scale2, gate2 = head(cond).to(hidden_states.dtype).unsqueeze(1).chunk(6, dim=-1)
    residual = hidden_states
    x = layer.layer_norm1(hidden_states) * (1 + scale1) + shift1
    x, _ = layer.self_attn(hidden_states=x, attention_mask=attention_mask, **kwargs)
    hidden_states = residual + (1 + gate1) * x
    residual = hidden_states
    x = layer.layer_norm2(hidden_states) * (1 + scale2) + shift2
    x = layer.mlp(x)
    return residual + (1 + gate2) * x


def _adaln_layer_forward(layer, head, hidden_states, attention_mask=None, spm_time_cond=None, **kwargs):
    """The patched ``CLIPEncoderLayer.forward``: adaLN when given a time vector, CLIP's own otherwise."""
    if spm_time_cond is None:
        return type(layer).forward(layer, hidden_states, attention_mask, **kwargs)
    if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
        ckpt = getattr(layer, "_gradient_checkpointing_func", None)
        if ckpt is None:
            from torch.utils.checkpoint import checkpoint

            ckpt = functools.partial(checkpoint, use_reentrant=False)
        # tensors that need grads go positionally (what reentrant checkpointing requires)
        return ckpt(functools.partial(_adaln_block, layer, head, attention_mask, kwargs), hidden_states, spm_time_cond)
    return _adaln_block(layer, head, attention_mask, kwargs, hidden_states, spm_time_cond)



# -- the model ----------------------------------------------------------------------------------
class StepAwarePreferenceModel(nn.Module):
    """CLIP (PickScore) with an optionally time-conditioned vision encoder.

    ``spm(images, t, prompts) -> scores (N,)`` implements ``spobench.engine.scoring.StepScorer``:
    images (N, 3, H, W) in [0, 1], ``t`` an int or a (N,) tensor of diffusion timesteps (ignored
    when ``time_conditioned=False``), one prompt per image (or a single prompt for all).
    """

    def __init__(self, clip, tokenizer, *, time_conditioned: bool = True, freq_dim: int = 256,
                 time_embed_dim: int | None = None, preprocess: dict | None = None, base: str = "",
                 max_length: int | None = None):
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer
        self.time_conditioned = time_conditioned
        self.base = base
        vcfg = clip.config.vision_config
        width = vcfg.hidden_size
        self.freq_dim = freq_dim
        self.time_embed_dim = time_embed_dim or width
        self.preprocess_cfg = dict(preprocess or read_preprocess(None, vcfg.image_size))
        self.max_length = max_length or clip.config.text_config.max_position_embeddings
        if time_conditioned:
            self.time_embed = TimestepEmbedder(self.time_embed_dim, freq_dim)
            self.layer_mods = nn.ModuleList(
                [_modulation_head(self.time_embed_dim, 6 * width) for _ in clip.vision_model.encoder.layers])
            self.pooled_mod = _modulation_head(self.time_embed_dim, 2 * width)
            for layer, head in zip(clip.vision_model.encoder.layers, self.layer_mods):
                layer.forward = functools.partial(_adaln_layer_forward, layer, head)
            self.to(clip.dtype)
        self._text_cache: dict[str, torch.Tensor] = {}
        self._text_cache_key: tuple | None = None
        self.text_encodes = 0  # prompts run through the text encoder (cache misses), for tests/logs
        self.counters = None  # a spobench.core.counters.Counters to charge image/text passes to (e.g. backbone's)
        self.origin: dict | None = None  # where imported weights came from (spobench.models.spm_official), kept on save

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_clip(cls, path_or_model, *, tokenizer=None, processor: str | Path | None = None,
                  time_conditioned: bool = True, dtype: torch.dtype = torch.float32,
                  **kwargs) -> "StepAwarePreferenceModel":
        """Build from a CLIPModel folder (PickScore for real use; a tiny CLIP in the tiny world) or a
        ``CLIPModel`` instance (then pass ``tokenizer``). ``processor``: a folder with the tokenizer and
        ``preprocessor_config.json`` when the model folder lacks them (PickScore: the laion ViT-H one)."""
        from transformers import CLIPModel

        if isinstance(path_or_model, CLIPModel):
            if tokenizer is None:
                if processor is None:
                    raise InputError("from_clip(CLIPModel): pass tokenizer= or processor=FOLDER")
                tokenizer, _ = _load_tokenizer(_resolve_folder(processor, "SPM processor"), None)
            proc_dir = _resolve_folder(processor, "SPM processor") if processor is not None else None
            preprocess = read_preprocess(proc_dir, path_or_model.config.vision_config.image_size)
            base = getattr(path_or_model.config, "_name_or_path", "") or "CLIPModel"
            return cls(path_or_model, tokenizer, time_conditioned=time_conditioned, preprocess=preprocess,
                       base=str(base), **kwargs)
        folder = _resolve_folder(path_or_model, "SPM init")
        clip = _load_clip(folder, dtype, safetensors_only=False)
        if tokenizer is None:
            tokenizer, preprocess = _tokenizer_and_preprocess(folder, processor, clip.config.vision_config.image_size)
        else:
            proc_dir = folder if (folder / "preprocessor_config.json").exists() else (
                _resolve_folder(processor, "SPM processor") if processor is not None else folder)
            preprocess = read_preprocess(proc_dir, clip.config.vision_config.image_size)
        return cls(clip, tokenizer, time_conditioned=time_conditioned, preprocess=preprocess,
                   base=str(path_or_model), **kwargs)

    def config_dict(self) -> dict:
        return {
            "format": SPM_FORMAT,
            "format_version": SPM_FORMAT_VERSION,
            "base_clip": self.base,
            "time_conditioned": self.time_conditioned,
            "time_embedding": {"type": "sinusoidal+mlp", "freq_dim": self.freq_dim,
                               "hidden": self.time_embed_dim, "max_period": 10000},
            "adaln": {"layers": "per vision encoder layer: shift/scale/gate x (attn, mlp)",
                      "pooled": "shift/scale before visual_projection", "gate": "1 + g"},
            "preprocess": self.preprocess_cfg,
            "max_length": self.max_length,
        } | ({"origin": self.origin} if self.origin else {})

    def save(self, directory: str | Path) -> Path:
        """Write ``spm_config.json``, ``clip/`` (a standard CLIPModel folder with tokenizer and
        preprocessor config) and ``time_conditioning.safetensors`` - atomically (temp dir + rename)."""
        from safetensors.torch import save_file

        from spobench.core.io import atomic_dir, provenance

        directory = Path(directory)
        with atomic_dir(directory) as tmp:
            self.clip.save_pretrained(str(tmp / CLIP_SUBDIR), safe_serialization=True)
            self.tokenizer.save_pretrained(str(tmp / CLIP_SUBDIR))
            write_preprocessor_config(tmp / CLIP_SUBDIR, self.preprocess_cfg)
            if self.time_conditioned:
                state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()
                         if not k.startswith("clip.")}
                save_file(state, str(tmp / TIME_WEIGHTS))
            cfg = self.config_dict() | {"provenance": provenance()}
            (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path, dtype: torch.dtype = torch.float32) -> "StepAwarePreferenceModel":
        """Load a folder written by :meth:`save` (or ``spobench spm import``). Every weight is checked:
        ``clip/`` through ``spobench.core.weights.load_pretrained`` (safetensors only), the time conditioning
        through ``check_state_dict``."""
        from spobench.core.weights import check_state_dict

        directory = Path(directory)
        cfg = read_spm_config(directory)
        clip_dir = directory / CLIP_SUBDIR
        clip = _load_clip(clip_dir, dtype, safetensors_only=True)
        tokenizer, _ = _load_tokenizer(clip_dir, None)
        image_size = clip.config.vision_config.image_size
        preprocess = cfg.get("preprocess") or read_preprocess(None, image_size)
        check_preprocess(preprocess, image_size, f"{directory / CONFIG_NAME}: preprocess")
        te = cfg.get("time_embedding", {})
        model = cls(clip, tokenizer, time_conditioned=cfg["time_conditioned"], freq_dim=te.get("freq_dim", 256),
                    time_embed_dim=te.get("hidden"), preprocess=preprocess, base=cfg.get("base_clip", ""),
                    max_length=cfg.get("max_length"))
        model.origin = cfg.get("origin")
        if model.time_conditioned:
            file = directory / TIME_WEIGHTS
            state = _read_time_weights(file)
            check_state_dict(model, state, str(file), ignore_missing=("clip.",))
            model.load_state_dict(state, strict=False)
        return model.to(dtype)

    # -- facts ----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.clip.logit_scale.device

    @property
    def dtype(self) -> torch.dtype:
        return self.clip.logit_scale.dtype

    @property
    def image_size(self) -> int:
        return self.clip.config.vision_config.image_size

    def enable_checkpointing(self) -> None:
        """Activation checkpointing for every CLIP layer (the adaLN-patched vision layers included)."""
        enable = getattr(self.clip, "activation_checkpointing_enable", None) or self.clip.gradient_checkpointing_enable
        enable()

    def time_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("clip.")]

    # -- text ----------------------------------------------------------------------------------
    def _text_params(self):
        yield from self.clip.text_model.parameters()
        yield from self.clip.text_projection.parameters()

    def clear_text_cache(self) -> None:
        self._text_cache.clear()
        self._text_cache_key = None

    def _encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        out = self.clip.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                          attention_mask=tok["attention_mask"].to(self.device))
        emb = out if isinstance(out, torch.Tensor) else out.pooler_output
        self.text_encodes += len(prompts)
        if self.counters is not None:
            self.counters.reward_text_passes += len(prompts)
        return emb / emb.norm(dim=-1, keepdim=True)

    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Normalised text embeddings (N, P). Cached per prompt (detached) unless the text encoder
        is being trained (train mode, grad on and text weights requiring grad); the cache is dropped
        whenever a text weight changes (optimizer step, load_state_dict, a move to another device or
        dtype) and on train()/eval()."""
        prompts = list(prompts)
        unique = list(dict.fromkeys(prompts))
        params = list(self._text_params())
        if self.training and torch.is_grad_enabled() and any(p.requires_grad for p in params):
            emb = self._encode_text(unique)
            index = {p: i for i, p in enumerate(unique)}
            return emb[[index[p] for p in prompts]]
        key = tuple((p.data_ptr(), p._version, p.dtype) for p in params)
        if key != self._text_cache_key:
            self._text_cache.clear()
            self._text_cache_key = key
        missing = [p for p in unique if p not in self._text_cache]
        if missing:
            with torch.no_grad():
                emb = self._encode_text(missing)
            for p, e in zip(missing, emb):
                self._text_cache[p] = e
        return torch.stack([self._text_cache[p] for p in prompts])

    # -- images --------------------------------------------------------------------------------
    def _timesteps(self, t, n: int) -> torch.Tensor:
        t = torch.as_tensor(t, device=self.device)
        if t.ndim == 0:
            t = t.expand(n)
        if t.shape != (n,):
            raise InputError(f"SPM timesteps must be a scalar or shape ({n},); got {tuple(t.shape)}")
        return t.float()

    def image_embeddings(self, images: torch.Tensor, t=None) -> torch.Tensor:
        """Normalised image embeddings (N, P) of images in [0, 1] at timestep(s) ``t``."""
        pp = self.preprocess_cfg
        pixels = preprocess_images(images.to(self.device), pp["size"], pp["crop"], pp["mean"], pp["std"],
                                   pp.get("resize", "clip"))
        pixels = pixels.to(self.dtype)
        if not self.time_conditioned:
            out = self.clip.get_image_features(pixel_values=pixels)
            emb = out if isinstance(out, torch.Tensor) else out.pooler_output
        else:
            if t is None:
                raise InputError("a time-conditioned SPM needs the timestep t")
            cond = self.time_embed(self._timesteps(t, images.shape[0]))
            out = self.clip.vision_model(pixel_values=pixels, spm_time_cond=cond)
            pooled = out.pooler_output
            shift, scale = self.pooled_mod(cond).to(pooled.dtype).chunk(2, dim=-1)
            emb = self.clip.visual_projection(pooled * (1 + scale) + shift)
        return emb / emb.norm(dim=-1, keepdim=True)

    def forward(self, images: torch.Tensor, t, prompts: Sequence[str]) -> torch.Tensor:
        """Scores (N,) = logit_scale.exp() * cos(image_emb(images, t), text_emb(prompts))."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        n = images.shape[0]
        if len(prompts) == 1 and n != 1:
            prompts = prompts * n
        if len(prompts) != n:
            raise InputError(f"SPM got {n} images but {len(prompts)} prompts")
        img = self.image_embeddings(images, t)
        if self.counters is not None:
            self.counters.reward_image_passes += n
        txt = self.text_embeddings(prompts).to(img.dtype)
        return self.clip.logit_scale.exp() * (img * txt).sum(-1)

    def train(self, mode: bool = True):
        self.clear_text_cache()
        return super().train(mode)
