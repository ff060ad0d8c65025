"""``spobench reproduce``'s plan: every check a run needs before anything is written.

:func:`preflight` resolves the recipe for this run folder - each trained cell's typed trainer config
(per-backbone defaults filled; that object is what the cell trains with), the backbone's weights,
every metric, every input that must already be on disk, every prompt set, every released
checkpoint's parts - and returns the :class:`Plan`. :func:`check_resume` refuses a resumed run whose
recipe changed under it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from spobench.core.errors import InputError, MissingWeightsError, NotImplementedYet
from spobench.reproduce.paths import is_pathlike, resolve_path
from spobench.reproduce.recipe import cell_config, cell_settings, input_order, validate_settings
from spobench.reproduce.schema import (TOY_BACKBONES, CellSpec, MetricInput, PathInput, Recipe, SPMInput,
                                       ToyClipInput, ToyPairsInput)


# =====================================================================================================
# the plan
# =====================================================================================================
@dataclass
class CellPlan:
    spec: CellSpec
    dir: Path
    settings: dict = field(default_factory=dict)  # resolved trainer settings (references replaced)
    trainer: Any = None  # the trainer class
    config: Any = None  # its typed config, per-backbone defaults filled: what the cell trains with
    model: str | None = None  # external cells: model source (a folder or hub id)
    unet: str | None = None  # external cells: a UNet-only folder or hub id
    vae: str | None = None  # external cells: a VAE-only folder or hub id
    lora: Path | None = None  # external cells: the LoRA weights file (from a folder or hub snapshot)

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def train_dir(self) -> Path:
        return self.dir / "train"

    @property
    def images(self) -> Path:
        return self.dir / "images"

    @property
    def lora_dir(self) -> Path | None:
        if self.spec.method == "external":
            return self.lora
        return self.train_dir / "lora" if self.spec.trained else None


@dataclass
class Plan:
    recipe: Recipe
    out: Path
    device: str
    model_source: str | None  # what load_backbone gets (None: the backbone's default)
    model_identity: str
    cells: list[CellPlan]
    prompts: Any  # the generation prompt list (a PromptSet when registered)
    prompt_info: dict
    metrics: dict[str, Any]  # name -> metric instance (constructed in preflight: weights found)
    inputs: dict[str, Any]  # name -> spec, in preparation order
    input_values: dict[str, str]  # name -> what "input:<name>" resolves to
    random_model: int | None = None
    compile: bool = False  # trainers' compile=true: how cells run, not what they are (kept out of identity)

    def identity(self) -> dict:
        g = asdict(self.recipe.generate)
        g.pop("batch_size")
        return {"recipe": self.recipe.name, "backbone": self.recipe.backbone, "model": self.model_identity,
                "generate": g, "prompts": self.prompt_info.get("version"),
                "inputs": {n: asdict(s) for n, s in self.inputs.items()},
                "cells": {c.id: {"method": c.spec.method, "settings": c.settings, "model": c.model,
                                 "lora": str(c.lora) if c.lora else None,
                                 **{k: getattr(c, k) for k in ("unet", "vae") if getattr(c, k)}}
                          for c in self.cells}}


def _input_value(name: str, spec, out: Path) -> str:
    if isinstance(spec, MetricInput):
        return f"metric:{spec.metric}"
    if isinstance(spec, PathInput):
        return str(resolve_path(spec.path, out))
    if isinstance(spec, ToyPairsInput):
        return str(out / "inputs" / name / "pairs.parquet")
    if isinstance(spec, SPMInput):
        return str(out / "inputs" / name / "spm")
    return str(out / "inputs" / name)  # toy-clip


def _resolve_settings(recipe: Recipe, cell: CellSpec, values: dict[str, str], out: Path) -> tuple[dict, set]:
    """The cell's settings with ``input:`` references and recipe paths made real; also the keys whose
    value is a path that must already exist."""
    resolved, must_exist = {}, set()
    for key, value in cell_settings(recipe, cell).items():
        if isinstance(value, str) and value.startswith("input:"):
            value = values[value[6:]]
        elif isinstance(value, str) and not value.startswith("metric:") and is_pathlike(value):
            value = str(resolve_path(value, out))
            must_exist.add(key)
        resolved[key] = value
    return resolved, must_exist


def _used_inputs(recipe: Recipe, cells: list[CellSpec]) -> set[str]:
    used: set[str] = set()
    for cell in cells:
        for v in cell_settings(recipe, cell).values():
            if isinstance(v, str) and v.startswith("input:"):
                used.add(v[6:])
    changed = True
    while changed:  # inputs of used inputs
        changed = False
        for name in list(used):
            spec = recipe.input_specs[name]
            for key in ("pairs", "init"):
                ref = getattr(spec, key, None)
                if isinstance(ref, str) and ref.startswith("input:") and ref[6:] not in used:
                    used.add(ref[6:])
                    changed = True
    return used


def _check_backbone(recipe: Recipe, out: Path) -> tuple[str | None, str, int | None]:
    """(source for load_backbone, identity string, random seed) - the backbone's own error if its
    weights are missing. Reads only (a hub id that is not cached raises unless downloads are allowed)."""
    from spobench.core import catalog

    name, model = recipe.backbone, recipe.model
    bb_cls = catalog.BACKBONES.get(name)
    if model.startswith("random:"):
        seed = int(model.removeprefix("random:"))
        return None, f"tiny-random-seed{seed}", seed
    # a backbone without a hub default is the tiny world's: its models ship with the package and are
    # small enough to hash (so that a resumed run notices new weights)
    small = bb_cls.default_source is None
    if model == "default":
        if small:  # pinned now: a model shipped while the run goes on must not mix into it
            from importlib import import_module

            shipped = import_module(bb_cls.__module__).PRETRAINED_DIR  # tiny-base, tiny-flow-base
            if shipped.is_dir():
                bb_cls.check_folder(shipped)
                return str(shipped), f"shipped {shipped.name} (unet sha256 {_unet_sha(shipped)})", None
            return None, f"{name}-random-seed0 (no shipped {shipped.name}: {bb_cls.__name__}.build(seed=0))", 0
        source = bb_cls.default_source
    elif model.startswith("hub:"):
        source = model.removeprefix("hub:")
    else:
        source = str(resolve_path(model, out))
    folder, model_id, revision = bb_cls._resolve(source)  # the same resolution load() does
    bb_cls.check_folder(folder, source)
    identity = f"{model_id}@{revision}" if revision else model_id
    if small:
        identity += f" (unet sha256 {_unet_sha(folder)})"
    return source, identity, None


def _unet_sha(folder: Path) -> str:
    """A short hash of a tiny model's UNet weights (4 MB), so that a resumed run notices new weights."""
    import hashlib

    files = sorted(f for sub in ("unet", "transformer") for f in (Path(folder) / sub).glob("*.safetensors"))
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def _check_metric(name: str, weights: str | None, device: str, where: str):
    from spobench.core import catalog

    try:
        cls = catalog.METRICS.get(name)
    except NotImplementedYet as e:
        raise NotImplementedYet(f"{e} ({where})") from None
    try:
        return cls(weights=weights, device=device)
    except MissingWeightsError as e:
        raise MissingWeightsError(f"{where}: {e}") from None


