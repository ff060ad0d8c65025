"""The ``spobench`` command line. Heavy imports (torch, diffusers) happen inside commands, so
``spobench ls`` and ``--help`` stay fast. Errors the user can act on print one line and exit
non-zero; ``--debug`` shows the traceback instead."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from spobench.core.checks import SEED_MAX
from spobench.core.errors import InputError, SpobenchError

app = typer.Typer(
    name="spobench",
    help="Post-train text-to-image diffusion models from preferences (SPO, MSPO, Diffusion-DPO, D3PO, DDPO) "
    "and measure them with PickScore, HPSv2, ImageReward, Aesthetic and GenEval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)
_state = {"debug": False}


class Kind(str, Enum):
    trainers = "trainers"
    metrics = "metrics"
    backbones = "backbones"
    recipes = "recipes"
    prompt_sets = "prompt-sets"


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")):
    _state["debug"] = debug


def _registry(kind: Kind):
    from spobench.core import catalog

    return {
        Kind.trainers: catalog.TRAINERS,
        Kind.metrics: catalog.METRICS,
        Kind.backbones: catalog.BACKBONES,
        Kind.recipes: catalog.recipes(),
        Kind.prompt_sets: catalog.PROMPT_SETS,
    }[kind]


@app.command("ls")
def ls(kind: Optional[Kind] = typer.Argument(None, help="What to list; all kinds when omitted.")):
    """List registered trainers, metrics, backbones, recipes and prompt sets.

    'planned' entries are part of the product but not built yet; using one fails with
    'not implemented yet'.
    """
    for k in [kind] if kind else list(Kind):
        table = Table(title=k.value, title_justify="left", show_edge=False)
        table.add_column("name", style="bold")
        table.add_column("status")
        table.add_column("description")
        for e in _registry(k):
            table.add_row(e.name, e.status if e.status == "ready" else f"[yellow]{e.status}[/]", e.summary)
        console.print(table)


# -- option values: checked while the command line is parsed, before any file or model is touched ------
def _flag(param) -> str:
    return max(param.opts, key=len) if getattr(param, "opts", None) else f"--{param.name}"


def _number(*, min: float | None = None, max: float | None = None, gt: float | None = None,
            lt: float | None = None):
    """A typer callback: the option's number must be finite and within the bounds (one `error:` line
    naming the flag; click's own range errors are a usage box, and it lets nan and inf through)."""
    def check(ctx, param, value):
        from spobench.core.checks import check_number

        return value if value is None else check_number(_flag(param), value, min=min, max=max, gt=gt, lt=lt)
    return check


def _device(allow_auto: bool = False):
    """A typer callback: a device this machine has (spobench.core.checks.parse_device)."""
    def check(ctx, param, value):
        from spobench.core.checks import parse_device

        return parse_device(value, _flag(param), allow_auto=allow_auto)
    return check


_SEED = _number(min=0, max=SEED_MAX)
_COUNT = _number(min=1)


def _tiny_clip_shape(hidden: int, patch: int) -> None:
    from spobench.core.checks import tiny_clip_problem

    for name, problem in tiny_clip_problem(hidden=hidden, patch=patch):
        raise InputError(f"--{name} {problem}")


def _backbone(name: str, model: Optional[str], device: str, dtype: str, lora: Optional[Path] = None,
              unet: Optional[str] = None, vae: Optional[str] = None):
    from spobench.core.dtypes import torch_dtype
    from spobench.models.backbones import load_backbone

    bb = load_backbone(name, model, device=device, dtype=torch_dtype(dtype), unet=unet, vae=vae)
    if lora is not None:
        bb.load_lora(lora)
    return bb


