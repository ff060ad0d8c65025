"""HPSv3's network and its inputs, on transformers' own Qwen2-VL modules (no remote code).

The layout follows ``hpsv3`` 1.0.0 on PyPI (MizzenAI/HPSv3; it pins transformers==4.45.2):
``hpsv3/model/qwen2vl_trainer.py`` (``Qwen2VLRewardModelBT``), ``hpsv3/inference.py``
(``HPSv3RewardInferencer``), ``hpsv3/dataset/utils.py`` (its copy of qwen-vl-utils' ``fetch_image``)
and ``hpsv3/dataset/data_collator_qwen.py`` (the instruction). What the reward model computes:

    image  -> RGB -> resize to exactly 256*28*28 pixels' worth (qwen-vl-utils smart_resize with
              min_pixels = max_pixels = 200704, PIL bicubic; 512x512 -> 448x448)
           -> Qwen2-VL image processor (its own smart_resize, a no-op on such sizes; /255; CLIP mean/std;
              14x14 patches, each image doubled in time, 2x2 merge order)
    text   -> chat template (the Qwen folder's) of one user turn [image, INSTRUCTION(prompt) + REWARD_PROMPT],
              add_generation_prompt; <|image_pad|> expanded to one token per merged patch; the tokenizer
              plus hpsv3's added special token <|Reward|>, padded on the right
    net    -> token embeddings with the ViT's merged patches scattered over the <|image_pad|> tokens ->
              the Qwen2 decoder with PLAIN 1-D positions (0..L-1 on all three M-RoPE axes: hpsv3's forward
              calls the decoder directly, without Qwen2-VL's get_rope_index) -> last hidden state at
              <|Reward|> -> rm_head in float32 (Linear(H,1024) ReLU Dropout Linear(1024,16) ReLU Linear(16,2))
           -> (mu, sigma); the score is mu.

The official ``HPSv3.safetensors`` keys are transformers 4.45's: ``visual.*``, ``model.*`` (decoder),
``lm_head.weight``, ``rm_head.*``. Here ``visual`` is transformers' ``Qwen2VisionTransformerPretrainedModel``
(the same names), ``model.*`` goes to ``language_model.*`` (``Qwen2VLTextModel``) and ``lm_head`` (the
score never reads it) is checked for shape and dropped, which saves 1 GB on the GPU.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from spobench.core.errors import InputError, ModelLoadError
from spobench.core.weights import check_state_dict, check_tensors

REWARD_TOKEN = "<|Reward|>"
IMAGE_PAD = "<|image_pad|>"
PIXELS = 256 * 28 * 28  # HPSv3RewardInferencer.prepare_batch: min_pixels = max_pixels = 200704
FACTOR = 28  # patch 14 x merge 2
MAX_RATIO = 200
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HEAD_WIDTHS = (1024, 16)  # rm_head_type "ranknet" with rm_head_kwargs None (HPSv3_7B.yaml sets none)
OUTPUT_DIM = 2  # (mu, sigma): HPSv3_7B.yaml output_dim 2, loss_type "uncertainty"
HEAD_KEYS = ("0", "3", "5")  # the head's Linear layers at Sequential indices 0, 3 and 5

# The model's text input, character for character (hpsv3/dataset/data_collator_qwen.py: INSTRUCTION and
# prompt_with_special_token; it is part of what the weights were trained on, so it cannot be reworded).
INSTRUCTION = """
You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. 

**Visual Quality:**  
Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:
- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. 

**Text Alignment:**  
Assess how well the image matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.
- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.
- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.
- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.
Textual prompt - {text_prompt}


"""
REWARD_PROMPT = """
Please provide the overall ratings of this image: <|Reward|>

