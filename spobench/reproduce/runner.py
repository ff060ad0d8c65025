"""``spobench reproduce``: run a recipe (a paper table) end to end and write its report.

Stages, in order:

1. **Check everything first** (:func:`spobench.reproduce.plan.preflight`), writing nothing: every cell's trainer exists
   (``not implemented yet: trainer 'x'`` otherwise) and accepts its settings, the backbone's weights,
   every metric's weights, every input that must already be on disk, every prompt set. A run that
   would fail after hours of training fails here instead, with the backbone's / metric's own error.
2. **Inputs** (``<out>/inputs/<name>``): tiny-world pairs, a tiny CLIP, SPMs trained with
   :func:`spobench.trainers.spm.train_spm`; ``random:<seed>`` tiny weights. Each is reused once done.
3. **Train** every cell (``<out>/cells/<id>/train``): the typed config preflight built goes
   straight into ``Trainer.run``, the path ``spobench train`` takes after parsing its options
   (same checkpoints, logs). A cell is done when its final LoRA and the done-marker
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
from dataclasses import asdict
from pathlib import Path

from spobench.core import outdir
from spobench.core.errors import InputError
from spobench.core.io import atomic_dir, atomic_write_json, provenance
from spobench.reproduce.plan import CellPlan, Plan, _first_difference, check_resume, preflight
from spobench.reproduce.paths import resolve_path
from spobench.reproduce.recipe import load_recipe
from spobench.reproduce.schema import SPMInput, ToyClipInput, ToyPairsInput

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
# running
# =====================================================================================================
def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


class Runner:
    def __init__(self, plan: Plan, console=None):
        from spobench.core.progress import make_console

        self.plan = plan
        self.console = console or make_console(stderr=True)
        self.stage = 0
        self.n_stages = 0

    # -- helpers -------------------------------------------------------------------------------------
    def say(self, what: str) -> None:
        self.stage += 1
        from rich.rule import Rule

        # a log's console is WIDE columns (core.progress): the rule stays a terminal's width
        self.console.print(Rule(f"[bold][{self.stage}/{self.n_stages}][/] {what}", align="left"),
                           width=min(self.console.width, 100))

    def dtype(self):
        from spobench.core.dtypes import torch_dtype

        return torch_dtype(self.plan.recipe.generate.dtype, "generate.dtype")

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
            from spobench.core.progress import status

            with atomic_dir(out) as tmp, status(self.console, f"drawing {spec.n} tiny-world pairs"):
                make_dataset(tmp, n_pairs=spec.n, seed=spec.seed, extra_generator=extra, p_extra=spec.base_samples)
        elif isinstance(spec, ToyClipInput):
            if (out / "config.json").exists():
                return info | {"reused": True}
            from spobench.models.backbones.tiny import tiny_tokenizer
            from spobench.toyworld.tiny_clip import make_tiny_clip_folder

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
            from spobench.core.checkpoint import latest_checkpoint
            from spobench.core.progress import Progress

            resume = latest_checkpoint(out) is not None
            bb = self.load_backbone()
            with Progress(f"training SPM {name}", total=spec.steps, unit="step", console=self.console) as bar:
                result = train_spm(bb, ref(spec.pairs), ref(spec.init), out, cfg, resume=resume, overwrite=not resume,
                                   progress=lambda rec: bar.update(completed=rec["step"],
                                                                   info=f"loss {rec['loss']:.4f}"))
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
        cfg = copy.deepcopy(cell.config)  # the typed config preflight built, straight into the trainer
        if self.plan.compile:  # the same math up to rounding: not part of the cell's settings or done-marker
            cfg.compile = True
        resume = cell.train_dir.exists() and any(cell.train_dir.iterdir())
        summary = cell.trainer.run(cfg, backbone=self.plan.recipe.backbone, model=self.plan.model_source,
                                   out=cell.train_dir, resume=resume, overwrite=False, console=self.console)
        info = {"settings": json.loads(json.dumps(cell.settings, default=str)), "complete": summary["complete"],
                "progress": summary["progress"], "counters": summary["counters"],
                "config": summary["config"], "wall_s": round(time.perf_counter() - t0, 3),
                "resumed": resume, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_json(marker, info)
        return info | {"reused": False}

    def generate(self, cell: CellPlan) -> dict:
        from spobench.core.progress import Progress
        from spobench.engine.rollout import SamplerConfig
        from spobench.data.manifest import read_manifest
        from spobench.eval.generate import generate

        g = self.plan.recipe.generate
        n = len(self.plan.prompts) * g.images_per_prompt
        want = {"spec": self._gen_spec(), "n": n}
        done = _read_json(cell.dir / GEN_DONE)
        if done is not None and done.get("spec") == want["spec"] and len(read_manifest(cell.images)) == n:
            return done | {"reused": True}
        t0 = time.perf_counter()
        bb = self.load_backbone(cell.model, cell.lora_dir, unet=cell.unet, vae=cell.vae)
        sampler = SamplerConfig(num_steps=g.steps, guidance_scale=g.cfg, eta=g.eta, resolution=g.resolution)
        with Progress(f"generating {cell.spec.label}", total=n, unit="image", console=self.console) as bar:
            generate(bb, list(self.plan.prompts), cell.images, seed=g.seed, images_per_prompt=g.images_per_prompt,
                     sampler=sampler, batch_size=g.batch_size, lora=str(cell.lora_dir) if cell.lora_dir else None,
                     resume=True, progress=lambda d, t: bar.update(completed=d, total=t))
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
        from spobench.core.progress import status

        with status(self.console, f"scoring {cell.spec.label} with {', '.join(names)}"):
            results = evaluate_folder(cell.images, factories, out=cell.dir / RESULTS, device=self.plan.device,
                                      metadata=metadata)
        info = {"metrics": names, "wall_s": round(time.perf_counter() - t0, 3), "generated": gen.get("wall_s")}
        atomic_write_json(cell.dir / EVAL_DONE, info)
        return results, info | {"reused": False}


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


HOW = "pass --resume to continue it (finished cells are reused) or choose another --out"


def reproduce(recipe_ref: str | Path, backbone: str | None = None, out: str | Path | None = None,
              resume: bool = False, device: str = "auto", cells: list[str] | None = None, console=None,
              compile: bool = False, released: bool = False, limit: int | None = None) -> dict:
    """Run a recipe end to end; returns the report data (also ``<out>/report.json``).

    ``released``: the recipe's ``[released]`` cells (published checkpoints, evaluated only) instead of
    its trained ones; ``backbone`` defaults to theirs (else ``tiny``). ``limit``: generate and score
    only the first N prompts (a quick check; the report says so)."""
    from spobench.core.progress import make_console

    console = console or make_console(stderr=True)
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
    outdir.check(out, resume=resume, how=HOW, needs=PLAN, command="reproduce")
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
            cmp = {m: {k: v.get(k) for k in ("win_rate", "win_rate_ci95", "mean_diff", "mean_diff_ci95",
                                                   "sign_test_p", "higher_is_better")}
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
    from spobench.core.catalog import BACKBONES
    from spobench.engine.rollout import sampler_name

    g = asdict(r.generate)
    return {
        "recipe": {"name": r.name, "title": r.title, "paper_table": r.paper_table, "file": r.file,
                   "description": r.description, "budget": r.budget, "released": r.is_released},
        "backbone": {"name": r.backbone, "model": plan.model_identity},
        "generate": g | {"prompts": plan.prompt_info,
                         "sampler": sampler_name(BACKBONES.get(r.backbone).family, r.generate.eta)},
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
