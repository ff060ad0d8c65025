"""``spobench reproduce``: run a recipe (a paper table) end to end and write its report.

Stages, in order:

1. **Check everything first** (:func:`preflight`), writing nothing: every cell's trainer exists
   (``not implemented yet: trainer 'x'`` otherwise) and accepts its settings, the backbone's weights,
   every metric's weights, every input that must already be on disk, every prompt set. A run that
   would fail after hours of training fails here instead, with the backbone's / metric's own error.
2. **Inputs** (``<out>/inputs/<name>``): tiny-world pairs, a tiny CLIP, SPMs trained with
   :func:`spobench.trainers.spm.train_spm`; ``random:<seed>`` tiny weights. Each is reused once done.
3. **Train** every cell (``<out>/cells/<id>/train``) with its trainer, exactly as ``spobench train``
   does (same configs, checkpoints, logs). A cell is done when its final LoRA and the done-marker
   ``reproduce-done.json`` exist; ``--resume`` reuses done cells and continues unfinished ones from
   their last checkpoint.
4. **Generate** (``<out>/cells/<id>/images``): the same prompts and seeds for every cell (DDIM,
   the recipe's steps / CFG), via :func:`spobench.eval.generate.generate`.
5. **Evaluate** (``results.json``) with the recipe's metrics (bootstrap CIs, per-tag means) and
   **compare** every cell with the reference cell (per-prompt win rates, ``compare.json``).
6. **Report** (:mod:`spobench.eval.report`): ``report.md``, ``report.json``, ``grid.png``, plots,
   ``report.html``.

``--released`` runs the recipe's ``[released]`` cells instead: the paper's rows from the published
checkpoints (full models, UNet-only fine-tunes, LoRAs, VAE overrides; folders or hub ids from the
local Hugging Face cache), evaluated only, so stage 3 is empty; preflight resolves every part (and
reads every LoRA) before anything is written. ``--limit N`` scores the first N prompts only.

``plan.json`` records what the run is (backbone, model, generation settings, every cell's
resolved settings); ``--resume`` refuses a recipe that changed under a finished cell.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from spobench.core import outdir
from spobench.core.errors import InputError, MissingWeightsError, NotImplementedYet
from spobench.core.io import atomic_dir, atomic_write_json, provenance
from spobench.reproduce.recipe import (
    CellSpec,
    MetricInput,
    PathInput,
    Recipe,
    SPMInput,
    ToyClipInput,
    ToyPairsInput,
    cell_settings,
    input_order,
    is_pathlike,
    load_recipe,
    resolve_path,
    validate_settings,
)

PLAN = "plan.json"
DONE = "reproduce-done.json"
GEN_DONE = "generate-done.json"
EVAL_DONE = "evaluate-done.json"
RESULTS = "results.json"
COMPARE = "compare.json"


# =====================================================================================================
# finding a recipe
# =====================================================================================================
def find_recipe(ref: str | Path) -> Path:
    """A recipe name (``spobench ls recipes``) or the path of a recipe file."""
    p = Path(ref)
    if p.suffix == ".toml" or p.exists():
        if not p.is_file():
            raise InputError(f"{p}: recipe file not found")
        return p
    from spobench.core import catalog

    return Path(catalog.recipes().get(str(ref)))


# =====================================================================================================
# the plan
# =====================================================================================================
@dataclass
class CellPlan:
    spec: CellSpec
    dir: Path
    settings: dict = field(default_factory=dict)  # resolved trainer settings (references replaced)
    trainer: Any = None  # the trainer class
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
    if model == "default":
        if name == "tiny":  # pinned now: a model shipped while the run goes on must not mix into it
            from spobench.models.backbones.tiny import PRETRAINED_DIR

            if PRETRAINED_DIR.is_dir():
                bb_cls.check_folder(PRETRAINED_DIR)
                return str(PRETRAINED_DIR), f"shipped tiny-base (unet sha256 {_unet_sha(PRETRAINED_DIR)})", None
            return None, "tiny-random-seed0 (no shipped tiny-base: TinyBackbone.build(seed=0))", 0
        source = bb_cls.default_source
    elif model.startswith("hub:"):
        source = model.removeprefix("hub:")
    else:
        source = str(resolve_path(model, out))
    folder, model_id, revision = bb_cls._resolve(source)  # the same resolution load() does
    bb_cls.check_folder(folder, source)
    identity = f"{model_id}@{revision}" if revision else model_id
    if name == "tiny":
        identity += f" (unet sha256 {_unet_sha(folder)})"
    return source, identity, None


def _unet_sha(folder: Path) -> str:
    """A short hash of a tiny model's UNet weights (4 MB), so that a resumed run notices new weights."""
    import hashlib

    files = sorted((Path(folder) / "unet").glob("*.safetensors"))
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
    from spobench.core import catalog
    from spobench.reproduce.recipe import is_pathlike as pathlike

    g = recipe.generate
    where = f"{recipe.file} [{recipe.backbone}]: generate.prompt_set"
    if pathlike(g.prompt_set):
        from spobench.data.prompts import load_prompt_file

        try:
            items = load_prompt_file(resolve_path(g.prompt_set, out))
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
        info = {"name": g.prompt_set}
    else:
        try:
            items = catalog.PROMPT_SETS.get(g.prompt_set)()
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
        info = {"name": g.prompt_set}
    if hasattr(items, "info"):
        info = items.info()
    if g.limit is not None:
        items = items.subset(range(min(g.limit, len(items))), f"first{g.limit}") if hasattr(items, "subset") \
            else list(items)[:g.limit]
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
    from spobench.trainers.base import load_prompts

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
        elif isinstance(spec, (ToyPairsInput, ToyClipInput)) and recipe.backbone != "tiny":
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
            cfg = cls.Config.from_dict(settings, source=f"{where}: {cell.where}")
            try:
                cfg = cls.prepare_config(copy.deepcopy(cfg), recipe.backbone, bb_cls.defaults)
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
            cp.settings, cp.trainer = settings, cls
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
    from spobench.models.backbones.base import lora_file, read_lora
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
            hub_id = value.removeprefix("hub:")
            folder, _, _ = bb_cls._from_hub(hub_id, patterns=["*.safetensors", "*.json"],
                                            hint=f'hf download {hub_id} --include "*.safetensors" "*.json"')
            cp.lora = lora_file(folder)
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


