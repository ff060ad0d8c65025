"""The recipe schema: every table of a recipe file as a typed config (:mod:`spobench.core.config`).

The layout and the meaning of each table are in :mod:`spobench.reproduce.recipe`; a field's help
text here is what ``spobench reproduce --fields`` lists. Only the checks of one table live here;
rules across tables (references between inputs and cells, per-backbone rules) are the loader's.
"""

from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from spobench.core.catalog import BACKBONES
from spobench.core import config as core_config  # AblationSpec has a field named `setting`
from spobench.core.config import MISSING, Config, SettingError, Source, setting
from spobench.reproduce.paths import (is_pathlike, model_problem, name_problem, path_problem,
                                      source_problem)

BACKBONE_NAMES = tuple(BACKBONES.names())  # the registered backbones (core/catalog.py), one list
BUILTIN_METHODS = ("base", "external")
# the tiny world's backbones: random:<seed> weights, toy inputs; a run there must say how it is scaled
TOY_BACKBONES = ("tiny", "tiny-flow")


class Table(Config):
    """A recipe table: unknown keys are named with the known ones."""

    noun: ClassVar[str] = "key"


@dataclass(kw_only=True)
class GenerateSpec(Table):
    prompt_set: str = setting("tiny-val", "a registered prompt set (spobench ls prompt-sets) or a prompt file")
    limit: int | None = setting(None, "use only the first N prompts", min=1)
    seed: int = setting(0, "base seed: image n of the run uses seed + n, the same for every cell", min=0)
    images_per_prompt: int = setting(1, "images per prompt", min=1)
    steps: int = setting(20, "DDIM steps (paper: 20)", min=1)
    cfg: float = setting(5.0, "classifier-free guidance scale (paper: 5)", min=0)
    eta: float = setting(0.0, "DDIM eta at inference (0: deterministic)", min=0, max=1)
    batch_size: int = setting(8, "images per generation batch", min=1)
    resolution: int | None = setting(None, "image side in pixels (default: the backbone's, 512 SD-1.5 / 1024 SDXL)",
                                  min=8, max=4096)
    dtype: Literal["fp32", "bf16", "fp16"] = setting("fp32", "dtype of the frozen model while generating")

    def check(self) -> None:
        if is_pathlike(self.prompt_set) and path_problem(self.prompt_set):
            raise SettingError("prompt_set", path_problem(self.prompt_set))


@dataclass(kw_only=True)
class EvaluateSpec(Table):
    metrics: list[str] = setting(None, "registered metric names (spobench ls metrics)", factory=lambda: ["toy_aesthetic"])
    weights: dict[str, str] = setting(None, "metric = weights folder ({weights}/...)", factory=dict)
    compare_to: str | None = setting("base", "a cell id: every other cell gets per-prompt win rates against it "
                                          "(none: no comparison)")

    def check(self) -> None:
        from spobench.core import catalog

        if not self.metrics:
            raise SettingError("metrics", "needs at least one metric")
        for i, m in enumerate(self.metrics):
            if m not in catalog.METRICS:
                close = difflib.get_close_matches(m, catalog.METRICS.names(), n=1, cutoff=0.5)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise SettingError(f"metrics[{i}]", f"unknown metric {m!r}{hint}")
        if len(set(self.metrics)) != len(self.metrics):
            raise SettingError("metrics", "lists a metric twice")
        for m, p in self.weights.items():
            if m not in self.metrics:
                raise SettingError(f"weights.{m}", f"{m!r} is not one of the recipe's metrics")
            if path_problem(p):
                raise SettingError(f"weights.{m}", path_problem(p))


@dataclass(kw_only=True)
class ReportSpec(Table):
    grid_prompts: int = setting(6, "prompts (columns) in grid.png", min=1, max=64)
    grid_tile: int = setting(128, "pixels per image in grid.png", min=16, max=1024)
    plot_metrics: list[str] | None = setting(None, "metrics in the plots (default: all)")


