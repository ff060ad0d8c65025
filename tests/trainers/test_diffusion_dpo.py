"""Diffusion-DPO: the loss against a hand computation, the step-0 sanity values, the batched UNet
calls against separate ones, the v-prediction target, data handling (winner first, ties, unlabeled
rows, SDXL micro-conditioning) and `spobench train diffusion-dpo` end to end with exact resume."""

import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from clitools import run
from spobench.core.errors import InputError
from spobench.trainers.diffusion_dpo import DiffusionDPOTrainer, crop_geometry, diffusion_dpo_loss


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from spobench.toyworld.pairs import make_dataset

    root = tmp_path_factory.mktemp("dpo-data")
    make_dataset(root, n_pairs=16, seed=0)  # 15 decided pairs and 1 tie
    return root / "pairs.parquet"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from spobench.models.backbones.testing import make_tiny_folder

    return make_tiny_folder(tmp_path_factory.mktemp("dpo-model") / "tiny-model")


def make_trainer(tmp_path, pairs, sets=(), perturb=0.0, backbone=None, name="tiny"):
    from spobench.models.backbones.tiny import TinyBackbone

    bb = backbone or TinyBackbone.build(0)
    base = [f"pairs={pairs}", "rollout_batch=8", "train_batch_size=4", "grad_accum=1", "epochs=1"]
    cfg = DiffusionDPOTrainer.prepare_config(DiffusionDPOTrainer.Config.load(None, base + list(sets)), name,
                                             bb.defaults)
    tr = DiffusionDPOTrainer(cfg, bb, tmp_path / "run")
    if perturb:  # LoRA B starts at 0 (policy == reference); give it weight so that the MSEs differ
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in bb.unet.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * perturb)
    return tr


# -- the loss on given MSEs --------------------------------------------------------------------------
def test_loss_matches_hand_computation_and_the_diffusers_form():
    mw, ml = torch.tensor([0.100, 0.300]), torch.tensor([0.200, 0.300])
    rw, rl = torch.tensor([0.1002, 0.300]), torch.tensor([0.1999, 0.3001])
    loss, st = diffusion_dpo_loss(mw, ml, rw, rl, beta=5000.0)
    # pair 0: z = -2500 * ((0.1 - 0.1002) - (0.2 - 0.1999)) = -2500 * -0.0003 = 0.75 ; pair 1: z = -0.25
    z = torch.tensor([0.75, -0.25])
    assert st["margin"].tolist() == pytest.approx(z.tolist(), abs=1e-4)
    assert loss.tolist() == pytest.approx([math.log1p(math.exp(-0.75)), math.log1p(math.exp(0.25))], abs=1e-4)
    assert st["accuracy"].tolist() == [1.0, 0.0]
    diffusers = -F.logsigmoid(2500.0 * ((rw - rl) - (mw - ml)))  # beta' = 2500 without the 0.5
    assert torch.allclose(loss, diffusers, atol=1e-6)


def test_tie_loss_is_the_soft_label_form_with_no_gradient_at_zero():
    d = torch.tensor([0.0, 1e-4], requires_grad=True)
    zero = torch.zeros(2)
    loss, _ = diffusion_dpo_loss(d, zero, zero, zero, beta=5000.0, p=torch.tensor([0.5, 0.5]))
    z = -2500 * 1e-4
    assert loss.tolist() == pytest.approx([math.log(2), -0.5 * (F.logsigmoid(torch.tensor(z)).item()
                                                                + F.logsigmoid(torch.tensor(-z)).item())])
    (g,) = torch.autograd.grad(loss.sum(), d)
    assert g[0] == 0 and g[1] != 0  # pulls z towards 0
    hard, _ = diffusion_dpo_loss(d, zero, zero, zero, p=torch.ones(2))
    assert torch.equal(hard, diffusion_dpo_loss(d, zero, zero, zero)[0])  # p = 1: the plain loss


# -- the trainer -----------------------------------------------------------------------------------------
def test_step_zero_is_ln2_and_half_accuracy_exactly(tmp_path, data):
    tr = make_trainer(tmp_path, data)
    items, stats = tr.collect(0, 0, tr.round_prompts(0, 0))
    tr.bb.counters.reset()
    loss, sums = tr.loss(items, len(items))
    n = len(items)
    assert loss.item() == float(torch.tensor(math.log(2), dtype=torch.float32))
    assert sums["accuracy"] == 0.5 * n and sums["margin"] == 0.0 and sums["model_mse"] == sums["ref_mse"]
    c = tr.bb.counters  # winners and losers in ONE policy call and ONE reference call, no CFG
    assert c.unet_calls == 2 and c.unet_rows_grad == 2 * n and c.unet_rows_nograd == 2 * n