# =====================================================================================================
# running
# =====================================================================================================
def _toml_literal(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


class Runner:
    def __init__(self, plan: Plan, console=None, log: Callable[[str], None] | None = None):
        from rich.console import Console

        self.plan = plan
        self.console = console or Console(stderr=True)
        self.stage = 0
        self.n_stages = 0

    # -- helpers -------------------------------------------------------------------------------------
    def say(self, what: str) -> None:
        self.stage += 1
        self.console.rule(f"[bold][{self.stage}/{self.n_stages}][/] {what}", align="left")

    def dtype(self):
        import torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.plan.recipe.generate.dtype]

    def load_backbone(self, model: str | None = None, lora: Path | None = None, unet: str | None = None,
                      vae: str | None = None):
        from spobench.models.backbones import load_backbone

        bb = load_backbone(self.plan.recipe.backbone, model or self.plan.model_source, device=self.plan.device,
                           dtype=self.dtype(), unet=unet, vae=vae)
        if lora is not None:
            bb.load_lora(lora)
        return bb

    # -- inputs --------------------------------------------------------------------------------------
    def prepare_model(self) -> None:
        seed = self.plan.random_model
        if seed is None:
            return
        folder = self.plan.out / "inputs" / f"model-random-{seed}"
        if not (folder / "model_index.json").exists():
            from spobench.models.backbones.testing import make_tiny_folder

            with atomic_dir(folder) as tmp:
                make_tiny_folder(tmp, seed=seed)
        self.plan.model_source = str(folder)

    def prepare_input(self, name: str, spec) -> dict:
        out = self.plan.out / "inputs" / name
        t0 = time.perf_counter()
        info: dict = {"kind": spec.kind}
        if isinstance(spec, ToyPairsInput):
            if (out / "stats.json").exists():
                return info | {"reused": True}
            from spobench.toyworld.pairs import backbone_generator, make_dataset

            extra = backbone_generator(self.load_backbone()) if spec.base_samples > 0 else None
            with atomic_dir(out) as tmp, self.console.status(f"drawing {spec.n} tiny-world pairs"):
                make_dataset(tmp, n_pairs=spec.n, seed=spec.seed, extra_generator=extra, p_extra=spec.base_samples)
        elif isinstance(spec, ToyClipInput):
            if (out / "config.json").exists():
                return info | {"reused": True}
            from spobench.models.backbones.tiny import tiny_tokenizer
            from spobench.models.spm import make_tiny_clip_folder

            with atomic_dir(out) as tmp:
                make_tiny_clip_folder(tmp, seed=spec.seed, image_size=32, patch_size=spec.patch, hidden=spec.hidden,
                                      layers=spec.layers, heads=4, projection_dim=32,
                                      tokenizer=tiny_tokenizer(model_max_length=77))
        elif isinstance(spec, SPMInput):
            done = _read_json(out / "metrics.json")
            if done is not None and (out / "spm").exists():
                return info | {"reused": True, "eval": done.get("eval"), "wall_s": done.get("wall_s")}
            from spobench.trainers.spm import SPMTrainConfig, train_spm

            def ref(v: str) -> str:
                return self.plan.input_values[v[6:]] if v.startswith("input:") else str(resolve_path(v, self.plan.out))

            cfg = SPMTrainConfig(steps=spec.steps, batch_size=spec.batch_size, lr=spec.lr, seed=spec.seed,
                                 no_step=spec.no_step,
                                 processor=str(resolve_path(spec.processor, self.plan.out)) if spec.processor else None)
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
                TimeRemainingColumn

            from spobench.core.checkpoint import latest_checkpoint

            resume = latest_checkpoint(out) is not None
            bb = self.load_backbone()
            with Progress(f"training SPM {name}", BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                          TimeElapsedColumn(), TimeRemainingColumn(), console=self.console) as bar:
                task = bar.add_task("spm", total=spec.steps, loss="-")
                result = train_spm(bb, ref(spec.pairs), ref(spec.init), out, cfg, resume=resume, overwrite=not resume,
                                   progress=lambda rec: bar.update(task, completed=rec["step"],
                                                                   loss=f"{rec['loss']:.4f}"))
            info |= {"eval": result.get("eval"), "wall_s": result.get("wall_s")}
        return info | {"reused": False, "wall_s": info.get("wall_s") or round(time.perf_counter() - t0, 2)}

    # -- cells ---------------------------------------------------------------------------------------
    def train(self, cell: CellPlan) -> dict:
        marker = cell.train_dir / DONE
        done = _read_json(marker)
        if done is not None and (cell.train_dir / "lora").exists():
            if done.get("settings") != json.loads(json.dumps(cell.settings, default=str)):
                raise InputError(f"{cell.train_dir}: trained with other settings "
                                 f"({_first_difference(done.get('settings'), cell.settings)}); use a new --out or "
                                 f"delete {cell.dir}")
            self.console.print(f"reusing the finished cell {cell.id!r} ({cell.train_dir})")
            return done | {"reused": True}
        t0 = time.perf_counter()
        overrides = [f"{k}={_toml_literal(v)}" for k, v in cell.settings.items()]
        if self.plan.compile:  # the same math up to rounding: not part of the cell's settings or done-marker
            overrides.append("compile=true")
        resume = cell.train_dir.exists() and any(cell.train_dir.iterdir())
        summary = cell.trainer.cli(backbone=self.plan.recipe.backbone, model=self.plan.model_source,
                                   out=cell.train_dir, config=None, overrides=overrides, resume=resume,
                                   overwrite=False, console=self.console)
        info = {"settings": json.loads(json.dumps(cell.settings, default=str)), "complete": summary["complete"],
                "progress": summary["progress"], "counters": summary["counters"],
                "config": summary["config"], "wall_s": round(time.perf_counter() - t0, 3),
                "resumed": resume, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_json(marker, info)
        return info | {"reused": False}

    def generate(self, cell: CellPlan) -> dict:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

        from spobench.engine.rollout import SamplerConfig
        from spobench.eval.generate import generate, read_manifest

        g = self.plan.recipe.generate
        n = len(self.plan.prompts) * g.images_per_prompt
        want = {"spec": self._gen_spec(), "n": n}
        done = _read_json(cell.dir / GEN_DONE)
        if done is not None and done.get("spec") == want["spec"] and len(read_manifest(cell.images)) == n:
            return done | {"reused": True}
        t0 = time.perf_counter()
        bb = self.load_backbone(cell.model, cell.lora_dir, unet=cell.unet, vae=cell.vae)
        sampler = SamplerConfig(num_steps=g.steps, guidance_scale=g.cfg, eta=g.eta, resolution=g.resolution)
        with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TimeRemainingColumn(), console=self.console) as bar:
            task = bar.add_task(f"generating {cell.spec.label}", total=n)
            generate(bb, list(self.plan.prompts), cell.images, seed=g.seed, images_per_prompt=g.images_per_prompt,
                     sampler=sampler, batch_size=g.batch_size, lora=str(cell.lora_dir) if cell.lora_dir else None,
                     resume=True, progress=lambda d, t: bar.update(task, completed=d, total=t))
        info = want | {"wall_s": round(time.perf_counter() - t0, 3)}
        atomic_write_json(cell.dir / GEN_DONE, info)
        return info | {"reused": False}

    def _gen_spec(self) -> dict:
        g = asdict(self.plan.recipe.generate)
        g.pop("batch_size")
        return g | {"prompts": self.plan.prompt_info.get("version")}

    def evaluate(self, cell: CellPlan) -> tuple[dict, dict]:
        from spobench.eval.evaluate import evaluate_folder

        names = list(self.plan.metrics)
        done = _read_json(cell.dir / EVAL_DONE)
        results = _read_json(cell.dir / RESULTS)
        gen = _read_json(cell.dir / GEN_DONE) or {}
        if (done is not None and results is not None and done.get("metrics") == names
                and done.get("generated") == gen.get("wall_s")):
            return results, done | {"reused": True}
        t0 = time.perf_counter()
        metadata = None
        meta = getattr(self.plan.prompts, "metadata", None)
        if meta is not None:
            ipp = self.plan.recipe.generate.images_per_prompt
            metadata = [m for m in meta for _ in range(ipp)]
        factories = {m: (lambda inst: (lambda weights=None, device="cpu": inst))(self.plan.metrics[m]) for m in names}
        with self.console.status(f"scoring {cell.spec.label} with {', '.join(names)}"):
            results = evaluate_folder(cell.images, factories, out=cell.dir / RESULTS, device=self.plan.device,
                                      metadata=metadata)
        info = {"metrics": names, "wall_s": round(time.perf_counter() - t0, 3), "generated": gen.get("wall_s")}
        atomic_write_json(cell.dir / EVAL_DONE, info)
        return results, info | {"reused": False}


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


