"""GenEval's decision rules as pure functions (no torch, no model), and its prompt metadata.

Transcribed from GenEval's ``evaluation/evaluate_images.py`` (djghosh13/geneval, MIT) and
``evaluation/summary_scores.py``:

* detections of a class are kept when their score is ``> 0.3`` (``> 0.9`` for prompts tagged
  ``counting``), compared in float32 as GenEval's detector scores are, most confident first (numpy's
  default argsort, as GenEval), at most 16 per class (``max_objects``); GenEval's optional
  same-class overlap filter is off by default (``max_overlap=1.0``) and stays off here;
* every ``include`` clause needs ``count`` detections of its class (the most confident ``count``
  are the ones checked further); a ``color`` clause needs that many of them classified as the
  colour by CLIP zero-shot over GenEval's 10 colours and 3 templates, each object's mask pasted
  onto a grey ``#999`` canvas and cropped to its box; a ``position`` clause needs every one of them
  to stand in the relation to every object of the clause it points at (``relative_position``:
  centre offset minus ``0.1 * (size_a + size_b)`` per axis, then a direction component ``> 0.5``);
* an ``exclude`` clause fails when ``count`` or more detections of its class are kept;
* an image is correct when every clause holds; a tag's score is the mean over its images and the
  overall score the unweighted mean over the six tags.

The colour classifier is a callable handed in by the caller (the GenEval plugin runs CLIP), or, for
tests, a colour already stored on each :class:`Detection`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from spobench.core.errors import InputError

# evaluation/object_names.txt: the 80 COCO classes in the detector's class order.
OBJECT_NAMES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

# evaluate_images.py defaults (its --options threshold / counting_threshold / max_objects /
# max_overlap / position_threshold / bgcolor).
THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
NMS_THRESHOLD = 1.0
POSITION_THRESHOLD = 0.1
BGCOLOR = "#999"

METADATA_FILE = Path(__file__).parent / "data" / "geneval_evaluation_metadata.jsonl"


def color_templates(classname: str) -> list[str]:
    """GenEval's three zero-shot templates for one class; ``{c}`` is filled with each colour."""
    return [f"a photo of a {{c}} {classname}", f"a photo of a {{c}}-colored {classname}", "a photo of a {c} object"]


@dataclass
class Detection:
    """One detected object. ``box`` is (x1, y1, x2, y2) in pixels; ``mask`` an (H, W) bool array at
    the image's size (or None); ``color`` a pre-computed colour name (tests; the plugin uses CLIP)."""

    label: str
    box: tuple[float, float, float, float]
    score: float
    mask: np.ndarray | None = None
    color: str | None = None


ColorClassifier = Callable[[Sequence[Detection], str], list[str]]


# -- detections -> objects ----------------------------------------------------------------------

def compute_iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """GenEval's IoU (pixel-inclusive areas, the ``+ 1``), used only when ``max_overlap < 1``."""
    def area(box):
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)

    i_area = area([max(box_a[0], box_b[0]), max(box_a[1], box_b[1]), min(box_a[2], box_b[2]), min(box_a[3], box_b[3])])
    u_area = area(box_a) + area(box_b) - i_area
    return i_area / u_area if u_area else 0


def filter_detections(detections: Iterable[Detection], tag: str, threshold: float = THRESHOLD,
                      counting_threshold: float = COUNTING_THRESHOLD, max_objects: int = MAX_OBJECTS,
                      max_overlap: float = NMS_THRESHOLD) -> dict[str, list[Detection]]:
    """Class name -> kept detections, most confident first (``evaluate_image``'s loop). Classes
    with nothing kept are absent."""
    confidence = threshold if tag != "counting" else counting_threshold
    by_class: dict[str, list[Detection]] = {}
    for det in detections:
        by_class.setdefault(det.label, []).append(det)
    kept: dict[str, list[Detection]] = {}
    for label, dets in by_class.items():
        # float32 like GenEval's mmdet score column: ``bbox[:, 4] > threshold`` compares in float32
        # (numpy casts the Python float down to the array's dtype), so a score of float32(0.3) is NOT
        # kept at threshold 0.3, where a float64 comparison would keep it.
        scores = np.array([d.score for d in dets], dtype=np.float32)
        # GenEval's own call, on float32 like its score column: numpy's default sort. Equal scores then
        # come out in numpy's order, which is NOT stable on float32 with numpy 2's SIMD sorts (x86
        # AVX2/AVX-512), so for exact ties it depends on numpy and the CPU, as GenEval's does
        # (benchmarks/parity/geneval.py: a stable sort disagreed with GenEval on tied detections).
        ordering = np.argsort(scores)[::-1]
        ordering = ordering[scores[ordering] > np.float32(confidence)]
        ordering = ordering[:max_objects].tolist()
        out = []
        while ordering:
            best = ordering.pop(0)
            out.append(dets[best])
            ordering = [o for o in ordering
                        if max_overlap == 1 or compute_iou(dets[best].box, dets[o].box) < max_overlap]
        if out:
            kept[label] = out
    return kept


# -- the relation and the clauses ---------------------------------------------------------------

def relative_position(obj_a: Detection, obj_b: Detection, position_threshold: float = POSITION_THRESHOLD) -> set[str]:
    """Relations of A to B, factoring in object sizes (GenEval's ``relative_position``, in float32
    as GenEval's detector boxes are)."""
    boxes = np.array([obj_a.box, obj_b.box], dtype=np.float32)[:, :4].reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised_offset = np.maximum(np.abs(offset) - position_threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised_offset) < 1e-3):
        return set()
    dx, dy = revised_offset / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def _stored_colors(objs: Sequence[Detection], classname: str) -> list[str]:
    missing = [d for d in objs if d.color is None]
    if missing:
        raise ValueError(f"no colour classifier given and {len(missing)} {classname} detection(s) have no .color")
    return [d.color for d in objs]  # type: ignore[misc]


