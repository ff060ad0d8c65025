"""SPO and MSPO on flow-matching backbones (spobench/engine/samplers.py FlowSteps through
spobench/trainers/spo_pools.py and spo.py): the family's step sampler is picked by ``backbone.family``; the
flow time -> scorer timestep map; pool candidates' log-probs against the SDE Gaussian written out by hand;
x0_hat = x_t - t v is what the scorer judges; the training log-probs equal the rollout's before an update;
MSPO segments; one round on an sd3 folder of the real component classes; `spobench train spo|mspo
--backbone tiny-flow` through the executable."""

import json
import math

import pytest
import torch

from clitools import run
from spobench.engine.rollout import RolloutEngine, SamplerConfig, make_generators
from spobench.engine.samplers import DDIMSteps, FlowSteps, step_sampler
from spobench.trainers.mspo import MSPOTrainer
from spobench.trainers.spo import SPOTrainer
from spobench.trainers.spo_pools import PoolConfig, pool_rollout

PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a small white square"]


@pytest.fixture(scope="module")
def flow_bb():
    from spobench.models.backbones.tiny_flow import TinyFlowBackbone

    return TinyFlowBackbone.build(0)


def mean_scorer(images, t, prompts):
    return images.mean(dim=(1, 2, 3)) * 200


def make_trainer(tmp_path, bb, cls=SPOTrainer, sets=(), scorer=mean_scorer, perturb=False):
    base = ["prompts=unused", "k=3", "num_steps=4", "kappa=800", "epochs=1", "rollout_batch=2", "threshold=0.0"]
    cfg = cls.Config.load(None, base + list(sets)).resolve(bb.defaults)
    tr = cls(cfg, bb, tmp_path / "run", prompts=PROMPTS, step_scorer=scorer)
    if perturb:  # LoRA B starts at 0 (policy == reference); give it weight so the log-ratios differ
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in bb.unet.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return tr


def test_the_family_picks_the_step_sampler(flow_bb):
    from spobench.models.backbones.tiny import TinyBackbone

    assert isinstance(step_sampler(RolloutEngine(TinyBackbone.build(0))), DDIMSteps)
    assert isinstance(step_sampler(RolloutEngine(flow_bb, SamplerConfig(num_steps=4)), 0.5), FlowSteps)
    assert step_sampler(RolloutEngine(flow_bb, SamplerConfig(num_steps=4)), 0.5).sched.noise_level == 0.5


def test_flow_time_maps_to_the_scorers_timesteps(flow_bb):
    """min(round(1000 t), 999) on tiny-flow's unshifted grid (diffusers: t from 1 to 1/1000 evenly, then 0);
    kappa = 750 pools 16 of 20 steps, as it does on DDIM."""
    steps = FlowSteps(RolloutEngine(flow_bb, SamplerConfig(num_steps=20)))
    labels = [steps.scorer_timestep(p) for p in range(21)]
    want = [min(round(1000 * (1 - i * 0.999 / 19)), 999) for i in range(20)] + [0]
    assert labels == want and labels[:3] == [999, 947, 895] and labels[-2:] == [1, 0]
    assert steps.is_final(20) and not steps.is_final(19)
    pool = PoolConfig(k=2, kappa=750)
    assert sum(pool.pools_at(steps.scorer_timestep(steps.next(p))) for p in steps.positions()) == 16


def test_pool_log_probs_are_the_sde_gaussian_by_hand(flow_bb):
    """Every candidate of a pool: log N(x; mean, std^2) averaged over C, H, W, with Flow-GRPO's step
    mean = x + [v + sigma^2 / (2t) (x + (1 - t) v)] dt, std = sigma sqrt(-dt), sigma = a sqrt(t / (1 - t))."""
    eng = RolloutEngine(flow_bb, SamplerConfig(num_steps=4, guidance_scale=4.5))
    steps = FlowSteps(eng, noise_level=0.7)
    seen = []

    def scorer(x0_hat, t, idx):
        seen.append((x0_hat.clone(), t))
        return x0_hat.mean(dim=(1, 2, 3))

    roll = pool_rollout(steps, PROMPTS[:2], make_generators([0, 1]), PoolConfig(k=3, kappa=800), scorer)
    assert [s.t for s in roll.steps] == [0, 1, 2, 3]  # grid indices; t_1 = 0.667 <= kappa / 1000: all pooled
    assert [t for _, t in seen] == [667, 334, 1, 0]
    cond, uncond = eng.encode(PROMPTS[:2])
    sig = flow_bb.sigmas(4)
    for n, step in enumerate(roll.steps):
        p = step.t
        t, t_next = float(sig[p]), float(sig[p + 1])
        t_in_sigma = float(sig[1]) if t >= 1 else t  # the grid's t_1 stands in for t in 1 - t at t = 1
        sigma = 0.7 * math.sqrt(t / (1 - t_in_sigma))
        dt = t_next - t
        with torch.no_grad():
            v = flow_bb.predict(step.x_t, torch.tensor(t), cond, uncond=uncond, guidance_scale=4.5)
        mean = step.x_t + (v + sigma**2 / (2 * t) * (step.x_t + (1 - t) * v)) * dt
        std = sigma * math.sqrt(-dt)
        want = torch.distributions.Normal(mean[:, None], std).log_prob(step.candidates).mean(dim=(2, 3, 4))
        assert torch.allclose(step.log_probs[:, :, 0], want, atol=1e-4, rtol=1e-5)
        # the scorer judged each candidate's x0_hat = x - t v at its own next time (x_0 itself at the end)
        x0_hat, _ = seen[n]
        cand = step.candidates.flatten(0, 1)
        if p + 1 == 4:
            assert torch.equal(x0_hat, cand)
        else:
            with torch.no_grad():
                vc = flow_bb.predict(cand, torch.tensor(t_next), cond.repeat_interleave(3),
                                     uncond=uncond.repeat_interleave(3), guidance_scale=4.5)
            assert torch.allclose(x0_hat, cand - t_next * vc, atol=1e-5)