def _load_generation_prompts(recipe: Recipe, out: Path):
    from spobench.data.prompts import first, load_prompts

    g = recipe.generate
    where = f"{recipe.file} [{recipe.backbone}]: generate.prompt_set"
    file = is_pathlike(g.prompt_set)
    try:
        items = load_prompts(resolve_path(g.prompt_set, out) if file else g.prompt_set, file=file, what=where,
                             example="prompt_set = \"prompts.txt\"")
    except InputError as e:
        raise (e if str(e).startswith(where) else InputError(f"{where}: {e}")) from None
    info = items.info() if hasattr(items, "info") else {"name": g.prompt_set}  # the whole set's, before the limit
    items = first(items, g.limit)
    from spobench.data.prompt_sets import prompts_sha256

    prompts = [getattr(p, "prompt", p) for p in items]
    sha = prompts_sha256(prompts)[:12]
    info = dict(info) | {"n": len(prompts), "sha256": sha,
                         "version": f"{info['version']}#{sha}" if info.get("version") else f"{info['name']}+{sha}"}
    if not prompts:
        raise InputError(f"{where}: no prompts")
    return items, info


def preflight(recipe: Recipe, cells: list[CellSpec], out: Path, device: str) -> Plan:
    """Every check a run needs, before anything is written."""
    import torch

    from spobench.core import catalog
    from spobench.data.prompts import load_prompts

    where = f"{recipe.file} [{recipe.backbone}]"
    validate_settings(recipe, cells)  # trainers exist (else not implemented yet) and accept the settings
    source, identity, random_seed = _check_backbone(recipe, out)
    metrics = {m: _check_metric(m, str(resolve_path(recipe.evaluate.weights[m], out))
                                if m in recipe.evaluate.weights else None, device, f"{where}: evaluate.metrics")
               for m in recipe.evaluate.metrics}

    used = _used_inputs(recipe, cells)
    order = [n for n in input_order(recipe) if n in used]
    values = {n: _input_value(n, recipe.input_specs[n], out) for n in order}
    for name in order:
        spec = recipe.input_specs[name]
        at = f"{where}: inputs.{name}"
        if isinstance(spec, PathInput):
            if not Path(values[name]).exists():
                raise MissingWeightsError(f"{at}: {values[name]} not found. {spec.how}".rstrip())
        elif isinstance(spec, MetricInput):
            _check_metric(spec.metric, None, device, at)
        elif isinstance(spec, (ToyPairsInput, ToyClipInput)) and recipe.backbone not in TOY_BACKBONES:
            raise InputError(f"{at}: kind {spec.kind!r} exists only for the tiny backbone")
        elif isinstance(spec, SPMInput):
            for key in ("pairs", "init"):
                ref = getattr(spec, key)
                if not ref.startswith("input:") and not resolve_path(ref, out).exists():
                    raise MissingWeightsError(f"{at}.{key}: {resolve_path(ref, out)} not found")
            if spec.processor and not resolve_path(spec.processor, out).exists():
                raise MissingWeightsError(f"{at}.processor: {resolve_path(spec.processor, out)} not found")

    bb_cls = catalog.BACKBONES.get(recipe.backbone)
    plans = []
    for cell in cells:
        cp = CellPlan(spec=cell, dir=out / "cells" / cell.id)
        if cell.trained:
            cls = catalog.TRAINERS.get(cell.method)
            settings, must_exist = _resolve_settings(recipe, cell, values, out)
            cfg = cell_config(recipe, cell, settings)
            try:
                cfg = cls.prepare_config(cfg, recipe.backbone, bb_cls.defaults)
            except InputError as e:
                raise InputError(f"{where}: {cell.where}: {e}") from None
            for key, value in settings.items():
                if key in must_exist and not Path(value).exists():
                    raise MissingWeightsError(f"{where}: {cell.where}.{key}: {value} not found")
            for key, value in cfg.to_dict().items():
                if isinstance(value, str) and value.startswith("metric:"):
                    _check_metric(value.removeprefix("metric:"), None, device, f"{where}: {cell.where}.{key}")
            if getattr(cfg, "prompts", None):
                try:
                    load_prompts(cfg.prompts, cfg.prompt_limit)
                except InputError as e:
                    raise InputError(f"{where}: {cell.where}.prompts: {e}") from None
            cp.settings, cp.trainer, cp.config = settings, cls, cfg
        elif cell.method == "external":
            _check_external(cp, bb_cls, out, where)
        plans.append(cp)
    prompts, info = _load_generation_prompts(recipe, out)
    del torch
    return Plan(recipe=recipe, out=out, device=device, model_source=source, model_identity=identity, cells=plans,
                prompts=prompts, prompt_info=info, metrics=metrics,
                inputs={n: recipe.input_specs[n] for n in order}, input_values=values, random_model=random_seed)


