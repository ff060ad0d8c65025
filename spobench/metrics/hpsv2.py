"""HPSv2 / HPSv2.1 (Wu et al., 2023) on transformers' CLIP.

The official checkpoints ``HPS_v2_compressed.pt`` (v2.0) and ``HPS_v2.1_compressed.pt`` (v2.1), from
the Hugging Face repo ``xswu/HPSv2``, hold ``{"state_dict": ...}`` of a fine-tuned open_clip ViT-H-14.
That state dict is converted onto a transformers ``CLIPModel`` by :mod:`.convert_open_clip` and loaded
strictly (no missing, no unexpected keys). The tokenizer is open_clip's BPE, which is CLIP's: a
transformers ``CLIPTokenizer`` built from the vocabulary and merges of a local
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` folder, with CLIP's default special tokens (not that folder's
tokenizer config, whose pad token "!" would make transformers split every "!" out of a prompt, unlike
open_clip; see :func:`.clip_common.load_open_clip_tokenizer`).

The score follows ``hpsv2.img_score.score`` / ``hpsv2.evaluation``::

    img   = RGB -> ToTensor -> ResizeMaxSize(224) on the float tensor: longest side -> 224 (torch
            bicubic, antialiased, no uint8 rounding, no clamp), centred zero pad to 224x224 (no crop)
            -> Normalize(OpenAI CLIP mean/std)
    ids   = [sot] + BPE(prompt) + [eot], truncated to 77 (eot kept last), zero-padded to 77
    score = cos(image_features, text_features)          (both L2-normalised; no logit scale)

**The stored score is the raw cosine** (about 0.2-0.35 for real images). HPSv2's benchmark tables
(``hpsv2.evaluation.evaluate_benchmark``) print the mean x 100; multiply by 100 when comparing with
published HPSv2 numbers.

Recorded in :meth:`identity` options: ``version`` (v2.0 / v2.1), ``antialias`` (True: torchvision >=
0.17's tensor bicubic, the official code's result today; False: torchvision < 0.17's, no
antialiasing) and the preprocessing. Metric version 2: version 1 resized the uint8 PIL image, which
HPSv2 does not do (benchmarks/parity/ measures the difference against the hpsv2 package). Runs in
float32 (HPSv2 runs under CUDA autocast; expect differences around 1e-3 from that). Prompts get
open_clip's ``html.unescape`` (twice) and whitespace clean-up; ftfy's mojibake repair is not applied.

Formats: ``xswu/HPSv2`` publishes the two checkpoints as pickles only (``.pt``), so they are read
with ``torch.load(weights_only=True)`` (tensors and plain containers; no code runs) and checked against
the converted model key by key (:func:`spobench.core.weights.check_state_dict`): a missing, unexpected,
wrong-shaped, non-tensor or NaN entry is an error naming the file and the open_clip key. Nothing is
downloaded and no remote code runs.
"""

from __future__ import annotations

import html
from pathlib import Path

import torch
from spobench.metrics.base import Metric, sha256_of, weights_root
from spobench.metrics.clip_common import (
    cosine,
    has_tokenizer,
    hub_cache_file,
    image_embeds,
    load_open_clip_tokenizer,
    open_clip_ids,
    resize_longest_pad,
    resolve_folder,
    text_embeds,
)
from spobench.metrics.convert_open_clip import load_open_clip_state_dict, unwrap_state_dict

from spobench.core.errors import InputError, MissingWeightsError, ModelLoadError
from spobench.core.weights import load_state_file

HUB_REPO = "xswu/HPSv2"
CHECKPOINTS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
DEFAULT_VERSION = "v2.1"
TOKENIZER_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
TOKENIZER_DIR = "CLIP-ViT-H-14-laion2B-s32B-b79K"
PREPROCESS = ("ToTensor, longest side -> image size (torch bicubic on floats, no clamp), centred zero pad, "
              "OpenAI CLIP mean/std")


def normalize_version(version: str) -> str:
    v = str(version).strip().lower()
    v = v if v.startswith("v") else "v" + v
    v = {"v2": "v2.0"}.get(v, v)
    if v not in CHECKPOINTS:
        raise InputError(f"hpsv2: unknown version {version!r} (choose from {', '.join(CHECKPOINTS)})")
    return v


def clean_prompt(text: str) -> str:
    """open_clip's ``basic_clean`` (minus ftfy) and ``whitespace_clean``; lower-casing is the tokenizer's."""
    return " ".join(html.unescape(html.unescape(text)).split())