END
"""


def user_text(prompt: str) -> str:
    return INSTRUCTION.format(text_prompt=prompt) + REWARD_PROMPT


def messages(prompt: str) -> list[dict]:
    """One conversation as hpsv3 builds it (the image entry's pixel limits do not reach the template)."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user_text(prompt)}]}]


# -- images -------------------------------------------------------------------------------------

def fetch_size(height: int, width: int, pixels: int = PIXELS, factor: int = FACTOR) -> tuple[int, int]:
    """qwen-vl-utils' ``smart_resize`` as hpsv3 vendors it, with min_pixels = max_pixels = ``pixels``:
    sides rounded to ``factor``, then scaled down (floor) or up (ceil) to the pixel budget."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise InputError(f"image of {width}x{height}: HPSv3 (Qwen2-VL) needs an aspect ratio under {MAX_RATIO}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > pixels:
        beta = math.sqrt(height * width / pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < pixels:
        beta = math.sqrt(pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def processor_size(height: int, width: int, min_pixels: int, max_pixels: int, factor: int) -> tuple[int, int]:
    """transformers 4.45's Qwen2-VL ``smart_resize`` (the image processor's own, after hpsv3's)."""
    if height < factor or width < factor:
        raise InputError(f"image of {width}x{height} is smaller than Qwen2-VL's {factor}-pixel patch grid")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def image_patches(image, proc: Mapping) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One PIL image -> (flattened patches (N, 3*T*P*P) float32, grid (1, H/P, W/P)): hpsv3's fetch_image,
    then Qwen2VLImageProcessor (transformers 4.45) with the folder's preprocessor_config ``proc``."""
    from PIL import Image

    patch, temporal, merge = int(proc["patch_size"]), int(proc["temporal_patch_size"]), int(proc["merge_size"])
    image = image.convert("RGB")
    w, h = image.size
    rh, rw = fetch_size(h, w)
    image = image.resize((rw, rh), Image.BICUBIC)
    ph, pw = processor_size(rh, rw, int(proc["min_pixels"]), int(proc["max_pixels"]), patch * merge)
    if (ph, pw) != (rh, rw):  # PIL returns a copy for an unchanged size, so only a real resize is done
        image = image.resize((pw, ph), Image.BICUBIC)
    x = (np.asarray(image, dtype=np.uint8).astype(np.float64) * float(proc["rescale_factor"])).astype(np.float32)
    x = (x - np.asarray(proc["image_mean"], dtype=np.float32)) / np.asarray(proc["image_std"], dtype=np.float32)
    x = np.tile(x.transpose(2, 0, 1)[None], (temporal, 1, 1, 1))  # (T, C, H, W): one image, doubled in time
    gh, gw = ph // patch, pw // patch
    x = x.reshape(1, temporal, 3, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(gh * gw, 3 * temporal * patch * patch)
    return np.ascontiguousarray(x), (1, gh, gw)


# -- the network --------------------------------------------------------------------------------

class HPSv3Net(nn.Module):
    """Qwen2-VL's ViT and decoder (transformers' modules) + hpsv3's float32 reward head."""

    def __init__(self, config):
        super().__init__()
        from transformers.models.qwen2_vl.modeling_qwen2_vl import (
            Qwen2VisionTransformerPretrainedModel,
            Qwen2VLTextModel,
        )

        self.visual = Qwen2VisionTransformerPretrainedModel._from_config(config.vision_config,
                                                                         attn_implementation="sdpa")
        self.language_model = Qwen2VLTextModel._from_config(config.text_config, attn_implementation="sdpa")
        hid = config.text_config.hidden_size
        self.rm_head = nn.Sequential(nn.Linear(hid, HEAD_WIDTHS[0]), nn.ReLU(), nn.Dropout(0.05),
                                     nn.Linear(HEAD_WIDTHS[0], HEAD_WIDTHS[1]), nn.ReLU(),
                                     nn.Linear(HEAD_WIDTHS[1], OUTPUT_DIM))
        self.image_token_id = int(config.image_token_id)
        self.reward_token_id: int | None = None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                image_grid_thw: torch.Tensor) -> torch.Tensor:
        """(B, 2) float32: (mu, sigma) at each row's <|Reward|> token."""
        lm = self.language_model
        embeds = lm.embed_tokens(input_ids)
        vis = self.visual(pixel_values.to(self.visual.get_dtype()), grid_thw=image_grid_thw).pooler_output
        slots = input_ids == self.image_token_id
        if int(slots.sum()) != vis.shape[0]:
            raise InputError(f"{int(slots.sum())} image tokens in the text but {vis.shape[0]} image features")
        embeds = embeds.masked_scatter(slots[..., None].expand_as(embeds), vis.to(embeds.dtype))
        b, n = input_ids.shape
        positions = torch.arange(n, device=input_ids.device).view(1, 1, n).expand(3, b, n)  # see the module doc
        hidden = lm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions,
                    use_cache=False).last_hidden_state
        at = input_ids == self.reward_token_id
        if not bool((at.sum(1) == 1).all()):
            raise InputError(f"each text must hold {REWARD_TOKEN} exactly once")
        return self.rm_head(hidden[at].float())


