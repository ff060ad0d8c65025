"""Recipes: a paper table (or ablation) as a data file, validated into typed dataclasses.

A recipe is a TOML file in ``recipes/`` (installed as package data ``spobench.recipes``) that says
which cells to train, how to generate and evaluate them, how to lay out the report and what the
paper printed. ``spobench reproduce <name> --backbone tiny|sd15|sdxl`` runs it
(:mod:`spobench.reproduce.runner`). Loading imports no torch; :func:`validate_settings` checks each cell's
trainer settings against the trainer's own typed config (that imports the trainer).

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
SPM folder, a pairs parquet, ``metric:<x>`` ...). Paths may start with ``{weights}`` (metric
weights root, ``$SPOBENCH_WEIGHTS``), ``{data}`` (``$SPOBENCH_DATA``) or ``{assets}`` (models shipped
in the package, e.g. ``{assets}/tiny-spm``); any other path is relative
to the run directory and may not leave it (no absolute paths, no ``..``, no ``~``). Cell ids and
input names are plain names (they become folder names under the run directory).
"""

from __future__ import annotations

from spobench import ASSETS
import dataclasses
import difflib
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from spobench.core.errors import InputError, NotImplementedYet

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

BACKBONE_NAMES = ("tiny", "sd15", "sdxl")
BUILTIN_METHODS = ("base", "external")
ROOTS = ("{weights}", "{data}", "{run}", "{assets}")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_PATHLIKE_SUFFIXES = (".txt", ".json", ".jsonl", ".parquet", ".toml", ".safetensors")


# =====================================================================================================
# typed fields
# =====================================================================================================
def spec(default: Any = dataclasses.MISSING, help: str = "", *, min: float | None = None,
         max: float | None = None, gt: float | None = None, lt: float | None = None, path: bool = False,
         name: bool = False, factory: Any = None) -> Any:
    """A recipe field: bounds, ``path`` (path rules apply), ``name`` (a plain folder-safe name)."""
    meta = {"help": help, "min": min, "max": max, "gt": gt, "lt": lt, "path": path, "name": name}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


