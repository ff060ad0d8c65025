"""Shared pieces of the CLIP-based metrics (PickScore, HPSv2, LAION aesthetic).

* image preprocessing, written out with PIL/numpy so that no torchvision is needed:
  :func:`resize_center_crop` (OpenAI CLIP's ``Resize(size, BICUBIC) -> CenterCrop(size)``, exact to
  torchvision's size and crop rounding) and :func:`resize_longest_pad` (HPSv2's ``preprocess_val``:
  ToTensor, then open_clip's ``ResizeMaxSize`` on the float tensor: longest side to ``size``, centred
  zero padding);
* :func:`resolve_folder`: where a model folder comes from: a subfolder of the metric's weights
  folder, or a hub id found in the LOCAL Hugging Face cache only (never downloaded);
* :func:`load_clip_tokenizer`, :func:`clip_features` and :func:`cosine`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from spobench.core.errors import InputError, MissingWeightsError, ModelLoadError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP / open_clip OPENAI_DATASET_MEAN
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MODEL_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
MODEL_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILE_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"))


# -- preprocessing ------------------------------------------------------------------------------

def to_normalized_tensor(image, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """torchvision's ``ToTensor() -> Normalize(mean, std)`` on an RGB PIL image: (3, H, W) float32."""
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (x - m) / s


def resize_center_crop(image, size: int) -> Image.Image:  # noqa: F821
    """OpenAI CLIP's ``Resize(size, BICUBIC) -> CenterCrop(size)`` on a PIL image, as torchvision does it:
    the shorter side becomes ``size`` and the longer ``int(size * long / short)`` (PIL bicubic, which
    antialiases when shrinking); the crop offset is ``int(round((side - size) / 2))``."""
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    if short != size:
        new_long = int(size * long / short)
        new_w, new_h = (size, new_long) if w <= h else (new_long, size)
        image = image.resize((new_w, new_h), Image.BICUBIC)
    w, h = image.size
    if w < size or h < size:  # torchvision pads before cropping; reachable only for a 1-pixel long side
        canvas = Image.new("RGB", (max(w, size), max(h, size)))
        canvas.paste(image, ((max(w, size) - w) // 2, (max(h, size) - h) // 2))
        image, (w, h) = canvas, canvas.size
    top = round((h - size) / 2.0)
    left = round((w - size) / 2.0)
    return image.crop((left, top, left + size, top + size))


def resize_longest_pad(image, size: int, antialias: bool = True, mean: Sequence[float] = CLIP_MEAN,
                       std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """HPSv2's ``preprocess_val``: RGB -> ToTensor -> ``ResizeMaxSize(size, BICUBIC, fill=0)`` ->
    Normalize; returns (3, size, size) float32.

    HPSv2's own open_clip copy (tgxs002/HPSv2, ``hpsv2/src/open_clip/transform.py``,
    ``image_transform(is_train=False, resize_longest_max=True)``) converts to a float tensor FIRST and
    resizes that tensor: torchvision's tensor path, i.e. ``torch.nn.functional.interpolate(mode="bicubic",
    align_corners=False, antialias=...)`` on [0, 1] floats, with no rounding to uint8 and no clamp (the
    bicubic overshoot below 0 / above 1 stays). ``antialias=True`` is torchvision >= 0.17's default for
    tensors; ``antialias=False`` is what torchvision < 0.17 did (HPSv2's 2023 environment).

    The longest side becomes ``size``: new (h, w) = ``round(h * s), round(w * s)`` with
    ``s = size / max(h, w)`` (Python's round, as open_clip), then zero padding (black, before
    normalisation) to ``size x size`` with ``pad // 2`` on the top/left and the rest on the bottom/right.

    Deviation, on purpose: open_clip skips resize AND padding when the longest side already equals
    ``size``, which leaves a non-square image that the model then rejects; here such an image is
    padded like any other (a square ``size x size`` image is unchanged either way).
    """
    import torch.nn.functional as F

    image = image.convert("RGB")
    w, h = image.size
    scale = size / float(max(h, w))
    new_h, new_w = round(h * scale), round(w * scale)
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
    if (new_w, new_h) != (w, h):
        x = F.interpolate(x[None], size=(new_h, new_w), mode="bicubic", align_corners=False,
                          antialias=antialias)[0]
    pad_h, pad_w = size - new_h, size - new_w
    x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (x - m) / s


# -- where model folders come from --------------------------------------------------------------

def has_model_weights(folder: Path) -> bool:
    return any((folder / f).is_file() for f in MODEL_WEIGHT_FILES + MODEL_INDEX_FILES)


def has_tokenizer(folder: Path) -> bool:
    return any(all((folder / f).is_file() for f in files) for files in TOKENIZER_FILE_SETS)


def hub_cache_snapshot(repo_id: str) -> Path | None:
    """The local Hugging Face cache's snapshot folder of ``repo_id`` (its ``main`` ref), or None.

    Only the cache on disk is read (``local_files_only=True``): nothing is downloaded, whatever
    ``HF_HUB_OFFLINE`` says, and the cache location follows ``HF_HUB_CACHE`` / ``HF_HOME``."""
    try:
        from huggingface_hub import constants, snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True, cache_dir=constants.HF_HUB_CACHE))
    except Exception:  # not cached, no huggingface_hub, a broken ref...
        return None


def hub_cache_file(repo_id: str, filename: str) -> Path | None:
    """One file of ``repo_id`` from the local Hugging Face cache, or None (never downloads)."""
    try:
        from huggingface_hub import constants, try_to_load_from_cache

        hit = try_to_load_from_cache(repo_id, filename, cache_dir=constants.HF_HUB_CACHE)
    except Exception:
        return None
    return Path(hit) if isinstance(hit, str) and Path(hit).is_file() else None


def resolve_folder(candidates: Iterable[Path], repo_id: str, ok) -> Path | None:
    """The first of ``candidates`` (then ``repo_id``'s local-cache snapshot) for which ``ok(folder)``."""
    for folder in candidates:
        if folder.is_dir() and ok(folder):
            return folder
    snap = hub_cache_snapshot(repo_id)
    if snap is not None and ok(snap):
        return snap
    return None


def weight_files(folder: Path) -> list[Path]:
    """The safetensors file(s) a transformers model folder loads from (shards listed by their index).

    Only safetensors: every official release these metrics read (PickScore_v1, openai CLIP ViT-L/14,
    Mask2Former) ships ``model.safetensors``, so a folder holding only ``pytorch_model.bin`` is
    refused rather than unpickled (:class:`ModelLoadError`), and one holding neither is
    :class:`MissingWeightsError`."""
    import json

    if (folder / MODEL_WEIGHT_FILES[0]).is_file():
        return [folder / MODEL_WEIGHT_FILES[0]]
    index = folder / MODEL_INDEX_FILES[0]
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelLoadError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
        return [folder / s for s in shards]
    for pickle in MODEL_WEIGHT_FILES[1:] + MODEL_INDEX_FILES[1:]:
        if (folder / pickle).is_file():
            raise ModelLoadError(f"{folder / pickle}: a pickle; this model is read from {MODEL_WEIGHT_FILES[0]} "
                                 f"only (its official release ships one): download model.safetensors into {folder}")
    raise MissingWeightsError(f"{folder}: no {MODEL_WEIGHT_FILES[0]}")


def combined_sha256(shas: Sequence[str]) -> str:
    """One hash for a checkpoint made of several files: the file hash itself when there is one file,
    else sha256 of the newline-joined file hashes (in the given order)."""
    if len(shas) == 1:
        return shas[0]
    return hashlib.sha256("\n".join(shas).encode()).hexdigest()


# -- models -------------------------------------------------------------------------------------

def load_clip_tokenizer(folder: str | Path, model_max_length: int = 77):
    """A transformers ``CLIPTokenizer`` from a local folder (tokenizer.json, or vocab.json + merges.txt)."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    tok.model_max_length = model_max_length
    return tok


def read_bpe(folder: str | Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a CLIP BPE tokenizer folder: vocab.json + merges.txt, else tokenizer.json's model."""
    import json

    folder = Path(folder)
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
    elif (folder / "tokenizer.json").is_file():
        model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
        vocab = model["vocab"]
        merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    else:
        raise InputError(f"{folder}: no vocab.json + merges.txt nor tokenizer.json")
    return vocab, merges


def load_open_clip_tokenizer(folder: str | Path, context_length: int = 77):
    """open_clip's ``SimpleTokenizer`` as a transformers ``CLIPTokenizer``: the folder's BPE vocabulary
    and merges with CLIP's default special tokens, IGNORING the folder's tokenizer_config.

    Why: laion's tokenizer config makes "!" (id 0) the pad token, and transformers then splits every
    "!" in a prompt out as that special token ("!!" -> [0, 0]), where open_clip's BPE gives "!!</w>"
    (diffusers issue #4153). Here the pad token is <|endoftext|>; use :func:`open_clip_ids` to get
    open_clip's zero padding back."""
    from transformers import CLIPTokenizer

    vocab, merges = read_bpe(folder)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=context_length)


