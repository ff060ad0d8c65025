"""``Backbone.lora_merged``: the rollout policy with the LoRA folded into the frozen weights is the same
function up to float rounding, and leaves the weights bit-identical behind it (training is unaffected)."""

import pytest
import torch

from spobench.models.backbones.tiny import TinyBackbone


@pytest.fixture(scope="module")
def bb():
    bb = TinyBackbone.build(0)
    bb.add_lora(4)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # lora_B starts at 0: give the adapter an effect
        for n, p in bb.unet.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return bb


def _inputs(bb, n=3):
    g = torch.Generator().manual_seed(2)
    x = torch.randn((n, *bb.latent_shape()), generator=g)
    t = torch.tensor([951, 501, 1])[:n]
    return x, t, bb.encode_prompts(["a red circle", "two blue squares", "a green star"][:n])


def _state(bb):
    return {k: v.detach().clone() for k, v in bb.unet.state_dict().items()}


def test_merged_policy_equals_the_adapter_up_to_rounding(bb):
    x, t, cond = _inputs(bb)
    with torch.no_grad():
        on = bb.predict(x, t, cond, 5.0)
        with bb.lora_disabled():
            off = bb.predict(x, t, cond, 5.0)
    with bb.lora_merged() as merged:
        assert merged
        assert not torch.is_grad_enabled()
        m = bb.predict(x, t, cond, 5.0)
    assert (on - off).abs().max() > 1e-2  # the adapter changes the output...
    torch.testing.assert_close(m, on, atol=2e-5, rtol=1e-5)  # ...and the merged weights give the same


def test_weights_and_training_are_bit_identical_after(bb):
    before = _state(bb)
    x, t, cond = _inputs(bb, 2)
    params = bb.trainable_parameters()

    def grads():
        out = bb.predict(x, t, cond, 5.0)
        return [g.clone() for g in torch.autograd.grad(out.square().mean(), params)], out.detach()

    g0, o0 = grads()
    with bb.lora_merged():
        bb.predict(x, t, cond, 5.0)
    after = _state(bb)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert bb.trainable_parameters() == params and all(p.requires_grad for p in params)
    g1, o1 = grads()
    assert torch.equal(o0, o1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))


def test_restored_when_the_body_raises(bb):
    before = _state(bb)
    with pytest.raises(RuntimeError, match="boom"), bb.lora_merged():
        raise RuntimeError("boom")
    assert all(torch.equal(v, bb.unet.state_dict()[k]) for k, v in before.items())
    assert all(p.requires_grad for p in bb.trainable_parameters())


def test_no_merge_without_lora_or_in_reduced_precision():
    plain = TinyBackbone.build(0)
    with plain.lora_merged() as merged:
        assert not merged
    half = TinyBackbone.build(0).to(dtype=torch.bfloat16)
    half.add_lora(4)
    before = _state(half)
    with half.lora_merged() as merged:
        assert not merged  # bf16 would round the LoRA update away: the adapter stays on
        assert all(torch.equal(v, half.unet.state_dict()[k]) for k, v in before.items())
    with half.lora_merged(reduced_precision=True) as merged:
        assert merged
    assert all(torch.equal(v, half.unet.state_dict()[k]) for k, v in before.items())