def test_training_log_probs_equal_the_rollouts_before_an_update(tmp_path, flow_bb, monkeypatch):
    """LoRA B = 0: policy == reference == rollout policy, so the loss's log-probs are the pools' and the
    loss is ln 2; one policy and one reference transformer call per micro-batch (x2 CFG)."""
    import spobench.trainers.spo as spo_module

    tr = make_trainer(tmp_path, flow_bb)
    seen = []

    def spy(*args, **kw):
        seen.append(pool_rollout(*args, **kw))
        return seen[-1]

    monkeypatch.setattr(spo_module, "pool_rollout", spy)
    items, stats = tr.collect(0, 0, [0, 1])
    assert stats["pools"] == 8 and len(items) == stats["kept_pairs"] > 0
    assert {it.t for it in items} <= {0, 1, 2, 3}
    rollout_lp = {}
    roll = seen[0]
    for n, step in enumerate(roll.steps):
        for b in range(2):
            rollout_lp[(b, n)] = (float(step.log_probs[b, step.win[b], 0]), float(step.log_probs[b, step.lose[b], 0]))
    c = tr.bb.counters
    c.reset()
    lp_w, lp_l, ref_w, ref_l = tr.log_probs(items)
    assert c.unet_calls == 2 and c.unet_rows_grad == 2 * len(items)
    assert torch.allclose(lp_w, ref_w, atol=1e-6) and torch.allclose(lp_l, ref_l, atol=1e-6)
    for it, w, l in zip(items, lp_w.tolist(), lp_l.tolist()):
        assert (w, l) == pytest.approx(rollout_lp[(it.prompt, it.key[1])], abs=1e-4)
    loss, sums = tr.loss(items, len(items))
    assert float(loss.detach()) == pytest.approx(math.log(2), abs=1e-5)
    assert sums["timestep"] == sum(tr.steps.scorer_timestep(it.t) for it in items)


def test_flow_spo_gradient_moves_the_lora(tmp_path, flow_bb):
    tr = make_trainer(tmp_path, flow_bb, perturb=True)
    items, _ = tr.collect(0, 0, [0, 1])
    loss, sums = tr.loss(items, len(items))
    grads = torch.autograd.grad(loss, tr.params)
    assert math.isfinite(float(loss)) and sums["abs_logratio"] > 0
    assert any(float(g.abs().sum()) > 0 for g in grads)
    with torch.no_grad():  # reset for the other tests of this module's backbone
        for n, p in flow_bb.unet.named_parameters():
            if "lora_B" in n:
                p.zero_()


def test_mspo_segments_on_flow(tmp_path, flow_bb):
    """j = 2 on 4 steps: segments 0->2 and 2->4, each pool's label on both transitions."""
    tr = make_trainer(tmp_path, flow_bb, cls=MSPOTrainer, sets=["inner_steps=2"])
    items, stats = tr.collect(0, 0, [0, 1])
    assert stats["pools"] == 4
    assert sorted({it.t for it in items}) == [0, 1, 2, 3]
    assert all(it.shared == (it.t % 2 == 0) for it in items)
    lp_w, lp_l, ref_w, ref_l = tr.log_probs(items)
    assert torch.allclose(lp_w, ref_w, atol=1e-6) and lp_w.shape == (len(items),)


