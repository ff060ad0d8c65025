"""GenEval parity: GenEval's rule code (djghosh13/geneval ``evaluation/evaluate_images.py``:
``evaluate_image`` -> thresholds, ordering, ``evaluate``, ``relative_position``) with a stubbed
detector, vs ``spobench.metrics.geneval_rules.evaluate_detections`` on the same detections.

GenEval is not a package: point ``GENEVAL_SRC`` at a checkout of djghosh13/geneval (the file is
read from there, never copied into spobench). The reference side imports it with stand-ins for what
it loads at import time (mmdet, open_clip, clip_benchmark), and replaces the two model calls:
``inference_detector`` returns the case's detections in mmdet's format (per class an (n, 5) float32
array of x1, y1, x2, y2, score, as mmdet 2.x's ``bbox_results``), and ``color_classification``
returns the case's stored colour per box (the colour CLIP is not rule code). Cases: GenEval's own
metadata rows (``prompts/evaluation_metadata.jsonl``), random float32 detections of the prompt's
classes and of distractors, scores near and exactly at the thresholds (float32(0.3), float32(0.9)).

    GENEVAL_SRC=/path/to/geneval python benchmarks/parity/geneval.py
    (GENEVAL_COMMIT=<sha> names the commit when the folder is not a git checkout)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

METRIC = "geneval"
REFERENCE = "GenEval evaluation/evaluate_images.py rules (stubbed detector)"
REQUIREMENTS = ("numpy", "pandas", "pillow")
N_CASES = 600


def reference_side(work: Path) -> None:
    import types

    import numpy as np

    src = Path(os.environ["GENEVAL_SRC"]) / "evaluation" / "evaluate_images.py"
    for name in ("mmdet", "mmdet.apis", "open_clip", "clip_benchmark", "clip_benchmark.metrics",
                 "clip_benchmark.metrics.zeroshot_classification"):
        sys.modules[name] = types.ModuleType(name)
    sys.modules["mmdet.apis"].inference_detector = sys.modules["mmdet.apis"].init_detector = None
    sys.modules["clip_benchmark.metrics"].zeroshot_classification = sys.modules[
        "clip_benchmark.metrics.zeroshot_classification"]
    ev = types.ModuleType("geneval_evaluate_images")
    ev.__file__ = str(src)
    code = src.read_text()
    code = code.replace('assert DEVICE == "cuda"', "")  # the only import-time line that needs a GPU
    exec(compile(code, str(src), "exec"), ev.__dict__)
    # main()'s defaults (evaluate_images.py sets these from --options under __main__)
    ev.THRESHOLD, ev.COUNTING_THRESHOLD, ev.MAX_OBJECTS = 0.3, 0.9, 16
    ev.NMS_THRESHOLD, ev.POSITION_THRESHOLD = 1.0, 0.1
    ev.classnames = [ln.strip() for ln in (src.parent / "object_names.txt").read_text().splitlines()]
    cases = json.loads((work / "cases.json").read_text())
    current = {}

    def inference_detector(_detector, _filepath):
        bbox = [np.zeros((0, 5), dtype=np.float32) for _ in ev.classnames]
        for d in current["detections"]:
            i = ev.classnames.index(d["label"])
            bbox[i] = np.concatenate([bbox[i], np.array([d["box"] + [d["score"]]], dtype=np.float32)])
        return bbox

    def color_classification(_image, objects, _classname):
        by_box = {tuple(np.float32(v) for v in d["box"]): d["color"] for d in current["detections"]}
        return [by_box[tuple(box[:4])] for box, _mask in objects]

    ev.inference_detector, ev.object_detector, ev.color_classification = inference_detector, None, color_classification
    out = []
    for case in cases:
        current.update(case)
        r = ev.evaluate_image(str(work / "blank.png"), case["metadata"])
        out.append({"correct": bool(r["correct"]), "reason": r["reason"]})
    (work / "reference.json").write_text(json.dumps(out))


def make_cases(n: int, seed: int = 0) -> list[dict]:
    import numpy as np
    from spobench.metrics import geneval_rules as gr

    rng = np.random.default_rng(seed)
    rows = gr.geneval_metadata()
    cases = []
    for _ in range(n):
        meta = rows[int(rng.integers(len(rows)))]
        classes = [c["class"] for c in meta.get("include", []) + meta.get("exclude", [])]
        classes += [gr.OBJECT_NAMES[int(i)] for i in rng.integers(0, 80, 2)]
        dets = []
        for label in classes:
            for _ in range(int(rng.integers(0, 5))):
                x1, y1 = rng.uniform(0, 400, 2)
                w, h = rng.uniform(5, 200, 2)
                score = rng.choice([np.float32(0.3), np.float32(0.9), np.float32(rng.uniform(0.25, 1.0)),
                                    np.nextafter(np.float32(0.3), np.float32(1)), np.float32(rng.uniform(0.85, 0.95))])
                box = [float(np.float32(v)) for v in (x1, y1, x1 + w, y1 + h)]
                dets.append({"label": label, "box": box, "score": float(np.float32(score)),
                             "color": gr.COLORS[int(rng.integers(0, 4))] if rng.random() < 0.5 else meta.get(
                                 "include", [{}])[0].get("color", "red")})
        cases.append({"metadata": meta, "detections": dets})
    return cases


def spobench_side(venv: Path) -> dict:
    import numpy as np
    from PIL import Image
    from spobench.metrics import geneval_rules as gr

    src = os.environ.get("GENEVAL_SRC")
    if not src or not (Path(src) / "evaluation" / "evaluate_images.py").is_file():
        raise common.NotRun("GenEval's rule code is not on PyPI; set GENEVAL_SRC to a checkout of djghosh13/geneval")
    t0 = time.perf_counter()
    py = common.ensure_venv(METRIC, REQUIREMENTS, venv)
    cases = make_cases(N_CASES)
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        Image.new("RGB", (512, 512)).save(work / "blank.png")
        (work / "cases.json").write_text(json.dumps(cases))
        common.run_reference(py, Path(__file__), work, result="reference.json")
        ref = json.loads((work / "reference.json").read_text())
    ours = []
    for case in cases:
        dets = [gr.Detection(x["label"], tuple(x["box"]), x["score"], None, x["color"]) for x in case["detections"]]
        correct, reason, _ = gr.evaluate_detections(dets, case["metadata"])
        ours.append({"correct": correct, "reason": reason})
    verdicts = sum(a["correct"] != b["correct"] for a, b in zip(ours, ref))
    reasons = sum(a["reason"] != b["reason"] for a, b in zip(ours, ref))
    unordered = sum(a["reason"] != b["reason"] and sorted(a["reason"]) != sorted(b["reason"])
                    for a, b in zip(ours, ref))
    ties = {float(np.float32(0.3)), float(np.float32(0.9))}
    n_tie = sum(any(x["score"] in ties for x in c["detections"]) for c in cases)
    checks = {f"verdict (0/1) over {len(cases)} cases ({verdicts} differ; {n_tie} cases hold a score at a "
              "threshold)": float(verdicts > 0)}
    git = subprocess.run(["git", "-C", src, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    commit = git.stdout.strip() if git.returncode == 0 else os.environ.get("GENEVAL_COMMIT", "(commit unknown)")
    notes = ["detector (Mask2Former) and colour CLIP stubbed: only the rule code is compared",
             f"reason text identical in {len(cases) - reasons}/{len(cases)} cases; of the others, {unordered} differ "
             "beyond the order of words (spobench lists position relations sorted, GenEval in a set's order)",
             "thresholds compare in float32 and ties order by numpy's default argsort on float32, as GenEval "
             "(spobench before this table: float64 and a stable sort, which disagreed on tied detections)"]
    return common.row(METRIC, REFERENCE, f"djghosh13/geneval {commit}", checks, notes, t0)


if __name__ == "__main__":
    common.script_main(METRIC, REFERENCE, spobench_side, reference_side)
