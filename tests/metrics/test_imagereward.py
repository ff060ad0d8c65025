"""ImageReward on tiny random weights written in the official checkpoint layout.

The reference below re-derives the score from the raw state dict with plain torch ops (timm's ViT
block as in BLIP's vit.py, MED's BERT self/cross-attention as in BLIP's med.py, ImageReward's MLP
and normalisation), independently of transformers' modules.
"""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from spobench.core.errors import MissingWeightsError, ModelLoadError
from spobench.metrics import imagereward as ir

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "red", "cat", "dog", "on", "the",
         "blue", "car", "##s", "and", "green", "tree", "an"]
VOCAB = len(WORDS) + 2  # + [DEC], [ENC]
VIT = dict(width=128, depth=2, heads=2, patch=16, image=32, mlp=256)
MED = {
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert", "num_attention_heads": 4,
    "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": VOCAB,
    "encoder_width": 768, "add_cross_attention": True,
}


def _lin(g, sd, name, n_out, n_in, scale=None):
    scale = scale if scale is not None else 1.0 / math.sqrt(n_in)
    sd[name + ".weight"] = torch.randn(n_out, n_in, generator=g) * scale
    sd[name + ".bias"] = torch.randn(n_out, generator=g) * 0.05


def _ln(g, sd, name, n):
    sd[name + ".weight"] = 1 + 0.1 * torch.randn(n, generator=g)
    sd[name + ".bias"] = 0.05 * torch.randn(n, generator=g)


