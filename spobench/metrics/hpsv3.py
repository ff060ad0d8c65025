"""HPSv3 (Ma et al., ICCV 2025): a Qwen2-VL-7B preference model, on transformers' own Qwen2-VL modules.

The score is the **mean** ``mu`` of HPSv3's two outputs ``(mu, sigma)`` at the ``<|Reward|>`` token (the
model is trained with an uncertainty-aware ranking loss; ``HPSv3RewardInferencer.reward(...)[i][0]``,
"we select miu as the final output"). It is an unbounded real number, higher is better, on the official
package's own scale with no rescaling (the instruction's "rating from 0 to 10" is text the model reads; the
head is a regression trained on preference pairs, not a clamp). ``sigma`` is not reported. Preprocessing,
prompt template and network: :mod:`spobench.metrics.hpsv3_model`.

Where the weights come from (nothing is downloaded, no remote code runs; the local Hugging Face cache is
read with ``local_files_only``, so ``HF_HUB_OFFLINE`` makes no difference):

* ``HPSv3.safetensors`` (hub ``MizzenAI/HPSv3``): ``<weights>/HPSv3.safetensors``, or ``--weights FILE``,
  or that repo in the local cache;
* Qwen2-VL's config, image processor config, chat template and tokenizer (hub ``Qwen/Qwen2-VL-7B-Instruct``;
  its 16 GB of weight shards are NOT needed: HPSv3.safetensors holds the whole model):
  ``<weights>/Qwen2-VL-7B-Instruct/``, or ``<weights>`` itself, or that repo in the local cache.

``<weights>`` is ``--weights DIR`` or ``$SPOBENCH_WEIGHTS/hpsv3``. The checkpoint is read through
:func:`spobench.core.weights.load_state_file` and checked key by key and shape by shape against the network
(a missing, unexpected, wrong-shaped or NaN weight is one error line naming the file and the key).

Options (keyword arguments, or ``spobench eval --option hpsv3.KEY=VALUE``; :class:`HPSv3Options`):
``dtype`` (bf16 | fp16 | fp32; default bf16 on CUDA as the official inference, fp32 on the CPU; the reward
head always runs in float32, as hpsv3 keeps it), ``batch_size`` (default 8; estimated from the sizes, not
measured here (no GPU): the 7B without its unused lm_head is about 15.5 GB in bf16, and an image's ~750
tokens need tens of MB of activations per layer, so batches of 8-32 fit one 80 GB GPU) and ``allow_cpu``: a
checkpoint of more than a billion parameters on the CPU is refused with one line unless forced (the 7B
needs about 31 GB of RAM in float32 and is meant for a GPU).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from spobench.core.config import Config, setting
from spobench.core.dtypes import torch_dtype
from spobench.core.errors import InputError, MissingWeightsError, ModelLoadError
from spobench.metrics.base import Metric, sha256_of, weights_root
from spobench.metrics.clip_common import has_tokenizer, hub_cache_file, resolve_folder
from spobench.metrics.hpsv3_model import (
    IMAGE_PAD,
    REWARD_TOKEN,
    build_net,
    expand_image_tokens,
    image_patches,
    messages,
)

MODEL_ID = "MizzenAI/HPSv3"
CHECKPOINT = "HPSv3.safetensors"
QWEN_ID = "Qwen/Qwen2-VL-7B-Instruct"
QWEN_DIR = "Qwen2-VL-7B-Instruct"
CPU_LIMIT = 1_000_000_000  # parameters: above this, the CPU is refused unless allow_cpu
PROCESSOR_DEFAULTS = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 1280, "patch_size": 14,
                      "temporal_patch_size": 2, "merge_size": 2, "rescale_factor": 1 / 255,
                      "image_mean": [0.48145466, 0.4578275, 0.40821073],
                      "image_std": [0.26862954, 0.26130258, 0.27577711]}


def _is_qwen(folder: Path) -> bool:
    return all((folder / f).is_file() for f in ("config.json", "preprocessor_config.json")) and has_tokenizer(folder)


def locate(weights: str | Path | None) -> tuple[Path, Path]:
    """(HPSv3.safetensors, Qwen2-VL folder), or :class:`MissingWeightsError` naming what is missing."""
    given = Path(weights) if weights else None
    folder = (given.parent if given is not None and given.is_file() else given) or weights_root() / "hpsv3"
    ckpt = given if given is not None and given.is_file() else folder / CHECKPOINT
    if not ckpt.is_file():
        ckpt = hub_cache_file(MODEL_ID, CHECKPOINT) or ckpt
    qwen = resolve_folder([folder / QWEN_DIR, folder], QWEN_ID, _is_qwen)
    missing = []
    if not ckpt.is_file():
        missing.append(f"{CHECKPOINT} (`hf download {MODEL_ID} {CHECKPOINT} --local-dir {folder}`)")
    if qwen is None:
        missing.append(f"{QWEN_ID}'s config, processor and tokenizer files, not its weights "
                       f"(`hf download {QWEN_ID} --include '*.json' --include '*.txt' --local-dir {folder / QWEN_DIR}`)")
    if missing:
        raise MissingWeightsError(
            f"metric 'hpsv3' needs {' and '.join(missing)}: not found in {folder} nor in the local Hugging Face "
            f"cache. Download them as shown, or pass --weights DIR (or set SPOBENCH_WEIGHTS).")
    return ckpt, qwen


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelLoadError(f"{path}: not a readable JSON file ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: not a JSON object")
    return data


def read_processor(folder: Path) -> dict:
    """The image processor settings of ``preprocessor_config.json`` (transformers 4.45's defaults where absent)."""
    path = folder / "preprocessor_config.json"
    proc = {**PROCESSOR_DEFAULTS, **_read_json(path)}
    for key in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size"):
        if not isinstance(proc[key], int) or isinstance(proc[key], bool) or proc[key] < 1:
            raise ModelLoadError(f"{path}: {key} must be a positive integer")
    for key in ("image_mean", "image_std"):
        if not (isinstance(proc[key], list) and len(proc[key]) == 3):
            raise ModelLoadError(f"{path}: {key} must be a list of 3 numbers")
    return proc


def read_chat_template(folder: Path, tokenizer) -> str:
    """The processor's template (chat_template.json, what hpsv3's processor.apply_chat_template renders),
    else the tokenizer's."""
    if (folder / "chat_template.json").is_file():
        template = _read_json(folder / "chat_template.json").get("chat_template")
    else:
        template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or IMAGE_PAD not in template:
        raise ModelLoadError(f"{folder}: no Qwen2-VL chat template (chat_template.json with {IMAGE_PAD})")
    return template


def parameter_count(config) -> int:
    """The network's size from its config (before reading a 16 GB file to learn it)."""
    t, v = config.text_config, config.vision_config
    hd = t.hidden_size // t.num_attention_heads
    per_layer = 2 * t.hidden_size ** 2 + 2 * t.hidden_size * t.num_key_value_heads * hd + 3 * t.hidden_size * t.intermediate_size
    return int(t.num_hidden_layers * per_layer + t.vocab_size * t.hidden_size + v.depth * 12 * v.embed_dim ** 2)


@dataclass
class HPSv3Options(Config):
    what = "hpsv3"
    dtype: Literal["bf16", "fp16", "fp32"] | None = setting(None, "network dtype (default: bf16 on CUDA, fp32 on the CPU)")
    batch_size: int = setting(8, "images per forward (8-32 fit one 80 GB GPU in bf16: an estimate)", min=1)
    allow_cpu: bool = setting(False, "score with a real-size (> 1B parameters) model on the CPU anyway")


class HPSv3(Metric):
    """HPSv3: the mean ``mu`` of Qwen2-VL-7B's (mu, sigma) reward at <|Reward|> (higher is better)."""

    name = "hpsv3"
    version = "1"
    Options = HPSv3Options

    def __init__(self, weights: str | Path | None = None, device: str = "cpu", batch_size: int = 8,
                 dtype: str | None = None, allow_cpu: bool = False, **options):
        on_cuda = str(device).startswith("cuda")
        self._dtype = torch_dtype(dtype or ("bf16" if on_cuda else "fp32"), "hpsv3 option dtype")
        super().__init__(weights=weights, device=device, batch_size=batch_size, model=MODEL_ID, processor=QWEN_ID,
                         **options)  # dtype and batch size change scores only by rounding: not in the cache key
        self.checkpoint, self.qwen_dir = locate(weights)
        from transformers import Qwen2VLConfig

        try:
            self._config = Qwen2VLConfig.from_pretrained(str(self.qwen_dir), local_files_only=True)
        except Exception as e:  # noqa: BLE001 - a foreign or broken config.json
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ModelLoadError(f"{self.qwen_dir / 'config.json'}: not a Qwen2-VL config ({first[:200]})") from None
        size = parameter_count(self._config)
        if str(device) == "cpu" and size > CPU_LIMIT and not allow_cpu:
            gb = size * torch.finfo(self._dtype).bits / 8 / 1e9
            raise InputError(f"metric 'hpsv3': {self.checkpoint} is a {size / 1e9:.1f}B-parameter model (about "
                             f"{gb:.0f} GB in {self._dtype}), meant for a GPU. Use --device cuda, or "
                             f"--option hpsv3.allow_cpu=true to force the CPU")
        self.checkpoint_sha256 = sha256_of(self.checkpoint)
        self._net = None

    def load(self):
        if self._net is None:
            from transformers import AutoTokenizer

            from spobench.core.weights import load_state_file

            self._proc = read_processor(self.qwen_dir)
            try:
                tok = AutoTokenizer.from_pretrained(str(self.qwen_dir), local_files_only=True, padding_side="right")
            except Exception as e:  # noqa: BLE001
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise ModelLoadError(f"{self.qwen_dir}: cannot read the Qwen2 tokenizer ({first[:200]})") from None
            tok.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})  # hpsv3's create_model_and_processor
            if tok.convert_tokens_to_ids(IMAGE_PAD) != self._config.image_token_id:
                raise ModelLoadError(f"{self.qwen_dir}: the tokenizer's {IMAGE_PAD} is not config.json's image_token_id "
                                     f"{self._config.image_token_id}")
            self._template = read_chat_template(self.qwen_dir, tok)
            self._special = [t for t in tok.get_added_vocab()]
            self._tokenizer = tok
            state = load_state_file(self.checkpoint, nested=("model",))  # hpsv3 unwraps {"model": ...}
            self._net = build_net(self._config, state, len(tok), tok.convert_tokens_to_ids(REWARD_TOKEN),
                                  str(self.checkpoint), self._dtype, self.device)
        return self._net

    def texts(self, prompts: list[str], grids: list[tuple[int, int, int]]) -> list[str]:
        """The model's input texts: the chat template, then one <|image_pad|> per merged patch."""
        for i, p in enumerate(prompts):
            bad = next((t for t in self._special if t in p), None)
            if bad is not None:
                raise InputError(f"prompt {i} ({p[:60]!r}) holds {bad!r}, a special token of HPSv3's tokenizer")
        merge = int(self._proc["merge_size"])
        return [expand_image_tokens(self._tokenizer.apply_chat_template(
                    messages(p), chat_template=self._template, tokenize=False, add_generation_prompt=True), g, merge)
                for p, g in zip(prompts, grids)]

    def inputs(self, images: list, prompts: list[str]) -> dict[str, torch.Tensor]:
        self.load()
        patches, grids = zip(*[image_patches(im, self._proc) for im in images])
        enc = self._tokenizer(self.texts(list(prompts), list(grids)), padding=True, return_tensors="pt")
        return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask,
                "pixel_values": torch.from_numpy(np.concatenate(patches)),
                "image_grid_thw": torch.tensor(grids, dtype=torch.long)}

    def score_batch(self, images: list, prompts: list[str]) -> torch.Tensor:
        net = self.load()
        batch = {k: v.to(self.device) for k, v in self.inputs(images, prompts).items()}
        return net(**batch)[:, 0]  # mu; [:, 1] is sigma
