"""ImageReward (Xu et al., 2023) on transformers' BLIP modules.

The official checkpoint ``ImageReward.pt`` (THUDM/ImageReward on the Hugging Face hub) is the state
dict of ImageReward's ``ImageReward`` module: a BLIP ``visual_encoder`` (timm-style ViT-L/16 at 224),
a BERT ``text_encoder`` with cross-attention to the image ("MED", configured by ``med_config.json``)
and an MLP head. Its keys are renamed onto transformers' ``BlipVisionModel`` and ``BlipTextModel``
(the same modules BLIP was ported to) and loaded strictly: every checkpoint key is used or listed in
:data:`UNUSED_PREFIXES`, and every model parameter is filled.

The score follows ``ImageReward.score`` / ``inference_rank``:

    ids     = bert-base-uncased tokenizer (+ "[DEC]" as bos, "[ENC]" as an extra special token),
              padding="max_length", truncation, max_length=35; the ids go in as they are (ImageReward's
              reward path does not swap [CLS] for [ENC])
    img     = Resize(224, bicubic) -> CenterCrop(224) -> RGB -> ToTensor -> Normalize(CLIP mean/std)
    feats   = text_encoder(ids, mask, encoder_hidden_states=visual_encoder(img)).last_hidden_state[:, 0]
    score   = (mlp(feats) - 0.16717362830052426) / 1.0333394966054072

Formats: THUDM/ImageReward publishes ``ImageReward.pt`` as a pickle only, so it is read with
``torch.load(weights_only=True)`` (tensors and plain containers; no code runs) and checked against the
model key by key and shape by shape (:func:`spobench.core.weights.check_state_dict`): a missing, unexpected,
wrong-shaped, non-tensor or NaN entry is an error naming the file and the checkpoint's own key.
Nothing is downloaded and no remote code runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from spobench.core.errors import ModelLoadError
from spobench.metrics.base import Metric, find_weights, sha256_of
from spobench.core.weights import check_state_dict, check_tensors, load_state_file

CHECKPOINT = "ImageReward.pt"
MED_CONFIG = "med_config.json"
TOKENIZER_DIR = "bert-base-uncased"
FILES = (CHECKPOINT, MED_CONFIG, f"{TOKENIZER_DIR}/vocab.txt")
HOW_TO_GET = (
    "Download ImageReward.pt and med_config.json from the Hugging Face repo THUDM/ImageReward "
    "(https://huggingface.co/THUDM/ImageReward), and bert-base-uncased's vocab.txt "
    "(https://huggingface.co/google-bert/bert-base-uncased) into a bert-base-uncased/ subfolder."
)

REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_LENGTH = 35
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VIT_HEAD_DIM = 64  # BLIP's create_vit: ViT-B 768/12 heads, ViT-L 1024/16 heads
VIT_LAYER_NORM_EPS = 1e-6  # BLIP's VisionTransformer: partial(nn.LayerNorm, eps=1e-6)
MLP_WIDTHS = (1024, 128, 64, 16, 1)  # ImageReward's MLP: Linear layers at Sequential indices 0, 2, 4, 6, 7
MLP_DROPOUTS = (0.2, 0.2, 0.1)

# Checkpoint entries the score does not use (BLIP_Pretrain's contrastive projections, and the
# momentum encoders / queues / decoder of BLIP pre-training if a checkpoint carries them).
UNUSED_PREFIXES = (
    "blip.vision_proj.", "blip.text_proj.", "blip.text_decoder.", "blip.itm_head.",
    "blip.visual_encoder_m.", "blip.text_encoder_m.", "blip.vision_proj_m.", "blip.text_proj_m.",
    "blip.image_queue", "blip.text_queue", "blip.idx_queue", "blip.ptr_queue", "blip.temp",
)
# MED's BertEmbeddings registers position_ids (arange) as a persistent buffer; transformers keeps it
# non-persistent. It is checked to be the arange and dropped.
POSITION_IDS_KEY = "blip.text_encoder.embeddings.position_ids"

_VIT_BLOCK = {
    "norm1": "layer_norm1", "attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection",
    "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}


_VIT_BLOCK_BACK = {v: k for k, v in _VIT_BLOCK.items()}
_VISION_BACK = {"vision.embeddings.class_embedding": "cls_token", "vision.embeddings.position_embedding": "pos_embed"}


def official_key(key: str) -> str:
    """The ImageReward.pt key an :class:`ImageRewardModel` key comes from (inverse of
    :func:`convert_state_dict`, for error messages)."""
    vis = "blip.visual_encoder."
    if key in _VISION_BACK:
        return vis + _VISION_BACK[key]
    if key.startswith("vision.embeddings.patch_embedding."):
        return vis + "patch_embed.proj." + key.rsplit(".", 1)[1]
    if key.startswith("vision.post_layernorm."):
        return vis + "norm." + key.rsplit(".", 1)[1]
    if key.startswith("vision.encoder.layers."):
        idx, sub = key[len("vision.encoder.layers."):].split(".", 1)
        module, _, param = sub.rpartition(".")
        if module in _VIT_BLOCK_BACK:
            return f"{vis}blocks.{idx}.{_VIT_BLOCK_BACK[module]}.{param}"
    if key.startswith("text."):
        return "blip.text_encoder." + key[len("text."):]
    if key.startswith("mlp."):
        return "mlp.layers." + key[len("mlp."):]
    return key


# -- preprocessing ------------------------------------------------------------------------------

def clip_preprocess(image, size: int = 224, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """torchvision's Resize(size, BICUBIC) -> CenterCrop(size) -> RGB -> ToTensor -> Normalize on a PIL
    image, as CLIP / open_clip / ImageReward compose it (PIL bicubic resize of the shorter side)."""
    from PIL import Image

    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    if short != size:
        new_short, new_long = size, int(size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        image = image.resize((new_w, new_h), Image.BICUBIC)
    w, h = image.size
    if w < size or h < size:  # torchvision pads before cropping; only reachable for size-1 sides
        canvas = Image.new(image.mode, (max(w, size), max(h, size)))
        canvas.paste(image, ((max(w, size) - w) // 2, (max(h, size) - h) // 2))
        image, (w, h) = canvas, canvas.size
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    image = image.crop((left, top, left + size, top + size)).convert("RGB")
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (x - m) / s


def load_tokenizer(folder: str | Path):
    """ImageReward's ``init_tokenizer``: bert-base-uncased plus [DEC] (bos) and [ENC]."""
    from transformers import BertTokenizer

    vocab = Path(folder) / "vocab.txt"
    tok = BertTokenizer(str(vocab), do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tok.enc_token_id = tok.convert_tokens_to_ids("[ENC]")
    return tok


# -- the model ----------------------------------------------------------------------------------

class ImageRewardModel(nn.Module):
    """BLIP ViT + BLIP text encoder with cross-attention + ImageReward's MLP head."""

    def __init__(self, vision_config, text_config):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        widths = (text_config.hidden_size,) + MLP_WIDTHS
        layers: list[nn.Module] = []
        for i in range(len(MLP_WIDTHS)):
            layers.append(nn.Linear(widths[i], widths[i + 1]))
            if i < len(MLP_DROPOUTS):
                layers.append(nn.Dropout(MLP_DROPOUTS[i]))
        self.mlp = nn.Sequential(*layers)

    @property
    def image_size(self) -> int:
        return int(self.vision.config.image_size)

    def text_features(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                        encoder_attention_mask=image_atts, is_decoder=False, return_dict=True)
        return out.last_hidden_state[:, 0, :].float()

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        rewards = self.mlp(self.text_features(pixel_values, input_ids, attention_mask))
        return ((rewards - REWARD_MEAN) / REWARD_STD).squeeze(-1)


def _configs(state: Mapping[str, torch.Tensor], med: Mapping, source: str = CHECKPOINT,
             med_source: str = MED_CONFIG):
    from transformers import BlipTextConfig, BlipVisionConfig

    pre = "blip.visual_encoder."
    shapes = {"cls_token": 3, "pos_embed": 3, "patch_embed.proj.weight": 4, "blocks.0.mlp.fc1.weight": 2}
    for key, ndim in shapes.items():
        if pre + key not in state:
            raise ModelLoadError(f"{source}: not an ImageReward checkpoint (missing key {pre + key})")
        if state[pre + key].ndim != ndim:
            raise ModelLoadError(f"{source}: weights do not match the model (wrong shape for 1 key(s): "
                                 f"{pre + key} {tuple(state[pre + key].shape)}, expected {ndim} dimensions)")
    width = state[pre + "cls_token"].shape[-1]
    n_pos = state[pre + "pos_embed"].shape[1]
    patch = state[pre + "patch_embed.proj.weight"].shape[-1]
    mlp = state[pre + "blocks.0.mlp.fc1.weight"].shape[0]
    depth = len({k.split(".")[3] for k in state if k.startswith(pre + "blocks.")})
    grid = math.isqrt(max(n_pos - 1, 0))
    if n_pos < 2 or grid * grid != n_pos - 1 or width % VIT_HEAD_DIM:
        raise ModelLoadError(f"{source}: unexpected ViT shape (pos_embed {n_pos} tokens, width {width})")
    need = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings")
    absent = [k for k in need if not isinstance(med.get(k), int) or isinstance(med.get(k), bool) or med[k] < 1]
    if absent:
        raise ModelLoadError(f"{med_source}: {absent[0]} must be a positive integer")
    vision = BlipVisionConfig(
        hidden_size=width, intermediate_size=mlp, num_hidden_layers=depth, num_attention_heads=width // VIT_HEAD_DIM,
        image_size=grid * patch, patch_size=patch, hidden_act="gelu", layer_norm_eps=VIT_LAYER_NORM_EPS,
        attention_dropout=0.0,
    )
    if not med.get("add_cross_attention", False):
        raise ModelLoadError(f"{med_source}: add_cross_attention must be true "
                             f"(ImageReward's text encoder attends to the image)")
    if med.get("position_embedding_type", "absolute") != "absolute":
        raise ModelLoadError(f"{med_source}: only absolute position embeddings are supported")
    text = BlipTextConfig(
        vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], encoder_hidden_size=width,
        intermediate_size=med["intermediate_size"], num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"], max_position_embeddings=med["max_position_embeddings"],
        hidden_act=med.get("hidden_act", "gelu"), layer_norm_eps=med.get("layer_norm_eps", 1e-12),
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=med.get("pad_token_id", 0),
        is_decoder=True,  # builds the cross-attention modules; forward runs as an encoder (is_decoder=False)
        use_cache=False,
    )
    return vision, text


