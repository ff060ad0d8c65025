"""A trained LoRA in the files other tools load: diffusers' own (``pipe.load_lora_weights``) and kohya-ss'
names (ComfyUI, AUTOMATIC1111 / Forge, sd-scripts), with the header metadata those UIs show.

Which LoRA: a run folder (its final ``lora/``, else its newest checkpoint's), a checkpoint folder, or a
LoRA folder/file spobench wrote (:func:`find_run_lora`); what it was trained on comes from the run's
``summary.json`` or the checkpoint's manifest. The weights are read with ``lora_files.read_lora`` (the one
reader: finite, a UNet LoRA) and written in one of :data:`FORMATS`.

kohya names (:func:`kohya_state`) follow the diffusers module paths, for SD-1.5 and SDXL alike:
``lora_unet_<module path, dots as underscores>.lora_down.weight`` (peft's ``lora_A``), ``.lora_up.weight``
(``lora_B``) and ``.alpha`` (a 0-dim tensor: the update is scaled by alpha / rank, as in peft). That is the
inverse of diffusers 0.42's ``loaders/lora_conversion_utils.py`` ``_convert_unet_lora_key`` and what its
``utils/state_dict_utils.py`` ``convert_state_dict_to_kohya`` writes; ComfyUI maps these names for both
UNets (``comfy/lora.py`` ``model_lora_keys_unet``: ``"lora_unet_" + diffusers key``), and A1111 converts
them with ``networks.py`` ``convert_diffusers_name_to_compvis``. kohya's own SDXL trainer writes the
Stability (sgm) block names instead (``lora_unet_input_blocks_4_1_...``); diffusers reads both.
"""

from __future__ import annotations

import collections
import datetime
import json
import os
from dataclasses import dataclass
from pathlib import Path

from spobench.core.errors import InputError
from spobench.core.io import read_json_object
from spobench.core.outdir import MARKER
from spobench.models.backbones.lora_files import LORA_WEIGHT_NAME, lora_file

