"""SPO / MSPO: the loss, the 1+1-forward trick, pair filtering, clipping, counters, config errors."""

import math

import pytest
import torch

from spobench.core.errors import InputError
from spobench.trainers.base import derive_seed
from spobench.trainers.mspo import MSPOConfig, MSPOTrainer
from spobench.trainers.spo import SPOConfig, SPOTrainer, preference_gap, spo_loss

PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a small white square"]


def mean_scorer(images, t, prompts):
    """Brighter is better, on a logit-like scale (gaps of a few units)."""
    return images.mean(dim=(1, 2, 3)) * 200


def make_trainer(tmp_path, cls=SPOTrainer, sets=(), scorer=mean_scorer, perturb=True):
    from spobench.models.backbones.tiny import TinyBackbone

    bb = TinyBackbone.build(0)
    base = ["prompts=unused", "k=2", "num_steps=4", "kappa=800", "epochs=1", "rollout_batch=2", "threshold=0.0"]
    cfg = cls.Config.load(None, base + list(sets)).resolve(bb.defaults)
    tr = cls(cfg, bb, tmp_path / "run", prompts=PROMPTS, step_scorer=scorer)
    if perturb:  # LoRA B starts at 0 (policy == reference); give it weight so the log-ratios differ
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in bb.unet.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return tr


# -- the loss on given log-probs ---------------------------------------------------------------------
def test_loss_matches_hand_computation_without_clamp():
    lp_w, lp_l = torch.tensor([-1.00, -2.0]), torch.tensor([-1.10, -1.5])
    ref_w, ref_l = torch.tensor([-1.05, -2.0]), torch.tensor([-1.00, -1.6])
    loss, st = spo_loss(lp_w, lp_l, ref_w, ref_l, beta=10.0, clamp_eps=None)
    # pair 0: lr_w = 0.05, lr_l = -0.10 -> margin 10 * 0.15 = 1.5 ; pair 1: lr_w = 0, lr_l = 0.1 -> -1.0
    expected = torch.tensor([math.log1p(math.exp(-1.5)), math.log1p(math.exp(1.0))])
    assert torch.allclose(loss, expected, atol=1e-6)
    assert st["accuracy"].tolist() == [1.0, 0.0]
    assert st["clamp_frac"].tolist() == [0.0, 0.0]


def test_loss_with_official_clamp_matches_hand_computation():
    # lr_w = 0.5 (clamped to log 1.1), lr_l = -0.02 (inside [log .9, log 1.1])
    lp_w, lp_l, ref_w, ref_l = (torch.tensor([v]) for v in (0.5, -0.02, 0.0, 0.0))
    loss, st = spo_loss(lp_w, lp_l, ref_w, ref_l, beta=10.0, clamp_eps=0.1)
    margin = 10 * (math.log(1.1) - (-0.02))
    assert loss.item() == pytest.approx(math.log1p(math.exp(-margin)), abs=1e-6)
    assert st["clamp_frac"].item() == 0.5


def test_clamp_equals_the_official_exp_clamp_log_in_value_and_gradient():
    torch.manual_seed(0)
    lr = (torch.randn(64, 2) * 0.2).requires_grad_(True)
    zero = torch.zeros(64)
    ours, _ = spo_loss(lr[:, 0], lr[:, 1], zero, zero, beta=10.0, clamp_eps=0.1)
    (g_ours,) = torch.autograd.grad(ours.sum(), lr)
    r0 = torch.clamp(torch.exp(lr[:, 0]), 0.9, 1.1)
    r1 = torch.clamp(torch.exp(lr[:, 1]), 0.9, 1.1)
    official = -torch.log(torch.sigmoid(10.0 * torch.log(r0) - 10.0 * torch.log(r1)))
    (g_off,) = torch.autograd.grad(official.sum(), lr)
    assert torch.allclose(ours, official, atol=1e-5)
    assert torch.allclose(g_ours, g_off, atol=1e-5)
    clamped = (lr.abs() > 0.0953).any(1)
    assert clamped.any() and (g_ours[lr.abs() > 0.11] == 0).all()  # a clamped side gives no gradient


