"""How an SPM brings decoded images to its CLIP's input: the folder's ``preprocessor_config.json`` read and
checked, and the resize / centre-crop / normalise it describes, done on tensors (differentiable, batched)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from spobench.core.errors import InputError, ModelLoadError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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