def convert_state_dict(state: Mapping[str, torch.Tensor], source: str = CHECKPOINT) -> dict[str, torch.Tensor]:
    """Official ImageReward keys -> :class:`ImageRewardModel` keys. Unknown keys raise."""
    check_tensors(state, source)
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key.startswith(UNUSED_PREFIXES):
            continue
        if key == POSITION_IDS_KEY:
            if not torch.equal(value.reshape(-1).long(), torch.arange(value.numel())):
                raise ModelLoadError(f"{source}: {key} is not 0..{value.numel() - 1}")
            continue
        if key.startswith("blip.visual_encoder."):
            rest = key[len("blip.visual_encoder."):]
            if rest == "cls_token":
                out["vision.embeddings.class_embedding"] = value
            elif rest == "pos_embed":
                out["vision.embeddings.position_embedding"] = value
            elif rest.startswith("patch_embed.proj."):
                out["vision.embeddings.patch_embedding." + rest.rsplit(".", 1)[1]] = value
            elif rest.startswith("norm."):
                out["vision.post_layernorm." + rest.rsplit(".", 1)[1]] = value
            elif rest.startswith("blocks."):
                _, idx, sub = rest.split(".", 2)
                module, _, param = sub.rpartition(".")
                if module not in _VIT_BLOCK:
                    unknown.append(key)
                    continue
                out[f"vision.encoder.layers.{idx}.{_VIT_BLOCK[module]}.{param}"] = value
            else:
                unknown.append(key)
        elif key.startswith("blip.text_encoder."):
            out["text." + key[len("blip.text_encoder."):]] = value
        elif key.startswith("mlp.layers."):
            out["mlp." + key[len("mlp.layers."):]] = value
        else:
            unknown.append(key)
    if unknown:
        raise ModelLoadError(f"{source}: weights do not match the model (unexpected {len(unknown)} key(s): "
                             f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''})")
    return out


