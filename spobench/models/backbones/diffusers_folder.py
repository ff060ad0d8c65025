"""How an SD-family backbone finds and checks its diffusers folder: a local folder or a hub id (resolved to a
local snapshot restricted to the files spobench reads), UNet / VAE overrides in the layouts released
checkpoints use, and a component-by-component check before anything is built, so that a failed load reads
as one line naming the folder, what is missing and how to get it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from spobench.core.errors import ModelLoadError

MARKER_FILE = "spobench_backbone.json"  # written by save_pretrained: which backbone a folder is for
_PIPELINE_BACKBONE = {"StableDiffusionPipeline": "sd15", "StableDiffusionXLPipeline": "sdxl",
                      "StableDiffusion3Pipeline": "sd3"}
_HALF = (torch.float16, torch.bfloat16)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub read it at import, or as the environment says now."""
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    except ImportError:  # pragma: no cover - huggingface_hub is a diffusers dependency
        pass
    return _env_true("HF_HUB_OFFLINE")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def _looks_like_path(source: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else that does not exist is a missing folder."""
    return (source.startswith(("/", ".", "~")) or "\\" in source or source.count("/") > 1
            or source.endswith("/"))


def _weights_variant(directory: Path, stem: str, dtype: torch.dtype) -> tuple[bool, str | None]:
    """Whether ``directory`` holds safetensors weights named ``stem``, and which variant to load.

    Plain weights are preferred; an ``fp16`` variant (what ``hf download --include "*.fp16.*"``
    fetches) is used when it is all there is, or when loading in half precision anyway.
    """
    plain = (directory / f"{stem}.safetensors").exists() or (directory / f"{stem}.safetensors.index.json").exists()
    fp16 = (directory / f"{stem}.fp16.safetensors").exists() or (
        directory / f"{stem}.safetensors.index.fp16.json").exists()
    if plain and not (fp16 and dtype in _HALF):
        return True, None
    if fp16:
        return True, "fp16"
    return False, None


@dataclass(frozen=True)
class ComponentSource:
    """Where an overriding UNet/VAE lives: ``root`` (a folder or hub snapshot) and its subfolder."""

    root: Path
    subfolder: str | None
    model_id: str
    revision: str | None = None

    def identity(self) -> str:
        return f"{self.model_id}@{self.revision}" if self.revision else self.model_id


def _config_class(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


class DiffusersFolder:
    """Loading half of :class:`spobench.models.backbones.sd.SD15Backbone`. Reads from the class: ``name``,
    ``default_source``, ``requires_marker``, ``tokenizer_names``, ``text_encoder_names``,
    ``model_components()``, ``hub_patterns()`` and ``download_hint()``."""

    @classmethod
    def resolve_component(cls, comp: str, source: str) -> "ComponentSource":
        """A UNet or VAE override -> where its config and weights are. Layouts accepted (the
        released repos use both): ``config.json`` + ``diffusion_pytorch_model[.fp16].safetensors`` at
        the top (``mapo-t2i/mapo-beta``, ``madebyollin/sdxl-vae-fp16-fix``) or under ``<comp>/``
        (``mhdang/dpo-sd1.5-text2image-v1``, ``mhdang/dpo-sdxl-text2image-v1``)."""
        stem = "diffusion_pytorch_model"
        path = Path(source).expanduser()
        if path.exists():
            if not path.is_dir():
                raise ModelLoadError(f"{cls.name}: {comp} override {source} is a file, not a folder with config.json "
                                     f"and {stem}.safetensors")
            root, model_id, revision = path.resolve(), str(path.resolve()), None
        elif _looks_like_path(source):
            raise ModelLoadError(f"{cls.name}: {comp} override folder {source} does not exist")
        else:
            patterns = [p for d in ("", f"{comp}/") for p in (f"{d}config.json", f"{d}{stem}.safetensors",
                                                                f"{d}{stem}.fp16.safetensors",
                                                                f"{d}{stem}.safetensors.index.json",
                                                                f"{d}{stem}-*-of-*.safetensors")]
            hint = f'hf download {source} --include "config.json" "{stem}.safetensors" "{comp}/*"'
            root, model_id, revision = cls._from_hub(source, patterns=patterns, hint=hint)
        for sub in ("", comp):
            d = root / sub if sub else root
            if (d / "config.json").exists() and _weights_variant(d, stem, torch.float32)[0]:
                klass = _config_class(d / "config.json")
                want = "UNet2DConditionModel" if comp == "unet" else "AutoencoderKL"
                if klass not in (None, want):
                    raise ModelLoadError(f"{cls.name}: {comp} override {source}: {d / 'config.json'} is a {klass}, "
                                         f"not a {want}")
                return ComponentSource(root=root, subfolder=sub or None, model_id=model_id, revision=revision)
        pickled = any(root.glob("*.bin")) or any(root.glob(f"{comp}/*.bin"))
        raise ModelLoadError(f"{cls.name}: {comp} override {source} holds no config.json + {stem}.safetensors "
                             f"(looked in {root} and {root / comp})"
                             + ("; only pickle .bin weights there, spobench loads safetensors only" if pickled else ""))

    @classmethod
    def _resolve(cls, source: str) -> tuple[Path, str, str | None]:
        """``source`` -> (local folder, model id, hub revision or None)."""
        path = Path(source).expanduser()
        if path.exists():
            if not path.is_dir():
                raise ModelLoadError(f"{cls.name}: {source} is a file, not a diffusers model folder "
                                     f"(a folder with model_index.json, unet/, vae/, {cls.text_encoder_names[0]}/ ...)")
            return path.resolve(), str(path.resolve()), None
        if _looks_like_path(source):
            raise ModelLoadError(f"{cls.name}: model folder {source} does not exist; pass an existing diffusers "
                                 f"folder or a hub id (default {cls.default_source or 'none'})")
        return cls._from_hub(source)

    @classmethod
    def resolve_lora(cls, source: str | Path) -> Path:
        """A LoRA folder or file, or the hub id of a LoRA repository (``hub:`` optional; e.g. the released
        SPO-Diffusion-Models/SPO-SD-v1-5_4k-p_10ep_LoRA), found offline as the models are."""
        from spobench.models.backbones.lora_files import lora_file

        text = str(source)
        path = Path(text).expanduser()
        if path.exists() or (_looks_like_path(text) and not text.startswith("hub:")):
            return lora_file(path)
        hub_id = text.removeprefix("hub:")
        folder, _, _ = cls._from_hub(hub_id, patterns=["*.safetensors", "*.json"],
                                     hint=f'hf download {hub_id} --include "*.safetensors" "*.json"')
        return lora_file(folder)

    @classmethod
    def _from_hub(cls, hub_id: str, patterns: list[str] | None = None,
                  hint: str | None = None) -> tuple[Path, str, str | None]:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HFValidationError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        offline = hub_offline()
        hint = hint or cls.download_hint(hub_id)
        from spobench.core.progress import quiet_libraries

        try:
            with quiet_libraries(downloads=True):  # no "Fetching N files" bars in a log
                snap = snapshot_download(hub_id, allow_patterns=patterns or cls.hub_patterns(),
                                         local_files_only=offline)
        except HFValidationError:
            raise ModelLoadError(f"{cls.name}: {hub_id!r} is neither an existing folder nor a valid hub id") from None
        except LocalEntryNotFoundError as err:
            if offline:
                raise ModelLoadError(
                    f"{cls.name}: hub id {hub_id} is not in the local Hugging Face cache (or only partly) and "
                    f"HF_HUB_OFFLINE=1 forbids downloading; get it with `{hint}` or set HF_HUB_OFFLINE=0 "
                    f"(no folder named {hub_id} exists either)") from None
            raise ModelLoadError(f"{cls.name}: cannot reach the Hugging Face hub for {hub_id} and it is not cached "
                                 f"({_first_line(err)}; no folder of that name exists either); get it with `{hint}`") from None
        except GatedRepoError:
            raise ModelLoadError(f"{cls.name}: hub id {hub_id} is gated: accept its licence on huggingface.co "
                                 f"and log in (`hf auth login`), then `{hint}`") from None
        except RepositoryNotFoundError:
            raise ModelLoadError(f"{cls.name}: hub id {hub_id} does not exist on the hub (or is private) and "
                                 f"no folder of that name exists") from None
        except RevisionNotFoundError as err:
            raise ModelLoadError(f"{cls.name}: hub id {hub_id}: {_first_line(err)}") from None
        except OSError as err:  # HfHubHTTPError, disk errors
            raise ModelLoadError(f"{cls.name}: cannot fetch {hub_id} ({_first_line(err)}); try `{hint}`") from None
        snap = Path(snap)
        return snap, hub_id, snap.name if snap.parent.name == "snapshots" else None

    @classmethod
    def check_folder(cls, folder: Path, source: str | None = None, skip: tuple[str, ...] = ()) -> None:
        """Refuse a folder for another backbone or with missing components, naming them.

        Why up front: diffusers/transformers report a missing file deep inside ``from_pretrained``
        with a message about a config class; users need "no text_encoder_2/ in <folder>".
        """
        where = source if source and source != str(folder) else str(folder)
        marker = folder / MARKER_FILE
        owner = None
        if marker.exists():
            try:
                owner = json.loads(marker.read_text()).get("backbone")
            except (OSError, ValueError, AttributeError) as err:
                raise ModelLoadError(f"{cls.name}: {marker} is unreadable ({_first_line(err)})") from None
        if owner is None and (folder / "model_index.json").exists():
            try:
                klass = json.loads((folder / "model_index.json").read_text()).get("_class_name")
            except (OSError, ValueError, AttributeError):
                klass = None
            owner = _PIPELINE_BACKBONE.get(klass)
        if owner is not None and owner != cls.name:
            raise ModelLoadError(f"{cls.name}: {where} is a model for the '{owner}' backbone, not '{cls.name}'; "
                                 f"load it with --backbone {owner}")
        if cls.requires_marker and not marker.exists():
            raise ModelLoadError(f"{cls.name}: {where} is not a {cls.name} model folder (no {MARKER_FILE}; "
                                 f"{cls.name} folders are written by spobench's save_pretrained)")

        missing: list[str] = []
        for comp, stem in cls.model_components():
            if comp in skip:  # replaced by an override (a released UNet, a fixed VAE)
                continue
            d = folder / comp
            if not d.is_dir():
                missing.append(f"{comp}/")
            elif not (d / "config.json").exists():
                missing.append(f"{comp}/config.json")
            elif not _weights_variant(d, stem, torch.float32)[0]:
                pickled = any(d.glob("*.bin")) or any(d.glob("*.ckpt"))
                missing.append(f"{comp}/{stem}.safetensors" + (" (only pickle .bin weights there; spobench "
                                                                  "loads safetensors only)" if pickled else ""))
        for tok in cls.tokenizer_names:
            d = folder / tok
            if not d.is_dir():
                missing.append(f"{tok}/")
            elif not ((d / "tokenizer.json").exists() or ((d / "vocab.json").exists() and (d / "merges.txt").exists())):
                missing.append(f"{tok}/vocab.json+merges.txt")
        if not (folder / "scheduler" / "scheduler_config.json").exists():
            missing.append("scheduler/scheduler_config.json")
        if missing:
            how = (f"get the full model with `{cls.download_hint(cls.default_source)}`" if cls.default_source
                   else "re-create it with save_pretrained")
            raise ModelLoadError(f"{cls.name}: {where} is missing {', '.join(missing)}; {how} "
                                 f"or point at a complete diffusers folder")