def test_zero_logratios_give_ln2():
    z = torch.zeros(3)
    loss, _ = spo_loss(z, z, z, z, beta=10.0)
    assert torch.allclose(loss, torch.full((3,), math.log(2)))


# -- the 1+1-forward loss vs the official 4 forwards ------------------------------------------------
def _items(tr, epoch=0, rnd=0):
    items, stats = tr.collect(epoch, rnd, [0, 1])
    assert items, stats
    return items


def test_one_policy_one_reference_forward_equals_four_forwards(tmp_path):
    tr = make_trainer(tmp_path)
    items = _items(tr)
    eng, cfg = tr.engine, tr.cfg
    loss, _ = tr.loss(items, len(items))
    g_ours = torch.autograd.grad(loss, tr.params)

    x_t = torch.stack([it.x_t for it in items])
    x_w, x_l = torch.stack([it.x_w for it in items]), torch.stack([it.x_l for it in items])
    t = torch.tensor([it.t for it in items])
    cond, uncond = eng.encode([PROMPTS[it.prompt] for it in items])
    lp_w = eng.log_prob(x_t, t, x_w, cond, uncond)  # four separate forwards, as the official loop
    lp_l = eng.log_prob(x_t, t, x_l, cond, uncond)
    with torch.no_grad(), tr.bb.lora_disabled():
        ref_w = eng.log_prob(x_t, t, x_w, cond, uncond)
        ref_l = eng.log_prob(x_t, t, x_l, cond, uncond)
    per, st = spo_loss(lp_w, lp_l, ref_w, ref_l, cfg.beta, cfg.clamp_eps)
    four = per.mean()
    g_four = torch.autograd.grad(four, tr.params)
    assert st["abs_logratio"].mean() > 1e-5  # the policy really differs from the reference
    assert abs(loss.item() - four.item()) < 1e-6
    for a, b in zip(g_ours, g_four):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_counters_two_policy_rows_per_pair_not_four(tmp_path):
    tr = make_trainer(tmp_path)
    items = _items(tr)
    c = tr.bb.counters
    c.reset()
    loss, _ = tr.loss(items, len(items))
    n = len(items)
    assert c.unet_rows_grad == 2 * n  # one row per pair, x2 for CFG (the official loop: 4 per pair)
    assert c.unet_rows_nograd == 2 * n  # the reference forward
    assert c.unet_calls == 2


def test_rollout_counts_match_the_engine_cost_structure(tmp_path):
    """4 steps (751, 501, 251, 1), kappa=800: all pooled; per prompt 1 + 3k rows (x2 CFG), 4k scorings."""
    tr = make_trainer(tmp_path)
    tr.bb.counters.reset()
    items, stats = tr.collect(0, 0, [0, 1])
    c, k = tr.bb.counters, 2
    assert c.unet_rows_nograd == 2 * 2 * (1 + 3 * k)
    assert c.reward_image_passes == 2 * 4 * k and c.vae_decodes == 2 * 4 * k
    assert c.unet_rows_grad == 0
    assert stats["pools"] == 8 and len(items) == stats["kept_pairs"]
    assert {it.t for it in items} <= {751, 501, 251, 1}