def official_key(key: str) -> str:
    """The HPSv3.safetensors key a :class:`HPSv3Net` key comes from."""
    return "model." + key[len("language_model."):] if key.startswith("language_model.") else key


def convert_state_dict(state: Mapping[str, torch.Tensor], n_tokens: int, hidden: int,
                       source: str) -> dict[str, torch.Tensor]:
    """Official keys -> :class:`HPSv3Net` keys; ``lm_head.weight`` checked for shape and dropped."""
    check_tensors(state, source)
    if "lm_head.weight" not in state:
        raise ModelLoadError(f"{source}: weights do not match the model (missing 1 key(s): lm_head.weight)")
    if tuple(state["lm_head.weight"].shape) != (n_tokens, hidden):
        raise ModelLoadError(f"{source}: weights do not match the model (wrong shape for 1 key(s): lm_head.weight "
                             f"{tuple(state['lm_head.weight'].shape)} vs {(n_tokens, hidden)})")
    out = {}
    for key, value in state.items():
        if key == "lm_head.weight":
            continue
        out["language_model." + key[len("model."):] if key.startswith("model.") else key] = value
    return out


def build_net(config, state: Mapping[str, torch.Tensor], n_tokens: int, reward_token_id: int, source: str,
              dtype: torch.dtype, device: str) -> HPSv3Net:
    """An :class:`HPSv3Net` holding ``state`` (official layout), every key accounted for. Built on the
    meta device and filled by assignment, so a 7B checkpoint is never held twice in memory."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import (
        Qwen2VLRotaryEmbedding,
        Qwen2VLVisionRotaryEmbedding,
    )

    config.text_config.vocab_size = n_tokens  # hpsv3: model.resize_token_embeddings(len(tokenizer))
    with torch.device("meta"):
        net = HPSv3Net(config)
    converted = convert_state_dict(state, n_tokens, config.text_config.hidden_size, source)
    check_state_dict(net, converted, source, file_key=official_key)
    converted = {k: v.to(torch.float32 if k.startswith("rm_head.") else dtype) for k, v in converted.items()}
    net.load_state_dict(converted, strict=True, assign=True)
    # the rotary tables are non-persistent buffers (never in a checkpoint): computed afresh
    net.visual.rotary_pos_emb = Qwen2VLVisionRotaryEmbedding(config.vision_config)
    net.language_model.rotary_emb = Qwen2VLRotaryEmbedding(config=config.text_config)
    left = [n for n, t in list(net.named_parameters()) + list(net.named_buffers()) if t.is_meta]
    if left:
        raise ModelLoadError(f"{source}: weights do not match the model (missing {len(left)} key(s): {left[0]})")
    net.reward_token_id = int(reward_token_id)
    return net.to(device).eval()


def expand_image_tokens(text: str, grid: Sequence[int], merge: int) -> str:
    """Qwen2VLProcessor: the template's one <|image_pad|> becomes one per merged patch."""
    if text.count(IMAGE_PAD) != 1:
        raise InputError(f"the chat template gave {text.count(IMAGE_PAD)} {IMAGE_PAD} tokens for one image")
    return text.replace(IMAGE_PAD, IMAGE_PAD * (int(np.prod(grid)) // (merge * merge)))
