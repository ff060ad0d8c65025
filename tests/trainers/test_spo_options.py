"""SPO's speed-to-result options (issue 16 part 2), each off by default: ``inner_epochs`` (more optimizer
passes over a round's kept pairs), ``keep_top`` (a threshold that follows the scorer's spread) and the
summed log-density with beta rescaled (``reduction=sum``, which equals the official mean with beta / (C H W)
when the clamp is off)."""

import math

import pytest
import torch

from spobench.trainers.spo import SPOConfig, SPOTrainer, keep_mask, preference_gap

PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a small white square"]


def mean_scorer(images, t, prompts):
    return images.mean(dim=(1, 2, 3)) * 200


def make_trainer(tmp_path, sets=(), name="run"):
    from spobench.models.backbones.tiny import TinyBackbone

    bb = TinyBackbone.build(0)
    base = ["prompts=unused", "k=2", "num_steps=4", "kappa=800", "epochs=1", "rollout_batch=2", "threshold=0.0",
            "train_batch_size=2"]
    cfg = SPOConfig.load(None, base + list(sets)).resolve(bb.defaults)
    tr = SPOTrainer(cfg, bb, tmp_path / name, prompts=PROMPTS, step_scorer=mean_scorer)
    g = torch.Generator().manual_seed(1)  # LoRA B starts at 0 (policy == reference): give it weight
    with torch.no_grad():
        for n, p in bb.unet.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return tr


def test_defaults_are_the_official_loop():
    cfg = SPOConfig()
    assert cfg.inner_epochs == 1 and cfg.keep_top is None and cfg.reduction == "mean" and cfg.clamp_eps == 0.1


# -- keep_top ------------------------------------------------------------------------------------------
def test_keep_mask_without_keep_top_is_the_fixed_threshold():
    gaps = [torch.tensor([0.05, 0.2, 0.0]), torch.tensor([0.11, 0.09])]
    got = keep_mask(gaps, 0.1, None)
    assert [m.tolist() for m in got] == [[False, True, False], [True, False]]


def test_keep_top_keeps_the_largest_gaps_of_the_whole_round():
    gaps = [torch.tensor([0.05, 0.30, 0.00, 0.01]), torch.tensor([0.20, 0.02, 0.40, 0.03])]
    got = keep_mask(gaps, 0.9, 0.25)  # ceil(0.25 * 8) = 2 pools, from any step; the threshold is not used
    assert [m.tolist() for m in got] == [[False, True, False, False], [False, False, True, False]]
    got = keep_mask(gaps, 0.0, 0.3)  # ceil(2.4) = 3
    assert sum(int(m.sum()) for m in got) == 3 and got[1][0] and got[0][1] and got[1][2]


def test_keep_top_never_keeps_a_zero_gap_and_breaks_ties_by_position():
    gaps = [torch.tensor([0.0, 0.0, 0.1]), torch.tensor([0.1, 0.0])]
    got = keep_mask(gaps, 0.0, 1.0)  # all 5 asked for, the 3 zero gaps dropped
    assert [m.tolist() for m in got] == [[False, False, True], [True, False]]
    got = keep_mask(gaps, 0.0, 0.2)  # one pool: the earlier of the two equal gaps
    assert [m.tolist() for m in got] == [[False, False, True], [False, False]]


def test_keep_top_in_a_round_keeps_that_fraction_of_its_pools(tmp_path):
    tr = make_trainer(tmp_path, ["keep_top=0.5"])
    items, stats = tr.collect(0, 0, [0, 1])
    assert stats["pools"] == 8 and stats["kept_pairs"] == 4 == len(items)
    every = make_trainer(tmp_path, ["threshold=0.0"], name="all").collect(0, 0, [0, 1])[0]
    gaps = sorted((it.prob_gap for it in every), reverse=True)
    assert sorted((it.prob_gap for it in items), reverse=True) == gaps[:4]  # the 4 largest of the 8