def test_mspo_items_cover_each_transition_and_cost_one_row_per_side(tmp_path):
    tr = make_trainer(tmp_path, MSPOTrainer, ["inner_steps=2"])
    items, stats = tr.collect(0, 0, [0])
    # segments 751->501->251, 251->1->0 (the last one ends at x_0): 2 pools x 2 transitions
    assert stats["pools"] == 2
    by_pool = {}
    for it in items:
        by_pool.setdefault(it.key[1], []).append(it)
    for its in by_pool.values():
        assert [it.shared for it in sorted(its, key=lambda i: i.key)] == [True, False]
        first, second = sorted(its, key=lambda i: i.key)
        assert torch.equal(second.x_t, first.x_w) and torch.equal(second.x_t_lose, first.x_l)
        assert second.t < first.t
    tr.bb.counters.reset()
    loss, _ = tr.loss(items, len(items))
    shared = sum(it.shared for it in items)
    assert tr.bb.counters.unet_rows_grad == 2 * (shared + 2 * (len(items) - shared))
    assert tr.bb.counters.unet_calls == 2
    # and equals the per-item loss computed one forward per side
    eng = tr.engine
    per = []
    for it in items:
        cond, uncond = eng.encode([PROMPTS[it.prompt]])
        start_l = it.x_t if it.shared else it.x_t_lose
        t = torch.tensor([it.t])
        lw = eng.log_prob(it.x_t[None], t, it.x_w[None], cond, uncond)
        ll = eng.log_prob(start_l[None], t, it.x_l[None], cond, uncond)
        with torch.no_grad(), tr.bb.lora_disabled():
            rw = eng.log_prob(it.x_t[None], t, it.x_w[None], cond, uncond)
            rl = eng.log_prob(start_l[None], t, it.x_l[None], cond, uncond)
        per.append(spo_loss(lw, ll, rw, rl, tr.cfg.beta, tr.cfg.clamp_eps)[0])
    assert abs(torch.cat(per).mean().item() - loss.item()) < 1e-6


# -- pair filtering -----------------------------------------------------------------------------------
def test_preference_gap_is_softmax_difference():
    gap = preference_gap(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0]))
    p = torch.softmax(torch.tensor([2.0, 1.0]), 0)
    assert gap[0].item() == pytest.approx((p[0] - p[1]).item()) and gap[1].item() == 0.0


@pytest.mark.parametrize("threshold", ["0.0", "0.3"])
def test_zero_margin_pairs_are_dropped(tmp_path, threshold):
    tr = make_trainer(tmp_path, sets=[f"threshold={threshold}"], scorer=lambda im, t, p: torch.zeros(im.shape[0]),
                      perturb=False)
    items, stats = tr.collect(0, 0, [0, 1])
    assert items == [] and stats["kept_pairs"] == 0 and stats["pools"] == 8


def test_threshold_keeps_only_clear_pairs(tmp_path):
    # scores 0 or 10 by candidate brightness order -> p_w - p_l = 0.9999 ; ties -> 0
    def scorer(images, t, prompts):
        m = images.mean(dim=(1, 2, 3))
        return torch.where(m > m.median(), 10.0, 0.0)

    tr = make_trainer(tmp_path, sets=["threshold=0.3"], scorer=scorer, perturb=False)
    items, stats = tr.collect(0, 0, [0, 1])
    assert 0 < stats["kept_pairs"] <= stats["pools"]
    assert all(it.prob_gap > 0.3 for it in items)


# -- gradient clipping --------------------------------------------------------------------------------
def _set_grads(params, total_norm):
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=g) for p in params]
    norm = torch.linalg.vector_norm(torch.stack([x.norm() for x in grads]))
    for p, x in zip(params, grads):
        p.grad = x * (total_norm / norm)


def _norm(params):
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()


def test_clipping_really_clips_large_gradients_and_leaves_small_ones(tmp_path):
    tr = make_trainer(tmp_path, sets=["max_grad_norm=1.0"], perturb=False)
    # the trainer has already built its optimizer from the parameters: an iterator would be spent now
    _set_grads(tr.params, 10.0)
    before = tr.clip_gradients()
    assert float(before) == pytest.approx(10.0, rel=1e-4)
    assert _norm(tr.params) == pytest.approx(1.0, rel=1e-4)
    _set_grads(tr.params, 0.5)
    small = [p.grad.clone() for p in tr.params]
    tr.clip_gradients()
    assert all(torch.equal(p.grad, s) for p, s in zip(tr.params, small))


def test_the_official_exhausted_iterator_clips_nothing(tmp_path):
    """What the official code does: clip_grad_norm_ on a filter() the optimizer already consumed."""
    tr = make_trainer(tmp_path, perturb=False)
    it = filter(lambda p: p.requires_grad, tr.bb.unet.parameters())
    torch.optim.AdamW(it, lr=1e-3)
    _set_grads(tr.params, 10.0)
    tr.acc.clip_grad_norm_(it, 1.0)
    assert _norm(tr.params) == pytest.approx(10.0, rel=1e-4)


