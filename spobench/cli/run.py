"""The main commands: ``generate``, ``train``, ``eval`` and ``reproduce``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from spobench.cli.common import _COUNT, _SEED, BACKBONE_NAMES, _backbone, _device, _number, console, err_console
from spobench.core.errors import InputError


def generate(
    out: Path = typer.Option(..., "--out", "-o", help="Output folder for PNGs and manifest.jsonl."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", "-p", help="Prompt file: .txt (one a line), .json, .jsonl."),
    prompt_set: Optional[str] = typer.Option(None, "--prompt-set", help="A registered prompt set (see `spobench ls prompt-sets`)."),
    backbone: str = typer.Option("tiny", "--backbone", "-b", help=BACKBONE_NAMES),
    model: Optional[str] = typer.Option(None, "--model", help="Model folder or hub id (default: the backbone's own)."),
    lora: Optional[str] = typer.Option(None, "--lora", help="A LoRA folder or file (diffusers', kohya's or the "
                                       "official SPO layout), or the hub id of one (e.g. "
                                       "SPO-Diffusion-Models/SPO-SD-v1-5_4k-p_10ep_LoRA; HF_HUB_OFFLINE honoured)."),
    unet: Optional[str] = typer.Option(None, "--unet", help="A released UNet-only folder or hub id replacing the "
                                       "model's (e.g. mhdang/dpo-sd1.5-text2image-v1)."),
    vae: Optional[str] = typer.Option(None, "--vae", help="A VAE-only folder or hub id replacing the model's (e.g. "
                                      "madebyollin/sdxl-vae-fp16-fix)."),
    seed: int = typer.Option(0, "--seed", callback=_SEED, help="Base seed; image n uses seed + n."),
    images_per_prompt: int = typer.Option(1, "--images-per-prompt", "-n", callback=_COUNT),
    steps: int = typer.Option(20, "--steps", callback=_COUNT, help="Sampler steps (DDIM; on a flow backbone the Euler/SDE grid)."),
    resolution: Optional[int] = typer.Option(None, "--resolution", callback=_number(min=8),
                                             help="Image side in pixels (default: the backbone's own, e.g. 512 "
                                             "for sd15, 1024 for sdxl)."),
    cfg: float = typer.Option(5.0, "--cfg", callback=_number(min=0), help="Classifier-free guidance scale."),
    eta: float = typer.Option(0.0, "--eta", callback=_number(min=0, max=1),
                              help="DDIM eta (0 = deterministic, as diffusers' default); on a flow backbone 0 is "
                              "the Euler ODE (diffusers' sampler), > 0 Flow-GRPO's SDE at a = 0.7."),
    batch_size: int = typer.Option(8, "--batch-size", callback=_COUNT),
    limit: Optional[int] = typer.Option(None, "--limit", callback=_COUNT, help="Use only the first N prompts."),
    device: str = typer.Option("cpu", "--device", callback=_device(), help="cpu | cuda | cuda:N | mps"),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 | bf16 | fp16 for the frozen model."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
):
    """Generate images with fixed seeds (DDIM; the Euler ODE on flow backbones) and write PNGs plus a JSONL manifest."""
    from spobench.core.progress import Progress
    from spobench.engine.rollout import SamplerConfig
    from spobench.eval.generate import generate as run

    from spobench.core import outdir
    from spobench.data.prompts import load_prompts
    from spobench.eval.generate import check_resume, plan

    if (prompts is None) == (prompt_set is None):
        raise InputError("give only one of --prompts and --prompt-set" if prompts is not None else
                         "give --prompts FILE or --prompt-set NAME (see `spobench ls prompt-sets`)")
    items = load_prompts(prompt_set if prompts is None else prompts, limit,  # limit >= 1: checked by its option
                         file=prompts is not None, what="--prompt-set", example="--prompts FILE")
    outdir.check(out, resume=resume, overwrite=overwrite)  # before minutes of model loading
    if resume:
        check_resume(out, plan(items, seed, images_per_prompt))
    bb = _backbone(backbone, model, device, dtype, lora, unet=unet, vae=vae)
    sampler = SamplerConfig(num_steps=steps, guidance_scale=cfg, eta=eta, resolution=resolution)
    with Progress("generating", total=len(items) * images_per_prompt, unit="image", console=err_console) as bar:
        rows = run(bb, items, out, seed=seed, images_per_prompt=images_per_prompt, sampler=sampler,
                   batch_size=batch_size, lora=lora, resume=resume, overwrite=overwrite,
                   progress=lambda done, total: bar.update(completed=done, total=total))
    console.print(f"wrote {len(rows)} images and manifest.jsonl to {out}")


def train(
    trainer: str = typer.Argument(..., help="A registered trainer: spo, mspo, diffusion-dpo, d3po, ddpo."),
    backbone: str = typer.Option("tiny", "--backbone", "-b", help=BACKBONE_NAMES),
    model: Optional[str] = typer.Option(None, "--model", help="Model folder or hub id."),
    out: Path = typer.Option(Path("runs/train"), "--out", "-o", help="Run folder (checkpoints, logs, final LoRA)."),
    config: Optional[Path] = typer.Option(None, "--config", help="A TOML file of trainer settings."),
    overrides: list[str] = typer.Option([], "--set", help="Override a setting: --set k=4 --set kappa=600 "
                                        "(--settings lists them)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Named settings applied before --config and --set "
                                         "(which override it): paper (the default: the paper's and the official "
                                         "code's settings) or fast (SPO on tiny: 5x the lr, to reach the paper's gain in a "
                                         "quarter of the rounds; it did with one training seed of two, results/fast_preset/), or a .toml file of the same format (spobench/assets/presets/); "
                                         "--settings lists them; the run's config.json records the resolved "
                                         "settings."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in --out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
    settings: bool = typer.Option(False, "--settings", help="List the trainer's settings (type, default, "
                                  "meaning) and exit."),
):
    """Post-train a backbone with a registered trainer (LoRA; checkpoints are resumable)."""
    from spobench.core import catalog

    cls = catalog.TRAINERS.get(trainer)
    if settings:
        typer.echo(f"settings of `spobench train {trainer}` (--set name=value, or a --config TOML file):")
        for line in cls.Config.describe().splitlines():
            typer.echo(f"  {line}")
        from spobench.trainers import presets

        typer.echo("presets (--preset NAME, before --config and --set):")
        for line in presets.describe().splitlines():
            typer.echo(f"  {line}")
        return
    cls.cli(backbone=backbone, model=model, out=out, config=config, overrides=overrides, resume=resume,
            overwrite=overwrite, console=console, preset=preset)


def eval_(
    metrics: Optional[str] = typer.Option(None, "--metrics", "-m", help="Comma-separated metric names, e.g. pickscore,hpsv2."),
    images: Optional[Path] = typer.Option(None, "--images", help="A folder written by `spobench generate`."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Results JSON (default: <images>/results.json)."),
    weights: list[str] = typer.Option([], "--weights", help="metric=DIR: where a metric's weights are (once per metric, and only for one in --metrics)."),
    option: list[str] = typer.Option([], "--option", help="METRIC.KEY=VALUE: a metric's option, e.g. hpsv3.batch_size=4 or hpsv3.dtype=bf16 (repeatable; a metric takes only the options its docs list)."),
    compare: Optional[tuple[Path, Path]] = typer.Option(
        None, "--compare", help="Compare two results (results.json or their folders): per-prompt win rates of A over B."),
    device: str = typer.Option("cpu", "--device", callback=_device(), help="cpu | cuda | cuda:N | mps"),
):
    """Score images with metric plugins (per-image scores, means, bootstrap 95% CIs), or with
    --compare A B, pair two evaluated runs by prompt and seed and report win rates with CIs."""
    from spobench.core import catalog

    names = [m.strip() for m in (metrics or "").split(",") if m.strip()]
    if compare is not None:
        from spobench.eval.compare import compare_results

        extra = [flag for flag, given in (("--images", images is not None), ("--weights", weights),
                                          ("--option", option)) if given]
        if extra:  # they would be ignored: compare reads only the two results files
            raise InputError(f"{extra[0]} does not go with --compare (it compares two results files as they are)")

        console.print(compare_results(compare[0], compare[1], metrics=names or None, out=out))
        return
    if not names:
        raise InputError("give --metrics a,b,... (see `spobench ls metrics`) or --compare A B")
    classes = {n: catalog.METRICS.get(n) for n in names}  # unknown / planned names fail here, before work
    if images is None:
        raise InputError("give --images DIR (a folder written by `spobench generate`)")
    from spobench.core.progress import Progress
    from spobench.eval.evaluate import evaluate_folder, parse_weights
    from spobench.metrics.base import parse_option_items

    with Progress("scoring", unit="score", console=err_console) as bar:
        result = evaluate_folder(images, classes, out=out, weights=parse_weights(weights), device=device,
                                 options=parse_option_items(option),
                                 progress=lambda done, total: bar.update(completed=done, total=total))
    table = Table(title="results", show_edge=False)
    table.add_column("metric")
    table.add_column("mean")
    table.add_column("95% CI")
    for name, agg in result["metrics"].items():
        table.add_row(name, f"{agg['mean']:.4f}", f"[{agg['ci95'][0]:.4f}, {agg['ci95'][1]:.4f}]")
        for tag, v in (agg.get("per_tag") or {}).items():
            table.add_row(f"  {tag}", f"{v:.4f}", "")
    console.print(table)


def reproduce(
    recipe: str = typer.Argument(..., help="A recipe name, e.g. table1 (see `spobench ls recipes`), or a recipe .toml file."),
    backbone: Optional[str] = typer.Option(None, "--backbone", "-b", help=f"{BACKBONE_NAMES} (default: tiny; "
                                           "with --released: the released checkpoints' backbone)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default: runs/<recipe>-<backbone>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue a run in --out: finished cells are reused, "
                                "unfinished ones continue from their last checkpoint."),
    released: bool = typer.Option(False, "--released", help="Evaluate the published checkpoints of the paper's "
                                  "rows (the recipe's released cells: full models, UNet-only fine-tunes, LoRAs, "
                                  "VAE overrides; from folders or the local Hugging Face cache) instead of training."),
    limit: Optional[int] = typer.Option(None, "--limit", callback=_COUNT, help="Generate and score only the first N prompts (a "
                                        "quick check; the report records the prompt count)."),
    cells: Optional[str] = typer.Option(None, "--cells", help="Comma-separated cell ids: run only these."),
    device: str = typer.Option("auto", "--device", callback=_device(allow_auto=True),
                               help="auto | cpu | cuda (generation and metrics; trainers "
                               "use the GPU when there is one)."),
    compile: bool = typer.Option(False, "--compile", help="Train every cell with compile=true (torch.compile of "
                                 "the UNet: the same math up to rounding, ~2x faster UNet calls after a one-off "
                                 "compile). Not part of a cell's identity: finished cells are reused either way."),
):
    """Train, generate and evaluate every cell of a paper table, then write the report
    (report.md, report.json, report.html, grid.png, metrics.png, training.png).

    Everything a run needs (trainers, backbone and metric weights, inputs, prompt sets) is checked
    before any work starts."""
    from spobench.reproduce.runner import reproduce as run

    only = [c.strip() for c in cells.split(",") if c.strip()] if cells else None
    data = run(recipe, backbone=backbone, out=out, resume=resume, device=device, cells=only, console=err_console,
               compile=compile, released=released, limit=limit)
    backbone = data["backbone"]["name"]
    table = Table(title=f"{data['recipe']['name']} on {backbone}", title_justify="left", show_edge=False)
    table.add_column("cell")
    for m in data["metrics"]:
        table.add_column(m)
    for c in data["cells"]:
        table.add_row(c["label"], *[f"{c['metrics'][m]['mean']:.4f}" if m in c["metrics"] else "-"
                                    for m in data["metrics"]])
    console.print(table)
    from spobench.eval.report_tables import paper_comparison_table

    versus = paper_comparison_table(data)
    if versus:  # the paper's rows beside ours, with the difference and its CI
        t = Table(title=f"beside the paper (Table {data['recipe']['paper_table']})", title_justify="left",
                  show_edge=False)
        for col in versus[0]:
            t.add_column(col)
        for row in versus[1]:
            t.add_row(*row)
        console.print(t)
    where = out if out is not None else \
        Path("runs") / f"{data['recipe']['name']}-{backbone}{'-released' if released else ''}"
    console.print(f"report: {where / 'report.md'} and {where / 'report.html'}")
