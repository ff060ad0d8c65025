"""Recipes: a paper table (or ablation) as a data file, validated into typed configs (:mod:`spobench.reproduce.schema`).

A recipe is a TOML file in ``recipes/`` (installed as package data ``spobench.recipes``) that says
which cells to train, how to generate and evaluate them, how to lay out the report and what the
paper printed. ``spobench reproduce <name> --backbone tiny|sd15|sdxl`` runs it
(:mod:`spobench.reproduce.runner`). Loading imports no torch; :func:`validate_settings` builds each cell's
trainer config (the trainer's own typed config, which imports the trainer), and that object is what
the cell trains with.

Layout (every key is optional unless marked; unknown keys are errors)::

    name = "table6"                      # required, = the file's stem
    title = "Impact of the pool size k"  # required
    paper_table = 6                      # which table of the paper (none for extra recipes)
    backbones = ["tiny", "sd15"]         # backbones the recipe supports (default: all three)
    description = "..."                  # shown in the report
    budget = "..."                       # how the run is scaled (a [tiny] table must set one)
    model = "random:0"                   # default | random:<seed> (tiny) | hub:<id> | a path

    [train]          # trainer settings every trained cell gets (a cell's own [cells.x.train] wins)
    [generate]       # prompt_set, limit, seed, images_per_prompt, steps, cfg, eta, batch_size, resolution, dtype
    [evaluate]       # metrics = [...], weights = {metric = path}, compare_to = "base"
    [report]         # grid_prompts, grid_tile, plot_metrics
    [inputs.<name>]  # prepared before training: kind = toy-pairs | toy-clip | spm | path | metric
    [cells.<id>]     # label, method (a trainer, "base" or "external"), train = {...}, paper_row,
                     # model/unet/vae/lora (external: a released checkpoint, evaluated only)
    [ablation]       # param, setting, method, values = [...], labels = [...], train, chosen
    [paper]          # backbone, columns, digits, metrics, note, rows = [{row, values}]

    [tiny] / [sd15] / [sdxl]   # per-backbone overrides of model, budget, description, train,
                               # generate, evaluate, report, inputs, cells, ablation

    [released]       # `reproduce <name> --released`: the paper's rows from published checkpoints
                     # backbone = "sd15" | "sdxl" (required), then overrides as above; its cells
                     # replace the recipe's cells whole (base / external cells only: nothing trains)

An ``external`` cell is a released checkpoint, evaluated only: ``model`` (a full diffusers folder or
hub id), ``unet`` (a UNet-only folder or hub id: config.json + diffusion_pytorch_model.safetensors at
its top or under unet/), ``vae`` (likewise, e.g. ``hub:madebyollin/sdxl-vae-fp16-fix``) and ``lora``
(a LoRA folder or file, or hub id), each ``hub:<org>/<name>`` or a recipe path. What it does not
replace comes from the recipe's ``model``.

Overrides are merged key by key into the tables above (lists are replaced; an ``inputs.<name>``
entry is replaced whole, since its kind decides its keys).

References and paths. A trainer setting ``"input:<name>"`` is the prepared input of that name (an
SPM folder, a pairs parquet, ``metric:<x>`` ...). Paths follow :mod:`spobench.reproduce.paths`
(``{weights}``, ``{data}``, ``{assets}`` roots, else inside the run directory). Cell ids and input
names are plain names (they become folder names under the run directory).
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any

from spobench.core.config import SettingError, Source, read_toml
from spobench.core.errors import InputError, NotImplementedYet
from spobench.reproduce.paths import is_pathlike, model_problem, name_problem, path_problem
from spobench.reproduce.schema import (BACKBONE_NAMES, BUILTIN_METHODS, OVERRIDABLE, TOY_BACKBONES, CellSpec,
                                       Recipe, build_input)

# where these lived before the schema and the paths had modules of their own


# =====================================================================================================
# loading
# =====================================================================================================
def merge(base: dict, over: dict, replace_under: tuple[str, ...] = ("inputs",), _path: tuple = ()) -> dict:
    """``over`` merged into ``base`` key by key (tables recursively, anything else replaced); tables
    directly under a key in ``replace_under`` are replaced whole."""
    out = dict(base)
    for k, v in over.items():
        whole = len(_path) == 1 and _path[0] in replace_under
        if isinstance(v, dict) and isinstance(out.get(k), dict) and not whole:
            out[k] = merge(out[k], v, replace_under, _path + (k,))
        else:
            out[k] = v
    return out


def released_backbone(path: str | Path) -> str:
    """The backbone of a recipe's ``[released]`` table (``--released`` without ``--backbone``)."""
    path = Path(path)
    rel = read_toml(path, "recipe").get("released")
    if not isinstance(rel, dict):
        raise InputError(f"{path}: the recipe has no [released] table (no published checkpoints to evaluate)")
    b = rel.get("backbone")
    if b not in BACKBONE_NAMES or b in TOY_BACKBONES:
        real = ", ".join(repr(n) for n in BACKBONE_NAMES if n not in TOY_BACKBONES)
        raise InputError(f"{path}: released.backbone: must be one of {real} (got {b!r})")
    return b


