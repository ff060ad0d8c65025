"""Diffusion-DPO on the flow-matching family (issue 18): the rectified-flow noising and velocity target and the
loss built on them against hand computations on tiny tensors, SD3's training t (logit-normal, the scheduler's
shift), the trainer's batched calls against separate velocity calls, and `spobench train diffusion-dpo` through
the installed CLI on the shipped tiny flow base and on a tiny SD3 folder (latent space, shift 3), plus a bad
pairs input as one named line."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from clitools import run
from contract import assert_clean_failure, snapshot
from spobench.trainers.diffusion_dpo import DiffusionDPOTrainer, diffusion_dpo_loss


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from spobench.toyworld.pairs import make_dataset

    root = tmp_path_factory.mktemp("dpo-flow-data")
    make_dataset(root, n_pairs=16, seed=0)  # 15 decided pairs and 1 tie
    return root / "pairs.parquet"


@pytest.fixture(scope="module")
def flow_bb():
    from spobench.models.backbones.tiny_flow import TinyFlowBackbone

    return TinyFlowBackbone.build(0)


def make_trainer(tmp_path, pairs, bb, perturb=0.0):
    base = [f"pairs={pairs}", "rollout_batch=8", "train_batch_size=4", "grad_accum=1", "epochs=1"]
    cfg = DiffusionDPOTrainer.prepare_config(DiffusionDPOTrainer.Config.load(None, base), bb.name, bb.defaults)
    tr = DiffusionDPOTrainer(cfg, bb, tmp_path / "run")
    if perturb:  # LoRA B starts at 0 (policy == reference); give it weight so that the MSEs differ
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in bb.unet.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * perturb)
    return tr


# -- the math on tiny tensors -----------------------------------------------------------------------------
def test_rectified_flow_noising_and_velocity_target_by_hand(flow_bb):
    x0 = torch.tensor([[[[0.5, -1.0]]], [[[0.0, 1.0]]]])  # (2, 1, 1, 2)
    eps = torch.tensor([[[[-1.0, 2.0]]], [[[4.0, 0.0]]]])
    x_t, v = flow_bb.training_target(x0, eps, torch.tensor([0.25, 0.5]))
    # row 0: 0.75 * 0.5 + 0.25 * -1 = 0.125, 0.75 * -1 + 0.25 * 2 = -0.25 ; row 1: 0.5 * (0, 1) + 0.5 * (4, 0)
    assert x_t.flatten().tolist() == [0.125, -0.25, 2.0, 0.5]
    assert v.flatten().tolist() == [-1.5, 3.0, 4.0, -1.0]  # eps - x_0


def test_flow_dpo_loss_by_hand_on_tiny_tensors(flow_bb):
    """Winner and loser share t and eps; errors against the velocity target; z = -beta/2 [(e_w - e_ref_w) -
    (e_l - e_ref_l)], the DDPM convention with eps-prediction replaced by v."""
    x0_w, x0_l = torch.tensor([[[[1.0, 0.0]]]]), torch.tensor([[[[0.0, -1.0]]]])
    eps, t = torch.tensor([[[[0.5, 0.5]]]]), torch.tensor([0.5, 0.5])
    x_t, v = flow_bb.training_target(torch.cat([x0_w, x0_l]), eps.repeat(2, 1, 1, 1), t)
    assert v.flatten().tolist() == [-0.5, 0.5, 0.5, 1.5]
    policy = torch.tensor([[[[-0.5, 0.4]]], [[[0.7, 1.5]]]])  # made-up velocities of the policy and reference
    ref = torch.tensor([[[[-0.4, 0.5]]], [[[0.5, 1.6]]]])
    mse = lambda p: ((p - v) ** 2).mean(dim=(1, 2, 3))  # noqa: E731
    m, r = mse(policy), mse(ref)
    # e_theta^w = (0 + 0.01) / 2 = 0.005, e_ref^w = (0.01 + 0) / 2 = 0.005, e_theta^l = (0.04 + 0) / 2 = 0.02,
    # e_ref^l = (0 + 0.01) / 2 = 0.005 -> z = -0.5 * 100 * ((0.005 - 0.005) - (0.02 - 0.005)) = 0.75
    assert m.tolist() == pytest.approx([0.005, 0.02]) and r.tolist() == pytest.approx([0.005, 0.005])
    loss, st = diffusion_dpo_loss(m[:1], m[1:], r[:1], r[1:], beta=100.0)
    assert st["margin"].item() == pytest.approx(0.75, abs=1e-5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.75)), abs=1e-6) and st["accuracy"].item() == 1.0


def test_training_t_is_sd3s_logit_normal_with_the_schedulers_shift(tmp_path, flow_bb):
    from spobench.models.backbones import load_backbone
    from spobench.models.backbones.testing import make_sd3_folder

    g = torch.Generator().manual_seed(3)
    n = torch.cat([torch.randn(1, generator=g) for _ in range(200)])  # one N(0, 1) draw per pair
    g = torch.Generator().manual_seed(3)
    ts = torch.tensor([flow_bb.training_timestep(g) for _ in range(200)])
    assert flow_bb.shift == 1.0 and torch.allclose(ts, torch.sigmoid(n))  # tiny-flow: shift 1, as pretrained
    sd3 = load_backbone("sd3", str(make_sd3_folder(tmp_path / "sd3")))
    g = torch.Generator().manual_seed(3)
    ts3 = torch.tensor([sd3.training_timestep(g) for _ in range(200)])
    u = torch.sigmoid(n)
    assert sd3.shift == 3.0 and torch.allclose(ts3, 3 * u / (1 + 2 * u))  # toward noise, as SD3's sigmas
    assert 0 < float(ts3.min()) and float(ts3.max()) < 1 and float(ts3.median()) > float(ts.median())


# -- the trainer on the tiny random flow backbone ---------------------------------------------------------
def test_step_zero_is_ln2_and_half_accuracy_on_a_flow_backbone(tmp_path, data):
    from spobench.models.backbones.tiny_flow import TinyFlowBackbone

    tr = make_trainer(tmp_path, data, TinyFlowBackbone.build(0))
    items, _ = tr.collect(0, 0, tr.round_prompts(0, 0))
    assert all(isinstance(it.t, float) and 0 < it.t < 1 for it in items) and items[0].x0.shape == (2, 3, 32, 32)
    tr.bb.counters.reset()
    loss, sums = tr.loss(items, len(items))
    n = len(items)
    assert loss.item() == float(torch.tensor(math.log(2), dtype=torch.float32))
    assert sums["accuracy"] == 0.5 * n and sums["margin"] == 0.0 and sums["model_mse"] == sums["ref_mse"]
    c = tr.bb.counters  # winners and losers in ONE policy call and ONE reference call, no CFG
    assert c.unet_calls == 2 and c.unet_rows_grad == 2 * n and c.unet_rows_nograd == 2 * n


def test_batched_calls_equal_separate_velocity_calls(tmp_path, data):
    from spobench.models.backbones.tiny_flow import TinyFlowBackbone

    tr = make_trainer(tmp_path, data, TinyFlowBackbone.build(0), perturb=0.05)
    items, _ = tr.collect(0, 0, tr.round_prompts(0, 0))
    items = items[:3]
    loss, _ = tr.loss(items, len(items))
    per = []
    for it in items:  # by hand: the rectified-flow path, the velocity target, four transformer calls
        cond = tr.bb.encode_prompts([it.caption], tr.cfg.resolution)
        e = {}
        for s, name in ((0, "w"), (1, "l")):
            x0 = it.x0[s][None]
            x_t = (1 - it.t) * x0 + it.t * it.noise[None]
            v = it.noise[None] - x0
            e["m" + name] = ((tr.bb.velocity(x_t, torch.tensor([it.t]), cond) - v) ** 2).mean()
            with torch.no_grad(), tr.bb.lora_disabled():
                e["r" + name] = ((tr.bb.velocity(x_t, torch.tensor([it.t]), cond) - v) ** 2).mean()
        z = -0.5 * 5000 * ((e["mw"] - e["rw"]) - (e["ml"] - e["rl"]))
        per.append(-F.logsigmoid(z))
    four = torch.stack(per).mean()
    # beta/2 = 2500 times four float32 MSEs' rounding (batched vs separate attention, ~1e-7 each): 1e-4 as the
    # DDPM test's bound
    assert loss.item() == pytest.approx(four.item(), abs=1e-4) and abs(loss.item() - math.log(2)) > 1e-2


# -- end to end through the executable --------------------------------------------------------------------
SETS = ["rollout_batch=8", "train_batch_size=4", "grad_accum=1", "epochs=1"]


def _sets(data, extra=()):
    return [a for s in [f"pairs={data}", *SETS, *extra] for a in ("--set", s)]


def _check_run(out, n_pairs=15):
    summary = json.loads((out / "summary.json").read_text())
    c = summary["counters"]
    assert summary["complete"] and summary["progress"]["rounds_done"] == 2  # 15 pairs, 8 a round
    assert c["unet_rows_grad"] == c["unet_rows_nograd"] == 2 * n_pairs and c["vae_encodes"] == 2 * n_pairs
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    first = rows[0]
    assert first["kind"] == "train" and first["loss"] == pytest.approx(math.log(2)) and first["accuracy"] == 0.5
    assert all(0 < r["timestep"] / r["items"] < 1 for r in rows if r["kind"] == "train")  # t in (0, 1)
    lora = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    assert lora and all(k.startswith("transformer.") for k in lora)  # diffusers' SD3 LoRA layout
    assert any(float(v.abs().max()) > 0 for k, v in lora.items() if "lora_B" in k)  # it trained
    return summary


def test_train_on_the_shipped_tiny_flow_base(tmp_path, data):
    out = tmp_path / "run"
    r = run("train", "diffusion-dpo", "--backbone", "tiny-flow", "--out", out, *_sets(data))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "pairs: 15 of 16 rows (1 ties dropped, 0 unlabeled)" in r.stdout
    summary = _check_run(out)
    assert summary["backbone"]["backbone"] == "tiny-flow" and summary["backbone"]["family"] == "flow"


def test_one_round_on_a_tiny_sd3_folder_in_process(tmp_path, data):
    """Latent space (the 16-channel VAE encodes the pairs into 16 x 8 x 8 latents), scheduler shift 3."""
    from spobench.models.backbones import load_backbone
    from spobench.models.backbones.testing import make_sd3_folder

    bb = load_backbone("sd3", str(make_sd3_folder(tmp_path / "sd3")))
    base = [f"pairs={data}", "rollout_batch=4", "train_batch_size=2", "grad_accum=2", "epochs=1", "resolution=16",
            "lora_rank=2", "max_rounds=1"]
    cfg = DiffusionDPOTrainer.prepare_config(DiffusionDPOTrainer.Config.load(None, base), "sd3", bb.defaults)
    tr = DiffusionDPOTrainer(cfg, bb, tmp_path / "run")
    items, _ = tr.collect(0, 0, tr.round_prompts(0, 0))
    assert items[0].x0.shape == (2, 16, 8, 8) and items[0].noise.shape == (16, 8, 8)
    bb.counters.reset()
    summary = tr.train()
    assert summary["progress"]["step"] == 1 and summary["counters"]["vae_encodes"] == 8
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    train = next(r for r in rows if r["kind"] == "train")
    assert train["loss"] == pytest.approx(math.log(2)) and 0 < train["timestep"] / train["items"] < 1


@pytest.mark.slow
def test_train_on_a_tiny_sd3_folder(tmp_path, data):
    from spobench.models.backbones.testing import make_sd3_folder

    model = make_sd3_folder(tmp_path / "sd3")
    out = tmp_path / "run"
    r = run("train", "diffusion-dpo", "--backbone", "sd3", "--model", model, "--out", out,
            *_sets(data, ["resolution=16"]))
    assert r.returncode == 0, r.stderr[-3000:]
    summary = _check_run(out)
    assert summary["backbone"]["shift"] == 3.0


def test_bad_pairs_input_is_one_named_line(tmp_path):
    pairs = tmp_path / "pairs.parquet"
    pairs.write_bytes(b"this is not a parquet file\n" * 10)
    out = tmp_path / "run"
    before = snapshot(out)
    r = run("train", "diffusion-dpo", "--backbone", "tiny-flow", "--out", out, "--set", f"pairs={pairs}")
    assert_clean_failure(r.returncode, r.stderr, [pairs], out, before)