FORMATS = {
    "diffusers": "diffusers' own file (pytorch_lora_weights.safetensors, unet.* keys): pipe.load_lora_weights, "
                 "spobench generate --lora, recipes, the Hugging Face hub",
    "kohya": "kohya-ss names (lora_unet_*.lora_down/lora_up/alpha) with ss_*/modelspec.* metadata: ComfyUI "
             "(models/loras), AUTOMATIC1111 / Forge (models/Lora), sd-scripts; SD-1.5 and SDXL",
}
KOHYA_PREFIX = "lora_unet_"
# kohya's ss_base_model_version and the SAI model spec's architecture ids (kohya-ss/sd-scripts
# library/sai_model_spec.py, commit 10bfcb9): what A1111 / Forge read to list a LoRA under its model
_UI_BASE = {"sd15": ("sd_v1", "stable-diffusion-v1/lora", 512),
            "sdxl": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", 1024)}
_CROSS_DIM = {768: "sd15", 2048: "sdxl"}  # a LoRA with no run beside it: attn2.to_k's input width says the UNet


@dataclass
class RunLora:
    """The LoRA file of a run and what spobench recorded about it (None where nothing was)."""

    file: Path
    name: str  # the run's (or checkpoint's) folder name: titles and default file names
    backbone: str | None = None  # sd15 | sdxl | tiny
    base_model: str | None = None  # the model folder or hub id it was trained on
    revision: str | None = None
    overrides: dict | None = None  # a released UNet / VAE the run used in place of the base model's
    prediction_type: str | None = None
    trainer: str | None = None
    resolution: int | None = None
    created: float | None = None


def _whole_model(where: Path, manifest: dict) -> InputError:
    modules = ", ".join((manifest.get("weights") or {}).get("modules") or []) or "whole modules"
    return InputError(f"{where}: holds whole-model weights ({modules}), not a LoRA; export-lora exports the LoRA "
                      "of a LoRA run (spo, mspo, diffusion-dpo, d3po, ddpo)")


def _from_checkpoint(ckpt: Path, name: str) -> RunLora:
    from spobench.core.checkpoint import read_manifest

    manifest = read_manifest(ckpt)
    if "weights" in manifest or "backbone" not in manifest:
        raise _whole_model(ckpt, manifest)
    config = read_json_object(ckpt / "config.json") if (ckpt / "config.json").is_file() else {}
    return _described(RunLora(lora_file(ckpt / "lora"), name), manifest["backbone"], manifest.get("trainer"),
                      config, manifest.get("created"))


def _described(src: RunLora, identity: dict, trainer, config: dict, created) -> RunLora:
    identity = identity if isinstance(identity, dict) else {}
    src.backbone, src.base_model = identity.get("backbone"), identity.get("model_id") or identity.get("source")
    src.revision, src.prediction_type = identity.get("revision"), identity.get("prediction_type")
    src.overrides = identity.get("overrides") if isinstance(identity.get("overrides"), dict) else None
    src.trainer = trainer if isinstance(trainer, str) else None
    res = config.get("resolution") if isinstance(config, dict) else None
    src.resolution = res if isinstance(res, int) and not isinstance(res, bool) else None
    src.created = created if isinstance(created, (int, float)) else None
    return src


def _from_run(run: Path, lora_dir: Path, name: str) -> RunLora:
    """A run folder's LoRA folder, described by the run's summary.json (else its newest checkpoint)."""
    from spobench.core.checkpoint import latest_checkpoint, read_manifest

    src = RunLora(lora_file(lora_dir), name)
    if (run / "summary.json").is_file():
        s = read_json_object(run / "summary.json")
        return _described(src, s.get("backbone"), s.get("trainer"), s.get("config") or {},
                          (run / "summary.json").stat().st_mtime)
    ckpt = latest_checkpoint(run)
    if ckpt is not None:
        m = read_manifest(ckpt)
        return _described(src, m.get("backbone"), m.get("trainer"), {}, m.get("created"))
    return src


def find_run_lora(path: str | Path) -> RunLora:
    """RUN -> its LoRA: a run folder (``lora/``, else the newest checkpoint's), a checkpoint folder, a
    LoRA folder (``pytorch_lora_weights.safetensors``) or file. Refuses, with one line naming RUN, a
    missing path, a folder that is none of these and a run or checkpoint of whole-model weights."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"{path}: no such run folder (give a run's --out, a checkpoint or a LoRA folder)")
    from spobench.core.checkpoint import latest_checkpoint, read_manifest  # (torch: after the cheap check)

    if path.is_file():
        if path.suffix != ".safetensors":
            raise InputError(f"{path}: not a LoRA file (.safetensors) nor a run folder")
        parent = path.parent
        if (parent.parent / "summary.json").is_file() or (parent.parent / "manifest.json").is_file():
            found = find_run_lora(parent.parent)
            if found.file.resolve() == path.resolve():
                return found
        return RunLora(path, path.stem)
    if (path / "manifest.json").is_file():
        return _from_checkpoint(path, f"{path.parent.parent.name}-{path.name}")
    if (path / "lora").is_dir():
        return _from_run(path, path / "lora", path.name)
    ckpt = latest_checkpoint(path)
    if ckpt is not None:
        manifest = read_manifest(ckpt)
        if "weights" in manifest or "backbone" not in manifest:
            raise _whole_model(path, manifest)
        return _from_checkpoint(ckpt, path.name)
    if (path / LORA_WEIGHT_NAME).is_file() or (any(path.glob("*.safetensors")) and not (path / "config.json").exists()):
        parent = path.parent
        if path.name == "lora" and (parent / "manifest.json").is_file():
            return _from_checkpoint(parent, f"{parent.parent.parent.name}-{parent.name}")
        if path.name == "lora" and (parent / "summary.json").is_file():
            return _from_run(parent, path, parent.name)
        return RunLora(lora_file(path), path.name)
    if (path / "model_index.json").is_file() or (path / "unet").is_dir() or any(path.glob("diffusion_pytorch_model*")):
        raise InputError(f"{path}: a whole model folder, not a LoRA run; export-lora exports the LoRA of a LoRA run")
    if (path / MARKER).is_file() or (path / "log.jsonl").is_file():
        raise InputError(f"{path}: this run has written no LoRA yet (no lora/, no checkpoint); export it after its "
                         "first checkpoint")
    raise InputError(f"{path}: not a spobench run, checkpoint or LoRA folder (no lora/, checkpoints/, manifest.json "
                     f"or {LORA_WEIGHT_NAME})")


# -- the layouts --------------------------------------------------------------------------------------
def module_alphas(state: dict, config: dict) -> dict[str, float]:
    """Each LoRA module's alpha as peft applies it (``alpha_pattern`` over ``lora_alpha``, peft's own
    pattern match), so that alpha / rank is the scale the trained adapter used."""
    from peft.utils.other import get_pattern_key

    patterns = config.get("alpha_pattern") or {}
    modules = sorted({k.split(".lora_")[0] for k in state})
    return {m: float(patterns.get(get_pattern_key(patterns.keys(), m), config["lora_alpha"])) for m in modules}


def kohya_state(state: dict, config: dict) -> dict:
    """peft-keyed UNet LoRA weights (``<module>.lora_A.weight``) -> kohya names, with alphas."""
    import torch

    out = {}
    for module, alpha in module_alphas(state, config).items():
        stem = KOHYA_PREFIX + module.replace(".", "_")
        down, up = state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"]
        out[f"{stem}.lora_down.weight"] = down.contiguous()
        out[f"{stem}.lora_up.weight"] = up.contiguous()
        out[f"{stem}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def guess_backbone(state: dict) -> str | None:
    widths = {v.shape[1] for k, v in state.items() if ".attn2.to_k.lora_A." in k and v.ndim == 2}
    return _CROSS_DIM.get(widths.pop()) if len(widths) == 1 else None


def ui_metadata(src: RunLora, state: dict, config: dict, fmt: str) -> dict[str, str]:
    """The header metadata of an export: what spobench knows of the run, and for kohya files the
    ``ss_*`` / ``modelspec.*`` keys UIs read (rank, alpha, base model version, title)."""
    meta = {"spobench_format": fmt, "spobench_run": src.name}
    for key, value in (("spobench_backbone", src.backbone), ("spobench_base_model", src.base_model),
                       ("spobench_base_revision", src.revision), ("spobench_trainer", src.trainer)):
        if value:
            meta[key] = str(value)
    if src.overrides:
        meta["spobench_base_overrides"] = json.dumps(src.overrides, sort_keys=True)
    if fmt != "kohya":
        return meta
    ranks = collections.Counter(v.shape[0] for k, v in state.items() if ".lora_A." in k)
    alphas = collections.Counter(module_alphas(state, config).values())
    backbone = src.backbone if src.backbone in _UI_BASE else guess_backbone(state)
    meta |= {"ss_network_module": "networks.lora", "ss_network_dim": str(ranks.most_common(1)[0][0]),
             "ss_network_alpha": str(alphas.most_common(1)[0][0]), "ss_output_name": src.name,
             "modelspec.sai_model_spec": "1.0.1", "modelspec.implementation": "diffusers",
             "modelspec.title": src.name}
    if src.base_model:
        meta["ss_sd_model_name"] = str(src.base_model)
    if backbone in _UI_BASE:
        version, arch, resolution = _UI_BASE[backbone]
        res = src.resolution or resolution
        meta |= {"ss_base_model_version": version, "ss_v2": "False", "modelspec.architecture": arch,
                 "modelspec.resolution": f"{res}x{res}"}
    if src.prediction_type:
        meta["modelspec.prediction_type"] = "v" if src.prediction_type == "v_prediction" else src.prediction_type
    if src.created:
        meta["modelspec.date"] = datetime.datetime.fromtimestamp(int(src.created), datetime.timezone.utc).isoformat()
    made = f"trained with spobench {src.trainer}" if src.trainer else "exported by spobench"
    meta["ss_training_comment"] = made + (f" on {src.base_model}" if src.base_model else "")
    return meta


def _pipeline_class(src: RunLora):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    # the UNet part of save_lora_weights / lora_state_dict is the same in both; SDXL's for SDXL runs
    return StableDiffusionXLPipeline if src.backbone == "sdxl" else StableDiffusionPipeline


def export_lora(src: RunLora, fmt: str, out: str | Path) -> Path:
    """Write ``src``'s LoRA to the file ``out`` in ``fmt`` (one of :data:`FORMATS`); atomic."""
    from diffusers.utils import convert_state_dict_to_diffusers

    from spobench.core.io import write_safetensors
    from spobench.models.backbones.lora_files import read_lora, write_lora

    if fmt not in FORMATS:
        raise InputError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    file, state, config = read_lora(src.file, _pipeline_class(src))
    meta = ui_metadata(src, state, config, fmt)
    if fmt == "kohya":
        write_safetensors(out, kohya_state(state, config), metadata={"format": "pt", **meta})
    else:
        adapter = {k: config[k] for k in ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern")}
        write_lora(out, _pipeline_class(src), convert_state_dict_to_diffusers(state), adapter, meta)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(out, 0o666 & ~umask)  # a file to share (a UI's folder, the hub): not the atomic writer's 0600
    return Path(out)