def evaluate(objects: Mapping[str, Sequence[Detection]], metadata: Mapping, classify_colors: ColorClassifier | None = None,
             position_threshold: float = POSITION_THRESHOLD) -> tuple[bool, str]:
    """GenEval's ``evaluate``: is the image correct for ``metadata``, and why not.

    ``objects`` comes from :func:`filter_detections`. Include clauses are ANDed, exclude clauses
    ORed; colour and position are judged on the most confident ``count`` detections only.
    ``classify_colors(detections, classname)`` returns one colour name per detection.
    """
    classify = classify_colors or _stored_colors
    correct = True
    reason: list[str] = []
    matched_groups: list[Sequence[Detection] | None] = []
    for req in metadata.get("include", []):
        classname = req["class"]
        matched = True
        found_objects = list(objects.get(classname, []))[: req["count"]]
        if len(found_objects) < req["count"]:
            correct = matched = False
            reason.append(f"expected {classname}>={req['count']}, found {len(found_objects)}")
        else:
            if "color" in req:
                colors = classify(found_objects, classname)
                if colors.count(req["color"]) < req["count"]:
                    correct = matched = False
                    reason.append(
                        f"expected {req['color']} {classname}>={req['count']}, found "
                        + f"{colors.count(req['color'])} {req['color']}; and "
                        + ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors)
                    )
            if "position" in req and matched:
                expected_rel, target_group = req["position"]
                if matched_groups[target_group] is None:
                    correct = matched = False
                    reason.append(f"no target for {classname} to be {expected_rel}")
                else:
                    for obj in found_objects:
                        for target_obj in matched_groups[target_group]:
                            true_rels = relative_position(obj, target_obj, position_threshold)
                            if expected_rel not in true_rels:
                                correct = matched = False
                                reason.append(f"expected {classname} {expected_rel} target, found "
                                              + f"{' and '.join(sorted(true_rels))} target")
                                break
                        if not matched:
                            break
        matched_groups.append(found_objects if matched else None)
    for req in metadata.get("exclude", []):
        classname = req["class"]
        if len(objects.get(classname, [])) >= req["count"]:
            correct = False
            reason.append(f"expected {classname}<{req['count']}, found {len(objects[classname])}")
    return correct, "\n".join(reason)


def evaluate_detections(detections: Iterable[Detection], metadata: Mapping, classify_colors: ColorClassifier | None = None,
                        **options) -> tuple[bool, str, dict[str, list[Detection]]]:
    """Threshold the raw detections for ``metadata['tag']`` and judge them: (correct, reason, objects)."""
    keys = ("threshold", "counting_threshold", "max_objects", "max_overlap")
    objects = filter_detections(detections, metadata["tag"], **{k: options[k] for k in keys if k in options})
    correct, reason = evaluate(objects, metadata, classify_colors,
                               options.get("position_threshold", POSITION_THRESHOLD))
    return correct, reason, objects


# -- the colour crop (PIL only) -----------------------------------------------------------------

def color_crop(image, det: Detection, bgcolor: str = BGCOLOR, crop: bool = True):
    """GenEval's ``ImageCrops`` item before CLIP's transform: the object's mask pasted onto a
    ``bgcolor`` canvas (``"original"``: the image itself), cropped to the box."""
    from PIL import Image

    image = image.convert("RGB")
    blank = image.copy() if bgcolor == "original" else Image.new("RGB", image.size, color=bgcolor)
    if det.mask is not None:
        mask = np.asarray(det.mask)
        if tuple(image.size[::-1]) != tuple(mask.shape):
            raise ValueError(f"mask shape {mask.shape} does not match the image ({image.size[1]}, {image.size[0]})")
        image = Image.composite(image, blank, Image.fromarray(mask.astype(bool)))
    if crop:
        image = image.crop(tuple(float(v) for v in det.box[:4]))
    return image


# -- scores -------------------------------------------------------------------------------------

def summarize(results: Iterable[tuple[str, bool | float]]) -> dict:
    """(tag, correct) per image -> per-tag accuracy and the overall score, the unweighted mean over
    tags (``summary_scores.py``)."""
    by_tag: dict[str, list[float]] = {}
    for tag, ok in results:
        by_tag.setdefault(tag, []).append(float(ok))
    per_tag = {t: float(np.mean(v)) for t, v in by_tag.items()}
    return {"per_tag": per_tag, "overall": float(np.mean(list(per_tag.values()))) if per_tag else float("nan"),
            "n_images": sum(len(v) for v in by_tag.values())}


# -- prompt metadata ----------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _metadata() -> tuple[str, ...]:
    return tuple(line for line in METADATA_FILE.read_text().splitlines() if line.strip())


def geneval_metadata() -> list[dict]:
    """GenEval's 553 metadata rows (tag, include/exclude clauses, prompt), in GenEval's order."""
    return [json.loads(line) for line in _metadata()]


def geneval_prompts() -> list[str]:
    """The ``geneval`` prompt set: GenEval's 553 prompts in order (index n = GenEval folder n)."""
    return [row["prompt"] for row in geneval_metadata()]


@lru_cache(maxsize=1)
def _by_prompt() -> dict[str, str]:
    return {json.loads(line)["prompt"]: line for line in _metadata()}


def metadata_for_prompt(prompt: str) -> dict:
    """The metadata row of a GenEval prompt (prompts are unique in GenEval's set)."""
    line = _by_prompt().get(prompt.strip())
    if line is None:
        raise InputError(f"prompt {prompt!r} is not one of GenEval's 553 prompts; GenEval needs its metadata "
                         "(generate with --prompt-set geneval, or pass the metadata rows)")
    return json.loads(line)