def _source(value: str, out: Path) -> str:
    """A recipe's ``hub:<id>`` or path as what the loaders take (a hub id or an absolute folder)."""
    return value.removeprefix("hub:") if value.startswith("hub:") else str(resolve_path(value, out))


def _check_external(cp: CellPlan, bb_cls, out: Path, where: str) -> None:
    """A released checkpoint's parts exist and are in a layout we load (reads only; a hub id must be
    in the local cache when HF_HUB_OFFLINE is set). Errors name the cell's field."""
    from spobench.models.backbones.lora_files import lora_file, read_lora
    from spobench.core.errors import SpobenchError

    cell = cp.spec

    def check(key: str) -> None:
        value = getattr(cell, key)
        if key == "model":
            cp.model = _source(value, out)
            folder, _, _ = bb_cls._resolve(cp.model)
            bb_cls.check_folder(folder, cp.model, skip=tuple(k for k in ("unet", "vae") if getattr(cell, k)))
        elif key in ("unet", "vae"):
            if not hasattr(bb_cls, "resolve_component"):
                raise InputError(f"the {bb_cls.name} backbone takes no released {key}")
            setattr(cp, key, _source(value, out))
            bb_cls.resolve_component(key, getattr(cp, key))
        elif value.startswith("hub:"):  # lora
            cp.lora = bb_cls.resolve_lora(value)
        else:
            cp.lora = lora_file(resolve_path(value, out))
        if key == "lora":
            read_lora(cp.lora, bb_cls.pipeline_class)  # readable, finite, a UNet LoRA in a known layout

    for key in ("model", "unet", "vae", "lora"):
        if getattr(cell, key):
            try:
                check(key)
            except SpobenchError as e:
                raise type(e)(f"{where}: cells.{cell.id}.{key}: {e}") from None


def _first_difference(a: Any, b: Any, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else k)
            if d:
                return d
        return None
    return None if a == b else f"{path}: {a!r} -> {b!r}"


def check_resume(plan: Plan, stored: dict) -> None:
    """A resumed run must be the same run: backbone, model, generation, inputs, and the settings of
    every cell it already has."""
    new = json.loads(json.dumps(plan.identity(), default=str))
    for key in ("recipe", "backbone", "model", "generate", "prompts"):
        d = _first_difference(stored.get(key), new.get(key), key)
        if d:
            raise InputError(f"{plan.out}: the recipe changed since this run started ({d}); use a new --out")
    for name, spec in new["inputs"].items():
        if name in stored.get("inputs", {}):
            d = _first_difference(stored["inputs"][name], spec, f"inputs.{name}")
            if d:
                raise InputError(f"{plan.out}: input {name!r} changed since this run started ({d}); use a new --out "
                                 f"or delete {plan.out / 'inputs' / name}")
    for cid, cell in new["cells"].items():
        if cid in stored.get("cells", {}):
            d = _first_difference(stored["cells"][cid], cell, f"cells.{cid}")
            if d:
                raise InputError(f"{plan.out}: cell {cid!r} changed since this run started ({d}); use a new --out "
                                 f"or delete {plan.out / 'cells' / cid}")
