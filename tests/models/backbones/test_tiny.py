"""The tiny backbone: deterministic build, exact save/load, tokenizer coverage."""

import pytest
import torch

from spobench.models.backbones.tiny import TinyBackbone, tiny_tokenizer
from spobench.toyworld.words import WORDS


def _state(bb):
    return {f"{name}.{k}": v for name, m in bb.modules().items() for k, v in m.state_dict().items()}


def test_build_is_deterministic():
    a, b = _state(TinyBackbone.build(0)), _state(TinyBackbone.build(0))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = _state(TinyBackbone.build(1))
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_build_does_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    TinyBackbone.build(0)
    assert torch.equal(torch.rand(3), expected)


def test_size():
    bb = TinyBackbone.build(0)
    n = sum(p.numel() for p in bb.unet.parameters())
    assert 0.9e6 < n < 1.2e6
    assert bb.defaults.resolution == 32 and bb.prediction_type == "v_prediction"


def test_save_load_round_trip(tmp_path):
    bb = TinyBackbone.build(3)
    bb.save_pretrained(tmp_path / "m")
    back = TinyBackbone.load(tmp_path / "m")
    a, b = _state(bb), _state(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    prompts = ["a small red circle", "zebra 123 \u00fc"]
    ca, cb = bb.encode_prompts(prompts), back.encode_prompts(prompts)
    assert torch.equal(ca.hidden, cb.hidden)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(bb.predict(x, 501, ca, 5.0), back.predict(x, 501, cb, 5.0))
    assert back.scheduler.config.prediction_type == "v_prediction"
    assert back.timesteps(20).tolist() == bb.timesteps(20).tolist()


def test_every_word_is_one_token():
    tok = tiny_tokenizer()
    for word in WORDS:
        ids = tok(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, word
        assert tok.convert_ids_to_tokens(ids) == [word + "</w>"]


@pytest.mark.parametrize("text", ["zebra 123 \u00fc", "\u732b \U0001F600 !?", "", "RED Circle"])
def test_any_text_tokenises(text):
    tok = tiny_tokenizer()
    enc = tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True)
    ids = enc.input_ids
    assert len(ids) == 32 and ids[0] == tok.bos_token_id and tok.eos_token_id in ids
    assert tok.unk_token_id not in ids[1:ids.index(tok.eos_token_id)]  # no unknowns: byte fallback


def test_prompt_of_the_grammar_is_short():
    tok = tiny_tokenizer()
    assert len(tok("a large red circle above two small blue squares").input_ids) == 11


def test_vocab_files_are_reproducible(tmp_path):
    import importlib.util

    from spobench.models.backbones.tiny import TOKENIZER_DIR

    spec = importlib.util.spec_from_file_location("make_vocab", TOKENIZER_DIR / "make_vocab.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(tmp_path)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_text() == (TOKENIZER_DIR / name).read_text(), name
