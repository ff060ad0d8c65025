"""``spobench export-lora``: a trained LoRA as a file other tools load."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from spobench.cli.common import console
from spobench.core.errors import InputError


# the command's --help; one line a paragraph (typer keeps a docstring's line breaks)
HELP = "\n\n".join([
    "Export a run's LoRA (SD-1.5, SDXL or tiny UNet) as one .safetensors file.",
    "--format diffusers: diffusers' own layout, what save_lora_weights writes (unet.<module>.lora.down/up keys, "
    "the adapter's rank and alpha in lora_adapter_metadata). For pipe.load_lora_weights(FILE), "
    "spobench generate --lora FILE and recipes' lora =, or the Hugging Face hub as pytorch_lora_weights.safetensors.",
    "--format kohya: kohya-ss names (lora_unet_<module>.lora_down.weight, .lora_up.weight, .alpha) with the "
    "ss_* / modelspec.* metadata UIs read (rank, alpha, base model version and name). For ComfyUI "
    "(models/loras), AUTOMATIC1111 / Forge (models/Lora) and kohya-ss sd-scripts, SD-1.5 and SDXL; diffusers' "
    "load_lora_weights and spobench generate --lora read it too.",
    "RUN's LoRA is its final lora/ (else its newest checkpoint's). The base model it was trained on goes into "
    "the file's metadata (spobench_base_model, ss_sd_model_name). Only the UNet LoRA is exported; runs of "
    "whole models (train-spm, toy pretrain) have none.",
])


class LoraFormat(str, Enum):
    diffusers = "diffusers"
    kohya = "kohya"


def export_lora(
    run: Path = typer.Argument(..., help="A training run folder (its --out), one of its checkpoints "
                               "(checkpoints/checkpoint-NNNNNN) or a LoRA folder spobench wrote."),
    fmt: LoraFormat = typer.Option(..., "--format", "-f", help="diffusers: for diffusers' pipe.load_lora_weights, "
                                   "spobench generate --lora and the Hugging Face hub. kohya: for ComfyUI "
                                   "(models/loras), AUTOMATIC1111 / Forge (models/Lora) and kohya-ss sd-scripts."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="The .safetensors file to write (default: "
                                       "<run name>-<format>.safetensors here)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
):
    """Export a run's LoRA as one .safetensors file for diffusers or for ComfyUI / A1111 (see HELP)."""
    from spobench.core import outdir
    from spobench.models.backbones.lora_export import export_lora as write, find_run_lora

    def check_out(out: Path) -> Path:
        if out.suffix != ".safetensors":
            raise InputError(f"--out {out}: give a .safetensors file name (UIs list LoRAs by that extension)")
        outdir.check_file(out)
        if out.exists() and not overwrite:
            raise InputError(f"--out {out}: already exists; pass --overwrite to replace it or choose another name")
        return out

    if out is not None:
        check_out(out)  # before reading the run
    src = find_run_lora(run)
    if src.backbone not in (None, "sd15", "sdxl") and fmt is LoraFormat.kohya:
        raise InputError(f"{run}: trained on the {src.backbone} backbone; kohya files are for SD-1.5 and SDXL "
                         "UNets (UIs load no other); use --format diffusers")
    out = out if out is not None else check_out(Path(f"{src.name}-{fmt.value}.safetensors"))
    path = write(src, fmt.value, out)
    base = f" (trained on {src.base_model})" if src.base_model else ""
    console.print(f"wrote {path}: {fmt.value} LoRA from {src.file}{base}", soft_wrap=True, highlight=False)