def test_one_round_on_an_sd3_folder(tmp_path):
    """The real SD3 component classes (16-channel VAE, shift 3): pools, scores of decoded x0_hat, one step."""
    from spobench.models.backbones import load_backbone
    from spobench.models.backbones.testing import make_sd3_folder

    bb = load_backbone("sd3", str(make_sd3_folder(tmp_path / "m")))
    sets = ["prompts=x", "k=2", "num_steps=3", "kappa=999", "rollout_batch=1", "threshold=0", "resolution=16",
            "lora_rank=2", "max_rounds=1", "scorer=metric:x"]
    cfg = SPOTrainer.prepare_config(SPOTrainer.Config.load(None, sets), "sd3", bb.defaults)
    tr = SPOTrainer(cfg, bb, tmp_path / "run", prompts=PROMPTS[:1], step_scorer=mean_scorer)
    assert isinstance(tr.steps, FlowSteps) and float(tr.steps.sched.sigmas[1]) < 1  # shifted grid
    summary = tr.train()
    c = summary["counters"]
    # 3 pooled steps of k = 2: 1 + 2 * 2 rollout rows (x2 CFG; the last candidates are x_0), 6 decodes
    assert c["unet_rows_nograd"] >= 2 * (1 + 2 * 2) and c["vae_decodes"] == 6 and c["reward_image_passes"] == 6
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert train and math.isfinite(train[0]["loss"]) and train[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()


# -- through the executable ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from spobench.models.backbones.testing import make_tiny_flow_folder

    root = tmp_path_factory.mktemp("spo-flow-cli")
    model = make_tiny_flow_folder(root / "tiny-flow-model")
    (root / "prompts.txt").write_text("\n".join(PROMPTS[:2]) + "\n")
    return root, model


@pytest.mark.parametrize("algo,extra", [("spo", []), ("mspo", ["--set", "inner_steps=2"])])
def test_train_one_round_on_tiny_flow_through_the_cli(world, algo, extra):
    root, model = world
    out = root / algo
    sets = [f"prompts={root / 'prompts.txt'}", "k=2", "num_steps=4", "rollout_batch=2", "epochs=1", "max_rounds=1",
            "threshold=0"]
    r = run("train", algo, "--backbone", "tiny-flow", "--model", model, "--out", out,
            *[a for s in sets for a in ("--set", s)], *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["progress"]["rounds_done"] == 1 and summary["progress"]["step"] >= 1
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    rnd = next(x for x in rows if x["kind"] == "round")
    assert rnd["pools"] == (8 if algo == "spo" else 4) and rnd["kept_pairs"] > 0  # kappa 750: t_1..t_4 pooled
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_the_flow_headline_recipe_runs_on_the_shipped_flow_base(tmp_path):
    """`spobench reproduce flow_headline --backbone tiny-flow` plans on assets/tiny-flow-base (not tiny-base),
    and its SPO and Flow-GRPO cells spend the same rollout transformer rows to within 2%."""
    from spobench.core.catalog import recipe_files
    from spobench.reproduce.plan import _check_backbone
    from spobench.reproduce.recipe import load_recipe

    r = load_recipe(recipe_files()["flow_headline"], "tiny-flow")
    source, identity, seed = _check_backbone(r, tmp_path)
    assert source.endswith("tiny-flow-base") and identity.startswith("shipped tiny-flow-base") and seed is None
    spo, grpo = r.cell("spo").train, r.cell("flow_grpo").train
    k, n = spo["k"], spo["num_steps"]
    spo_rows = spo["max_rounds"] * spo["rollout_batch"] * (5 + 15 * k) * 2  # kappa 750: 16 of 20 steps pooled
    grpo_rows = grpo["max_rounds"] * grpo["rollout_batch"] * grpo["group_size"] * grpo["num_steps"] * 2
    assert n == 20 and spo["kappa"] == 750 and abs(grpo_rows / spo_rows - 1) < 0.02


def test_generation_on_a_flow_backbone_is_the_euler_ode(flow_bb):
    """RolloutEngine.sample (what `spobench generate` and reproduce call) at eta = 0: x_{i+1} = x_i + v dt."""
    eng = RolloutEngine(flow_bb, SamplerConfig(num_steps=3, guidance_scale=5.0, eta=0.0))
    traj = eng.sample(PROMPTS[:2], make_generators([0, 1]), log_probs=False)
    cond, uncond = eng.encode(PROMPTS[:2])
    sig = flow_bb.sigmas(3)
    assert traj.latents.shape[1] == 4 and torch.equal(traj.log_probs, torch.zeros(2, 3))
    for i in range(3):
        x = traj.latents[:, i]
        with torch.no_grad():
            v = flow_bb.predict(x, sig[i].expand(2), cond, uncond=uncond, guidance_scale=5.0)
        assert torch.allclose(traj.latents[:, i + 1], x + v * (sig[i + 1] - sig[i]), atol=1e-5)