@pytest.mark.parametrize("bad", ["keep_top=0", "keep_top=1.5", "inner_epochs=0"])
def test_bad_values_name_the_setting(bad):
    from spobench.core.errors import InputError

    with pytest.raises(InputError, match=bad.split("=")[0]):
        SPOConfig.load(None, [bad])


# -- inner_epochs --------------------------------------------------------------------------------------
def test_inner_epochs_trains_each_kept_pair_again_in_a_new_order(tmp_path):
    one = make_trainer(tmp_path, name="one").round(0, 0)
    three = make_trainer(tmp_path, ["inner_epochs=3"], name="three").round(0, 0)
    n = len(one.items)
    assert n > 2 and len(three.items) == 3 * n and three.n_items == one.n_items == n
    keys = [it.key for it in one.items]
    assert [it.key for it in three.items[:n]] == keys  # pass 1 is the round as it was
    passes = [[it.key for it in three.items[p * n:(p + 1) * n]] for p in (1, 2)]
    assert all(sorted(p) == sorted(keys) for p in passes)  # each pass is every pair once
    assert passes[0] != keys and passes[1] != passes[0]  # in its own order (fixed by seed, epoch, round)
    again = make_trainer(tmp_path, ["inner_epochs=3"], name="again").round(0, 0)
    assert [it.key for it in again.items] == [it.key for it in three.items]


def test_inner_epochs_takes_that_many_times_the_optimizer_steps(tmp_path):
    one = make_trainer(tmp_path, name="one")
    three = make_trainer(tmp_path, ["inner_epochs=3"], name="three")
    steps1 = one.loop.train_items(one.round(0, 0).items)
    steps3 = three.loop.train_items(three.round(0, 0).items)
    assert len(steps3) == 3 * len(steps1)
    # the first pass is the same steps on the same pairs from the same start
    assert [s["loss"] for s in steps3[:len(steps1)]] == pytest.approx([s["loss"] for s in steps1], abs=1e-6)


# -- the summed log-density, beta rescaled ---------------------------------------------------------------
def test_sum_reduction_with_beta_over_dims_equals_the_mean_without_clamp(tmp_path):
    """Eq. 4 on the true log-density with beta / (C H W) is the official per-dimension mean with beta: same
    loss, same gradient (the clamp off: it acts on log-ratios, which differ by C H W)."""
    mean = make_trainer(tmp_path, ["reduction=mean", "clamp_eps=none", "beta=10"], name="mean")
    items = mean.collect(0, 0, [0, 1])[0]
    C, H, W = items[0].x_t.shape
    summed = make_trainer(tmp_path, ["reduction=sum", "clamp_eps=none", f"beta={10 / (C * H * W)!r}"], name="sum")
    lm, sm = mean.loss(items, len(items))
    ls, ss = summed.loss(items, len(items))
    assert lm.item() == pytest.approx(ls.item(), rel=1e-5)
    # the margin is a small difference of log-ratios ~40x its size: float32 rounding of those (which moves with
    # the thread count: 7e-5 between 1 and 2 threads here) sets the tolerance, not the margin's own size
    assert sm["margin"] == pytest.approx(ss["margin"], abs=1e-6 * 10 * sm["abs_logratio"])
    lp_m = mean.log_probs(items)[0].detach()
    lp_s = summed.log_probs(items)[0].detach()
    assert torch.allclose(lp_s, lp_m * C * H * W, rtol=1e-4)  # the sum is C H W means
    gm = torch.autograd.grad(lm, mean.params)
    gs = torch.autograd.grad(ls, summed.params)
    for a, b in zip(gm, gs):  # up to float rounding (a sum of 3,072 terms against their mean)
        assert (a - b).norm() <= 1e-3 * a.norm()
    assert math.isfinite(lm.item())


def test_preference_gap_orders_as_the_score_gap():
    s_l = torch.zeros(5)
    s_w = torch.tensor([0.0, 0.1, 0.5, 1.0, 3.0])
    gap = preference_gap(s_w, s_l)
    assert (gap[1:] > gap[:-1]).all() and gap[0] == 0  # keep_top ranks pools by it