def test_a_training_step_uses_clipped_gradients(tmp_path):
    """The optimizer step of the training loop sees gradients of norm <= max_grad_norm."""
    tr = make_trainer(tmp_path, sets=["max_grad_norm=1e-3"])
    items = _items(tr)
    seen, step = [], tr.optimizer.step

    def spy(*a, **kw):
        seen.append(_norm(tr.params))
        return step(*a, **kw)

    tr.optimizer.step = spy
    logs = tr.train_items(items[:2])
    assert logs[0]["grad_norm"] > 1e-3  # the raw norm is logged ...
    assert seen[0] == pytest.approx(1e-3, rel=1e-3)  # ... the step used the clipped gradients


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    """Two micro-batches of one pair accumulate to the gradient of one batch of two pairs.

    Compared at the optimizer step, not after it: Adam's first update is ~lr * sign(g), so a gradient
    entry that is ~0 can flip sign under a different summation order and move a parameter by 2 * lr.
    """
    a = make_trainer(tmp_path / "a", sets=["train_batch_size=2", "grad_accum=1", "max_grad_norm=none"])
    b = make_trainer(tmp_path / "b", sets=["train_batch_size=1", "grad_accum=2", "max_grad_norm=none"])
    grads = {}
    for name, tr in (("a", a), ("b", b)):
        step = tr.optimizer.step

        def spy(*args, _tr=tr, _name=name, _step=step, **kw):
            grads.setdefault(_name, []).append(torch.cat([p.grad.flatten().clone() for p in _tr.params]))
            return _step(*args, **kw)

        tr.optimizer.step = spy
    items = _items(a)[:2]
    la, lb = a.train_items(items), b.train_items(items)
    assert len(la) == len(lb) == 1 and la[0]["loss"] == pytest.approx(lb[0]["loss"], abs=1e-6)
    assert la[0]["grad_norm"] == pytest.approx(lb[0]["grad_norm"], rel=1e-4)
    assert len(grads["a"]) == len(grads["b"]) == 1  # one optimizer step each
    ga, gb = grads["a"][0], grads["b"][0]
    assert ga.norm() > 0
    assert (ga - gb).norm() <= 1e-4 * ga.norm()


def test_non_finite_loss_stops_with_a_clear_error(tmp_path):
    from spobench.trainers.loop import TrainingError

    tr = make_trainer(tmp_path)
    items = _items(tr)
    tr.loss = lambda mb, total: (torch.tensor(float("nan"), requires_grad=True), {})
    with pytest.raises(TrainingError, match="non-finite loss.*no checkpoint was written yet"):
        tr.train_items(items)