def open_clip_ids(tokenizer, texts: Sequence[str], context_length: int = 77) -> torch.Tensor:
    """open_clip's ``tokenize``: [sot] + BPE + [eot], truncated to ``context_length`` with eot kept last,
    then zeros. (Zero vs end-of-text padding does not change the pooled text features: attention is
    causal and pooling reads the first end-of-text.)"""
    ids = tokenizer(list(texts), padding="max_length", truncation=True, max_length=context_length,
                    return_tensors="pt").input_ids
    eot = tokenizer.eos_token_id
    first = (ids == eot).int().argmax(dim=1, keepdim=True)
    return ids.masked_fill(torch.arange(ids.shape[1])[None, :] > first, 0)


def load_clip_model(folder: str | Path, device: str = "cpu"):
    """A transformers ``CLIPModel`` from a local folder in float32, eval mode, every weight accounted
    for (:func:`spobench.core.weights.load_pretrained`: a missing, unexpected, wrong-shaped or NaN weight is
    a :class:`ModelLoadError` naming the file and the keys). Safetensors only (see :func:`weight_files`);
    no remote code."""
    from transformers import CLIPModel

    from spobench.core.weights import load_pretrained

    model = load_pretrained(CLIPModel, folder, safetensors_only=True, what="CLIPModel", dtype=torch.float32,
                            trust_remote_code=False)
    return model.to(device).eval()


def image_embeds(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """``CLIPModel.get_image_features`` as a tensor (transformers 5 returns a ModelOutput)."""
    out = model.get_image_features(pixel_values=pixel_values)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def text_embeds(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    out = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of two (N, D) tensors."""
    return (l2_normalize(a) * l2_normalize(b)).sum(-1)



