"""Every built-in name, declared lazily as "module:object" so that `spobench ls` imports no torch.

A target of None means the name is part of the product but not built yet: using it fails with
"not implemented yet: <name>" (exit code 3) instead of faking output.
"""

from __future__ import annotations

import sys
from pathlib import Path

from spobench.core.registry import Registry

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TRAINERS: Registry = Registry("trainer")
METRICS: Registry = Registry("metric")
BACKBONES: Registry = Registry("backbone")
PROMPT_SETS: Registry = Registry("prompt set")
RECIPES: Registry = Registry("recipe")

register_trainer = TRAINERS.register

# -- backbones ------------------------------------------------------------------------------------
BACKBONES.declare("sd15", "spobench.models.backbones.sd:SD15Backbone", "Stable Diffusion 1.5 (diffusers folder or hub id)")
BACKBONES.declare("sdxl", "spobench.models.backbones.sd:SDXLBackbone", "Stable Diffusion XL base (diffusers folder or hub id)")
BACKBONES.declare("tiny", "spobench.models.backbones.tiny:TinyBackbone", "the tiny-world model: 32x32 pixel space, CPU-sized")
BACKBONES.declare("sd3", "spobench.models.backbones.sd3:FlowBackbone", "Stable Diffusion 3 / 3.5, rectified flow (diffusers folder or hub id)")
BACKBONES.declare("tiny-flow", "spobench.models.backbones.tiny_flow:TinyFlowBackbone", "the tiny flow world's model: SD3-shaped, 32x32 pixel space, CPU-sized")

# -- trainers -------------------------------------------------------------------------------------
TRAINERS.declare("spo", "spobench.trainers.spo:SPOTrainer", "Step-aware Preference Optimization (paper Sec. 4)")
TRAINERS.declare("mspo", "spobench.trainers.mspo:MSPOTrainer", "Multi-step SPO for SDXL (paper Sec. 4.5)")
TRAINERS.declare("diffusion-dpo", "spobench.trainers.diffusion_dpo:DiffusionDPOTrainer", "Diffusion-DPO on Pick-a-Pic-format pairs (offline)")
TRAINERS.declare("d3po", "spobench.trainers.d3po:D3POTrainer", "D3PO: two trajectories from one x_T, reward-labelled (online)")
TRAINERS.declare("ddpo", "spobench.trainers.ddpo:DDPOTrainer", "DDPO: PPO on denoising trajectories (online)")
TRAINERS.declare("flow-grpo", "spobench.trainers.flow_grpo:FlowGRPOTrainer", "Flow-GRPO: GRPO on a flow model's SDE steps (online)")

# -- metrics --------------------------------------------------------------------------------------
METRICS.declare("pickscore", "spobench.metrics.pickscore:PickScore", "PickScore v1 (CLIP-H): logit_scale * cos")
METRICS.declare("hpsv2", "spobench.metrics.hpsv2:HPSv2", "HPSv2 / v2.1 (open_clip checkpoint on transformers CLIP)")
METRICS.declare("imagereward", "spobench.metrics.imagereward:ImageReward", "ImageReward (BLIP + MLP head)")
METRICS.declare("aesthetic", "spobench.metrics.aesthetic:Aesthetic", "LAION aesthetic predictor v2 (CLIP ViT-L/14 + linear MLP)")
METRICS.declare("hpsv3", "spobench.metrics.hpsv3:HPSv3", "HPSv3 (Qwen2-VL-7B reward model): the mean mu of its (mu, sigma)")
METRICS.declare("geneval", "spobench.metrics.geneval:GenEval", "GenEval object-focused alignment (Mask2Former + CLIP colour)")
METRICS.declare("toy_alignment", "spobench.metrics.toy:ToyAlignment", "tiny world: rule-checked prompt alignment (GenEval-style tags)")
METRICS.declare("toy_aesthetic", "spobench.metrics.toy:ToyAesthetic", "tiny world: prompt-free image quality on a 0-10 scale")
METRICS.declare("toy_pickscore", "spobench.metrics.toy_pickscore:ToyPickScore", "tiny world: a tiny CLIP trained on the tiny world's pairs (PickScore's loss)")

# -- prompt sets ----------------------------------------------------------------------------------
PROMPT_SETS.declare("file", "spobench.data.prompts:load_prompt_file", "a text file, one prompt a line (or JSON/JSONL)")
PROMPT_SETS.declare("tiny-val", "spobench.toyworld.pairs:tiny_val_prompts", "tiny world: 500 validation prompts")
PROMPT_SETS.declare("tiny-train", "spobench.toyworld.pairs:tiny_train_prompts", "tiny world: training prompts (official 4k list format)")
PROMPT_SETS.declare("pickapic-validation-unique", "spobench.data.prompt_sets:pickapic_validation_unique", "Pick-a-Pic v1 validation_unique (local parquet)")
PROMPT_SETS.declare("hpsv2-benchmark", "spobench.data.prompt_sets:hpsv2_benchmark", "HPSv2 benchmark prompts (local JSONs)")
PROMPT_SETS.declare("partiprompts", "spobench.data.prompt_sets:partiprompts", "PartiPrompts (local TSV)")
PROMPT_SETS.declare("spo-4k", "spobench.data.prompt_sets:spo_training_prompts", "official SPO 4k training prompts (local JSON)")
PROMPT_SETS.declare("geneval", "spobench.metrics.geneval_rules:geneval_prompts", "GenEval's 553 prompts with metadata")

# -- recipes --------------------------------------------------------------------------------------
_PAPER_TABLES = {
    "table1": "SDXL: SPO vs Diffusion-DPO vs MAPO on four preference metrics",
    "table2": "SD-1.5: SPO vs DDPO, D3PO, Diffusion-DPO",
    "table3": "GenEval alignment (SDXL)",
    "table4": "ablation: initialisation of the next x_t (random / win / lose)",
    "table5": "ablation: preference model (SPM vs no-step vs PickScore)",
    "table6": "ablation: pool size k",
    "table7": "ablation: MSPO inner steps j",
    "table8": "ablation: timestep range kappa",
    "table9": "ablation: pair choice (best-worst vs random)",
}


def recipe_files() -> dict[str, Path]:
    """The shipped recipes: name -> file (package data ``spobench.recipes``)."""
    from importlib.resources import files

    out = {}
    for entry in sorted(files("spobench.recipes").iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".toml") and entry.is_file():
            out[entry.name[:-5]] = Path(str(entry))
    return out


def recipe_header(path: Path) -> dict:
    """``name``/``title``/``paper_table`` of a recipe file without validating the rest (for ``ls``;
    the schema is :mod:`spobench.reproduce.schema`)."""
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        return {"name": Path(path).stem, "title": f"(unreadable: {e})"}
    return {"name": raw.get("name", Path(path).stem), "title": str(raw.get("title", "")),
            "paper_table": raw.get("paper_table")}


def recipes() -> Registry:
    """The paper's tables (and extra recipes) as recipe names: every ``recipes/*.toml`` shipped as
    package data ``spobench.recipes`` is 'ready' (its entry holds the file's path); a paper table
    without a file stays 'planned'. Only the files' headers are read (no validation, no torch)."""
    if not RECIPES.names():
        files = recipe_files()
        for name, summary in _PAPER_TABLES.items():
            if name not in files:
                RECIPES.declare(name, None, summary)
        for name, path in files.items():
            RECIPES.declare(name, None, recipe_header(path).get("title") or _PAPER_TABLES.get(name, ""))
            RECIPES.entry(name).obj = path
    return RECIPES