# -- inputs: things prepared before training -----------------------------------------------------------
@dataclass(kw_only=True)
class ToyPairsInput(Table):
    """The tiny world's generic preference pairs (``spobench toy data``): ``<input>/pairs.parquet``."""

    kind: Literal["toy-pairs"] = setting("toy-pairs")
    n: int = setting(2000, "preference pairs", min=2)
    seed: int = setting(0, "", min=0)
    base_samples: float = setting(0.0, "share of images drawn by the tiny base model (0: simulated generators)",
                               min=0, max=1)


@dataclass(kw_only=True)
class ToyClipInput(Table):
    """A random tiny CLIP (``spobench toy clip``): the starting point of the tiny world's SPMs."""

    kind: Literal["toy-clip"] = setting("toy-clip")
    seed: int = setting(0, "", min=0)
    hidden: int = setting(64, "", min=8)
    layers: int = setting(3, "", min=1)
    patch: int = setting(4, "", min=1)

    def check(self) -> None:
        from spobench.core.checks import tiny_clip_problem

        for key, problem in tiny_clip_problem(hidden=self.hidden, patch=self.patch):
            raise SettingError(f"{key}", problem)


@dataclass(kw_only=True)
class SPMInput(Table):
    """A step-aware preference model trained by ``train_spm`` (paper Sec. 4.2): ``<input>/spm``."""

    kind: Literal["spm"] = setting("spm")
    pairs: str = setting(MISSING, "input:<toy-pairs input> or a Pick-a-Pic-format parquet path")
    init: str = setting(MISSING, "input:<toy-clip input> or a CLIP/PickScore folder")
    no_step: bool = setting(False, "Table 5 'w/o step': no time conditioning")
    steps: int = setting(300, "optimizer steps (0: evaluate the init only)", min=0)
    batch_size: int = setting(16, "pairs per step", min=1)
    lr: float | None = setting(None, "learning rate (default: the backbone's SPM rate)", gt=0)
    seed: int = setting(0, "", min=0)
    processor: str | None = setting(None, "tokenizer/preprocessor folder when init lacks them", check=path_problem)

    def check(self) -> None:
        for key in ("pairs", "init"):
            v = getattr(self, key)
            if not v.startswith("input:") and path_problem(v):
                raise SettingError(key, path_problem(v))


@dataclass(kw_only=True)
class PathInput(Table):
    """Something that must already be on disk (an SPM folder, a pairs file): checked before any work."""

    kind: Literal["path"] = setting("path")
    path: str = setting(MISSING, "{weights}/..., {data}/... or a path in the run directory", check=path_problem)
    how: str = setting("", "how to get it (shown when it is missing)")


@dataclass(kw_only=True)
class MetricInput(Table):
    """A registered metric used as a step scorer or reward: resolves to ``metric:<name>``."""

    kind: Literal["metric"] = setting("metric")
    metric: str = setting(MISSING, "a registered metric name")


INPUT_KINDS = {"toy-pairs": ToyPairsInput, "toy-clip": ToyClipInput, "spm": SPMInput, "path": PathInput,
               "metric": MetricInput}
InputSpec = typing.Union[ToyPairsInput, ToyClipInput, SPMInput, PathInput, MetricInput]


def build_input(raw: Any, source: Source) -> InputSpec:
    """An ``[inputs.<name>]`` table as its kind's spec (``source``: that table)."""
    if not isinstance(raw, dict):
        raise source.error("", f"must be a table (got {raw!r})")
    kind = raw.get("kind")
    if kind not in INPUT_KINDS:
        raise source.error("kind", f"must be one of {', '.join(map(repr, INPUT_KINDS))} (got {kind!r})")
    return INPUT_KINDS[kind].from_dict(raw, source)