HOW = "pass --resume to continue it (finished cells are reused) or choose another --out"


def check_out(out: Path, resume: bool) -> None:
    outdir.check(out, resume=resume, how=HOW)
    if resume and outdir.entries(out) and not (out / PLAN).exists():
        raise InputError(f"{out}: not a `spobench reproduce` run folder (no {PLAN}); choose another --out")


def reproduce(recipe_ref: str | Path, backbone: str | None = None, out: str | Path | None = None,
              resume: bool = False, device: str = "auto", cells: list[str] | None = None, console=None,
              compile: bool = False, released: bool = False, limit: int | None = None) -> dict:
    """Run a recipe end to end; returns the report data (also ``<out>/report.json``).

    ``released``: the recipe's ``[released]`` cells (published checkpoints, evaluated only) instead of
    its trained ones; ``backbone`` defaults to theirs (else ``tiny``). ``limit``: generate and score
    only the first N prompts (a quick check; the report says so)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(stderr=True)
    t_start = time.perf_counter()
    path = find_recipe(recipe_ref)
    if backbone is None:
        from spobench.reproduce.recipe import released_backbone

        backbone = released_backbone(path) if released else "tiny"
    recipe = load_recipe(path, backbone, released=released)
    if limit is not None:
        if limit < 1:
            raise InputError(f"--limit: must be >= 1 (got {limit})")
        recipe.generate.limit = min(limit, recipe.generate.limit or limit)
    chosen = recipe.cell_list
    if cells:
        ids = [c.id for c in recipe.cell_list]
        bad = [c for c in cells if c not in ids]
        if bad:
            raise InputError(f"--cells: {bad[0]!r} is not a cell of {recipe.name} (cells: {', '.join(ids)})")
        chosen = [c for c in recipe.cell_list if c.id in cells]
    out = Path(out) if out is not None else Path("runs") / f"{recipe.name}-{backbone}{'-released' if released else ''}"
    check_out(out, resume)
    device = _default_device() if device == "auto" else device
    plan = preflight(recipe, chosen, out, device)
    plan.compile = compile
    stored = _read_json(out / PLAN) if resume else None
    if stored is not None:
        check_resume(plan, stored)

    # -- nothing has been written so far ------------------------------------------------------------
    with outdir.claim(out, command=f"reproduce {recipe.name}", resume=resume, how=HOW,
                      keep=lambda: (out / PLAN).exists()):  # from the plan on, a failed run is resumable
        return _run(recipe, backbone, path, out, plan, stored, console, t_start)


def _run(recipe, backbone: str, path: Path, out: Path, plan: Plan, stored: dict | None, console, t_start: float) -> dict:
    """The stages of :func:`reproduce` once its --out is claimed."""
    from rich.table import Table

    identity = json.loads(json.dumps(plan.identity(), default=str))
    if stored is not None:  # keep cells of earlier sessions that this one does not run
        identity["cells"] = stored.get("cells", {}) | identity["cells"]
        identity["inputs"] = stored.get("inputs", {}) | identity["inputs"]
    atomic_write_json(out / PLAN, identity | {"recipe_file": str(path), **provenance()})

    runner = Runner(plan, console)
    table = Table(title=f"{recipe.name} on {backbone}: {recipe.title}", title_justify="left", show_edge=False)
    for col in ("cell", "method", "status"):
        table.add_column(col)
    for c in plan.cells:
        status = "done" if (c.train_dir / DONE).exists() else ("-" if not c.spec.trained else
                                                               "partial" if c.train_dir.exists() else "to train")
        table.add_row(c.spec.label, c.spec.method, status)
    console.print(table)
    console.print(f"model: {plan.model_identity}; prompts: {plan.prompt_info.get('name')} ({len(plan.prompts)}); "
                  f"out: {out}", highlight=False)
    runner.n_stages = len(plan.inputs) + sum(c.spec.trained for c in plan.cells) + 2 * len(plan.cells) + 1

    runner.prepare_model()
    inputs = {}
    for name, spec in plan.inputs.items():
        runner.say(f"input {name} ({spec.kind})")
        inputs[name] = runner.prepare_input(name, spec)
    train_info: dict[str, dict] = {}
    for c in plan.cells:
        if c.spec.trained:
            runner.say(f"train {c.spec.label} ({c.spec.method})")
            train_info[c.id] = runner.train(c)
    gen_info, eval_info, results = {}, {}, {}
    for c in plan.cells:
        runner.say(f"generate {c.spec.label}")
        gen_info[c.id] = runner.generate(c)
        runner.say(f"evaluate {c.spec.label}")
        results[c.id], eval_info[c.id] = runner.evaluate(c)
    compares = {}
    ref = recipe.evaluate.compare_to
    ref_cell = next((c for c in plan.cells if c.id == ref), None)
    if ref_cell is not None:
        from spobench.eval.compare import compare_results

        for c in plan.cells:
            if c.id != ref:
                compares[c.id] = dict(compare_results(c.dir / RESULTS, ref_cell.dir / RESULTS, out=c.dir / COMPARE))
    runner.say("report")
    data = report_data(plan, inputs, train_info, gen_info, eval_info, results, compares,
                       wall_s=time.perf_counter() - t_start)
    from spobench.eval.report import write_report

    files = write_report(out, data)
    console.print(f"wrote {', '.join(sorted(files))} to {out}", highlight=False)
    return data


def report_data(plan: Plan, inputs: dict, train_info: dict, gen_info: dict, eval_info: dict, results: dict,
                compares: dict, wall_s: float) -> dict:
    r = plan.recipe
    cells = []
    for c in plan.cells:
        res = results[c.id]
        metrics = {m: {k: res["metrics"][m].get(k) for k in ("mean", "std", "ci95", "per_tag", "overall")}
                   for m in plan.metrics if m in res["metrics"]}
        t = train_info.get(c.id)
        train = None
        if t is not None:
            train = {"complete": t.get("complete"), "reused": t.get("reused"), "wall_s": t.get("wall_s"),
                     "rounds": (t.get("progress") or {}).get("rounds_done"),
                     "steps": (t.get("progress") or {}).get("step"), "counters": t.get("counters", {}),
                     "settings": t.get("settings"), "log": str((c.train_dir / "log.jsonl").relative_to(plan.out))}
        cmp = None
        if c.id in compares:
            cmp = {m: {k: v.get(k) for k in ("win_rate", "win_rate_ci95", "mean_diff", "mean_diff_ci95", "sign_test_p")}
                   for m, v in compares[c.id]["metrics"].items()}
        cells.append({
            "id": c.id, "label": c.spec.label, "method": c.spec.method, "paper_row": c.spec.paper_row,
            "checkpoint": {k: v for k, v in (("model", c.model), ("unet", c.unet), ("vae", c.vae),
                                             ("lora", str(c.lora) if c.lora else None)) if v} or None,
            "ablation_value": c.spec.ablation_value, "settings": c.settings,
            "images": str(c.images.relative_to(plan.out)), "n_images": res.get("n_images"),
            "train": train,
            "generate": {"wall_s": gen_info[c.id].get("wall_s"), "reused": gen_info[c.id].get("reused")},
            "evaluate": {"wall_s": eval_info[c.id].get("wall_s"), "reused": eval_info[c.id].get("reused")},
            "metrics": metrics, "compare": cmp,
        })
    g = asdict(r.generate)
    return {
        "recipe": {"name": r.name, "title": r.title, "paper_table": r.paper_table, "file": r.file,
                   "description": r.description, "budget": r.budget, "released": r.is_released},
        "backbone": {"name": r.backbone, "model": plan.model_identity},
        "generate": g | {"prompts": plan.prompt_info},
        "metrics": list(plan.metrics),
        "compare_to": r.evaluate.compare_to if r.evaluate.compare_to in {c.id for c in plan.cells} else None,
        "cells": cells,
        "inputs": inputs,
        "ablation": None if r.ablation is None else {
            "param": r.ablation.param, "setting": r.ablation.setting, "values": r.ablation.values,
            "labels": [r.ablation.label_of(i) for i in range(len(r.ablation.values))], "chosen": r.ablation.chosen},
        "paper": None if r.paper is None else asdict(r.paper),
        "report": asdict(r.report),
        "wall_s": round(wall_s, 2),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **provenance(),
    }