# -- config -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sets, message", [
    (["kapa=700"], "unknown setting 'kapa' (did you mean 'kappa'?)"),
    (["k=1"], "setting 'k' must be >= 2 (got 1)"),
    (["k=2.5"], "setting 'k' must be an integer (got 2.5)"),
    (["beta=abc"], "setting 'beta' must be a number (got 'abc')"),
    (["beta=0"], "setting 'beta' must be > 0 (got 0.0)"),
    (["kappa=1000"], "setting 'kappa' must be < 1000 (got 1000)"),
    (["kappa=-1"], "setting 'kappa' must be >= 0 (got -1)"),
    (["init=best"], "setting 'init' must be one of 'random', 'win', 'lose' (got 'best')"),
    (["threshold=1.5"], "setting 'threshold' must be < 1 (got 1.5)"),
    (["eta=0"], "setting 'eta' must be > 0 (got 0.0)"),
    (["t_min=800"], "setting 't_min' must be <= kappa (750) (got 800)"),
    (["k"], "--set 'k': expected key=value"),
    # NaN and inf pass every `v < bound` check; each number must be finite first
    (["threshold=nan"], "--set: setting 'threshold' must be a finite number (got nan)"),
    (["lr=nan"], "--set: setting 'lr' must be a finite number (got nan)"),
    (["beta=inf"], "setting 'beta' must be a finite number (got inf)"),
    (["guidance_scale=-inf"], "setting 'guidance_scale' must be a finite number (got -inf)"),
    (["max_grad_norm=nan"], "setting 'max_grad_norm' must be a finite number"),
    (["k=nan"], "setting 'k' must be an integer (got nan)"),
    (["prompts="], "setting 'prompts' is empty"),
    (["scorer= "], "setting 'scorer' is empty"),
    (["reward=metric:toy_aesthetic"], "unknown setting 'reward' (did you mean 'scorer'?)"),
    (["learning_rate=1e-4"], "unknown setting 'learning_rate' (did you mean 'lr'?)"),
])
def test_bad_settings_name_the_field(sets, message):
    with pytest.raises(InputError) as e:
        SPOConfig.load(None, sets)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_config_file_then_overrides(tmp_path):
    f = tmp_path / "spo.toml"
    f.write_text('k = 3\nkappa = 600\nreduction = "sum"\nclamp_eps = 0.2\n')
    cfg = SPOConfig.load(f, ["kappa=500", "clamp_eps=none", "scorer=metric:toy_aesthetic"])
    assert (cfg.k, cfg.kappa, cfg.reduction, cfg.clamp_eps, cfg.scorer) == (3, 500, "sum", None, "metric:toy_aesthetic")
    bad = tmp_path / "bad.toml"
    bad.write_text("beta = -1\n")
    with pytest.raises(InputError, match="setting 'beta' must be > 0"):
        SPOConfig.load(bad)


def test_config_files_name_file_and_field(tmp_path):
    f = tmp_path / "nan.toml"
    f.write_text("beta = nan\n")
    with pytest.raises(InputError, match=r"nan.toml: setting 'beta' must be a finite number \(got nan\)"):
        SPOConfig.load(f)
    f = tmp_path / "utf16.toml"
    f.write_bytes("k = 3\n".encode("utf-16"))
    with pytest.raises(InputError, match=r"utf16.toml:1: not valid UTF-8"):
        SPOConfig.load(f)
    f = tmp_path / "bom.toml"
    f.write_bytes("k = 3\n".encode("utf-8-sig"))  # a UTF-8 BOM is still UTF-8
    assert SPOConfig.load(f).k == 3
    with pytest.raises(InputError, match=r"ckpt/config.json: setting 'kappa' must be < 1000"):
        SPOConfig.from_dict({"kappa": 5000}, "ckpt/config.json")


def test_validate_checks_values_set_in_code():
    cfg = SPOConfig()
    cfg.eta = float("nan")
    with pytest.raises(InputError, match="setting 'eta' must be a finite number"):
        cfg.validate()


def test_d3po_names_its_reward():
    from spobench.trainers.d3po import D3POConfig

    with pytest.raises(InputError, match=r"unknown setting 'scorer' \(did you mean 'reward'\?\)"):
        D3POConfig.load(None, ["scorer=metric:toy_aesthetic"])


def test_backbone_defaults_fill_unset_fields():
    from spobench.models.backbones.base import BackboneDefaults

    d = BackboneDefaults(lora_rank=64, lr=1e-5, spo_threshold=0.4, resolution=1024)
    cfg = MSPOConfig.load(None, ["lr=3e-5"]).resolve(d)
    assert (cfg.lora_rank, cfg.lr, cfg.threshold, cfg.resolution, cfg.inner_steps) == (64, 3e-5, 0.4, 1024, 4)


def test_resume_refuses_changed_algorithm_settings():
    stored = SPOConfig.load(None, ["k=4"])
    SPOConfig.load(None, ["k=4", "epochs=20"]).check_resume(stored)  # epochs may change
    with pytest.raises(InputError, match="setting 'k' differs from the run being resumed"):
        SPOConfig.load(None, ["k=2"]).check_resume(stored)


