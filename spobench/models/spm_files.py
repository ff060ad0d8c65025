"""An SPM folder on disk (``spm_config.json``, ``clip/``, the time-conditioning weights) and the outside
CLIP / PickScore folders an SPM starts from: finding them, reading and checking their files. Never
downloads: a hub id must already be in the local HF cache."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from spobench import ASSETS
from spobench.core.errors import MissingWeightsError, ModelLoadError
from spobench.models.spm_preprocess import read_preprocess

SPM_FORMAT = "spobench-spm"
SPM_FORMAT_VERSION = 1
CONFIG_NAME = "spm_config.json"
CLIP_SUBDIR = "clip"
TIME_WEIGHTS = "time_conditioning.safetensors"
# the tiny world's SPM, trained on generic tiny-world pairs (how: assets/tiny-spm/train.json)
TINY_SPM = ASSETS / "tiny-spm"

PICKSCORE_ID = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
_TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))

HOW_TO_GET = (
    f"For real use download the PickScore model ({PICKSCORE_ID}) and the tokenizer/processor files of "
    f"{PICKSCORE_PROCESSOR_ID} (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json, "
    f"preprocessor_config.json) into one folder, e.g. `hf download {PICKSCORE_ID} --local-dir DIR` and "
    f"`hf download {PICKSCORE_PROCESSOR_ID} vocab.json merges.txt tokenizer_config.json special_tokens_map.json "
    f"preprocessor_config.json --local-dir DIR`."
)


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