@app.command()
def generate(
    out: Path = typer.Option(..., "--out", "-o", help="Output folder for PNGs and manifest.jsonl."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", "-p", help="Prompt file: .txt (one a line), .json, .jsonl."),
    prompt_set: Optional[str] = typer.Option(None, "--prompt-set", help="A registered prompt set (see `spobench ls prompt-sets`)."),
    backbone: str = typer.Option("tiny", "--backbone", "-b", help="tiny | sd15 | sdxl"),
    model: Optional[str] = typer.Option(None, "--model", help="Model folder or hub id (default: the backbone's own)."),
    lora: Optional[Path] = typer.Option(None, "--lora", help="A LoRA folder/file in diffusers' format."),
    unet: Optional[str] = typer.Option(None, "--unet", help="A released UNet-only folder or hub id replacing the "
                                       "model's (e.g. mhdang/dpo-sd1.5-text2image-v1)."),
    vae: Optional[str] = typer.Option(None, "--vae", help="A VAE-only folder or hub id replacing the model's (e.g. "
                                      "madebyollin/sdxl-vae-fp16-fix)."),
    seed: int = typer.Option(0, "--seed", callback=_SEED, help="Base seed; image n uses seed + n."),
    images_per_prompt: int = typer.Option(1, "--images-per-prompt", "-n", callback=_COUNT),
    steps: int = typer.Option(20, "--steps", callback=_COUNT, help="DDIM steps."),
    cfg: float = typer.Option(5.0, "--cfg", callback=_number(min=0), help="Classifier-free guidance scale."),
    eta: float = typer.Option(0.0, "--eta", callback=_number(min=0, max=1),
                              help="DDIM eta (0 = deterministic, as diffusers' default)."),
    batch_size: int = typer.Option(8, "--batch-size", callback=_COUNT),
    limit: Optional[int] = typer.Option(None, "--limit", callback=_COUNT, help="Use only the first N prompts."),
    device: str = typer.Option("cpu", "--device", callback=_device(), help="cpu | cuda | cuda:N | mps"),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 | bf16 | fp16 for the frozen model."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
):
    """Generate images with fixed seeds (DDIM) and write PNGs plus a JSONL manifest."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

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
    sampler = SamplerConfig(num_steps=steps, guidance_scale=cfg, eta=eta)
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, transient=False) as bar:
        task = bar.add_task("generating", total=len(items) * images_per_prompt)
        rows = run(bb, items, out, seed=seed, images_per_prompt=images_per_prompt, sampler=sampler,
                   batch_size=batch_size, lora=str(lora) if lora else None, resume=resume, overwrite=overwrite,
                   progress=lambda done, total: bar.update(task, completed=done, total=total))
    console.print(f"wrote {len(rows)} images and manifest.jsonl to {out}")


@app.command(context_settings={"allow_extra_args": False})
def train(
    trainer: str = typer.Argument(..., help="A registered trainer: spo, mspo, diffusion-dpo, d3po, ddpo."),
    backbone: str = typer.Option("tiny", "--backbone", "-b", help="tiny | sd15 | sdxl"),
    model: Optional[str] = typer.Option(None, "--model", help="Model folder or hub id."),
    out: Path = typer.Option(Path("runs/train"), "--out", "-o", help="Run folder (checkpoints, logs, final LoRA)."),
    config: Optional[Path] = typer.Option(None, "--config", help="A TOML file of trainer settings."),
    overrides: list[str] = typer.Option([], "--set", help="Override a setting: --set k=4 --set kappa=600 "
                                        "(--settings lists them)."),
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
        return
    cls.cli(backbone=backbone, model=model, out=out, config=config, overrides=overrides, resume=resume,
            overwrite=overwrite, console=console)


@app.command("eval")
def eval_(
    metrics: Optional[str] = typer.Option(None, "--metrics", "-m", help="Comma-separated metric names, e.g. pickscore,hpsv2."),
    images: Optional[Path] = typer.Option(None, "--images", help="A folder written by `spobench generate`."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Results JSON (default: <images>/results.json)."),
    weights: list[str] = typer.Option([], "--weights", help="metric=DIR: where a metric's weights are (once per metric, and only for one in --metrics)."),
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

        extra = [flag for flag, given in (("--images", images is not None), ("--weights", weights)) if given]
        if extra:  # they would be ignored: compare reads only the two results files
            raise InputError(f"{extra[0]} does not go with --compare (it compares two results files as they are)")

        console.print(compare_results(compare[0], compare[1], metrics=names or None, out=out))
        return
    if not names:
        raise InputError("give --metrics a,b,... (see `spobench ls metrics`) or --compare A B")
    classes = {n: catalog.METRICS.get(n) for n in names}  # unknown / planned names fail here, before work
    if images is None:
        raise InputError("give --images DIR (a folder written by `spobench generate`)")
    from spobench.eval.evaluate import evaluate_folder, parse_weights

    result = evaluate_folder(images, classes, out=out, weights=parse_weights(weights), device=device)
    table = Table(title="results", show_edge=False)
    table.add_column("metric")
    table.add_column("mean")
    table.add_column("95% CI")
    for name, agg in result["metrics"].items():
        table.add_row(name, f"{agg['mean']:.4f}", f"[{agg['ci95'][0]:.4f}, {agg['ci95'][1]:.4f}]")
        for tag, v in (agg.get("per_tag") or {}).items():
            table.add_row(f"  {tag}", f"{v:.4f}", "")
    console.print(table)


@app.command()
def reproduce(
    recipe: str = typer.Argument(..., help="A recipe name, e.g. table1 (see `spobench ls recipes`), or a recipe .toml file."),
    backbone: Optional[str] = typer.Option(None, "--backbone", "-b", help="tiny | sd15 | sdxl (default: tiny; "
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


@app.command("train-spm")
def train_spm_cmd(
    pairs: Path = typer.Option(..., "--pairs", help="Pick-a-Pic-format parquet (or a folder of them): caption, jpg_0, jpg_1, label_0, label_1."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: spm/, checkpoints/, log.jsonl, metrics.json."),
    backbone: str = typer.Option("tiny", "--backbone", "-b", help="tiny | sd15 | sdxl (whose x0_hat the SPM learns to score)."),
    model: Optional[str] = typer.Option(None, "--model", help="Backbone model folder or hub id."),
    init: Optional[Path] = typer.Option(None, "--init", help="CLIP/PickScore folder (or an SPM folder) to start from; default $SPOBENCH_WEIGHTS/pickscore (tiny: toy_pickscore)."),
    processor: Optional[str] = typer.Option(None, "--processor", help="Tokenizer/preprocessor folder when --init lacks them (PickScore: laion/CLIP-ViT-H-14-laion2B-s32B-b79K)."),
    val_pairs: Optional[Path] = typer.Option(None, "--val-pairs", help="Held-out parquet (default: a caption-hash split of --pairs)."),
    no_step: bool = typer.Option(False, "--no-step", help="Table 5 'SPM w/o step': no time conditioning (with --steps 0: plain PickScore)."),
    steps: int = typer.Option(1000, "--steps", callback=_number(min=0), help="Optimizer steps (0: evaluate --init only)."),
    lr: Optional[float] = typer.Option(None, "--lr", callback=_number(gt=0),
                                       help="AdamW learning rate (default 3e-6 sd15, 1e-6 sdxl, 1e-4 tiny)."),
    batch_size: int = typer.Option(8, "--batch-size", callback=_COUNT, help="Pairs per step."),
    time_lr_mult: float = typer.Option(1.0, "--time-lr-mult", callback=_number(min=0),
                                       help="Learning-rate multiplier for the time-conditioning layers (zero-initialised)."),
    seed: int = typer.Option(0, "--seed", callback=_SEED),
    device: str = typer.Option("cpu", "--device", callback=_device(), help="cpu | cuda | cuda:N | mps"),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 | bf16 | fp16 for the frozen backbone."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint in --out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
):
    """Train the step-aware preference model (paper Sec. 4.2) on Pick-a-Pic-format pairs and report
    held-out pair accuracy at t = 0, 250, 500, 750, 950."""
    from spobench.core.errors import MissingWeightsError
    from spobench.models.spm_files import HOW_TO_GET
    from spobench.trainers.spm import METRICS, SPMTrainConfig, default_init, train_spm

    config = SPMTrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, no_step=no_step,
                            time_lr_mult=time_lr_mult, val_pairs=str(val_pairs) if val_pairs else None,
                            processor=processor)
    bb = _backbone(backbone, model, device, dtype)
    if init is None:
        init = default_init(backbone)
        if not init.exists():
            raise MissingWeightsError(
                f"no --init given and no CLIP folder at {init}. Pass --init DIR (a CLIP/PickScore folder). "
                + HOW_TO_GET)

    def show(rec: dict) -> None:
        typer.echo(f"step {rec['step']}/{steps}  loss {rec['loss']:.4f}  ({rec['elapsed_s']:.0f}s)", err=True)

    # train_spm claims --out: a fresh run that fails before its checkpoint leaves nothing
    result = train_spm(bb, pairs, init, out, config, resume=resume, overwrite=overwrite, progress=show)
    ev = result["eval"]
    typer.echo(f"{result['variant']}: held-out pair accuracy ({ev['n_pairs']} non-tie pairs)")
    for t, acc in ev["accuracy"].items():
        typer.echo(f"  t={t:>4}  {acc:.4f}")
    typer.echo(f"  mean    {ev['mean_accuracy']:.4f}")
    typer.echo(f"model: {result['model']}  metrics: {Path(out) / METRICS}")


@app.command("eval-spm")
def eval_spm_cmd(
    models: list[Path] = typer.Argument(..., help="SPM folders (RUN/spm) or plain CLIP/PickScore folders; the first is the reference."),
    pairs: Path = typer.Option(..., "--pairs", help="Held-out Pick-a-Pic-format parquet (or folder of them)."),
    exclude: list[Path] = typer.Option([], "--exclude", help="A training parquet whose captions are left out (repeatable)."),
    max_pairs: int = typer.Option(1000, "--max", callback=_COUNT, help="At most this many non-tie pairs."),
    timesteps: str = typer.Option("0,250,500,750,950", "--timesteps", help="Comma-separated t buckets."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the full result (per-pair outcomes too) to this JSON file."),
    backbone: str = typer.Option("tiny", "--backbone", "-b", help="tiny | sd15 | sdxl (whose x0_hat is scored)."),
    model: Optional[str] = typer.Option(None, "--model", help="Backbone model folder or hub id."),
    processor: Optional[str] = typer.Option(None, "--processor", help="Tokenizer/preprocessor folder for CLIP folders that lack them."),
    device: str = typer.Option("cpu", "--device", callback=_device(), help="cpu | cuda | cuda:N | mps"),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 | bf16 | fp16 for the frozen backbone."),
):
    """Pair accuracy of preference models per timestep on the same held-out pairs and noise, with each
    model's paired difference to the first (bootstrap 95% CI over captions, McNemar's exact test)."""
    from spobench.core import outdir
    from spobench.core.io import atomic_write_json
    from spobench.eval.spm_eval import compare_spms

    if out is not None:
        outdir.check_file(out)  # before the scoring, whose result would be lost

    try:
        ts = [int(x) for x in timesteps.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--timesteps must be comma-separated integers (got {timesteps!r})") from None
    if any(t < 0 for t in ts):  # the upper bound is the backbone's, known once it is loaded
        raise InputError(f"--timesteps must be >= 0 (got {timesteps!r})")
    bb = _backbone(backbone, model, device, dtype)
    if ts and not all(0 <= t < bb.num_train_timesteps for t in ts):
        raise InputError(f"--timesteps must lie in [0, {bb.num_train_timesteps}) (got {timesteps!r})")

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    with Progress("scoring held-out pairs", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True)) as bar:
        task = bar.add_task("pairs", total=None)
        res = compare_spms(bb, models, pairs, exclude=exclude, max_pairs=max_pairs, eval_timesteps=ts or None,
                           processor=processor,
                           progress=lambda done, total: bar.update(task, completed=done, total=total))
    if out is not None:
        atomic_write_json(out, res)
    buckets = [str(t) for t in res["eval_timesteps"]]
    table = Table(title=f"pair accuracy on {res['n_pairs']} held-out pairs ({res['n_captions']} captions); "
                        f"diff vs {res['reference']} [95% CI] (McNemar p)")
    table.add_column("model")
    for t in buckets:
        table.add_column(f"t={t}", justify="right")
    table.add_column("mean", justify="right")
    for key, m in res["models"].items():
        cells = [f"{m['accuracy'][t]:.3f}" for t in buckets] + [f"{m['mean_accuracy']:.3f}"]
        table.add_row(key, *cells)
        if "vs_reference" in m:
            vs = m["vs_reference"]
            diffs = [vs["per_t"][t] for t in buckets] + [vs["mean"]]
            table.add_row("", *[f"{d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] (p {d['mcnemar_p']:.2g})"
                                for d in diffs])
    console.print(table)
    if out is not None:
        console.print(f"result: {out}")


spm_app = typer.Typer(help="Step-aware preference models from elsewhere.", no_args_is_help=True)
app.add_typer(spm_app, name="spm")


@spm_app.command("import")
def spm_import(
    checkpoint: Path = typer.Argument(..., help="The official SPO checkpoint, e.g. sd-v1-5_step-aware_preference_model.bin."),
    clip: str = typer.Option(..., "--clip", help="The PickScore folder (yuvalkirstain/PickScore_v1): its config.json and tokenizer are used, not its weights."),
    out: Path = typer.Option(..., "--out", "-o", help="The SPM folder to write (then --set scorer=OUT, eval-spm OUT, recipes)."),
    processor: Optional[str] = typer.Option(None, "--processor", help="Tokenizer/preprocessor folder when --clip lacks them (laion/CLIP-ViT-H-14-laion2B-s32B-b79K)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
):
    """Import an official SPO step-aware preference model (SPO-Diffusion-Models/Step-Aware_Preference_Models)
    unchanged into an spobench SPM folder; it scores with the official input path."""
    from spobench.models.spm_official import import_official

    folder = import_official(checkpoint, clip, out, processor=processor, overwrite=overwrite)
    console.print(f"wrote {folder} (official step-aware preference model; use it as --set scorer={folder})")


toy_app = typer.Typer(help="The tiny world: pretrain its base model, write its preference data.",
                      no_args_is_help=True)
app.add_typer(toy_app, name="toy")


@toy_app.command("pretrain")
def toy_pretrain(
    out: Path = typer.Option(Path("runs/tiny-pretrain"), "--out", "-o", help="Run folder (checkpoints/, model/)."),
    steps: int = typer.Option(2500, "--steps", callback=_COUNT, help="Optimizer steps (batch 32: ~0.9 s each on 2 cores)."),
    batch_size: int = typer.Option(32, "--batch-size", callback=_COUNT),
    lr: float = typer.Option(1e-3, "--lr", callback=_number(gt=0)),
    seed: int = typer.Option(0, "--seed", callback=_SEED),
    checkpoint_every: int = typer.Option(250, "--checkpoint-every", callback=_COUNT),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint in --out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
):
    """Pretrain the tiny backbone (v-prediction) on renders of mixed quality; exports a diffusers folder
    to <out>/model that `--backbone tiny --model <out>/model` loads."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from spobench.models.backbones.tiny import TinyBackbone
    from spobench.core import outdir
    from spobench.core.checkpoint import latest_checkpoint
    from spobench.toyworld.pretrain import PretrainConfig, Pretrainer, toy_batch

    cfg = PretrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, checkpoint_every=checkpoint_every)
    with outdir.claim(out, command="toy pretrain", resume=resume, overwrite=overwrite,
                      keep=lambda: latest_checkpoint(out) is not None):
        trainer = Pretrainer(TinyBackbone.build(seed), cfg, toy_batch, out)
        if resume and trainer.load_checkpoint():
            console.print(f"resumed at step {trainer.step}")
        with Progress("pretraining", BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
                      TimeElapsedColumn(), TimeRemainingColumn(), console=err_console) as bar:
            task = bar.add_task("pretrain", total=steps, completed=trainer.step, loss=float("nan"))
            trainer.run(progress=lambda s, loss: bar.update(task, completed=s, loss=loss))
        folder = trainer.export(out / "model")
    console.print(f"wrote {folder} (EMA weights, step {trainer.step})")


