"""``RolloutEngine.encode`` caches each prompt's encoding: the same rows as encoding the batch afresh, one
text-encoder call per new prompt set, and a bounded cache."""

import torch

from spobench.engine.rollout import RolloutEngine
from spobench.models.backbones.tiny import TinyBackbone


def test_cached_rows_equal_a_fresh_encoding_and_encode_once(monkeypatch):
    bb = TinyBackbone.build(0)
    eng = RolloutEngine(bb)
    bb.encode_unconditional(1)  # the "" branch has its own cache (the backbone's)
    calls = []
    real = bb.encode_prompts
    monkeypatch.setattr(bb, "encode_prompts", lambda p, r=None: calls.append(list(p)) or real(p, r))
    prompts = ["a red circle", "two blue squares", "a green star", "a red circle"]
    cond, uncond = eng.encode(prompts)
    assert calls == [["a red circle", "two blue squares", "a green star"]]  # each distinct prompt once
    assert torch.equal(cond.hidden, real(prompts).hidden)
    assert uncond.hidden.shape[0] == 4
    again, _ = eng.encode(["a green star", "a red circle", "one yellow moon"])
    assert calls[-1] == ["one yellow moon"]  # only the new one is encoded
    assert torch.equal(again.hidden, real(["a green star", "a red circle", "one yellow moon"]).hidden)


def test_cache_is_bounded():
    eng = RolloutEngine(TinyBackbone.build(0))
    eng.PROMPT_CACHE = 3
    for i in range(6):
        eng.encode([f"prompt {i}", f"prompt {i + 1}"])
    assert len(eng._prompt_cache) == 3
    cond, _ = eng.encode([f"prompt {i}" for i in range(5)])  # a batch larger than the cache still works
    assert cond.hidden.shape[0] == 5
