"""The ``spobench`` command line. Heavy imports (torch, diffusers) happen inside commands, so
``spobench ls`` and ``--help`` stay fast. Errors the user can act on print one line and exit
non-zero; ``--debug`` shows the traceback instead."""

from __future__ import annotations

import sys
from enum import Enum
from typing import Optional

import typer
from rich.table import Table

from spobench.cli import export, run, spm, toy
from spobench.cli.common import console, err_console
from spobench.core.errors import SpobenchError

app = typer.Typer(
    name="spobench",
    help="Post-train text-to-image diffusion models from preferences (SPO, MSPO, Diffusion-DPO, D3PO, DDPO) "
    "and measure them with PickScore, HPSv2, ImageReward, Aesthetic and GenEval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
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

app.command()(run.generate)
app.command(context_settings={"allow_extra_args": False})(run.train)
app.command("eval")(run.eval_)
app.command()(run.reproduce)
app.command("train-spm")(spm.train_spm_cmd)
app.command("eval-spm")(spm.eval_spm_cmd)
app.command("export-lora", help=export.HELP)(export.export_lora)
app.add_typer(spm.spm_app, name="spm")
app.add_typer(toy.toy_app, name="toy")


def main(argv: Optional[list[str]] = None) -> None:
    import os

    # transformers warns on every load that torchvision is absent; it is absent on purpose here
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from spobench.core.progress import interval_seconds

        interval_seconds()  # a bad SPOBENCH_PROGRESS_SECONDS is refused before any work
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

