"""Step-aware preference model commands: ``train-spm``, ``eval-spm`` and ``spm import``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from spobench.cli.common import _COUNT, _SEED, _backbone, _device, _number, console, err_console
from spobench.core.errors import InputError


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

    from spobench.core.progress import Progress

    # train_spm claims --out: a fresh run that fails before its checkpoint leaves nothing
    with Progress("training SPM", total=steps, unit="step", console=err_console) as bar:
        result = train_spm(bb, pairs, init, out, config, resume=resume, overwrite=overwrite,
                           progress=lambda rec: bar.update(completed=rec["step"], info=f"loss {rec['loss']:.4f}"))
    ev = result["eval"]
    typer.echo(f"{result['variant']}: held-out pair accuracy ({ev['n_pairs']} non-tie pairs)")
    for t, acc in ev["accuracy"].items():
        typer.echo(f"  t={t:>4}  {acc:.4f}")
    typer.echo(f"  mean    {ev['mean_accuracy']:.4f}")
    typer.echo(f"model: {result['model']}  metrics: {Path(out) / METRICS}")


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

    from spobench.core.progress import Progress

    with Progress("scoring held-out pairs", unit="pair", console=err_console) as bar:
        res = compare_spms(bb, models, pairs, exclude=exclude, max_pairs=max_pairs, eval_timesteps=ts or None,
                           processor=processor,
                           progress=lambda done, total: bar.update(completed=done, total=total))
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