def build_model(state: Mapping[str, torch.Tensor], med: Mapping, source: str = CHECKPOINT,
                med_source: str = MED_CONFIG) -> ImageRewardModel:
    """An :class:`ImageRewardModel` holding ``state`` (official layout), loaded strictly."""
    check_tensors(state, source)
    vision, text = _configs(state, med, source, med_source)
    model = ImageRewardModel(vision, text)
    converted = convert_state_dict(state, source)
    # position_ids: MED saves it, transformers rebuilds it (checked to be the arange in the conversion)
    check_state_dict(model, converted, source, ignore_missing=("text.embeddings.position_ids",),
                     file_key=official_key)
    model.load_state_dict(converted, strict=False)
    return model.eval()


def read_med_config(path: Path) -> dict:
    try:
        med = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelLoadError(f"{path}: not a readable JSON config ({type(e).__name__}: {e})") from None
    if not isinstance(med, dict):
        raise ModelLoadError(f"{path}: not a JSON object")
    return med


def load_model(folder: str | Path) -> ImageRewardModel:
    folder = Path(folder)
    state = load_state_file(folder / CHECKPOINT)
    med = read_med_config(folder / MED_CONFIG)
    return build_model(state, med, str(folder / CHECKPOINT), str(folder / MED_CONFIG))


# -- the plugin ---------------------------------------------------------------------------------

class ImageReward(Metric):
    """ImageReward v1.0: BLIP image-text encoder + MLP, standardised reward (higher is better)."""

    name = "imagereward"
    version = "1"

    def __init__(self, weights: str | Path | None = None, device: str = "cpu", batch_size: int = 16, **options):
        super().__init__(weights=weights, device=device, batch_size=batch_size, **options)
        self.folder = find_weights(self.name, weights, FILES, HOW_TO_GET)
        self.checkpoint_sha256 = sha256_of(self.folder / CHECKPOINT)
        self._model: ImageRewardModel | None = None
        self._tokenizer = None

    def load(self) -> ImageRewardModel:
        if self._model is None:
            self._model = load_model(self.folder).to(self.device)
            self._tokenizer = load_tokenizer(self.folder / TOKENIZER_DIR)
        return self._model

    @torch.no_grad()
    def score_batch(self, images: list, prompts: list[str]) -> torch.Tensor:
        model = self.load()
        text = self._tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_LENGTH,
                               return_tensors="pt")
        pixels = torch.stack([clip_preprocess(im, model.image_size) for im in images]).to(self.device)
        return model(pixels, text.input_ids.to(self.device), text.attention_mask.to(self.device))