def test_batched_calls_equal_separate_forwards_and_the_v_target(tmp_path, data):
    tr = make_trainer(tmp_path, data, perturb=0.02)
    assert tr.bb.prediction_type == "v_prediction"
    items, _ = tr.collect(0, 0, tr.round_prompts(0, 0))
    items = items[:3]
    loss, _ = tr.loss(items, len(items))
    g_ours = torch.autograd.grad(loss, tr.params)

    ac = tr.bb.scheduler.alphas_cumprod
    per = []
    for it in items:  # by hand: noising, the v target, four UNet calls
        a = ac[it.t]
        t = torch.tensor([it.t])
        cond = tr.bb.encode_prompts([it.caption], tr.cfg.resolution)
        e = {}
        for s, name in ((0, "w"), (1, "l")):
            x0 = it.x0[s][None]
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * it.noise[None]
            v = a.sqrt() * it.noise[None] - (1 - a).sqrt() * x0
            e["m" + name] = ((tr.bb.predict(x_t, t, cond) - v) ** 2).mean()
            with torch.no_grad(), tr.bb.lora_disabled():
                e["r" + name] = ((tr.bb.predict(x_t, t, cond) - v) ** 2).mean()
        z = -0.5 * 5000 * ((e["mw"] - e["rw"]) - (e["ml"] - e["rl"]))
        per.append(-F.logsigmoid(z))
    four = torch.stack(per).mean()
    g_four = torch.autograd.grad(four, tr.params)
    # batched and separate convolutions round differently (by thread count too); beta/2 = 2500 times four
    # float32 MSEs' rounding (~1e-7 each) bounds the loss difference at ~1e-3: 1e-4 is 2x the worst seen
    assert loss.item() == pytest.approx(four.item(), abs=1e-4) and abs(loss.item() - math.log(2)) > 1e-2
    flat_ours, flat_four = torch.cat([g.flatten() for g in g_ours]), torch.cat([g.flatten() for g in g_four])
    # float32 MSE differences times beta/2 = 2500 amplify rounding: compare the gradient as a whole
    assert (flat_ours - flat_four).norm() / flat_four.norm() < 1e-4


def test_pairs_are_winner_first_and_seeded(tmp_path, data):
    tr = make_trainer(tmp_path, data, ["caption_dropout=0"])
    idx = tr.round_prompts(0, 0)
    items, _ = tr.collect(0, 0, idx)
    rows = [tr.rows[i] for i in idx]
    a, b = tr.pairs.images(rows, 32)
    for it, row, im0, im1 in zip(items, rows, a, b):
        win, lose = (im0, im1) if tr.pairs.labels[row, 0] > tr.pairs.labels[row, 1] else (im1, im0)
        assert torch.equal(it.x0[0], win * 2 - 1) and torch.equal(it.x0[1], lose * 2 - 1)  # pixel space
        assert it.p == 1.0 and it.caption == tr.pairs.captions[row]
    again, _ = tr.collect(0, 0, idx)
    assert [(i.t, i.noise.sum().item()) for i in items] == [(i.t, i.noise.sum().item()) for i in again]
    other, _ = tr.collect(0, 1, idx)  # another round: other t and noise for the same pairs
    assert [i.t for i in items] != [i.t for i in other]


def test_ties_and_unlabeled_rows(tmp_path, data):
    tr = make_trainer(tmp_path, data)
    assert tr.data_counts == {"rows": 16, "unlabeled": 0, "ties": 1, "used": 15}
    kept = make_trainer(tmp_path, data, ["keep_ties=true"])
    assert kept.data_counts["used"] == 16
    items, stats = kept.collect(0, 0, list(range(16)))
    assert stats["ties"] == 1 and sorted(it.p for it in items)[0] == 0.5

    import pyarrow.parquet as pq

    t = pq.read_table(data)
    t = t.set_column(t.schema.get_field_index("has_label"), "has_label",
                     [[i % 2 == 0 for i in range(t.num_rows)]])
    pq.write_table(t, tmp_path / "half.parquet")
    half = make_trainer(tmp_path, tmp_path / "half.parquet")
    assert half.data_counts["unlabeled"] == 8 and all(r % 2 == 0 for r in half.rows)


def test_missing_or_empty_pairs_are_one_line_errors(tmp_path, data):
    from spobench.models.backbones.tiny import TinyBackbone

    with pytest.raises(InputError, match="setting 'pairs' is required"):
        DiffusionDPOTrainer.prepare_config(DiffusionDPOTrainer.Config.load(None, []), "tiny",
                                           TinyBackbone.defaults)
    with pytest.raises(InputError, match="'prompts' and 'prompt_limit' are not used"):
        DiffusionDPOTrainer.prepare_config(DiffusionDPOTrainer.Config.load(None, [f"pairs={data}", "prompts=x.txt"]),
                                           "tiny", TinyBackbone.defaults)
    import pyarrow.parquet as pq

    t = pq.read_table(data)
    t = t.set_column(t.schema.get_field_index("has_label"), "has_label", [[False] * t.num_rows])
    pq.write_table(t, tmp_path / "none.parquet")
    with pytest.raises(InputError, match=r"no pairs to train on \(16 rows: 16 unlabeled"):
        make_trainer(tmp_path, tmp_path / "none.parquet")


