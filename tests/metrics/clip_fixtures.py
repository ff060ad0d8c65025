"""Tiny checkpoints in the OFFICIAL layouts for the CLIP-based metrics (PickScore, HPSv2, aesthetic),
plus an independent pure-torch reference of open_clip's CLIP forward.

Import from a test module with::

    sys.path.insert(0, str(Path(__file__).parent)); import clip_fixtures as cf
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WORDS = ["a", "photo", "of", "red", "cat", "dog", "blue", "car", "on", "the", "green", "tree", "painting"]
VISION = dict(width=128, layers=2, heads=2, patch=8, image=32, mlp=256)  # open_clip's head width 64 -> 2 heads
TEXT = dict(width=64, layers=2, heads=1, context=77, mlp=128)
EMBED = 16
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# -- a CLIP BPE vocabulary small enough for tests -----------------------------------------------

def bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiny_vocab(words=WORDS) -> tuple[dict[str, int], list[str]]:
    """CLIP's layout in miniature: 256 byte symbols, their ``</w>`` forms, whole-word tokens built by
    suffix merges (``d</w>`` -> ``ed</w>`` -> ``red</w>``), then <|startoftext|>, <|endoftext|> last
    (so end-of-text has the largest id, as in CLIP)."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    known, merges = set(tokens), []
    for word in words:
        suffix = word[-1] + "</w>"
        for ch in reversed(word[:-1]):
            merges.append(f"{ch} {suffix}")
            suffix = ch + suffix
            if suffix not in known:
                known.add(suffix)
                tokens.append(suffix)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    merges = list(dict.fromkeys(merges))
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer(folder: Path, pad_token: str = "!") -> Path:
    """A CLIPTokenizer folder (vocab.json, merges.txt, configs). ``pad_token="!"`` (id 0) is what
    laion/CLIP-ViT-H-14-laion2B-s32B-b79K's tokenizer uses, i.e. open_clip's zero padding."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = tiny_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **special}))
    return folder


def vocab_size() -> int:
    return len(tiny_vocab()[0])


def open_clip_ids(text_words: list[str], context: int = 77) -> torch.Tensor:
    """What open_clip's tokenizer gives for lower-case words that are whole tokens: sot, words, eot, zeros."""
    vocab, _ = tiny_vocab()
    ids = [vocab["<|startoftext|>"]] + [vocab[w + "</w>"] for w in text_words] + [vocab["<|endoftext|>"]]
    return torch.tensor(ids + [0] * (context - len(ids)))


def write_processor_folder(folder: Path, size: int = 32) -> Path:
    """laion/CLIP-ViT-H-14-laion2B-s32B-b79K's processor files, at a tiny size."""
    write_tokenizer(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": size, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
        "resample": 3, "size": size,
    }))
    return folder


# -- a tiny transformers CLIPModel folder --------------------------------------------------------

def write_clip_model(folder: Path, seed: int = 0, projection_dim: int = EMBED, image_size: int = 32,
                     hidden_act: str = "gelu") -> Path:
    from transformers import CLIPConfig, CLIPModel

    v = vocab_size()
    config = CLIPConfig(
        text_config=dict(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act=hidden_act,
                         eos_token_id=v - 1, bos_token_id=v - 2, pad_token_id=0, projection_dim=projection_dim),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=8, hidden_act=hidden_act, projection_dim=projection_dim),
        projection_dim=projection_dim, logit_scale_init_value=math.log(1 / 0.07),
    )
    torch.manual_seed(seed)
    model = CLIPModel(config)
    with torch.no_grad():  # make the LayerNorms non-trivial so that wrong wiring shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(folder))
    return folder


# -- a tiny open_clip CLIP state dict ------------------------------------------------------------