def load_recipe(path: str | Path, backbone: str = "tiny", released: bool = False) -> Recipe:
    """Read and validate a recipe file for ``backbone`` (its overrides merged; with ``released``, the
    ``[released]`` table merged last). Pure Python: trainer settings are checked by
    :func:`validate_settings`."""
    path = Path(path)
    ctx = Source(str(path), "")
    raw = read_toml(path, "recipe")
    if backbone not in BACKBONE_NAMES:
        raise InputError(f"unknown backbone {backbone!r} (known: {', '.join(BACKBONE_NAMES)})")
    # the whole file first (catches typos in every override table), then the merged view
    base = Recipe.from_dict(raw, ctx)
    if base.name != path.stem:
        raise ctx.error("name", f"{base.name!r} must equal the file's name {path.stem!r}")
    for b in base.backbones:
        if b not in BACKBONE_NAMES:
            raise ctx.error("backbones", f"unknown backbone {b!r} (known: {', '.join(BACKBONE_NAMES)})")
    for b in BACKBONE_NAMES:
        over = raw.get(b)
        if over is None:
            continue
        for k in over:
            if k not in OVERRIDABLE:
                raise ctx.sub(b).unknown(k, OVERRIDABLE, "key")
        if b not in base.backbones:
            raise ctx.error(b, f"overrides a backbone the recipe does not support (backbones = {base.backbones})")
    for b in base.backbones:  # every backbone's merged view must be valid, not only the one run now
        _resolve(raw, b, ctx)
    if base.released is not None:
        _resolve_released(raw, ctx)
    if released:
        if base.released is None:
            raise InputError(f"{path}: recipe {base.name!r} has no [released] table (no published checkpoints "
                             "to evaluate); run it without --released")
        return _resolve_released(raw, ctx, backbone)
    if backbone not in base.backbones:
        raise InputError(f"{path}: recipe {base.name!r} supports --backbone {', '.join(base.backbones)} "
                         f"(not {backbone!r})")
    return _resolve(raw, backbone, ctx)


def _resolve_released(raw: dict, ctx: Source, backbone: str | None = None) -> Recipe:
    """The recipe as ``--released`` runs it: the backbone's overrides, then ``[released]`` (its cells
    replace the recipe's whole: released checkpoints are evaluated, never trained)."""
    rel = dict(raw["released"])
    b = rel.pop("backbone", None)
    if b not in ("sd15", "sdxl"):
        raise ctx.error("released.backbone", f"must be 'sd15' or 'sdxl' (got {b!r}): the checkpoints' backbone")
    for k in rel:
        if k not in OVERRIDABLE:
            raise ctx.sub("released").unknown(k, (*OVERRIDABLE, "backbone"), "key")
    if "cells" not in rel:
        raise ctx.error("released.cells", "is required (the published checkpoints to evaluate)")
    if backbone is not None and backbone != b:
        raise InputError(f"{ctx.origin}: released.backbone: the released checkpoints are {b} models; run "
                         f"--released with --backbone {b} (or without --backbone), not {backbone!r}")
    over = raw.get(b) or {}
    merged = merge({k: v for k, v in raw.items() if k not in (*BACKBONE_NAMES, "released")}, over)
    merged.pop("cells", None)
    merged = merge(merged, rel)
    c = Source(f"{ctx.origin} [released]", "")
    for cid, cell in (rel.get("cells") or {}).items():
        if isinstance(cell, dict) and cell.get("method") not in BUILTIN_METHODS:
            raise c.error(f"cells.{cid}.method", "released cells are 'base' or 'external' (evaluated, not trained)")
    r = _resolve(merged, b, ctx, label="released")
    r.is_released = True
    return r