def official_state_dict(seed=0):
    """A tiny ImageReward state dict with the official key names (ImageReward.blip.* / mlp.*)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    D, p = VIT["width"], "blip.visual_encoder."
    n_pos = (VIT["image"] // VIT["patch"]) ** 2 + 1
    sd[p + "cls_token"] = torch.randn(1, 1, D, generator=g) * 0.1
    sd[p + "pos_embed"] = torch.randn(1, n_pos, D, generator=g) * 0.1
    sd[p + "patch_embed.proj.weight"] = torch.randn(D, 3, VIT["patch"], VIT["patch"], generator=g) * 0.03
    sd[p + "patch_embed.proj.bias"] = torch.randn(D, generator=g) * 0.05
    for i in range(VIT["depth"]):
        b = f"{p}blocks.{i}."
        _ln(g, sd, b + "norm1", D)
        _lin(g, sd, b + "attn.qkv", 3 * D, D)
        _lin(g, sd, b + "attn.proj", D, D)
        _ln(g, sd, b + "norm2", D)
        _lin(g, sd, b + "mlp.fc1", VIT["mlp"], D)
        _lin(g, sd, b + "mlp.fc2", D, VIT["mlp"])
    _ln(g, sd, p + "norm", D)
    H, t = MED["hidden_size"], "blip.text_encoder."
    sd[t + "embeddings.position_ids"] = torch.arange(MED["max_position_embeddings"]).expand(1, -1).clone()
    sd[t + "embeddings.word_embeddings.weight"] = torch.randn(VOCAB, H, generator=g) * 0.5
    sd[t + "embeddings.position_embeddings.weight"] = torch.randn(MED["max_position_embeddings"], H, generator=g) * 0.5
    _ln(g, sd, t + "embeddings.LayerNorm", H)
    for i in range(MED["num_hidden_layers"]):
        b = f"{t}encoder.layer.{i}."
        for part, kv_in in (("attention", H), ("crossattention", D)):
            _lin(g, sd, b + part + ".self.query", H, H)
            _lin(g, sd, b + part + ".self.key", H, kv_in)
            _lin(g, sd, b + part + ".self.value", H, kv_in)
            _lin(g, sd, b + part + ".output.dense", H, H)
            _ln(g, sd, b + part + ".output.LayerNorm", H)
        _lin(g, sd, b + "intermediate.dense", MED["intermediate_size"], H)
        _lin(g, sd, b + "output.dense", H, MED["intermediate_size"])
        _ln(g, sd, b + "output.LayerNorm", H)
    _lin(g, sd, "blip.vision_proj", 16, D)  # contrastive projections: in the checkpoint, unused by the score
    _lin(g, sd, "blip.text_proj", 16, H)
    widths = (H, 1024, 128, 64, 16, 1)
    for idx, (n_in, n_out) in zip((0, 2, 4, 6, 7), zip(widths[:-1], widths[1:])):
        _lin(g, sd, f"mlp.layers.{idx}", n_out, n_in, scale=1.0 / math.sqrt(n_in))
    return sd


# -- the independent reference ------------------------------------------------------------------

def ref_vit(sd, x):
    p, D, heads = "blip.visual_encoder.", VIT["width"], VIT["heads"]
    x = F.conv2d(x, sd[p + "patch_embed.proj.weight"], sd[p + "patch_embed.proj.bias"], stride=VIT["patch"])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[p + "cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd[p + "pos_embed"]
    for i in range(VIT["depth"]):
        b = f"{p}blocks.{i}."
        h = F.layer_norm(x, (D,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], 1e-6)
        B, N, C = h.shape
        qkv = F.linear(h, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]).reshape(B, N, 3, heads, C // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (C // heads) ** -0.5).softmax(dim=-1)
        h = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = x + F.linear(h, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        h = F.layer_norm(x, (D,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], 1e-6)
        h = F.linear(F.gelu(F.linear(h, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])),
                     sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
        x = x + h
    return F.layer_norm(x, (D,), sd[p + "norm.weight"], sd[p + "norm.bias"], 1e-6)


def ref_text(sd, ids, mask, enc):
    t, H, heads, eps = "blip.text_encoder.", MED["hidden_size"], MED["num_attention_heads"], MED["layer_norm_eps"]
    L = ids.shape[1]
    x = sd[t + "embeddings.word_embeddings.weight"][ids] + sd[t + "embeddings.position_embeddings.weight"][:L]
    x = F.layer_norm(x, (H,), sd[t + "embeddings.LayerNorm.weight"], sd[t + "embeddings.LayerNorm.bias"], eps)
    self_mask = (1.0 - mask[:, None, None, :].float()) * -10000.0
    enc_mask = (1.0 - torch.ones(enc.shape[:2])[:, None, None, :]) * -10000.0

    def attention(b, h, kv, add_mask):
        def split(z):
            return z.view(z.shape[0], z.shape[1], heads, H // heads).permute(0, 2, 1, 3)
        q = split(F.linear(h, sd[b + ".self.query.weight"], sd[b + ".self.query.bias"]))
        k = split(F.linear(kv, sd[b + ".self.key.weight"], sd[b + ".self.key.bias"]))
        v = split(F.linear(kv, sd[b + ".self.value.weight"], sd[b + ".self.value.bias"]))
        scores = q @ k.transpose(-1, -2) / math.sqrt(H // heads) + add_mask
        ctx = (scores.softmax(dim=-1) @ v).permute(0, 2, 1, 3).reshape(h.shape)
        out = F.linear(ctx, sd[b + ".output.dense.weight"], sd[b + ".output.dense.bias"])
        return F.layer_norm(out + h, (H,), sd[b + ".output.LayerNorm.weight"], sd[b + ".output.LayerNorm.bias"], eps)

    for i in range(MED["num_hidden_layers"]):
        b = f"{t}encoder.layer.{i}."
        x = attention(b + "attention", x, x, self_mask)
        x = attention(b + "crossattention", x, enc, enc_mask)
        inter = F.gelu(F.linear(x, sd[b + "intermediate.dense.weight"], sd[b + "intermediate.dense.bias"]))
        out = F.linear(inter, sd[b + "output.dense.weight"], sd[b + "output.dense.bias"])
        x = F.layer_norm(out + x, (H,), sd[b + "output.LayerNorm.weight"], sd[b + "output.LayerNorm.bias"], eps)
    return x


def ref_score(sd, pixels, ids, mask):
    feats = ref_text(sd, ids, mask, ref_vit(sd, pixels))[:, 0, :].float()
    h = feats
    for idx in (0, 2, 4, 6, 7):  # Dropout layers are identity at eval
        h = F.linear(h, sd[f"mlp.layers.{idx}.weight"], sd[f"mlp.layers.{idx}.bias"])
    return ((h - 0.16717362830052426) / 1.0333394966054072).squeeze(-1)


# -- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def state():
    return official_state_dict()


@pytest.fixture
def weights_dir(tmp_path, state):
    torch.save(state, tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_text(json.dumps(MED))
    (tmp_path / "bert-base-uncased").mkdir()
    (tmp_path / "bert-base-uncased" / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    return tmp_path


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)),  # landscape
            Image.fromarray(rng.integers(0, 256, (64, 33, 3), dtype=np.uint8)),  # portrait
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).convert("L")]  # grey, no resize


PROMPTS = ["a photo of a red cat", "two blue cars on the tree and a green dog " * 4, "an unknownword"]


# -- tests --------------------------------------------------------------------------------------

def test_forward_matches_reference_math(state):
    model = ir.build_model(state, MED)
    assert model.vision.config.image_size == 32 and model.vision.config.num_attention_heads == 2
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(3, 3, 32, 32, generator=g)
    ids = torch.randint(5, VOCAB, (3, 35), generator=g)
    ids[:, 0] = 2
    mask = torch.ones(3, 35, dtype=torch.long)
    mask[1, 20:] = 0  # padded rows: the self-attention mask matters
    mask[2, 7:] = 0
    ids[mask == 0] = 0
    with torch.no_grad():
        ours = model(pixels, ids, mask)
        ref = ref_score(state, pixels, ids, mask)
        vit_diff = (model.vision(pixel_values=pixels).last_hidden_state - ref_vit(state, pixels)).abs().max()
    assert vit_diff <= 1e-5
    assert ours.shape == (3,)
    assert (ours - ref).abs().max() <= 1e-5, (ours, ref)
    assert ref.std() > 1e-3  # the tiny weights give distinct scores, so the check means something


def test_state_dict_mapping_is_strict(state):
    bad = dict(state)
    bad["blip.something_else.weight"] = torch.zeros(1)
    with pytest.raises(ModelLoadError, match=r"unexpected 1 key.*blip\.something_else\.weight"):
        ir.build_model(bad, MED)
    missing = {k: v for k, v in state.items() if k != "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"}
    with pytest.raises(ModelLoadError, match=r"missing 1 key.*blip\.text_encoder\.encoder\.layer\.1\.crossattention\.self\.key\.weight"):
        ir.build_model(missing, MED)
    block = {k: v for k, v in state.items()}
    block["blip.visual_encoder.blocks.0.attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(ModelLoadError, match=r"unexpected 1 key.*blocks\.0\.attn\.extra\.weight"):
        ir.build_model(block, MED)
    shifted = dict(state)
    shifted[ir.POSITION_IDS_KEY] = state[ir.POSITION_IDS_KEY] + 1
    with pytest.raises(ModelLoadError, match="position_ids"):
        ir.build_model(shifted, MED)
    # the unused contrastive projections are dropped, everything else is used
    converted = ir.convert_state_dict(state)
    assert not any("proj" in k and k.startswith(("vision_proj", "text_proj")) for k in converted)
    model = ir.build_model(state, MED)
    assert set(converted) == set(model.state_dict()) - {"text.embeddings.position_ids"}


def test_tokenizer_matches_imagereward_init_tokenizer(weights_dir):
    tok = ir.load_tokenizer(weights_dir / "bert-base-uncased")
    assert len(tok) == VOCAB
    assert tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [VOCAB - 2, VOCAB - 1]
    assert tok.bos_token == "[DEC]" and tok.enc_token_id == VOCAB - 1
    enc = tok(["A photo of a red CAT", PROMPTS[1]], padding="max_length", truncation=True, max_length=35,
              return_tensors="pt")
    ids = WORDS.index
    assert enc.input_ids[0, :8].tolist() == [ids("[CLS]"), ids("a"), ids("photo"), ids("of"), ids("a"), ids("red"),
                                             ids("cat"), ids("[SEP]")]
    assert enc.input_ids[0, 8:].eq(0).all() and enc.attention_mask[0].sum() == 8
    assert enc.input_ids.shape == (2, 35) and enc.attention_mask[1].all() and enc.input_ids[1, -1] == ids("[SEP]")


def test_clip_preprocess_resize_and_crop():
    # no resize needed (short side == size): a pure centre crop, left = round((300 - 224) / 2) = 38
    arr = np.zeros((224, 300, 3), dtype=np.uint8)
    arr[..., 0] = np.arange(300)[None, :] % 256
    arr[..., 1] = 77
    x = ir.clip_preprocess(Image.fromarray(arr), 224)
    assert x.shape == (3, 224, 224)
    mean, std = torch.tensor(ir.CLIP_MEAN), torch.tensor(ir.CLIP_STD)
    expect_r = ((torch.arange(38, 38 + 224) % 256).float() / 255 - mean[0]) / std[0]
    assert torch.allclose(x[0, 5], expect_r, atol=1e-6)
    assert torch.allclose(x[1], torch.full((224, 224), (77 / 255 - mean[1].item()) / std[1].item()), atol=1e-6)
    # resize: the shorter side to `size` with PIL bicubic, the longer to int(size * long / short)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 80, 3), dtype=np.uint8))
    resized = img.resize((int(32 * 80 / 50), 32), Image.BICUBIC)  # (51, 32)
    left = int(round((51 - 32) / 2.0))
    expect = np.asarray(resized.crop((left, 0, left + 32, 32)), dtype=np.float32) / 255
    got = ir.clip_preprocess(img, 32) * std[:, None, None] + mean[:, None, None]
    assert np.allclose(got.permute(1, 2, 0).numpy(), expect, atol=1e-6)


def test_plugin_scores_equal_reference(weights_dir, state):
    metric = ir.ImageReward(weights=weights_dir, batch_size=2)
    assert metric.identity().checkpoint_sha256 == metric.checkpoint_sha256 and len(metric.checkpoint_sha256) == 64
    images = _images()
    out = metric.score(images, PROMPTS)
    assert out.scores.shape == (3,) and out.tags is None
    tok = ir.load_tokenizer(weights_dir / "bert-base-uncased")
    enc = tok(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert enc.input_ids[:, 0].eq(WORDS.index("[CLS]")).all()  # ImageReward keeps [CLS] (no [ENC] swap)
    pixels = torch.stack([ir.clip_preprocess(im, 32) for im in images])
    with torch.no_grad():
        ref = ref_score(state, pixels, enc.input_ids, enc.attention_mask).double().numpy()
    assert np.abs(out.scores - ref).max() <= 1e-5
    # scoring one at a time gives the same numbers (no cross-talk within a batch)
    one = ir.ImageReward(weights=weights_dir, batch_size=1).score(images[:2], PROMPTS[:2]).scores
    assert np.abs(one - out.scores[:2]).max() <= 1e-6


def test_missing_weights_names_files_and_source(tmp_path):
    with pytest.raises(MissingWeightsError) as e:
        ir.ImageReward(weights=tmp_path)
    msg = str(e.value)
    for word in ("ImageReward.pt", "med_config.json", "THUDM/ImageReward", "bert-base-uncased"):
        assert word in msg


def test_checkpoint_with_code_is_refused(weights_dir):
    import fractions

    # an arbitrary Python object: torch.load(weights_only=True) must refuse to unpickle it
    torch.save({"blip.visual_encoder.cls_token": fractions.Fraction(1, 3)}, weights_dir / "ImageReward.pt")
    with pytest.raises(ModelLoadError, match="weights-only"):
        ir.load_model(weights_dir)
