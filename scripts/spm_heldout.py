"""Pair accuracy per timestep of one or more SPM folders on an independent pairs parquet (captions seen in
the SPM's training parquet are left out), all models on the same pairs and noise.

Usage: python scripts/spm_heldout.py --pairs TEST.parquet --train-pairs TRAIN.parquet --max 1000 DIR [DIR ...]

DIR: an SPM folder, or a plain CLIP folder (e.g. the toy PickScore, spobench/assets/toy-pickscore), which is
scored without time conditioning: Table 5's "PickScore" row, a preference model trained on clean images only.
"""

import argparse
import json
from pathlib import Path

import torch

from spobench.backbones import load_backbone
from spobench.spm import CONFIG_NAME, StepAwarePreferenceModel
from spobench.spm_train import PairTable, SPMTrainConfig, evaluate_spm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pairs", required=True)
    ap.add_argument("--train-pairs", required=True, action="append",
                    help="a training parquet whose captions are left out (repeatable)")
    ap.add_argument("--max", type=int, default=1000)
    ap.add_argument("--backbone", default="tiny")
    ap.add_argument("spm", nargs="+")
    a = ap.parse_args()
    seen = {c for p in a.train_pairs for c in PairTable(p).captions}
    test = PairTable(a.pairs)
    rows = [i for i, c in enumerate(test.captions) if c not in seen]
    bb = load_backbone(a.backbone, None)
    cfg = SPMTrainConfig(val_max=a.max)
    out = {"pairs": a.pairs, "rows_with_unseen_captions": len(rows), "models": {}}
    for d in a.spm:
        torch.manual_seed(0)
        if (Path(d) / CONFIG_NAME).exists():
            model = StepAwarePreferenceModel.load(d)
        else:
            model = StepAwarePreferenceModel.from_clip(d, time_conditioned=False)
        ev = evaluate_spm(bb, model, test, rows, cfg, bb.defaults.resolution)
        out["models"][d] = ev
        print(d, ev["n_pairs"], {k: round(v, 4) for k, v in ev["accuracy"].items()}, round(ev["mean_accuracy"], 4),
              flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