def open_clip_state_dict(seed: int = 0, vision=VISION, text=TEXT, embed: int = EMBED, vocab: int | None = None,
                         attn_mask: bool = False) -> dict[str, torch.Tensor]:
    """open_clip ``CLIP`` parameter names and shapes (as in HPS_v2_compressed.pt's ``state_dict``)."""
    g = torch.Generator().manual_seed(seed)
    vocab = vocab or vocab_size()

    def rn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    sd: dict[str, torch.Tensor] = {}

    def ln(name, n):
        sd[name + ".weight"] = 1 + rn(n, scale=0.1)
        sd[name + ".bias"] = rn(n, scale=0.05)

    def blocks(prefix, width, layers, mlp):
        for i in range(layers):
            b = f"{prefix}.resblocks.{i}."
            ln(b + "ln_1", width)
            sd[b + "attn.in_proj_weight"] = rn(3 * width, width, scale=width ** -0.5)
            sd[b + "attn.in_proj_bias"] = rn(3 * width, scale=0.05)
            sd[b + "attn.out_proj.weight"] = rn(width, width, scale=width ** -0.5)
            sd[b + "attn.out_proj.bias"] = rn(width, scale=0.05)
            ln(b + "ln_2", width)
            sd[b + "mlp.c_fc.weight"] = rn(mlp, width, scale=width ** -0.5)
            sd[b + "mlp.c_fc.bias"] = rn(mlp, scale=0.05)
            sd[b + "mlp.c_proj.weight"] = rn(width, mlp, scale=mlp ** -0.5)
            sd[b + "mlp.c_proj.bias"] = rn(width, scale=0.05)

    W, p = vision["width"], vision["patch"]
    grid = vision["image"] // p
    sd["visual.class_embedding"] = rn(W, scale=W ** -0.5)
    sd["visual.positional_embedding"] = rn(grid * grid + 1, W, scale=W ** -0.5)
    sd["visual.proj"] = rn(W, embed, scale=W ** -0.5)
    sd["visual.conv1.weight"] = rn(W, 3, p, p, scale=(3 * p * p) ** -0.5)
    ln("visual.ln_pre", W)
    blocks("visual.transformer", W, vision["layers"], vision["mlp"])
    ln("visual.ln_post", W)
    T = text["width"]
    sd["token_embedding.weight"] = rn(vocab, T, scale=0.5)
    sd["positional_embedding"] = rn(text["context"], T, scale=0.1)
    blocks("transformer", T, text["layers"], text["mlp"])
    ln("ln_final", T)
    sd["text_projection"] = rn(T, embed, scale=T ** -0.5)
    sd["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    if attn_mask:
        sd["attn_mask"] = torch.empty(text["context"], text["context"]).fill_(float("-inf")).triu_(1)
    return sd


# -- independent reference: open_clip's forward in plain torch -----------------------------------

def _resblock(x, sd, pre, heads, mask=None):
    width = x.shape[-1]
    mha = nn.MultiheadAttention(width, heads, batch_first=True)
    mha.load_state_dict({"in_proj_weight": sd[pre + "attn.in_proj_weight"], "in_proj_bias": sd[pre + "attn.in_proj_bias"],
                         "out_proj.weight": sd[pre + "attn.out_proj.weight"], "out_proj.bias": sd[pre + "attn.out_proj.bias"]})
    mha.eval()
    h = F.layer_norm(x, (width,), sd[pre + "ln_1.weight"], sd[pre + "ln_1.bias"], eps=1e-5)
    x = x + mha(h, h, h, need_weights=False, attn_mask=mask)[0]
    h = F.layer_norm(x, (width,), sd[pre + "ln_2.weight"], sd[pre + "ln_2.bias"], eps=1e-5)
    h = F.linear(F.gelu(F.linear(h, sd[pre + "mlp.c_fc.weight"], sd[pre + "mlp.c_fc.bias"])),
                 sd[pre + "mlp.c_proj.weight"], sd[pre + "mlp.c_proj.bias"])
    return x + h


def _n_layers(sd, prefix):
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


@torch.no_grad()
def reference_image_features(sd, pixels: torch.Tensor, heads: int) -> torch.Tensor:
    sd = {k: v.float() for k, v in sd.items()}
    conv = sd["visual.conv1.weight"]
    W = conv.shape[0]
    x = F.conv2d(pixels, conv, stride=conv.shape[-1])  # (N, W, g, g)
    x = x.reshape(x.shape[0], W, -1).permute(0, 2, 1)
    x = torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, W), x], dim=1)
    x = x + sd["visual.positional_embedding"]
    x = F.layer_norm(x, (W,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"], eps=1e-5)
    for i in range(_n_layers(sd, "visual.transformer.resblocks.")):
        x = _resblock(x, sd, f"visual.transformer.resblocks.{i}.", heads)
    x = F.layer_norm(x[:, 0], (W,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"], eps=1e-5)
    return x @ sd["visual.proj"]


@torch.no_grad()
def reference_text_features(sd, ids: torch.Tensor, heads: int) -> torch.Tensor:
    sd = {k: v.float() for k, v in sd.items()}
    T = sd["token_embedding.weight"].shape[1]
    L = ids.shape[1]
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][:L]
    mask = torch.empty(L, L).fill_(float("-inf")).triu_(1)
    for i in range(_n_layers(sd, "transformer.resblocks.")):
        x = _resblock(x, sd, f"transformer.resblocks.{i}.", heads, mask)
    x = F.layer_norm(x, (T,), sd["ln_final.weight"], sd["ln_final.bias"], eps=1e-5)
    return x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ sd["text_projection"]


# -- LAION improved-aesthetic-predictor head -----------------------------------------------------

def aesthetic_head_state_dict(in_dim: int = EMBED, seed: int = 0) -> dict[str, torch.Tensor]:
    """``MLP.layers`` of improved-aesthetic-predictor: Linear(in,1024), Dropout, Linear(1024,128),
    Dropout, Linear(128,64), Dropout, Linear(64,16), Linear(16,1) -> keys layers.{0,2,4,6,7}."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for idx, (n_in, n_out) in zip((0, 2, 4, 6, 7), ((in_dim, 1024), (1024, 128), (128, 64), (64, 16), (16, 1))):
        sd[f"layers.{idx}.weight"] = torch.randn(n_out, n_in, generator=g) * n_in ** -0.5
        sd[f"layers.{idx}.bias"] = torch.randn(n_out, generator=g) * 0.1
    return sd


def reference_aesthetic(sd, emb: torch.Tensor) -> torch.Tensor:
    x = emb / emb.norm(dim=-1, keepdim=True)
    for idx in (0, 2, 4, 6, 7):  # no activations: the released head is purely linear
        x = F.linear(x, sd[f"layers.{idx}.weight"], sd[f"layers.{idx}.bias"])
    return x[:, 0]


# -- images and a fake Hugging Face cache --------------------------------------------------------

def images(n: int = 3, seed: int = 0, sizes=((40, 40), (64, 48), (30, 52))):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (sizes[i % len(sizes)][1], sizes[i % len(sizes)][0], 3), dtype=np.uint8))
            for i in range(n)]


def fake_hub_cache(cache: Path, repo_id: str, commit: str = "0" * 40) -> Path:
    """The snapshot folder of ``repo_id`` in a huggingface_hub cache layout at ``cache`` (files to be
    written by the caller)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    return snap