def test_seeds_depend_on_every_part():
    seeds = {derive_seed(0, e, r, i) for e in range(3) for r in range(3) for i in range(3)}
    assert len(seeds) == 27 and derive_seed(0, 1, 2, 3) == derive_seed(0, 1, 2, 3)
    assert all(0 <= s < 2**63 for s in seeds)


def test_compile_without_a_cpu_compiler_is_a_clear_error(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    with pytest.raises(InputError, match="setting 'compile'.*C\\+\\+ compiler"):
        make_trainer(tmp_path, sets=["compile=true"])


@pytest.mark.slow
@pytest.mark.skipif(not any(__import__("shutil").which(c) for c in ("g++", "c++", "clang++")),
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_unet_gives_the_same_round(tmp_path):
    """``compile=true`` (torch.compile of the UNet, in place) is the same math: the same pools and pairs,
    the same loss and gradients at the optimizer step, up to float rounding; the LoRA's keys are unchanged."""
    eager = make_trainer(tmp_path / "eager", sets=["max_grad_norm=none"])
    comp = make_trainer(tmp_path / "compiled", sets=["max_grad_norm=none", "compile=true"])
    assert comp.cfg.compile and not eager.cfg.compile
    assert comp.bb.unet._compiled_call_impl is not None and eager.bb.unet._compiled_call_impl is None
    got = {}
    for name, tr in (("eager", eager), ("compiled", comp)):
        items, stats = tr.collect(0, 0, [0, 1])
        step = tr.optimizer.step

        def spy(*args, _tr=tr, _name=name, _step=step, **kw):
            got[_name + "_grad"] = torch.cat([p.grad.flatten().clone() for p in _tr.params])
            return _step(*args, **kw)

        tr.optimizer.step = spy
        logs = tr.train_items(items)
        got[name] = (items, stats, logs, {k: v.clone() for k, v in tr.bb.lora_state_dict().items()})
    (ie, se, le, we), (ic, sc, lc, wc) = got["eager"], got["compiled"]
    assert len(ie) == len(ic) > 0 and se["kept_pairs"] == sc["kept_pairs"]
    for a, b in zip(ie, ic):
        assert a.t == b.t and torch.allclose(a.x_t, b.x_t, atol=1e-4) and torch.allclose(a.x_w, b.x_w, atol=1e-4)
    assert [r["loss"] for r in le] == pytest.approx([r["loss"] for r in lc], abs=1e-5)
    ge, gc = got["eager_grad"], got["compiled_grad"]
    assert ge.norm() > 0 and (ge - gc).norm() <= 1e-3 * ge.norm()
    # the LoRA itself is not compared after the step: Adam's first update is ~lr * sign(g), so a gradient
    # entry near 0 may flip sign under float rounding (see test_gradient_accumulation_equals_one_big_batch)
    assert we.keys() == wc.keys() and all(we[k].shape == wc[k].shape for k in we)


def test_bf16_frozen_weights_train_an_fp32_lora(tmp_path):
    """dtype=bf16 (meant for GPUs; CPUs run it too): frozen UNet in bf16, LoRA and optimizer in fp32, and
    the same round's loss and gradient norm as fp32 to bf16 precision."""
    got = {}
    for dt in ("fp32", "bf16"):
        tr = make_trainer(tmp_path / dt, sets=[f"dtype={dt}", "max_grad_norm=none"])
        items, _ = tr.collect(0, 0, [0, 1])
        logs = tr.train_items(items)
        frozen = {p.dtype for n, p in tr.bb.unet.named_parameters() if "lora_" not in n}
        assert frozen == {torch.bfloat16 if dt == "bf16" else torch.float32}
        assert {p.dtype for p in tr.params} == {torch.float32} and all(p.grad is None or p.grad.dtype == torch.float32
                                                                       for p in tr.params)
        got[dt] = (len(items), logs[0]["loss"], logs[0]["grad_norm"])
    assert got["bf16"][0] == got["fp32"][0] > 0
    assert got["bf16"][1] == pytest.approx(got["fp32"][1], rel=0.01)
    assert got["bf16"][2] == pytest.approx(got["fp32"][2], rel=0.05) and got["bf16"][2] > 0
