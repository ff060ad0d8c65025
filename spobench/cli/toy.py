"""The tiny world's commands (``spobench toy ...``): pretrain its base model, write its preference data,
build and train its CLIPs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from spobench.cli.common import _COUNT, _SEED, _backbone, _number, _tiny_clip_shape, console, err_console


toy_app = typer.Typer(help="The tiny world: pretrain its base model, write its preference data.",
                      no_args_is_help=True)


def _one_of(value: str, names: tuple[str, ...]) -> str:
    from spobench.core.errors import InputError

    if value not in names:
        raise InputError(f"--backbone: {value!r} is not one of {', '.join(names)}")
    return value


@toy_app.command("pretrain")
def toy_pretrain(
    out: Path = typer.Option(Path("runs/tiny-pretrain"), "--out", "-o", help="Run folder (checkpoints/, model/)."),
    steps: Optional[int] = typer.Option(None, "--steps", callback=_COUNT,
                                        help="Optimizer steps (default: tiny 2500, tiny-flow 1500; batch 32: ~0.9 s each on 2 cores)."),
    batch_size: int = typer.Option(32, "--batch-size", callback=_COUNT),
    lr: float = typer.Option(1e-3, "--lr", callback=_number(gt=0)),
    seed: int = typer.Option(0, "--seed", callback=_SEED),
    checkpoint_every: int = typer.Option(250, "--checkpoint-every", callback=_COUNT),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint in --out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
    backbone: str = typer.Option("tiny", "--backbone", callback=lambda v: _one_of(v, ("tiny", "tiny-flow")),
                                 help="tiny: the U-Net (v-prediction); tiny-flow: the SD3-shaped transformer "
                                      "(rectified flow, spobench/toyworld/flow_pretrain.py)."),
):
    """Pretrain the tiny backbone (v-prediction) or the tiny flow backbone (rectified flow) on renders of
    mixed quality; exports a diffusers folder to <out>/model that `--backbone <name> --model <out>/model` loads."""
    from spobench.core.progress import Progress
    from spobench.core import outdir
    from spobench.core.checkpoint import latest_checkpoint
    from spobench.toyworld.pretrain import toy_batch

    if backbone == "tiny-flow":
        from spobench.models.backbones.tiny_flow import TinyFlowBackbone as Model
        from spobench.toyworld.flow_pretrain import FlowPretrainConfig as PretrainConfig, FlowPretrainer as Pretrainer
    else:
        from spobench.models.backbones.tiny import TinyBackbone as Model
        from spobench.toyworld.pretrain import PretrainConfig, Pretrainer
    cfg = PretrainConfig(batch_size=batch_size, lr=lr, seed=seed, checkpoint_every=checkpoint_every,
                         **({} if steps is None else {"steps": steps}))
    steps = cfg.steps
    with outdir.claim(out, command="toy pretrain", resume=resume, overwrite=overwrite,
                      keep=lambda: latest_checkpoint(out) is not None):
        trainer = Pretrainer(Model.build(seed), cfg, toy_batch, out)
        if resume and trainer.load_checkpoint():
            console.print(f"resumed at step {trainer.step}")
        with Progress("pretraining", total=steps, completed=trainer.step, unit="step", console=err_console) as bar:
            trainer.run(progress=lambda s, loss: bar.update(completed=s, info=f"loss {loss:.4f}"))
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
    from spobench.core.progress import status
    from spobench.toyworld.pairs import backbone_generator, make_dataset

    outdir.check(out, overwrite=overwrite, resumable=False)
    extra = None
    if base_samples > 0:
        extra = backbone_generator(_backbone("tiny", model, "cpu", "fp32"))
    with outdir.claim(out, command="toy data", overwrite=overwrite, resumable=False), \
            status(err_console, f"drawing {pairs} pairs"):
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

    from spobench.core.progress import Progress

    command = shlex.join(["spobench", *sys.argv[1:]])  # recorded in metrics.json and beside the weights
    # train_toy_pickscore claims --out: a fresh run that fails (bad parquet, NaN loss...) leaves nothing
    with Progress("training toy PickScore", total=steps, unit="step", console=err_console) as bar:
        result = train_toy_pickscore(pairs, out, config, init=init, overwrite=overwrite, command=command,
                                     progress=lambda rec: bar.update(completed=rec["step"],
                                                                     info=f"loss {rec['loss']:.4f}"))
    for line in summary_lines(result):
        typer.echo(line)
    typer.echo(f"model: {result['model']}  metrics: {Path(out) / METRICS}  ({result['train_s']:.0f}s training)")