# -- cells ---------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class CellSpec(Table):
    id: str = setting(MISSING, "folder-safe id", check=name_problem)
    method: str = setting(MISSING, "a trainer (spobench ls trainers), 'base' (no training) or "
                                            "'external' (a given model/LoRA)")
    label: str = setting("", "row label in the report (default: the id)")
    paper_row: str | None = setting(None, "the paper's row shown beside this cell (default: the label)")
    train: dict[str, Any] = setting(None, "trainer settings (spobench train <method> --help)", factory=dict)
    model: str | None = setting(None, "external: a full model folder (path rules) or hub:<id>")
    unet: str | None = setting(None, "external: a UNet-only folder or hub:<id> replacing the model's UNet")
    vae: str | None = setting(None, "external: a VAE-only folder or hub:<id> replacing the model's VAE")
    lora: str | None = setting(None, "external: a LoRA folder or file, or hub:<id>")
    ablation_value: Any = setting(None, "(set by the ablation grid)")
    where: str = field(default="", init=False)  # where its settings come from, for error messages

    def check(self) -> None:
        from spobench.core import catalog

        if self.method not in BUILTIN_METHODS and self.method not in catalog.TRAINERS:
            known = list(BUILTIN_METHODS) + catalog.TRAINERS.names()
            close = difflib.get_close_matches(self.method, known, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise SettingError("method", f"unknown method {self.method!r}{hint} (known: {', '.join(known)})")
        if self.method in BUILTIN_METHODS and self.train:
            raise SettingError("train", f"method {self.method!r} trains nothing; remove its settings")
        given = [k for k in ("model", "unet", "vae", "lora") if getattr(self, k) is not None]
        if self.method == "external" and not given:
            raise SettingError("", "method 'external' needs model = ..., unet = ..., vae = ... and/or lora = ...")
        if self.method != "external" and given:
            raise SettingError(given[0], "only 'external' cells take a model/unet/vae/lora")
        if self.model is not None:
            if model_problem(self.model):
                raise SettingError("model", model_problem(self.model))
            if self.model.startswith("random:"):
                raise SettingError("model", "an external cell is a released model, not random:<seed>")
        for key in ("unet", "vae", "lora"):
            if getattr(self, key) is not None and source_problem(getattr(self, key)):
                raise SettingError(key, source_problem(getattr(self, key)))
        if not self.label:
            self.label = self.id
        if self.paper_row is None:
            self.paper_row = self.label

    @property
    def trained(self) -> bool:
        return self.method not in BUILTIN_METHODS


@dataclass(kw_only=True)
class AblationSpec(Table):
    param: str = setting(MISSING, "the ablated parameter as the paper names it (x axis)")
    method: str = setting("spo", "the trainer of every grid cell")
    values: list[Any] = setting(MISSING, "one cell per value: a scalar (sets `setting`) or a table "
                                                   "of settings")
    setting: str | None = setting(None, "the trainer setting a scalar value sets (default: param)")
    labels: list[str] | None = core_config.setting(None, "row labels = the paper's rows (default: the values)")
    train: dict[str, Any] = core_config.setting(None, "settings every grid cell gets", factory=dict)
    chosen: Any = core_config.setting(None, "the paper's choice among the values (marked in the report)")

    def check(self) -> None:
        if not self.values:
            raise SettingError("values", "needs at least one value")
        if self.labels is not None and len(self.labels) != len(self.values):
            raise SettingError("labels", f"has {len(self.labels)} labels for {len(self.values)} values")
        for i, v in enumerate(self.values):
            if isinstance(v, (list, dict)) and not isinstance(v, dict):
                raise SettingError(f"values[{i}]", "must be a scalar or a table of settings")
            if isinstance(v, dict) and not v:
                raise SettingError(f"values[{i}]", "is an empty table")
        if self.chosen is not None and self.chosen not in self.values:
            raise SettingError("chosen", f"{self.chosen!r} is not one of the values")
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
class PaperRow(Table):
    row: str = setting(MISSING, "the row label as printed")
    values: list[float] = setting(MISSING, "one number per column, as printed")


@dataclass(kw_only=True)
class PaperSpec(Table):
    backbone: str = setting(MISSING, "the paper's model for this table (SD-1.5, SDXL)")
    columns: list[str] = setting(MISSING, "column names as printed")
    digits: list[int] = setting(MISSING, "decimals printed per column", min=0, max=8)
    metrics: list[str] = setting(None, "our metric per column (sd15/sdxl), '' for none", factory=list)
    scale: list[float] | None = setting(None, "per column: the paper's number = ours x scale (HPSv2 and GenEval "
                                           "print x100)", gt=0)
    rows: list[PaperRow] = setting(None, "", factory=list)
    note: str = setting("", "caveats (what the paper's text lacks, how a column is computed)")

    def check(self) -> None:
        n = len(self.columns)
        if len(self.digits) != n:
            raise SettingError("digits", f"has {len(self.digits)} entries for {n} columns")
        if self.metrics and len(self.metrics) != n:
            raise SettingError("metrics", f"has {len(self.metrics)} entries for {n} columns")
        if self.scale is not None and len(self.scale) != n:
            raise SettingError("scale", f"has {len(self.scale)} entries for {n} columns")
        for i, r in enumerate(self.rows):
            if len(r.values) != n:
                raise SettingError(f"rows[{i}].values", f"has {len(r.values)} numbers for {n} columns")
        names = [r.row for r in self.rows]
        if len(set(names)) != len(names):
            raise SettingError("rows", "repeats a row label")

    def row(self, label: str) -> PaperRow | None:
        return next((r for r in self.rows if r.row == label), None)

    def text(self, col: int, value: float | None) -> str:
        return "—" if value is None else f"{value:.{self.digits[col]}f}"


# -- the recipe ------------------------------------------------------------------------------------------
OVERRIDABLE = ("model", "budget", "description", "train", "generate", "evaluate", "report", "inputs", "cells",
               "ablation", "preset")


def preset_problem(name: str) -> str | None:
    from spobench.trainers import presets

    known = presets.names()
    return None if name in known else f"unknown preset {name!r} (known: {', '.join(known)})"


@dataclass(kw_only=True)
class Recipe(Table):
    name: str = setting(MISSING, "= the file's stem", check=name_problem)
    title: str = setting(MISSING, "")
    paper_table: int | None = setting(None, "the paper's table number", min=1)
    backbones: list[str] = setting(None, "supported backbones", factory=lambda: list(BACKBONE_NAMES))
    description: str = setting("", "")
    budget: str = setting("", "how this run is scaled relative to the paper")
    model: str = setting("default", "default | random:<seed> (tiny) | hub:<id> | a path")
    train: dict[str, Any] = setting(None, "settings every trained cell gets", factory=dict)
    preset: str = setting("paper", "named trainer settings under every trained cell's [train] "
                          "(spobench/assets/presets/: paper = the defaults, fast)", check=preset_problem)
    generate: GenerateSpec = setting(None, "", factory=GenerateSpec)
    evaluate: EvaluateSpec = setting(None, "", factory=EvaluateSpec)
    report: ReportSpec = setting(None, "", factory=ReportSpec)
    inputs: dict[str, Any] = setting(None, "", factory=dict)
    cells: dict[str, Any] = setting(None, "", factory=dict)
    ablation: AblationSpec | None = setting(None, "")
    paper: PaperSpec | None = setting(None, "")
    tiny: dict[str, Any] | None = setting(None, "overrides for --backbone tiny")
    sd15: dict[str, Any] | None = setting(None, "overrides for --backbone sd15")
    sdxl: dict[str, Any] | None = setting(None, "overrides for --backbone sdxl")
    released: dict[str, Any] | None = setting(None, "overrides for --released (published checkpoints)")

    # set by load_recipe
    file: str = field(default="", init=False)
    backbone: str = field(default="", init=False)
    is_released: bool = field(default=False, init=False)
    cell_list: list = field(default_factory=list, init=False)
    input_specs: dict = field(default_factory=dict, init=False)

    def cell(self, cid: str) -> CellSpec:
        return next(c for c in self.cell_list if c.id == cid)




def describe() -> str:
    """Every recipe table and its keys (type, default, help), from the declarations above: the
    recipe's reference, as ``--settings`` is the trainers'."""
    tables = [("", Recipe), ("generate", GenerateSpec), ("evaluate", EvaluateSpec), ("report", ReportSpec),
              *((f"inputs.<name> (kind = {k!r})", c) for k, c in INPUT_KINDS.items()), ("cells.<id>", CellSpec),
              ("ablation", AblationSpec), ("paper", PaperSpec), ("paper.rows[]", PaperRow)]
    out = []
    for name, cls in tables:
        out.append(f"[{name}]" if name else "(top level)")
        out.extend(f"  {line}" for line in cls.describe().splitlines())
    return "\n".join(out)