def test_crop_geometry_of_the_centre_crop():
    assert crop_geometry(40, 24, 16) == (24, 40, 0, 5)  # resized to 27 x 16, 5 px cut on the left
    assert crop_geometry(24, 48, 16) == (48, 24, 8, 0)
    assert crop_geometry(40, 24, 16, flipped=True) == (24, 40, 0, 6)  # mirrored: 27 - 5 - 16


def test_sdxl_micro_conditioning_from_the_real_image_sizes(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from spobench.models.backbones.sd import SDXLBackbone
    from spobench.models.backbones.testing import make_sdxl_folder

    def png(w, h):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(w * h).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
        return buf.getvalue()

    pq.write_table(pa.table({"caption": ["a red circle"], "jpg_0": [png(40, 24)], "jpg_1": [png(24, 48)],
                             "label_0": [0.0], "label_1": [1.0]}), tmp_path / "sdxl.parquet")
    bb = SDXLBackbone.load(make_sdxl_folder(tmp_path / "sdxl"))
    tr = make_trainer(tmp_path, tmp_path / "sdxl.parquet", ["resolution=16", "hflip=false"], backbone=bb, name="sdxl")
    assert tr.cfg.lr == 2.048e-5 and tr.cfg.lr_warmup_steps == 500 and tr.cfg.weight_decay == 1e-2
    items, _ = tr.collect(0, 0, [0])
    # winner (jpg_1, 24 x 48) first, then the loser (jpg_0, 40 x 24)
    assert items[0].time_ids.tolist() == [[48, 24, 8, 0, 16, 16], [24, 40, 0, 5, 16, 16]]
    assert items[0].x0.shape == (2, 4, 8, 8)
    loss, _ = tr.loss(items, 1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)


# -- end to end through the executable --------------------------------------------------------------------
def test_train_then_resume_is_bit_identical(tmp_path, data, model):
    sets = [f"pairs={data}", "rollout_batch=4", "train_batch_size=2", "grad_accum=2", "epochs=2",
            "checkpoint_every=1"]
    args = ["train", "diffusion-dpo", "--backbone", "tiny", "--model", model, *[a for s in sets for a in ("--set", s)]]
    full, part = tmp_path / "full", tmp_path / "part"
    r = run(*args, "--out", full)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "pairs: 15 of 16 rows (1 ties dropped, 0 unlabeled)" in r.stdout
    summary = json.loads((full / "summary.json").read_text())
    c = summary["counters"]
    assert summary["complete"] and summary["progress"]["rounds_done"] == 8  # 15 pairs / 4 a round, 2 epochs
    assert c["unet_rows_grad"] == c["unet_rows_nograd"] == 2 * 2 * 15 and c["vae_encodes"] == 2 * 2 * 15
    rows = [json.loads(line) for line in (full / "log.jsonl").read_text().splitlines()]
    first = rows[0]
    assert first["kind"] == "train" and first["loss"] == pytest.approx(math.log(2)) and first["accuracy"] == 0.5
    assert all(k in first for k in ("margin", "model_mse", "ref_mse", "grad_norm"))

    r = run(*args, "--out", part, "--set", "max_rounds=3")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run("train", "diffusion-dpo", "--backbone", "tiny", "--model", model, "--out", part, "--resume",
            "--set", "max_rounds=none")
    assert r.returncode == 0 and "resuming from" in r.stdout, r.stderr[-3000:]
    a = load_file(str(full / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(part / "lora" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_train_their_own_pairs(tmp_path, data, model):
    """2 gloo processes: each reads and trains its own pairs; in the last round (7 pairs: 4 + 3) both
    train 3, so that they take the same steps."""
    import os
    import subprocess
    import sys

    from clitools import EXE

    out = tmp_path / "ddp"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    sets = [f"pairs={data}", "rollout_batch=4", "train_batch_size=2", "grad_accum=1", "epochs=1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    r = subprocess.run([*launcher, EXE, "train", "diffusion-dpo", "--backbone", "tiny", "--model", str(model),
                        "--out", str(out), *[a for s in sets for a in ("--set", s)]],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["complete"] and summary["progress"]["rounds_done"] == 2
    assert summary["counters"]["unet_rows_grad"] == 2 * (8 + 6)
