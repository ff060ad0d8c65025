"""Generic preference pairs for the tiny world, in Pick-a-Pic's format, and the tiny prompt sets.

Why: SPO's claim (paper Secs. 1, 3) is that generic preferences (Pick-a-Pic) blend prompt alignment
and layout with aesthetics, so they often disagree with aesthetic-only preference, and that SPO still
learns aesthetics from them. Here both ingredients are known exactly, so that claim can be tested.

Each pair is one training-split prompt and two images from two *different* generators. A generator
is a distribution over images for a prompt: with probability ``p_layout_error`` it draws a layout
error (:func:`spobench.toyworld.render.perturb_scene`), and each of the seven quality knobs is
switched on with probability ``p_spoil`` at a level ~ Beta with mean ``spoil`` (all independent per
image). Every image is then scored by the oracles (from the pixels, not from its knobs): alignment
``A`` in {0, 1} and aesthetic ``Q`` in [0, 10].

The label blends both (a Bradley-Terry annotator)::

    u_i      = w_align * A_i + w_aesth * Q_i / 10          (defaults 0.6 and 0.4)
    P(0 > 1) = sigmoid((u_0 - u_1) / temperature)          (default temperature 0.05)

then, with probability ``label_noise`` (0.1) the drawn winner is flipped, and with probability
``p_tie`` (0.05) the pair is labelled a tie (0.5 / 0.5) instead. Because alignment moves ``u`` by
0.6 and a typical aesthetic gap only by ~0.1, the generic winner is often the better-aligned but
uglier image: ``stats["disagreement_rate"]`` is the fraction of non-tie pairs whose generic winner has
the lower aesthetic score.

Parquet columns (Pick-a-Pic's names and types): ``caption`` (string), ``jpg_0``, ``jpg_1`` (binary
image bytes - PNG, lossless, despite the name, so no JPEG artefacts reach the aesthetic oracle;
``PIL.Image.open`` reads them like Pick-a-Pic's JPEGs), ``label_0``, ``label_1`` (float64: 1/0, 0/1
or 0.5/0.5), ``has_label`` (bool), ``are_different`` (bool: the two images' bytes differ); plus the
analysis columns ``align_0``, ``align_1``, ``aesth_0``, ``aesth_1`` (float64), ``generator_0``,
``generator_1`` (string), ``error_0``, ``error_1`` (string: the layout error or "") and ``seed_0``,
``seed_1`` (int64).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from spobench.core.io import atomic_file, atomic_write_json, atomic_write_text
from spobench.toyworld import grammar, oracle
from spobench.toyworld.render import Knobs, perturb_scene, render

# (prompts, seed) -> one uint8 (H, W, 3) image per prompt, e.g. samples of a tiny base model
ExtraGenerator = Callable[[list, int], list]

PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1", "has_label", "are_different")
ANALYSIS_COLUMNS = ("align_0", "align_1", "aesth_0", "aesth_1", "generator_0", "generator_1",
                    "error_0", "error_1", "seed_0", "seed_1")

# seed salts of the pair set's two random streams (values are part of every shipped data set)
SCENES = 0x5A1B  # the scenes, the generator of each side and each side's image seed
LAYOUT_ERRORS = 0xE77  # per image: whether its generator spoils the layout, and the knobs it draws


@dataclass(frozen=True)
class Generator:
    """A simulated text-to-image model: how often it breaks the layout and how it spoils quality."""

    name: str
    p_layout_error: float
    spoil: float  # mean level of a knob that is on
    p_spoil: float  # probability that each knob is on
    weight: float = 1.0  # how often it is drawn

    def knobs(self, rng: np.random.Generator) -> Knobs:
        vals = {}
        conc = 4.0
        for name in Knobs.names():
            on = rng.random() < self.p_spoil
            level = rng.beta(self.spoil * conc, (1 - self.spoil) * conc) if on else 0.0
            vals[name] = float(np.clip(level, 0.0, 1.0))
        return Knobs(**vals)


DEFAULT_GENERATORS: tuple[Generator, ...] = (
    Generator("careful", p_layout_error=0.10, spoil=0.30, p_spoil=0.30),  # follows prompts, mostly clean
    Generator("artist", p_layout_error=0.50, spoil=0.15, p_spoil=0.15),  # beautiful, loose with prompts
    Generator("literal", p_layout_error=0.05, spoil=0.60, p_spoil=0.65),  # follows prompts, ugly
    Generator("sloppy", p_layout_error=0.45, spoil=0.55, p_spoil=0.55),  # neither
    Generator("average", p_layout_error=0.25, spoil=0.40, p_spoil=0.40),
)


@dataclass(frozen=True)
class LabelModel:
    """The annotator: Bradley-Terry on a blend of alignment and aesthetics (see the module doc)."""

    w_align: float = 0.6
    w_aesth: float = 0.4
    temperature: float = 0.05
    label_noise: float = 0.1
    p_tie: float = 0.05

    def utility(self, align: np.ndarray, aesth: np.ndarray) -> np.ndarray:
        return self.w_align * np.asarray(align) + self.w_aesth * np.asarray(aesth) / 10.0

    def p_first_wins(self, u0: np.ndarray, u1: np.ndarray) -> np.ndarray:
        z = (np.asarray(u0, float) - np.asarray(u1, float)) / self.temperature
        return 0.5 * (1.0 + np.tanh(0.5 * z))  # the logistic function, without overflow


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(img, np.uint8)).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _score(img: np.ndarray, scene: grammar.Scene) -> tuple[float, float]:
    an = oracle.analyze(img)
    ok, _ = oracle.check(an, scene)
    return float(ok), float(np.clip(10.0 - sum(oracle.WEIGHTS[k] * v for k, v in oracle.penalties(an).items()), 0, 10))


def make_pairs(n_pairs: int, seed: int, out_path: str | Path | None = None,
               generators: Sequence[Generator] = DEFAULT_GENERATORS, label_model: LabelModel = LabelModel(),
               extra_generator: ExtraGenerator | None = None, p_extra: float = 0.5, p_unlabeled: float = 0.0,
               size: int = 32, split: str = "train") -> dict:
    """Draw ``n_pairs`` generic preference pairs and write them to ``out_path`` (parquet) if given.

    ``extra_generator(prompts, seed)`` (optional) supplies images for a share ``p_extra`` of the slots
    (generator name "extra"), e.g. samples of a base diffusion model; they are scored by the same
    oracles. ``p_unlabeled`` of the rows get ``has_label=False`` (as some Pick-a-Pic rows; trainers
    must skip them). Deterministic in all arguments. Returns the statistics (also the table under
    the key "table" when no ``out_path`` is given).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if len(generators) < 2:
        raise ValueError("need at least two generators: a pair's images come from different ones")
    rng = np.random.default_rng([seed, SCENES])
    w = np.array([g.weight for g in generators], float)
    w /= w.sum()
    lm = label_model

    scenes, gens, seeds = [], [], []
    for _ in range(n_pairs):
        scenes.append(grammar.sample_scene(rng, split))
        a, b = rng.choice(len(generators), size=2, replace=False, p=w)
        gens.append([generators[a], generators[b]])
        seeds.append([int(rng.integers(2**31)), int(rng.integers(2**31))])
    use_extra = np.zeros((n_pairs, 2), bool)
    if extra_generator is not None:
        use_extra = rng.random((n_pairs, 2)) < p_extra
        use_extra[use_extra.all(1), 1] = False  # never two extra images in one pair: pairs compare generators
    extra_imgs: dict[tuple[int, int], np.ndarray] = {}
    if use_extra.any():
        slots = [tuple(x) for x in np.argwhere(use_extra)]
        outs = extra_generator([grammar.to_prompt(scenes[i]) for i, _ in slots], int(seed))
        if len(outs) != len(slots):
            raise ValueError(f"extra_generator returned {len(outs)} images for {len(slots)} prompts")
        extra_imgs = {s: np.asarray(img, np.uint8) for s, img in zip(slots, outs)}

    cols: dict[str, list] = {c: [] for c in PICKAPIC_COLUMNS + ANALYSIS_COLUMNS}
    flags = []
    for i in range(n_pairs):
        scene = scenes[i]
        imgs, names, errors = [], [], []
        for k in range(2):
            if (i, k) in extra_imgs:
                imgs.append(extra_imgs[(i, k)])
                names.append("extra")
                errors.append("")
                continue
            g = gens[i][k]
            r = np.random.default_rng([seeds[i][k], LAYOUT_ERRORS])
            drawn, err = (perturb_scene(scene, r) if r.random() < g.p_layout_error else (scene, ""))
            imgs.append(render(drawn, g.knobs(r), seeds[i][k], size))
            names.append(g.name)
            errors.append(err)
        (a0, q0), (a1, q1) = _score(imgs[0], scene), _score(imgs[1], scene)
        u0, u1 = lm.utility(a0, q0), lm.utility(a1, q1)
        p0 = float(lm.p_first_wins(u0, u1))
        first = rng.random() < p0
        if rng.random() < lm.label_noise:
            first = not first
        tie = rng.random() < lm.p_tie
        labeled = not (rng.random() < p_unlabeled)
        l0, l1 = (0.5, 0.5) if tie else ((1.0, 0.0) if first else (0.0, 1.0))
        b0, b1 = _png(imgs[0]), _png(imgs[1])
        for c, v in (("caption", grammar.to_prompt(scene)), ("jpg_0", b0), ("jpg_1", b1), ("label_0", l0),
                     ("label_1", l1), ("has_label", labeled), ("are_different", b0 != b1), ("align_0", a0),
                     ("align_1", a1), ("aesth_0", q0), ("aesth_1", q1), ("generator_0", names[0]),
                     ("generator_1", names[1]), ("error_0", errors[0]), ("error_1", errors[1]),
                     ("seed_0", seeds[i][0]), ("seed_1", seeds[i][1])):
            cols[c].append(v)
        flags.append((tie, labeled))

    schema = pa.schema([
        ("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()), ("label_0", pa.float64()),
        ("label_1", pa.float64()), ("has_label", pa.bool_()), ("are_different", pa.bool_()),
        ("align_0", pa.float64()), ("align_1", pa.float64()), ("aesth_0", pa.float64()), ("aesth_1", pa.float64()),
        ("generator_0", pa.string()), ("generator_1", pa.string()), ("error_0", pa.string()),
        ("error_1", pa.string()), ("seed_0", pa.int64()), ("seed_1", pa.int64()),
    ])
    table = pa.table({c: cols[c] for c in schema.names}, schema=schema)
    stats = pair_stats(table)
    stats.update(n_pairs=n_pairs, seed=seed, label_model=asdict(lm), generators=[asdict(g) for g in generators],
                 image_format="PNG", extra_generator=extra_generator is not None,
                 p_extra=p_extra if extra_generator is not None else 0.0)
    if out_path is not None:
        with atomic_file(out_path, "wb") as f:
            pq.write_table(table, f)
    else:
        stats["table"] = table
    return stats


def pair_stats(table) -> dict:
    """Label statistics of a pairs table (pyarrow Table or dict of columns)."""
    col = (lambda c: np.asarray(table.column(c).to_pylist())) if hasattr(table, "column") else \
        (lambda c: np.asarray(table[c]))
    l0, lab = col("label_0").astype(float), col("has_label").astype(bool)
    a0, a1, q0, q1 = (col(c).astype(float) for c in ("align_0", "align_1", "aesth_0", "aesth_1"))
    decided = lab & (l0 != 0.5)
    first = l0 == 1.0
    w_q, l_q = np.where(first, q0, q1), np.where(first, q1, q0)
    w_a, l_a = np.where(first, a0, a1), np.where(first, a1, a0)
    n_dec = int(decided.sum())

    def frac(mask):
        return float(mask[decided].mean()) if n_dec else float("nan")

    gens = np.concatenate([col("generator_0"), col("generator_1")])
    al, ae = np.concatenate([a0, a1]), np.concatenate([q0, q1])
    return {
        "n_rows": len(l0),
        "n_labeled": int(lab.sum()),
        "tie_rate": float((l0[lab] == 0.5).mean()) if lab.any() else float("nan"),
        "first_win_rate": frac(first),
        "disagreement_rate": frac(w_q < l_q),  # generic winner is the uglier image
        "aesthetic_agreement_rate": frac(w_q > l_q),
        "winner_less_aligned_rate": frac(w_a < l_a),
        "align_differs_rate": float((a0 != a1).mean()) if len(a0) else float("nan"),
        "mean_alignment": float(al.mean()) if len(al) else float("nan"),
        "mean_aesthetic": float(ae.mean()) if len(ae) else float("nan"),
        "by_generator": {str(g): {"n": int((gens == g).sum()), "alignment": float(al[gens == g].mean()),
                                  "aesthetic": float(ae[gens == g].mean())} for g in sorted(set(gens.tolist()))},
    }


# -- prompt lists -------------------------------------------------------------------------------------------

def tiny_train_prompts() -> list[str]:
    """The ``tiny-train`` prompt set: 4000 training-split prompts (seed 0), as in the official 4k list."""
    return grammar.train_prompts()


def tiny_val_prompts() -> list[str]:
    """The ``tiny-val`` prompt set: 500 validation-split prompts (disjoint from every training prompt)."""
    return grammar.val_prompts()


def write_prompt_lists(out_dir: str | Path, n_train: int = grammar.TRAIN_SIZE, n_val: int = grammar.VAL_SIZE,
                       train_seed: int = grammar.TRAIN_SEED, val_seed: int = grammar.VAL_SEED) -> dict[str, Path]:
    """Write ``train_prompts.json`` in the official 4k file's format (a JSON list of
    ``{"caption": ..., "trainset_idx": i}``) and ``val_prompts.json`` (a JSON list of strings)."""
    out = Path(out_dir)
    train = grammar.sample_prompts(n_train, train_seed, "train")
    val = grammar.sample_prompts(n_val, val_seed, "val")
    paths = {"train": out / "train_prompts.json", "val": out / "val_prompts.json"}
    atomic_write_text(paths["train"], json.dumps([{"caption": p, "trainset_idx": i} for i, p in enumerate(train)],
                                                 indent=1) + "\n")
    atomic_write_text(paths["val"], json.dumps(val, indent=1) + "\n")
    return paths


def make_dataset(out_dir: str | Path, n_pairs: int = 5000, seed: int = 0, **kw) -> dict:
    """Everything a tiny-world run needs in one folder: pairs.parquet, the prompt lists, stats.json."""
    out = Path(out_dir)
    stats = make_pairs(n_pairs, seed, out / "pairs.parquet", **kw)
    paths = write_prompt_lists(out)
    stats["files"] = {"pairs": "pairs.parquet", "train_prompts": paths["train"].name, "val_prompts": paths["val"].name}
    atomic_write_json(out / "stats.json", stats)
    return stats


def backbone_generator(backbone, num_steps: int = 20, guidance_scale: float = 5.0, batch_size: int = 32):
    """An ``extra_generator`` that samples the given backbone (DDIM, eta=0, one seed per image), so
    that pairs mix base-model samples with simulated generators, as Pick-a-Pic mixes models."""
    import torch

    from spobench.engine.rollout import RolloutEngine, SamplerConfig, make_generators
    from spobench.eval.generate import to_uint8

    engine = RolloutEngine(backbone, SamplerConfig(num_steps=num_steps, guidance_scale=guidance_scale, eta=0.0))

    def generate(prompts, seed):
        out = []
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start:start + batch_size])
            gens = make_generators([seed * 1_000_003 + start + i for i in range(len(chunk))])
            with torch.no_grad():
                x0 = engine.sample(chunk, gens, keep_latents=False).x0
                out.extend(to_uint8(backbone.decode(x0)))
        return out

    return generate