def locate(weights: str | Path | None, version: str) -> tuple[Path, Path]:
    """(checkpoint file, tokenizer folder) for ``version``, or :class:`MissingWeightsError`.

    Checkpoint: ``weights`` if it is a file, else ``<folder>/<HPS file>`` with ``<folder>`` =
    ``weights`` or ``$SPOBENCH_WEIGHTS/hpsv2``, else the file from ``xswu/HPSv2`` in the local
    Hugging Face cache. Tokenizer: ``<folder>/CLIP-ViT-H-14-laion2B-s32B-b79K/``, ``<folder>`` itself,
    or the laion repo in the local Hugging Face cache."""
    filename = CHECKPOINTS[version]
    given = Path(weights) if weights else None
    folder = given.parent if given is not None and given.is_file() else (given or weights_root() / "hpsv2")
    if given is not None and given.is_file():
        checkpoint: Path | None = given
    elif (folder / filename).is_file():
        checkpoint = folder / filename
    else:
        checkpoint = hub_cache_file(HUB_REPO, filename)
    tokenizer = resolve_folder([folder / TOKENIZER_DIR, folder], TOKENIZER_ID, has_tokenizer)
    missing = []
    if checkpoint is None:
        missing.append(f"{filename} (HPSv2 {version}, hub repo {HUB_REPO}; get it with "
                       f"`hf download {HUB_REPO} {filename} --local-dir {folder}`)")
    if tokenizer is None:
        missing.append(f"the {TOKENIZER_ID} tokenizer (vocab.json + merges.txt or tokenizer.json; get it with "
                       f"`hf download {TOKENIZER_ID} --include '*.json' --include '*.txt' "
                       f"--local-dir {folder / TOKENIZER_DIR}`)")
    if missing:
        raise MissingWeightsError(
            f"metric 'hpsv2' needs {' and '.join(missing)}: not found in {folder} nor in the local Hugging Face "
            f"cache. Put the files there (or run the hf download commands without --local-dir, to fill the "
            f"cache), or pass --weights DIR (or set SPOBENCH_WEIGHTS)."
        )
    return checkpoint, tokenizer


def load_model(checkpoint: str | Path):
    """The HPSv2 checkpoint as a float32 transformers ``CLIPModel`` (strict load)."""
    checkpoint = Path(checkpoint)
    state = unwrap_state_dict(load_state_file(checkpoint), str(checkpoint))
    return load_open_clip_state_dict(state, name=str(checkpoint))


def check_tokenizer(tokenizer, model, where: str) -> None:
    """The tokenizer must be the checkpoint's vocabulary with end-of-text as the last id (what makes
    open_clip's argmax pooling and transformers' first-eos pooling pick the same token)."""
    vocab = model.config.text_config.vocab_size
    if len(tokenizer) != vocab or tokenizer.eos_token_id != vocab - 1:
        raise ModelLoadError(f"{where}: tokenizer has {len(tokenizer)} tokens with end-of-text id "
                             f"{tokenizer.eos_token_id}; the checkpoint expects {vocab} with end-of-text {vocab - 1}")


class HPSv2(Metric):
    """HPSv2 / v2.1: cosine of open_clip ViT-H-14 image and text features (raw cosine; x100 for tables)."""

    name = "hpsv2"
    version = "2"

    def __init__(self, weights: str | Path | None = None, device: str = "cpu", batch_size: int = 16,
                 version: str = DEFAULT_VERSION, antialias: bool = True, **options):
        hps_version = normalize_version(version)
        super().__init__(weights=weights, device=device, batch_size=batch_size, version=hps_version,
                         antialias=bool(antialias), preprocess=PREPROCESS, tokenizer=TOKENIZER_ID, **options)
        self.hps_version = hps_version
        self.antialias = bool(antialias)
        self.checkpoint, self.tokenizer_dir = locate(weights, hps_version)
        self.checkpoint_sha256 = sha256_of(self.checkpoint)
        self._model = None
        self._tokenizer = None

    def load(self):
        if self._model is None:
            model = load_model(self.checkpoint)
            tok = load_open_clip_tokenizer(self.tokenizer_dir, model.config.text_config.max_position_embeddings)
            check_tokenizer(tok, model, str(self.tokenizer_dir))
            self._model, self._tokenizer = model.to(self.device), tok
        return self._model

    def score_batch(self, images: list, prompts: list[str]) -> torch.Tensor:
        model = self.load()
        size = int(model.config.vision_config.image_size)
        context = int(model.config.text_config.max_position_embeddings)
        pixels = torch.stack([resize_longest_pad(im, size, self.antialias) for im in images]).to(self.device)
        ids = open_clip_ids(self._tokenizer, [clean_prompt(p) for p in prompts], context).to(self.device)
        return cosine(image_embeds(model, pixels), text_embeds(model, ids))