@toy_app.command("data")
def toy_data(
    out: Path = typer.Option(Path("runs/tiny-data"), "--out", "-o", help="Folder for pairs.parquet, prompt lists, stats.json."),
    pairs: int = typer.Option(5000, "--pairs", callback=_number(min=2), help="Number of preference pairs."),
    seed: int = typer.Option(0, "--seed", callback=_SEED),
    base_samples: float = typer.Option(
        0.5, "--base-samples", callback=_number(min=0, max=1),
        help="Share of image slots filled with samples of the tiny base model (0: simulated generators only)."),
    model: Optional[str] = typer.Option(None, "--model", help="Tiny model folder for --base-samples (default: shipped)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
):
    """Write the tiny world's generic preference data in Pick-a-Pic's format (pairs.parquet), the
    training prompt list in the official 4k file's format and the 500 validation prompts."""
    from spobench.core import outdir
    from spobench.toyworld.pairs import backbone_generator, make_dataset

    outdir.check(out, overwrite=overwrite, resumable=False)
    extra = None
    if base_samples > 0:
        extra = backbone_generator(_backbone("tiny", model, "cpu", "fp32"))
    with outdir.claim(out, command="toy data", overwrite=overwrite, resumable=False), \
            console.status(f"drawing {pairs} pairs"):
        stats = make_dataset(out, n_pairs=pairs, seed=seed, extra_generator=extra, p_extra=base_samples)
    table = Table(title=f"tiny-world pairs in {out}", show_edge=False)
    table.add_column("statistic")
    table.add_column("value")
    for k, v in stats.items():
        if isinstance(v, (int, float, str)):
            table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    console.print(table)


@toy_app.command("clip")
def toy_clip(
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the CLIPModel (+ tokenizer, preprocessor)."),
    seed: int = typer.Option(0, "--seed", callback=_SEED),
    hidden: int = typer.Option(64, "--hidden", callback=_number(min=8), help="Width (a multiple of the 4 heads)."),
    layers: int = typer.Option(3, "--layers", callback=_COUNT),
    patch: int = typer.Option(4, "--patch", callback=_COUNT, help="Patch size on the 32x32 images (divides 32)."),
    overwrite: bool = typer.Option(False, "--overwrite"),
):
    """Write a randomly initialised tiny CLIP (the tiny backbone's tokenizer) as the starting point of
    the tiny world's preference models: `spobench train-spm --backbone tiny --init <out>`."""
    _tiny_clip_shape(hidden, patch)  # before the imports: transformers takes seconds to load
    from spobench.models.backbones.tiny import tiny_tokenizer
    from spobench.core import outdir
    from spobench.toyworld.tiny_clip import make_tiny_clip_folder

    with outdir.claim(out, command="toy clip", overwrite=overwrite, resumable=False):
        make_tiny_clip_folder(out, seed=seed, image_size=32, patch_size=patch, hidden=hidden, layers=layers,
                              heads=4, projection_dim=32, tokenizer=tiny_tokenizer(model_max_length=77))
    console.print(f"wrote a random tiny CLIP to {out}")


@toy_app.command("pickscore")
def toy_pickscore(
    pairs: Path = typer.Option(..., "--pairs", help="Pick-a-Pic-format parquet (or a folder of them), e.g. `spobench toy data`'s pairs.parquet."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: model/ (a CLIPModel folder), log.jsonl, metrics.json."),
    steps: int = typer.Option(3000, "--steps", callback=_number(min=0), help="Optimizer steps (0: evaluate --init only)."),
    batch_size: int = typer.Option(32, "--batch-size", callback=_COUNT, help="Pairs per step."),
    lr: float = typer.Option(1e-3, "--lr", callback=_number(gt=0), help="AdamW peak learning rate (warm-up, then cosine decay)."),
    seed: int = typer.Option(0, "--seed", callback=_SEED, help="Seed of the random initial CLIP and of the data order."),
    init: Optional[Path] = typer.Option(None, "--init", help="A CLIP folder to start from (default: a random tiny CLIP as `spobench toy clip` writes)."),
    val_fraction: float = typer.Option(0.1, "--val-fraction", callback=_number(min=0, max=0.99), help="Share of captions held out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
):
    """Train the tiny world's PickScore (the `toy_pickscore` metric): a tiny CLIP trained with PickScore's
    loss on clean preference pairs; reports held-out pair accuracy (generic label and oracle labels)."""
    import shlex

    from spobench.toyworld.pickscore_train import METRICS, ToyPickScoreConfig, summary_lines, train_toy_pickscore

    config = ToyPickScoreConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, val_fraction=val_fraction)

    def show(rec: dict) -> None:
        typer.echo(f"step {rec['step']}/{steps}  loss {rec['loss']:.4f}  ({rec['elapsed_s']:.0f}s)", err=True)

    command = shlex.join(["spobench", *sys.argv[1:]])  # recorded in metrics.json and beside the weights
    # train_toy_pickscore claims --out: a fresh run that fails (bad parquet, NaN loss...) leaves nothing
    result = train_toy_pickscore(pairs, out, config, init=init, overwrite=overwrite, command=command,
                                 progress=show)
    for line in summary_lines(result):
        typer.echo(line)
    typer.echo(f"model: {result['model']}  metrics: {Path(out) / METRICS}  ({result['train_s']:.0f}s training)")


def main(argv: Optional[list[str]] = None) -> None:
    import os

    # transformers warns on every load that torchvision is absent; it is absent on purpose here
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        app(args=argv, standalone_mode=True)
    except SpobenchError as e:
        if _state["debug"]:
            raise
        from rich.markup import escape  # "table2.toml [released]: ..." is text, not a style tag

        err_console.print(f"[bold red]error:[/] {escape(str(e))}", markup=True, highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except OSError as e:  # a full disk outside the atomic writers (which raise OutputError themselves)
        import errno

        if _state["debug"] or e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        err_console.print(f"[bold red]error:[/] {e.filename or 'output'}: {e.strerror}", markup=True,
                          highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