class Ctx:
    """Where a value came from: the file, for error messages that name file and field."""

    def __init__(self, file: str):
        self.file = file

    def error(self, where: str, msg: str) -> InputError:
        return InputError(f"{self.file}: {where}: {msg}" if where else f"{self.file}: {msg}")


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        item = typing.get_args(tp)[0]
        plural = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}.get(item)
        return f"a list of {plural}" if plural else "a list"
    if origin is dict:
        return "a table"
    if tp is type(None):
        return "none"
    if dataclasses.is_dataclass(tp):
        return "a table"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _coerce(ctx: Ctx, where: str, tp, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(ctx, where, a, value)
            except InputError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise ctx.error(where, f"must be {_type_name(tp)} (got {value!r})")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ctx.error(where, f"must be one of {', '.join(map(repr, choices))} (got {value!r})")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ctx.error(where, f"must be {_type_name(tp)} (got {value!r})")
        (item,) = typing.get_args(tp)
        return [_coerce(ctx, f"{where}[{i}]", item, v) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ctx.error(where, f"must be a table (got {value!r})")
        _, item = typing.get_args(tp)
        return {k: _coerce(ctx, f"{where}.{k}", item, v) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ctx.error(where, f"must be a table (got {value!r})")
        return build(tp, value, ctx, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # TOML has nan and inf; no recipe number means either
                raise ctx.error(where, f"must be a finite number (got {value!r})")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a schema bug, not a user error
        raise TypeError(f"unsupported recipe field type {tp!r} at {where}")
    raise ctx.error(where, f"must be {_type_name(tp)} (got {value!r})")


def _check_bounds(ctx: Ctx, where: str, meta, v) -> None:
    from spobench.core.checks import number_problem

    problem = number_problem(v, min=meta.get("min"), max=meta.get("max"), gt=meta.get("gt"), lt=meta.get("lt"))
    if problem:
        raise ctx.error(where, problem)


def _unknown(ctx: Ctx, where: str, key: str, known) -> InputError:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    at = f"{where}.{key}" if where else key
    return ctx.error(at, f"unknown key{hint}; known: {', '.join(sorted(known))}")


def build(cls, raw: dict, ctx: Ctx, where: str = ""):
    """``cls`` (a dataclass) from a TOML table: unknown keys, wrong types and bounds are errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            raise _unknown(ctx, where, key, fields)
        at = f"{where}.{key}" if where else key
        v = _coerce(ctx, at, hints[key], value)
        meta = fields[key].metadata
        _check_bounds(ctx, at, meta, v)
        if isinstance(v, list):
            for i, item in enumerate(v):
                _check_bounds(ctx, f"{at}[{i}]", meta, item)
        if meta.get("path") and v is not None:
            for i, item in enumerate(v if isinstance(v, list) else [v]):
                check_path(ctx, at if not isinstance(v, list) else f"{at}[{i}]", item)
        if meta.get("name") and v is not None:
            check_name(ctx, at, v)
        kwargs[key] = v
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        at = f"{where}.{missing[0]}" if where else missing[0]
        raise ctx.error(at, "is required")
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        check(ctx, where)
    return obj


# =====================================================================================================
# paths and names
# =====================================================================================================
def check_name(ctx: Ctx, where: str, value: str) -> None:
    if not _NAME.match(value) or ".." in value:
        raise ctx.error(where, f"{value!r} is not a plain name (letters, digits, '_', '-', '.'; it becomes a "
                               "folder name under the run directory)")


def check_path(ctx: Ctx, where: str, value: str) -> None:
    """A recipe path: ``{weights}/...``, ``{data}/...``, ``{run}/...`` or relative to the run directory,
    never absolute, never with ``..`` or ``~`` (a recipe cannot reach outside its roots)."""
    rest = value
    for root in ROOTS:
        if value.startswith(root):
            rest = value[len(root):]
            if rest and not rest.startswith("/"):
                raise ctx.error(where, f"{value!r}: expected {root}/<path>")
            rest = rest.lstrip("/")
            break
    else:
        if "{" in value or "}" in value:
            raise ctx.error(where, f"{value!r}: unknown placeholder (known: {', '.join(ROOTS)})")
    p = rest.replace("\\", "/")
    if value.startswith("/") or value.startswith("~") or re.match(r"^[A-Za-z]:", value):
        raise ctx.error(where, f"{value!r}: absolute paths are not allowed in recipes; use {{weights}}/..., "
                               "{data}/... or a path inside the run directory")
    if any(part == ".." for part in p.split("/")):
        raise ctx.error(where, f"{value!r}: paths in recipes cannot escape the run directory ('..')")


def is_pathlike(value: str) -> bool:
    return ("/" in value or "\\" in value or value.startswith((".", "~", "{")) or value.endswith(_PATHLIKE_SUFFIXES)
            or Path(value).is_absolute())


def resolve_path(value: str, run_dir: Path) -> Path:
    """A checked recipe path as a real path (relative paths are inside ``run_dir``)."""
    from spobench.metrics.base import weights_root
    from spobench.data.prompt_sets import data_root

    roots = {"{weights}": weights_root(), "{data}": data_root(), "{run}": Path(run_dir),
             "{assets}": ASSETS}  # models shipped in the package
    for root, base in roots.items():
        if value.startswith(root):
            rest = value[len(root):].lstrip("/")
            return base / rest if rest else base
    run_dir = Path(run_dir).resolve()
    p = (run_dir / value).resolve()
    if p != run_dir and run_dir not in p.parents:  # a symlink inside the run dir pointing out of it
        raise InputError(f"{value!r} resolves to {p}, outside the run directory {run_dir}")
    return p


# =====================================================================================================
# the schema
# =====================================================================================================
@dataclass(kw_only=True)
class GenerateSpec:
    prompt_set: str = spec("tiny-val", "a registered prompt set (spobench ls prompt-sets) or a prompt file")
    limit: int | None = spec(None, "use only the first N prompts", min=1)
    seed: int = spec(0, "base seed: image n of the run uses seed + n, the same for every cell", min=0)
    images_per_prompt: int = spec(1, "images per prompt", min=1)
    steps: int = spec(20, "DDIM steps (paper: 20)", min=1)
    cfg: float = spec(5.0, "classifier-free guidance scale (paper: 5)", min=0)
    eta: float = spec(0.0, "DDIM eta at inference (0: deterministic)", min=0, max=1)
    batch_size: int = spec(8, "images per generation batch", min=1)
    resolution: int | None = spec(None, "image side in pixels (default: the backbone's, 512 SD-1.5 / 1024 SDXL)",
                                  min=8, max=4096)
    dtype: Literal["fp32", "bf16", "fp16"] = spec("fp32", "dtype of the frozen model while generating")

    def check(self, ctx: Ctx, where: str) -> None:
        if is_pathlike(self.prompt_set):
            check_path(ctx, f"{where}.prompt_set", self.prompt_set)


@dataclass(kw_only=True)
class EvaluateSpec:
    metrics: list[str] = spec(None, "registered metric names (spobench ls metrics)", factory=lambda: ["toy_aesthetic"])
    weights: dict[str, str] = spec(None, "metric = weights folder ({weights}/...)", factory=dict)
    compare_to: str | None = spec("base", "a cell id: every other cell gets per-prompt win rates against it "
                                          "(none: no comparison)")

    def check(self, ctx: Ctx, where: str) -> None:
        from spobench.core import catalog

        if not self.metrics:
            raise ctx.error(f"{where}.metrics", "needs at least one metric")
        for i, m in enumerate(self.metrics):
            if m not in catalog.METRICS:
                close = difflib.get_close_matches(m, catalog.METRICS.names(), n=1, cutoff=0.5)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ctx.error(f"{where}.metrics[{i}]", f"unknown metric {m!r}{hint}")
        if len(set(self.metrics)) != len(self.metrics):
            raise ctx.error(f"{where}.metrics", "lists a metric twice")
        for m, p in self.weights.items():
            if m not in self.metrics:
                raise ctx.error(f"{where}.weights.{m}", f"{m!r} is not one of the recipe's metrics")
            check_path(ctx, f"{where}.weights.{m}", p)


@dataclass(kw_only=True)
class ReportSpec:
    grid_prompts: int = spec(6, "prompts (columns) in grid.png", min=1, max=64)
    grid_tile: int = spec(128, "pixels per image in grid.png", min=16, max=1024)
    plot_metrics: list[str] | None = spec(None, "metrics in the plots (default: all)")


# -- inputs: things prepared before training -----------------------------------------------------------
@dataclass(kw_only=True)
class ToyPairsInput:
    """The tiny world's generic preference pairs (``spobench toy data``): ``<input>/pairs.parquet``."""

    kind: Literal["toy-pairs"] = spec("toy-pairs")
    n: int = spec(2000, "preference pairs", min=2)
    seed: int = spec(0, "", min=0)
    base_samples: float = spec(0.0, "share of images drawn by the tiny base model (0: simulated generators)",
                               min=0, max=1)


@dataclass(kw_only=True)
class ToyClipInput:
    """A random tiny CLIP (``spobench toy clip``): the starting point of the tiny world's SPMs."""

    kind: Literal["toy-clip"] = spec("toy-clip")
    seed: int = spec(0, "", min=0)
    hidden: int = spec(64, "", min=8)
    layers: int = spec(3, "", min=1)
    patch: int = spec(4, "", min=1)

    def check(self, ctx: Ctx, where: str) -> None:
        from spobench.core.checks import tiny_clip_problem

        for key, problem in tiny_clip_problem(hidden=self.hidden, patch=self.patch):
            raise ctx.error(f"{where}.{key}", problem)


@dataclass(kw_only=True)
class SPMInput:
    """A step-aware preference model trained by ``train_spm`` (paper Sec. 4.2): ``<input>/spm``."""

    kind: Literal["spm"] = spec("spm")
    pairs: str = spec(dataclasses.MISSING, "input:<toy-pairs input> or a Pick-a-Pic-format parquet path")
    init: str = spec(dataclasses.MISSING, "input:<toy-clip input> or a CLIP/PickScore folder")
    no_step: bool = spec(False, "Table 5 'w/o step': no time conditioning")
    steps: int = spec(300, "optimizer steps (0: evaluate the init only)", min=0)
    batch_size: int = spec(16, "pairs per step", min=1)
    lr: float | None = spec(None, "learning rate (default: the backbone's SPM rate)", gt=0)
    seed: int = spec(0, "", min=0)
    processor: str | None = spec(None, "tokenizer/preprocessor folder when init lacks them", path=True)

    def check(self, ctx: Ctx, where: str) -> None:
        for key in ("pairs", "init"):
            v = getattr(self, key)
            if not v.startswith("input:"):
                check_path(ctx, f"{where}.{key}", v)


@dataclass(kw_only=True)
class PathInput:
    """Something that must already be on disk (an SPM folder, a pairs file): checked before any work."""

    kind: Literal["path"] = spec("path")
    path: str = spec(dataclasses.MISSING, "{weights}/..., {data}/... or a path in the run directory", path=True)
    how: str = spec("", "how to get it (shown when it is missing)")


@dataclass(kw_only=True)
class MetricInput:
    """A registered metric used as a step scorer or reward: resolves to ``metric:<name>``."""

    kind: Literal["metric"] = spec("metric")
    metric: str = spec(dataclasses.MISSING, "a registered metric name")


INPUT_KINDS = {"toy-pairs": ToyPairsInput, "toy-clip": ToyClipInput, "spm": SPMInput, "path": PathInput,
               "metric": MetricInput}
InputSpec = typing.Union[ToyPairsInput, ToyClipInput, SPMInput, PathInput, MetricInput]


def build_input(raw: Any, ctx: Ctx, where: str) -> InputSpec:
    if not isinstance(raw, dict):
        raise ctx.error(where, f"must be a table (got {raw!r})")
    kind = raw.get("kind")
    if kind not in INPUT_KINDS:
        raise ctx.error(f"{where}.kind", f"must be one of {', '.join(map(repr, INPUT_KINDS))} (got {kind!r})")
    return build(INPUT_KINDS[kind], raw, ctx, where)


# -- cells ---------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class CellSpec:
    id: str = spec(dataclasses.MISSING, "folder-safe id", name=True)
    method: str = spec(dataclasses.MISSING, "a trainer (spobench ls trainers), 'base' (no training) or "
                                            "'external' (a given model/LoRA)")
    label: str = spec("", "row label in the report (default: the id)")
    paper_row: str | None = spec(None, "the paper's row shown beside this cell (default: the label)")
    train: dict[str, Any] = spec(None, "trainer settings (spobench train <method> --help)", factory=dict)
    model: str | None = spec(None, "external: a full model folder (path rules) or hub:<id>")
    unet: str | None = spec(None, "external: a UNet-only folder or hub:<id> replacing the model's UNet")
    vae: str | None = spec(None, "external: a VAE-only folder or hub:<id> replacing the model's VAE")
    lora: str | None = spec(None, "external: a LoRA folder or file, or hub:<id>")
    ablation_value: Any = spec(None, "(set by the ablation grid)")
    where: str = field(default="", init=False)  # where its settings come from, for error messages

    def check(self, ctx: Ctx, where: str) -> None:
        from spobench.core import catalog

        if self.method not in BUILTIN_METHODS and self.method not in catalog.TRAINERS:
            known = list(BUILTIN_METHODS) + catalog.TRAINERS.names()
            close = difflib.get_close_matches(self.method, known, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ctx.error(f"{where}.method", f"unknown method {self.method!r}{hint} (known: {', '.join(known)})")
        if self.method in BUILTIN_METHODS and self.train:
            raise ctx.error(f"{where}.train", f"method {self.method!r} trains nothing; remove its settings")
        given = [k for k in ("model", "unet", "vae", "lora") if getattr(self, k) is not None]
        if self.method == "external" and not given:
            raise ctx.error(where, "method 'external' needs model = ..., unet = ..., vae = ... and/or lora = ...")
        if self.method != "external" and given:
            raise ctx.error(f"{where}.{given[0]}", "only 'external' cells take a model/unet/vae/lora")
        if self.model is not None:
            check_model(ctx, f"{where}.model", self.model)
            if self.model.startswith("random:"):
                raise ctx.error(f"{where}.model", "an external cell is a released model, not random:<seed>")
        for key in ("unet", "vae", "lora"):
            if getattr(self, key) is not None:
                check_source(ctx, f"{where}.{key}", getattr(self, key))
        if not self.label:
            self.label = self.id
        if self.paper_row is None:
            self.paper_row = self.label

    @property
    def trained(self) -> bool:
        return self.method not in BUILTIN_METHODS


@dataclass(kw_only=True)
class AblationSpec:
    param: str = spec(dataclasses.MISSING, "the ablated parameter as the paper names it (x axis)")
    method: str = spec("spo", "the trainer of every grid cell")
    values: list[Any] = spec(dataclasses.MISSING, "one cell per value: a scalar (sets `setting`) or a table "
                                                   "of settings")
    setting: str | None = spec(None, "the trainer setting a scalar value sets (default: param)")
    labels: list[str] | None = spec(None, "row labels = the paper's rows (default: the values)")
    train: dict[str, Any] = spec(None, "settings every grid cell gets", factory=dict)
    chosen: Any = spec(None, "the paper's choice among the values (marked in the report)")

    def check(self, ctx: Ctx, where: str) -> None:
        if not self.values:
            raise ctx.error(f"{where}.values", "needs at least one value")
        if self.labels is not None and len(self.labels) != len(self.values):
            raise ctx.error(f"{where}.labels", f"has {len(self.labels)} labels for {len(self.values)} values")
        for i, v in enumerate(self.values):
            if isinstance(v, (list, dict)) and not isinstance(v, dict):
                raise ctx.error(f"{where}.values[{i}]", "must be a scalar or a table of settings")
            if isinstance(v, dict) and not v:
                raise ctx.error(f"{where}.values[{i}]", "is an empty table")
        if self.chosen is not None and self.chosen not in self.values:
            raise ctx.error(f"{where}.chosen", f"{self.chosen!r} is not one of the values")
        if self.setting is None:
            self.setting = self.param

    def label_of(self, i: int) -> str:
        if self.labels is not None:
            return self.labels[i]
        v = self.values[i]
        return ", ".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else str(v)

    def settings_of(self, i: int) -> dict:
        v = self.values[i]
        return dict(v) if isinstance(v, dict) else {self.setting: v}


# -- the paper's numbers ---------------------------------------------------------------------------------
@dataclass(kw_only=True)
class PaperRow:
    row: str = spec(dataclasses.MISSING, "the row label as printed")
    values: list[float] = spec(dataclasses.MISSING, "one number per column, as printed")


@dataclass(kw_only=True)
class PaperSpec:
    backbone: str = spec(dataclasses.MISSING, "the paper's model for this table (SD-1.5, SDXL)")
    columns: list[str] = spec(dataclasses.MISSING, "column names as printed")
    digits: list[int] = spec(dataclasses.MISSING, "decimals printed per column", min=0, max=8)
    metrics: list[str] = spec(None, "our metric per column (sd15/sdxl), '' for none", factory=list)
    scale: list[float] | None = spec(None, "per column: the paper's number = ours x scale (HPSv2 and GenEval "
                                           "print x100)", gt=0)
    rows: list[PaperRow] = spec(None, "", factory=list)
    note: str = spec("", "caveats (what the paper's text lacks, how a column is computed)")

    def check(self, ctx: Ctx, where: str) -> None:
        n = len(self.columns)
        if len(self.digits) != n:
            raise ctx.error(f"{where}.digits", f"has {len(self.digits)} entries for {n} columns")
        if self.metrics and len(self.metrics) != n:
            raise ctx.error(f"{where}.metrics", f"has {len(self.metrics)} entries for {n} columns")
        if self.scale is not None and len(self.scale) != n:
            raise ctx.error(f"{where}.scale", f"has {len(self.scale)} entries for {n} columns")
        for i, r in enumerate(self.rows):
            if len(r.values) != n:
                raise ctx.error(f"{where}.rows[{i}].values", f"has {len(r.values)} numbers for {n} columns")
        names = [r.row for r in self.rows]
        if len(set(names)) != len(names):
            raise ctx.error(f"{where}.rows", "repeats a row label")

    def row(self, label: str) -> PaperRow | None:
        return next((r for r in self.rows if r.row == label), None)

    def text(self, col: int, value: float | None) -> str:
        return "—" if value is None else f"{value:.{self.digits[col]}f}"


# a Hugging Face repo id: [owner/]name, letters, digits, '-', '_', '.' (the hub's own rule, without '--'/'..')
_HUB_ID = re.compile(r"^(?!.*(\.\.|--))[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
                     r"(?:/[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?)?$")


def check_model(ctx: Ctx, where: str, value: str) -> None:
    if value == "default":
        return
    if value.startswith("hub:"):
        check_hub_id(ctx, where, value)
        return
    if value.startswith("random:"):
        if not value.removeprefix("random:").isdigit():
            raise ctx.error(where, f"{value!r}: expected random:<seed> (a non-negative integer)")
        return
    check_path(ctx, where, value)


def check_hub_id(ctx: Ctx, where: str, value: str) -> None:
    """``hub:<id>`` must be a hub id and nothing else: the model loaders take any existing folder
    for a source, so ``hub:/abs/path`` or ``hub:../x`` would read outside the recipe's roots, and an id
    that is also a folder in the current directory would load that folder instead of the hub's."""
    hub_id = value.removeprefix("hub:")
    if not _HUB_ID.match(hub_id):
        raise ctx.error(where, f"{value!r}: not a hub id (expected hub:<owner>/<name>, e.g. "
                               "hub:runwayml/stable-diffusion-v1-5; folders are written as paths)")
    if Path(hub_id).exists():
        raise ctx.error(where, f"{value!r}: {Path(hub_id).resolve()} exists in the current directory and would "
                               "be loaded instead of the hub model; run from another directory")


def check_source(ctx: Ctx, where: str, value: str) -> None:
    """An external cell's ``unet``/``vae``/``lora``: ``hub:<id>`` or a recipe path."""
    if value.startswith("hub:"):
        check_hub_id(ctx, where, value)
    else:
        check_path(ctx, where, value)


# -- the recipe ------------------------------------------------------------------------------------------
OVERRIDABLE = ("model", "budget", "description", "train", "generate", "evaluate", "report", "inputs", "cells",
               "ablation")


@dataclass(kw_only=True)
class Recipe:
    name: str = spec(dataclasses.MISSING, "= the file's stem", name=True)
    title: str = spec(dataclasses.MISSING, "")
    paper_table: int | None = spec(None, "the paper's table number", min=1)
    backbones: list[str] = spec(None, "supported backbones", factory=lambda: list(BACKBONE_NAMES))
    description: str = spec("", "")
    budget: str = spec("", "how this run is scaled relative to the paper")
    model: str = spec("default", "default | random:<seed> (tiny) | hub:<id> | a path")
    train: dict[str, Any] = spec(None, "settings every trained cell gets", factory=dict)
    generate: GenerateSpec = spec(None, "", factory=GenerateSpec)
    evaluate: EvaluateSpec = spec(None, "", factory=EvaluateSpec)
    report: ReportSpec = spec(None, "", factory=ReportSpec)
    inputs: dict[str, Any] = spec(None, "", factory=dict)
    cells: dict[str, Any] = spec(None, "", factory=dict)
    ablation: AblationSpec | None = spec(None, "")
    paper: PaperSpec | None = spec(None, "")
    tiny: dict[str, Any] | None = spec(None, "overrides for --backbone tiny")
    sd15: dict[str, Any] | None = spec(None, "overrides for --backbone sd15")
    sdxl: dict[str, Any] | None = spec(None, "overrides for --backbone sdxl")
    released: dict[str, Any] | None = spec(None, "overrides for --released (published checkpoints)")

    # set by load_recipe
    file: str = field(default="", init=False)
    backbone: str = field(default="", init=False)
    is_released: bool = field(default=False, init=False)
    cell_list: list = field(default_factory=list, init=False)
    input_specs: dict = field(default_factory=dict, init=False)

    def cell(self, cid: str) -> CellSpec:
        return next(c for c in self.cell_list if c.id == cid)


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


def read_toml(path: Path) -> dict:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: recipe file not found") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not valid UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path}: invalid TOML ({e})") from None


def recipe_files() -> dict[str, Path]:
    """The shipped recipes: name -> file (package data ``spobench.recipes``)."""
    from importlib.resources import files

    root = files("spobench.recipes")
    out = {}
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".toml") and entry.is_file():
            out[entry.name[:-5]] = Path(str(entry))
    return out


def header(path: Path) -> dict:
    """``name``/``title``/``paper_table`` of a recipe file without validating the rest (for ``ls``)."""
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        return {"name": Path(path).stem, "title": f"(unreadable: {e})"}
    return {"name": raw.get("name", Path(path).stem), "title": str(raw.get("title", "")),
            "paper_table": raw.get("paper_table")}


def released_backbone(path: str | Path) -> str:
    """The backbone of a recipe's ``[released]`` table (``--released`` without ``--backbone``)."""
    path = Path(path)
    rel = read_toml(path).get("released")
    if not isinstance(rel, dict):
        raise InputError(f"{path}: the recipe has no [released] table (no published checkpoints to evaluate)")
    b = rel.get("backbone")
    if b not in BACKBONE_NAMES or b == "tiny":
        raise InputError(f"{path}: released.backbone: must be 'sd15' or 'sdxl' (got {b!r})")
    return b


def load_recipe(path: str | Path, backbone: str = "tiny", released: bool = False) -> Recipe:
    """Read and validate a recipe file for ``backbone`` (its overrides merged; with ``released``, the
    ``[released]`` table merged last). Pure Python: trainer settings are checked by
    :func:`validate_settings`."""
    path = Path(path)
    ctx = Ctx(str(path))
    raw = read_toml(path)
    if backbone not in BACKBONE_NAMES:
        raise InputError(f"unknown backbone {backbone!r} (known: {', '.join(BACKBONE_NAMES)})")
    # the whole file first (catches typos in every override table), then the merged view
    base = build(Recipe, raw, ctx)
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
                raise _unknown(ctx, b, k, OVERRIDABLE)
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


def _resolve_released(raw: dict, ctx: Ctx, backbone: str | None = None) -> Recipe:
    """The recipe as ``--released`` runs it: the backbone's overrides, then ``[released]`` (its cells
    replace the recipe's whole: released checkpoints are evaluated, never trained)."""
    rel = dict(raw["released"])
    b = rel.pop("backbone", None)
    if b not in ("sd15", "sdxl"):
        raise ctx.error("released.backbone", f"must be 'sd15' or 'sdxl' (got {b!r}): the checkpoints' backbone")
    for k in rel:
        if k not in OVERRIDABLE:
            raise _unknown(ctx, "released", k, (*OVERRIDABLE, "backbone"))
    if "cells" not in rel:
        raise ctx.error("released.cells", "is required (the published checkpoints to evaluate)")
    if backbone is not None and backbone != b:
        raise InputError(f"{ctx.file}: released.backbone: the released checkpoints are {b} models; run "
                         f"--released with --backbone {b} (or without --backbone), not {backbone!r}")
    over = raw.get(b) or {}
    merged = merge({k: v for k, v in raw.items() if k not in (*BACKBONE_NAMES, "released")}, over)
    merged.pop("cells", None)
    merged = merge(merged, rel)
    c = Ctx(f"{ctx.file} [released]")
    for cid, cell in (rel.get("cells") or {}).items():
        if isinstance(cell, dict) and cell.get("method") not in BUILTIN_METHODS:
            raise c.error(f"cells.{cid}.method", "released cells are 'base' or 'external' (evaluated, not trained)")
    r = _resolve(merged, b, Ctx(ctx.file), label="released")
    r.is_released = True
    return r


def _resolve(raw: dict, backbone: str, ctx: Ctx, label: str | None = None) -> Recipe:
    """``label``: the recipe is already merged (``[released]``); errors name that view."""
    if label is None:
        over = raw.get(backbone) or {}
        merged = merge({k: v for k, v in raw.items() if k not in (*BACKBONE_NAMES, "released")}, over)
    else:
        merged = raw
    c = Ctx(f"{ctx.file} [{label or backbone}]")
    r = build(Recipe, merged, c)
    r.file, r.backbone = ctx.file, backbone
    check_model(c, "model", r.model)
    if r.model.startswith("random:") and backbone != "tiny":
        raise c.error("model", "random:<seed> weights exist only for the tiny backbone")
    if backbone == "tiny" and not r.budget:
        raise c.error("tiny.budget", "a tiny run must say how it is scaled relative to the paper (budget = \"...\")")
    for key, value in r.train.items():
        _check_setting(c, f"train.{key}", value)
    # inputs, in order (an spm may use earlier inputs)
    for name, spec_raw in r.inputs.items():
        check_name(c, f"inputs.{name}", name)
        r.input_specs[name] = build_input(spec_raw, c, f"inputs.{name}")
    input_order(r, c)  # references name declared inputs, no cycles
    # cells: explicit ones, then the ablation grid
    for cid, cell_raw in r.cells.items():
        if not isinstance(cell_raw, dict):
            raise c.error(f"cells.{cid}", f"must be a table (got {cell_raw!r})")
        cell = build(CellSpec, {"id": cid, **cell_raw}, c, f"cells.{cid}")
        cell.where = f"cells.{cid}.train"
        r.cell_list.append(cell)
    if r.ablation is not None:
        a = r.ablation
        CellSpec(id="x", method=a.method).check(c, "ablation")  # method known
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
            cell = build(CellSpec, {"id": cid, "method": a.method, "label": shown, "paper_row": label,
                                    "train": settings, "ablation_value": a.values[i]}, c, f"ablation.values[{i}]")
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


def input_order(recipe: Recipe, ctx: Ctx | None = None) -> list[str]:
    """Input names in an order where every input comes after the inputs it uses."""
    ctx = ctx or Ctx(f"{recipe.file} [{recipe.backbone}]")
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


def _check_setting(ctx: Ctx, where: str, value: Any) -> None:
    """Trainer settings that look like paths obey the path rules (references and metric specs pass)."""
    if isinstance(value, str):
        if value.startswith(("input:", "metric:")):
            return
        if is_pathlike(value):
            check_path(ctx, where, value)
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


def _check_free_strings(config_cls, settings: dict) -> None:
    """A free-text trainer setting (a path or a name: prompts, scorer, reward, pairs) holding a bare
    name would be opened relative to the current directory by the trainer, outside the recipe's roots;
    in a recipe it must be a reference, a registered prompt set (``prompts``) or a path."""
    from spobench.core import catalog

    hints = typing.get_type_hints(config_cls)
    for key, value in settings.items():
        tp = hints.get(key)
        free = tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp))
        if not free or not isinstance(value, str) or value.startswith(("input:", "metric:")) or is_pathlike(value):
            continue
        if key == "prompts" and value in catalog.PROMPT_SETS:
            continue
        known = " or a registered prompt set (spobench ls prompt-sets)" if key == "prompts" else ""
        raise InputError(f"setting {key!r} {value!r} is a bare name, which would be read from the current directory; "
                         f"write ./{value} for a path in the run directory, {{data}}/{value}, input:<name>, "
                         f"metric:<name>{known}")


def validate_settings(recipe: Recipe, cells: list[CellSpec] | None = None) -> dict[str, Any]:
    """Check every trained cell's settings with its trainer's typed config; returns cell id -> config.

    A planned trainer fails here with ``not implemented yet: trainer 'x'`` (exit code 3)."""
    from spobench.core import catalog

    out = {}
    ctx = Ctx(f"{recipe.file} [{recipe.backbone}]")
    for cell in cells if cells is not None else recipe.cell_list:
        if not cell.trained:
            continue
        where = cell.where
        try:
            cls = catalog.TRAINERS.get(cell.method)
        except NotImplementedYet as e:
            raise NotImplementedYet(f"{e} ({ctx.file}: {where})") from None
        settings = cell_settings(recipe, cell)
        try:
            out[cell.id] = cls.Config.from_dict(settings, source=where)
            _check_free_strings(cls.Config, settings)
        except InputError as e:
            msg = str(e).removeprefix(f"{where}: ")
            m = re.match(r"^setting '([^']+)' (.*)$", msg)
            if m:
                raise ctx.error(f"{where}.{m.group(1)}", m.group(2)) from None
            m = re.search(r"unknown setting '([^']+)'", msg)
            if m:
                raise ctx.error(f"{where}.{m.group(1)}", msg[m.start():]) from None
            raise ctx.error(where, msg.removeprefix(f"{where}: ")) from None
    return out
