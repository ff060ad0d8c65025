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

from spobench import ASSETS
import functools
import json
import math
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
import torch.nn.functional as F

from spobench.core.errors import InputError, MissingWeightsError, ModelLoadError

SPM_FORMAT = "spobench-spm"
SPM_FORMAT_VERSION = 1
CONFIG_NAME = "spm_config.json"
CLIP_SUBDIR = "clip"
TIME_WEIGHTS = "time_conditioning.safetensors"
# the tiny world's SPM, trained on generic tiny-world pairs (how: assets/tiny-spm/train.json)
TINY_SPM = ASSETS / "tiny-spm"

PICKSCORE_ID = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))

HOW_TO_GET = (
    f"For real use download the PickScore model ({PICKSCORE_ID}) and the tokenizer/processor files of "
    f"{PICKSCORE_PROCESSOR_ID} (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json, "
    f"preprocessor_config.json) into one folder, e.g. `hf download {PICKSCORE_ID} --local-dir DIR` and "
    f"`hf download {PICKSCORE_PROCESSOR_ID} vocab.json merges.txt tokenizer_config.json special_tokens_map.json "
    f"preprocessor_config.json --local-dir DIR`."
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


# -- preprocessing ------------------------------------------------------------------------------
def _as_int_size(value, key: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        for k in (key, "height", "shortest_edge"):
            if k in value:
                return int(value[k])
    return None


# How images are brought to the CLIP input size (``preprocess["resize"]``):
# * "clip": what CLIPImageProcessor does through PIL (antialiased bicubic resize of the short side, long
#   side floored, centre-crop offsets floored). spobench's own SPMs use it: it is what their PickScore
#   init saw in training and what the PickScore metric does to the final images, and without antialiasing
#   a 512 -> 224 resize aliases fine texture into the score.
# * "spo": the official SPO scoring path, for the official checkpoints (trained on it): bicubic without
#   antialias, both sides rounded (``int(side * scale + 0.5)``), then torchvision's centre crop (offsets
#   ``int(round(d / 2))``, Python's round), only when the resized image is not square. From RockeyCoss/SPO
#   @ecb68d886bf566552271e51f0a0410828438630e, spo/preference_models/models/step_aware_preference_model.py
#   (``get_preference_score``). It works on [-1, 1] images and maps them with ``(x / 2 + 0.5).clamp(0, 1)``
#   after the resize; bicubic weights sum to one, so resizing the [0, 1] images spobench's backbones decode
#   is the same map, provided the decoded image reaches the SPM unclamped: the pool scorer
#   (engine/scoring.py) decodes with ``clamp=False`` for "spo" SPMs, and the clamp here follows the resize.
RESIZE_MODES = ("clip", "spo")


def read_preprocess(folder: Path | None, image_size: int, resize: str = "clip") -> dict:
    """Resize/crop/normalisation settings from ``preprocessor_config.json`` (CLIP defaults if absent)."""
    out = {"size": image_size, "crop": image_size, "mean": list(OPENAI_CLIP_MEAN), "std": list(OPENAI_CLIP_STD),
           "resize": resize, "source": "clip-defaults"}
    file = folder / "preprocessor_config.json" if folder is not None else None
    if file is not None and file.exists():
        try:
            cfg = json.loads(file.read_text())
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{file}: not valid JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise ModelLoadError(f"{file}: not a preprocessor config (a JSON object)")
        try:
            out["size"] = _as_int_size(cfg.get("size"), "shortest_edge") or out["size"]
            out["crop"] = _as_int_size(cfg.get("crop_size"), "height") or out["crop"]
        except (TypeError, ValueError):
            raise ModelLoadError(f"{file}: size/crop_size are not integers") from None
        out["mean"] = cfg.get("image_mean", out["mean"])
        out["std"] = cfg.get("image_std", out["std"])
        out["source"] = str(file)
    check_preprocess(out, image_size, str(file or "preprocess settings"))
    out["mean"], out["std"] = list(out["mean"]), list(out["std"])
    return out


def check_preprocess(pp, image_size: int, source: str) -> None:
    """Refuse preprocess settings a CLIP of ``image_size`` cannot use, naming ``source`` and the field."""
    if not isinstance(pp, dict):
        raise ModelLoadError(f"{source}: preprocess settings must be an object")
    for key in ("size", "crop"):
        v = pp.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ModelLoadError(f"{source}: {key} must be a positive integer (got {v!r})")
    for key in ("mean", "std"):
        v = pp.get(key)
        if (not isinstance(v, (list, tuple)) or len(v) != 3
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)):
            raise ModelLoadError(f"{source}: {key} must be 3 finite numbers (got {v!r})")
    if not all(x > 0 for x in pp["std"]):
        raise ModelLoadError(f"{source}: std must be positive (got {pp['std']!r})")
    if pp.get("resize", "clip") not in RESIZE_MODES:
        raise ModelLoadError(f"{source}: resize must be one of {', '.join(RESIZE_MODES)} (got {pp.get('resize')!r})")
    if pp["crop"] != image_size:
        raise ModelLoadError(f"{source}: crop size {pp['crop']} does not match the CLIP image size {image_size}")
    if pp.get("resize") == "spo" and pp["size"] != pp["crop"]:
        raise ModelLoadError(f"{source}: the 'spo' resize crops to the resize size, so size ({pp['size']}) "
                             f"must equal crop ({pp['crop']})")


def _resized_shape(h: int, w: int, size: int, resize: str) -> tuple[int, int]:
    if resize == "spo":
        scale = size / min(h, w)
        return int(h * scale + 0.5), int(w * scale + 0.5)
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(size * long / short)
    return (size, new_long) if h <= w else (new_long, size)


def _crop_offset(have: int, want: int, resize: str) -> int:
    # torchvision's CenterCrop (the official path) rounds half to even; CLIPImageProcessor floors
    return int(round((have - want) / 2.0)) if resize == "spo" else (have - want) // 2


def preprocess_images(images: torch.Tensor, size: int, crop: int, mean: Sequence[float],
                      std: Sequence[float], resize: str = "clip") -> torch.Tensor:
    """CLIP preprocessing in torch (differentiable, batched): images (N, 3, H, W) in [0, 1] ->
    bicubic resize of the short side to ``size`` (antialiased for ``resize="clip"``, as
    CLIPImageProcessor through PIL; not for ``"spo"``, the official SPO path: see RESIZE_MODES),
    centre crop ``crop`` x ``crop``, clamp to [0, 1], normalise with ``mean``/``std``."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise InputError(f"SPM expects images of shape (N, 3, H, W); got {tuple(images.shape)}")
    if resize not in RESIZE_MODES:
        raise InputError(f"resize must be one of {', '.join(RESIZE_MODES)} (got {resize!r})")
    x = images.float()
    h, w = x.shape[-2:]
    size = max(size, crop)
    nh, nw = _resized_shape(h, w, size, resize)
    if (nh, nw) != (h, w):  # bicubic at scale 1 with align_corners=False is the identity: skipped
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=resize == "clip", align_corners=False)
    if (nh, nw) != (crop, crop):
        top, left = _crop_offset(nh, crop, resize), _crop_offset(nw, crop, resize)
        x = x[..., top:top + crop, left:left + crop]
    x = x.clamp(0, 1)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def write_preprocessor_config(folder: str | Path, preprocess: dict) -> Path:
    """Write ``preprocessor_config.json`` (CLIPImageProcessor keys) for the settings of
    :func:`read_preprocess` (``size``, ``crop``, ``mean``, ``std``), so the folder reloads the same."""
    file = Path(folder) / "preprocessor_config.json"
    file.write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": preprocess["size"]},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": preprocess["crop"], "width": preprocess["crop"]},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(preprocess["mean"]), "image_std": list(preprocess["std"]), "do_convert_rgb": True}, indent=2))
    return file


# -- loading helpers ----------------------------------------------------------------------------
def _has_tokenizer(folder: Path) -> bool:
    return any(all((folder / f).exists() for f in group) for group in _TOKENIZER_FILES)


def _resolve_folder(path: str | Path, what: str) -> Path:
    """A local folder, or a hub id already in the local HF cache (never downloads)."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if not p.exists() and "/" in str(path) and not str(path).startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(str(path), local_files_only=True))
        except Exception:  # noqa: BLE001 - anything here means "not on disk"
            pass
    raise MissingWeightsError(f"{what}: no CLIP model folder at {path} (not found). {HOW_TO_GET}")


def _load_tokenizer(folder: Path, processor: str | Path | None):
    from transformers import AutoTokenizer

    candidates = [folder] + ([_resolve_folder(processor, "SPM tokenizer")] if processor is not None else [])
    for c in candidates:
        if _has_tokenizer(c):
            try:
                return AutoTokenizer.from_pretrained(str(c)), c
            except Exception as e:  # noqa: BLE001
                raise ModelLoadError(f"{c}: cannot load the CLIP tokenizer ({e})") from None
    raise MissingWeightsError(
        f"no CLIP tokenizer files (vocab.json + merges.txt, or tokenizer.json) in {folder}"
        + (f" or {processor}" if processor else "")
        + f". PickScore uses the processor of {PICKSCORE_PROCESSOR_ID}: put its tokenizer files beside the model "
        f"or pass its folder as the processor. {HOW_TO_GET}"
    )


def _load_clip(folder: Path, dtype: torch.dtype, *, safetensors_only: bool):
    """``safetensors_only``: True for the ``clip/`` of an SPM folder (spobench writes safetensors, so a
    pickle there is refused unread); False for an outside CLIP/PickScore folder, whose ``.bin``
    transformers reads with ``weights_only=True``."""
    from transformers import CLIPModel

    from spobench.core.weights import load_pretrained

    if not (folder / "config.json").exists():
        raise MissingWeightsError(f"{folder}: no config.json, not a CLIPModel folder. {HOW_TO_GET}")
    try:
        return load_pretrained(CLIPModel, folder, safetensors_only=safetensors_only, what="CLIP", dtype=dtype)
    except MissingWeightsError as e:
        if safetensors_only and any(folder.glob("*.bin")):
            raise MissingWeightsError(f"{folder}: no model.safetensors (only a pickled .bin, which an SPM folder "
                                      "never holds; it is not read)") from None
        raise MissingWeightsError(f"{e} {HOW_TO_GET}") from None


def _tokenizer_and_preprocess(folder: Path, processor, image_size: int, resize: str = "clip"):
    """The tokenizer and preprocess settings for a CLIP folder: from the folder itself, else from
    ``processor`` (PickScore's live in the laion ViT-H repo)."""
    tokenizer, tok_dir = _load_tokenizer(folder, processor)
    proc_dir = folder if (folder / "preprocessor_config.json").exists() else (
        _resolve_folder(processor, "SPM processor") if processor is not None else tok_dir)
    return tokenizer, read_preprocess(proc_dir, image_size, resize)


def read_spm_config(directory: Path) -> dict:
    """``spm_config.json`` of an SPM folder, checked field by field (one line naming the bad one)."""
    file = directory / CONFIG_NAME
    if not file.exists():
        raise MissingWeightsError(f"{directory}: no {CONFIG_NAME}; not an SPM folder (train one with "
                                  f"`spobench train-spm`, import an official one with `spobench spm import`). "
                                  f"{HOW_TO_GET}")
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        first = (str(e).splitlines() or [""])[0]
        raise ModelLoadError(f"{file}: not valid JSON ({type(e).__name__}: {first})") from None
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{file}: not an SPM config (a JSON object)")
    if cfg.get("format") != SPM_FORMAT:
        raise ModelLoadError(f"{file}: not an SPM config (format {cfg.get('format')!r}, expected {SPM_FORMAT!r})")
    version = cfg.get("format_version", SPM_FORMAT_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version > SPM_FORMAT_VERSION:
        raise ModelLoadError(f"{file}: format_version {version!r} is not one this spobench reads "
                             f"(<= {SPM_FORMAT_VERSION})")
    if not isinstance(cfg.get("time_conditioned"), bool):
        raise ModelLoadError(f"{file}: time_conditioned must be true or false (got {cfg.get('time_conditioned')!r})")
    te = cfg.get("time_embedding", {})
    if not isinstance(te, dict):
        raise ModelLoadError(f"{file}: time_embedding must be an object")
    for key, optional in (("freq_dim", False), ("hidden", True)):
        v = te.get(key, 256 if key == "freq_dim" else None)
        if not (v is None and optional) and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ModelLoadError(f"{file}: time_embedding.{key} must be a positive integer (got {v!r})")
    ml = cfg.get("max_length")
    if ml is not None and (not isinstance(ml, int) or isinstance(ml, bool) or ml < 1):
        raise ModelLoadError(f"{file}: max_length must be a positive integer (got {ml!r})")
    if not isinstance(cfg.get("base_clip", ""), str):
        raise ModelLoadError(f"{file}: base_clip must be a string")
    if "preprocess" in cfg and not isinstance(cfg["preprocess"], dict):
        raise ModelLoadError(f"{file}: preprocess must be an object")
    return cfg


def _read_time_weights(file: Path) -> dict:
    from safetensors.torch import load_file

    if not file.is_file():
        raise ModelLoadError(f"{file.parent}: time-conditioned SPM without {file.name}")
    try:
        return load_file(str(file))
    except Exception as e:  # noqa: BLE001 - SafetensorError (truncated, not safetensors) and OSError alike
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(f"{file}: cannot read the time-conditioning weights ({type(e).__name__}: {first})") from None


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


# -- a tiny CLIP for the tiny world and tests ---------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def make_tiny_clip_tokenizer(words: Sequence[str] = ()):
    """A byte-level CLIPTokenizer whose vocabulary is the 256 byte symbols (with and without
    ``</w>``), one merged token per word in ``words`` (when the BPE merge order allows), and the
    two special tokens at the top ids (as in CLIP)."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(c, len(vocab))
    merges: list[tuple[str, str]] = []
    for w in words:
        w = w.lower()
        if len(w) < 2 or not w.isascii():
            continue
        left = w[0]
        for i, c in enumerate(w[1:], start=1):
            right = c + "</w>" if i == len(w) - 1 else c
            pair = (left, right)
            if pair not in merges:
                merges.append(pair)
            left = left + right
            vocab.setdefault(left, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges)


def make_tiny_clip_folder(folder: str | Path, *, seed: int = 0, image_size: int = 32, patch_size: int = 8,
                          hidden: int = 32, layers: int = 2, heads: int = 2, projection_dim: int = 16,
                          max_length: int = 77, words: Sequence[str] | None = None, tokenizer=None) -> Path:
    """Write a randomly initialised tiny CLIPModel folder (config, safetensors, tokenizer,
    preprocessor_config.json) that ``StepAwarePreferenceModel.from_clip`` loads like PickScore.
    ``tokenizer``: any CLIPTokenizer (e.g. the tiny backbone's); default a byte-level one with the
    tiny world's ``words`` merged."""
    from transformers import CLIPConfig, CLIPModel

    if words is None:
        from spobench.toyworld.words import WORDS as words
    folder = Path(folder)
    tok = tokenizer if tokenizer is not None else make_tiny_clip_tokenizer(words)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=max_length,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, image_size=image_size, patch_size=patch_size),
        projection_dim=projection_dim,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(cfg).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": image_size},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD), "do_convert_rgb": True}, indent=2))
    return folder
