"""UNet LoRA files on disk: finding the weights file of a LoRA folder and reading it, in every key layout
diffusers' loaders read (``save_lora_weights``, attention processors, kohya), into peft's keys plus the
LoraConfig it was made with; and writing one in diffusers' own layout (:func:`write_lora`, what
``save_lora_weights`` writes). Safetensors only; NaN/inf and text-encoder LoRAs are refused by name."""

from __future__ import annotations

import collections
from pathlib import Path

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_TEXT_PREFIXES = ("text_encoder.", "text_encoder_2.", "text_encoder_3.", "lora_te")  # diffusers and kohya names


def lora_file(path: str | Path) -> Path:
    """The weights file of a LoRA folder (``pytorch_lora_weights.safetensors``, or its only
    ``*.safetensors``) or the file itself."""
    from spobench.core.errors import ModelLoadError

    path = Path(path)
    if not path.is_dir():
        if not path.exists():
            raise ModelLoadError(f"no LoRA weights at {path}")
        return path
    if (path / LORA_WEIGHT_NAME).exists():
        return path / LORA_WEIGHT_NAME
    found = sorted(path.glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    pickled = sorted(p.name for p in path.glob("*.bin"))
    why = (f"{len(found)} .safetensors files and no {LORA_WEIGHT_NAME}" if found else
           f"no {LORA_WEIGHT_NAME}" + (f" (only pickle {pickled[0]}; spobench loads safetensors only)" if pickled else ""))
    raise ModelLoadError(f"{path}: {why}")


def write_lora(file: str | Path, pipeline_class, unet_layers: dict, adapter_config: dict | None = None,
               metadata: dict[str, str] | None = None) -> Path:
    """Write a UNet LoRA exactly as diffusers' ``save_lora_weights`` writes it (``unet.``-prefixed
    diffusers keys, its ``lora_adapter_metadata`` from ``adapter_config``), with ``metadata`` added to
    the header; atomic, and byte-identical for identical inputs (``io.canonical_safetensors``).
    ``unet_layers``: diffusers-keyed weights without the prefix (``convert_state_dict_to_diffusers``)."""
    import json
    import struct
    import tempfile

    from spobench.core.io import atomic_file, canonical_safetensors

    with tempfile.TemporaryDirectory(prefix="spobench-lora-") as tmp:
        pipeline_class.save_lora_weights(tmp, unet_lora_layers=unet_layers, weight_name=LORA_WEIGHT_NAME,
                                         safe_serialization=True, unet_lora_adapter_metadata=adapter_config)
        blob = (Path(tmp) / LORA_WEIGHT_NAME).read_bytes()
    if metadata:
        (n,) = struct.unpack("<Q", blob[:8])
        header = json.loads(blob[8:8 + n])
        header["__metadata__"] = {**header.get("__metadata__", {}), **metadata}
        text = json.dumps(header).encode()
        blob = struct.pack("<Q", len(text)) + text + blob[8 + n:]
    with atomic_file(file) as f:
        f.write(canonical_safetensors(blob))
    return Path(file)


def open_lora_file(path: str | Path, applies: str) -> tuple[Path, dict, dict]:
    """A LoRA file or folder -> (file, state dict, safetensors header metadata). Safetensors only; refuses
    an unreadable or empty file, NaN/inf weights and text-encoder LoRA weights (spobench applies ``applies``
    LoRAs only: dropping the others silently would evaluate another model)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from spobench.core.errors import ModelLoadError
    from spobench.core.weights import check_finite

    file = lora_file(path)
    try:
        state = load_file(str(file))
        with safe_open(str(file), "pt") as f:
            metadata = f.metadata() or {}
    except (OSError, SafetensorError) as err:
        raise ModelLoadError(f"{file}: not a readable safetensors LoRA file ({type(err).__name__}: {err})") from None
    if not state:
        raise ModelLoadError(f"{file}: holds no tensors")
    check_finite(state, str(file))
    text = sorted(k for k in state if k.startswith(_TEXT_PREFIXES))
    if text:
        raise ModelLoadError(f"{file}: holds text-encoder LoRA weights ({text[0]}, {len(text)} keys); spobench "
                             f"applies {applies} LoRAs only")
    return file, state, metadata


def read_lora(path: str | Path, pipeline_class, unet_config=None) -> tuple[Path, dict, dict]:
    """A UNet LoRA file -> (file, peft-keyed state dict, LoraConfig kwargs).

    The key layouts are the ones diffusers' loaders convert (diffusers 0.42
    ``utils/state_dict_utils.py`` ``UNET_TO_DIFFUSERS`` and ``loaders/lora_conversion_utils.py``
    ``_convert_non_diffusers_lora_to_diffusers``); their conversions are used as they are, on a dict
    read here from safetensors (never a pickle). Refuses NaN/inf weights, text-encoder LoRA weights
    (spobench applies UNet LoRAs only: dropping them silently would evaluate another model) and files
    holding no UNet LoRA."""
    import json

    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    from spobench.core.errors import ModelLoadError

    file, state, metadata = open_lora_file(path, "UNet")
    alphas: dict = {}
    if all(k.startswith(_KOHYA_PREFIXES) for k in state):
        try:
            state, alphas = pipeline_class.lora_state_dict(dict(state), unet_config=unet_config)
        except (ValueError, KeyError, IndexError, TypeError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise ModelLoadError(f"{file}: unreadable kohya-style LoRA keys ({first})") from None
        alphas = {k.removeprefix("unet."): v for k, v in (alphas or {}).items() if k.startswith("unet.")}
    if any(k.startswith("unet.") for k in state):
        other = sorted(k for k in state if not k.startswith("unet."))
        if other:
            raise ModelLoadError(f"{file}: key {other[0]!r} is neither a unet. nor a text-encoder LoRA key")
        state = {k.removeprefix("unet."): v for k, v in state.items()}
    # else: the oldest layout (save_attn_procs), UNet keys without a prefix
    bad = sorted(k for k in state if "lora" not in k)
    if bad:
        raise ModelLoadError(f"{file}: key {bad[0]!r} is not a LoRA weight")
    state = convert_unet_state_dict_to_peft(state)
    alphas = {k2: v for k, v in alphas.items() for k2 in convert_unet_state_dict_to_peft({k: None})}
    if not any(".lora_A." in k for k in state) or not any(".lora_B." in k for k in state):
        raise ModelLoadError(f"{file}: holds no UNet LoRA weights (no lora down/up pairs)")
    try:
        packed = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except ValueError:
        raise ModelLoadError(f"{file}: its lora_adapter_metadata is not valid JSON") from None
    config = {k.removeprefix("unet."): v for k, v in packed.items() if k.startswith("unet.")} \
        if isinstance(packed, dict) else {}
    ranks = {k: v.shape[1] for k, v in state.items() if ".lora_B." in k and v.ndim > 1}
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    modules = sorted({k.split(".lora_")[0] for k in state})
    if config.get("r"):  # the file says how it was made (spobench's save_lora, recent diffusers)
        out = {"r": config["r"], "lora_alpha": config.get("lora_alpha") or config["r"],
               "target_modules": sorted(config.get("target_modules") or DEFAULT_LORA_TARGETS),
               "rank_pattern": config.get("rank_pattern") or {}, "alpha_pattern": config.get("alpha_pattern") or {}}
        return file, state, out
    # rank per module from lora_B; kohya alphas per module, else alpha = rank (scale 1, diffusers' rule)
    rank_of = {k.split(".lora_B.")[0]: n for k, n in ranks.items()}
    alpha_of = {k.split(".lora_A.")[0].removesuffix(".alpha"): float(v) for k, v in alphas.items()}
    alpha = collections.Counter(alpha_of.values()).most_common(1)[0][0] if alpha_of else r
    out = {"r": r, "lora_alpha": alpha, "target_modules": modules,
           "rank_pattern": {m: n for m, n in rank_of.items() if n != r},
           "alpha_pattern": ({m: a for m, a in alpha_of.items() if a != alpha} if alpha_of else
                             {m: n for m, n in rank_of.items() if n != r})}
    return file, state, out