def _resolve(raw: dict, backbone: str, ctx: Source, label: str | None = None) -> Recipe:
    """``label``: the recipe is already merged (``[released]``); errors name that view."""
    if label is None:
        over = raw.get(backbone) or {}
        merged = merge({k: v for k, v in raw.items() if k not in (*BACKBONE_NAMES, "released")}, over)
    else:
        merged = raw
    c = Source(f"{ctx.origin} [{label or backbone}]", "")
    r = Recipe.from_dict(merged, c)
    r.file, r.backbone = ctx.origin, backbone
    if model_problem(r.model):
        raise c.error("model", model_problem(r.model))
    if r.model.startswith("random:") and backbone not in TOY_BACKBONES:
        raise c.error("model", "random:<seed> weights exist only for the tiny backbone")
    if backbone in TOY_BACKBONES and not r.budget:
        raise c.error("tiny.budget", "a tiny run must say how it is scaled relative to the paper (budget = \"...\")")
    for key, value in r.train.items():
        _check_setting(c, f"train.{key}", value)
    # inputs, in order (an spm may use earlier inputs)
    for name, spec_raw in r.inputs.items():
        if name_problem(name):
            raise c.error(f"inputs.{name}", name_problem(name))
        r.input_specs[name] = build_input(spec_raw, c.sub(f"inputs.{name}"))
    input_order(r, c)  # references name declared inputs, no cycles
    # cells: explicit ones, then the ablation grid
    for cid, cell_raw in r.cells.items():
        if not isinstance(cell_raw, dict):
            raise c.error(f"cells.{cid}", f"must be a table (got {cell_raw!r})")
        cell = CellSpec.from_dict({"id": cid, **cell_raw}, c.sub(f"cells.{cid}"))
        cell.where = f"cells.{cid}.train"
        r.cell_list.append(cell)
    if r.ablation is not None:
        a = r.ablation
        CellSpec.from_dict({"id": "x", "method": a.method}, c.sub("ablation"))  # method known
        if a.method in BUILTIN_METHODS:
            raise c.error("ablation.method", "an ablation grid needs a trainer")
        for i in range(len(a.values)):
            label, value = a.label_of(i), a.values[i]
            if isinstance(value, dict):
                cid = _slug(f"{a.setting}-{label}")
            else:
                cid = _slug(f"{a.setting}-{str(value).removeprefix('input:').removeprefix('metric:')}")
            settings = merge(a.train, a.settings_of(i))
            shown = f"{a.param} = {label}" if re.fullmatch(r"-?[\d.]+", label) else label  # "k = 4", not "4"
            cell = CellSpec.from_dict({"id": cid, "method": a.method, "label": shown, "paper_row": label,
                                       "train": settings, "ablation_value": a.values[i]}, c.sub(f"ablation.values[{i}]"))
            cell.where = f"ablation.values[{i}]"
            r.cell_list.append(cell)
    if not r.cell_list:
        raise c.error("cells", "the recipe has no cells")
    ids = [x.id for x in r.cell_list]
    dup = next((x for x in ids if ids.count(x) > 1), None)
    if dup:
        raise c.error("cells", f"two cells are named {dup!r}")
    declared = ", ".join(r.input_specs) or "none"
    for key, value in r.train.items():
        if isinstance(value, str) and value.startswith("input:") and value[6:] not in r.input_specs:
            raise c.error(f"train.{key}", f"{value!r} names no input (declared: {declared})")
    for cell in r.cell_list:
        for key, value in cell.train.items():
            _check_setting(c, f"{cell.where}.{key}", value)
            if isinstance(value, str) and value.startswith("input:") and value[6:] not in r.input_specs:
                raise c.error(f"{cell.where}.{key}", f"{value!r} names no input (declared: {declared})")
    if r.evaluate.compare_to is not None and r.evaluate.compare_to not in ids:
        raise c.error("evaluate.compare_to", f"{r.evaluate.compare_to!r} is not a cell (cells: {', '.join(ids)})")
    if r.report.plot_metrics:
        for m in r.report.plot_metrics:
            if m not in r.evaluate.metrics:
                raise c.error("report.plot_metrics", f"{m!r} is not one of evaluate.metrics")
    return r


def input_order(recipe: Recipe, ctx: Source | None = None) -> list[str]:
    """Input names in an order where every input comes after the inputs it uses."""
    ctx = ctx or Source(f"{recipe.file} [{recipe.backbone}]", "")
    order: list[str] = []
    visiting: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise ctx.error(f"inputs.{name}", f"inputs use each other in a cycle ({' -> '.join(visiting + [name])})")
        visiting.append(name)
        for key in ("pairs", "init"):
            ref = getattr(recipe.input_specs[name], key, None)
            if isinstance(ref, str) and ref.startswith("input:"):
                if ref[6:] not in recipe.input_specs:
                    raise ctx.error(f"inputs.{name}.{key}", f"{ref!r} names no input (declared: "
                                                            f"{', '.join(recipe.input_specs)})")
                visit(ref[6:])
        visiting.pop()
        order.append(name)

    for name in recipe.input_specs:
        visit(name)
    return order


def _check_setting(ctx: Source, where: str, value: Any) -> None:
    """Trainer settings that look like paths obey the path rules (references and metric specs pass)."""
    if isinstance(value, str):
        if value.startswith(("input:", "metric:")):
            return
        if is_pathlike(value) and path_problem(value):
            raise ctx.error(where, path_problem(value))
    elif isinstance(value, (list, dict)):
        raise ctx.error(where, f"trainer settings are scalars (got {value!r})")


def _slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-.").lower()
    return re.sub(r"-{2,}", "-", s) or "cell"


# =====================================================================================================
# trainer settings (imports the trainers)
# =====================================================================================================
def cell_settings(recipe: Recipe, cell: CellSpec) -> dict:
    """The trainer settings of a cell: the recipe's [train], then the cell's own (grid values last)."""
    return merge(recipe.train, cell.train)


def _check_free_strings(config) -> None:
    """A free-text trainer setting (a path or a name: prompts, scorer, reward, pairs) holding a bare
    name would be opened relative to the current directory by the trainer, outside the recipe's roots;
    in a recipe it must be a reference, a registered prompt set (``prompts``) or a path."""
    from spobench.core import catalog

    hints = typing.get_type_hints(type(config))
    for key in config.fields():
        value = getattr(config, key)
        if str not in typing.get_args(hints[key]) + (hints[key],):
            continue
        if not isinstance(value, str) or value.startswith(("input:", "metric:")) or is_pathlike(value):
            continue
        if key == "prompts" and value in catalog.PROMPT_SETS:
            continue
        known = " or a registered prompt set (spobench ls prompt-sets)" if key == "prompts" else ""
        raise SettingError(key, f"{value!r} is a bare name, which would be read from the current directory; "
                                f"write ./{value} for a path in the run directory, {{data}}/{value}, input:<name>, "
                                f"metric:<name>{known}")


def cell_source(recipe: Recipe, cell: CellSpec) -> Source:
    """Where a cell's trainer settings are in the recipe: ``<file> [backbone]: cells.<id>.train``."""
    return Source(f"{recipe.file} [{recipe.backbone}]", cell.where)


def cell_config(recipe: Recipe, cell: CellSpec, settings: dict | None = None):
    """The typed config of a trained cell from its settings (default: :func:`cell_settings`);
    errors name the recipe field (``cells.spo.train.k: must be >= 2``).

    A planned trainer fails here with ``not implemented yet: trainer 'x'`` (exit code 3)."""
    from spobench.core import catalog

    source = cell_source(recipe, cell)
    try:
        cls = catalog.TRAINERS.get(cell.method)
    except NotImplementedYet as e:
        raise NotImplementedYet(f"{e} ({source.origin}: {cell.where})") from None
    from spobench.trainers.presets import apply_preset

    try:
        base = apply_preset(cls.Config, cell.method, recipe.preset, backbone=recipe.backbone)
    except InputError as e:  # a preset made for other trainers, or a bad value in its file
        raise InputError(f"{source.origin}: preset: {e} ({cell.where})") from None
    cfg = cls.Config.from_dict(cell_settings(recipe, cell) if settings is None else settings, source, base)
    try:
        _check_free_strings(cfg)
    except SettingError as e:
        raise source.error(e.key, e.problem) from None
    return cfg


def validate_settings(recipe: Recipe, cells: list[CellSpec] | None = None) -> dict[str, Any]:
    """Every trained cell's typed trainer config (:func:`cell_config`): cell id -> config."""
    return {cell.id: cell_config(recipe, cell) for cell in (cells if cells is not None else recipe.cell_list)
            if cell.trained}
