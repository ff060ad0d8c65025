"""LAION aesthetic predictor v2 ("improved-aesthetic-predictor", Schuhmann) on transformers' CLIP.

The head ``sac+logos+ava1-l14-linearMSE.pth`` (github.com/christophschuhmann/improved-aesthetic-predictor)
is the state dict of that repo's ``MLP.layers``::

    Linear(768, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2), Linear(128, 64), Dropout(0.1),
    Linear(64, 16), Linear(16, 1)            -> keys layers.{0,2,4,6,7}.{weight,bias}

(no activations: the released "linearMSE" head is linear). It reads the L2-normalised image embedding
of OpenAI CLIP ViT-L/14, here ``openai/clip-vit-large-patch14`` (the transformers port of the same
weights) via ``CLIPModel.get_image_features``. As in ``simple_inference.py``::

    img   = Resize(224, bicubic) -> CenterCrop(224) -> RGB -> ToTensor -> Normalize(CLIP mean/std)
    score = mlp(normalize(clip.encode_image(img)))            (roughly 1-10; prompt-free)

Runs in float32 (the reference runs CLIP in float16 on CUDA; expect differences around 1e-2).

Where the weights come from (nothing downloaded, no remote code): the head file in ``<weights>``
(``--weights DIR`` or ``$SPOBENCH_WEIGHTS/aesthetic``); CLIP in ``<weights>/clip-vit-large-patch14/``
or ``openai/clip-vit-large-patch14`` in the local Hugging Face cache. ``checkpoint_sha256`` covers both:
sha256 of "<head sha256>\\n<CLIP weights sha256>"; each is also recorded in the identity options.

Formats: the official head is a pickled state dict (``.pth``; no other format is published), read
with ``torch.load(weights_only=True)`` and checked key by key and shape by shape against the head
(:func:`spobench.core.weights.check_state_dict`: missing, unexpected, wrong-shaped, non-tensor or NaN
entries are refused, naming the file and the key). ``openai/clip-vit-large-patch14`` ships
``model.safetensors`` (besides pickles, TF and Flax files); only that is read, strictly
(:func:`.clip_common.load_clip_model`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from spobench.metrics.base import Metric, sha256_of, weights_root
from spobench.metrics.clip_common import (
    combined_sha256,
    has_model_weights,
    image_embeds,
    l2_normalize,
    load_clip_model,
    resize_center_crop,
    resolve_folder,
    to_normalized_tensor,
    weight_files,
)
from torch import nn

from spobench.core.errors import MissingWeightsError, ModelLoadError
from spobench.core.weights import check_state_dict, load_state_file

HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
HEAD_URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
            "sac%2Blogos%2Bava1-l14-linearMSE.pth")
CLIP_ID = "openai/clip-vit-large-patch14"
CLIP_DIR = "clip-vit-large-patch14"
HIDDEN = (1024, 128, 64, 16, 1)
DROPOUTS = (0.2, 0.2, 0.1)


class AestheticHead(nn.Module):
    """improved-aesthetic-predictor's ``MLP.layers`` (Sequential indices 0, 2, 4, 6, 7 are Linear)."""

    def __init__(self, in_dim: int = 768):
        super().__init__()
        widths = (in_dim,) + HIDDEN
        layers: list[nn.Module] = []
        for i in range(len(HIDDEN)):
            layers.append(nn.Linear(widths[i], widths[i + 1]))
            if i < len(DROPOUTS):
                layers.append(nn.Dropout(DROPOUTS[i]))
        self.layers = nn.Sequential(*layers)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.layers(emb).squeeze(-1)


def load_head(path: str | Path) -> AestheticHead:
    path = Path(path)
    state = load_state_file(path)
    if "layers.0.weight" not in state or state["layers.0.weight"].ndim != 2:
        raise ModelLoadError(f"{path}: not an improved-aesthetic-predictor head (no 2-d layers.0.weight)")
    head = AestheticHead(int(state["layers.0.weight"].shape[1]))
    check_state_dict(head, state, str(path))
    head.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return head.eval()


def locate(weights: str | Path | None) -> tuple[Path, Path]:
    given = Path(weights) if weights else None
    folder = given.parent if given is not None and given.is_file() else (given or weights_root() / "aesthetic")
    head = given if given is not None and given.is_file() else folder / HEAD_FILE
    clip = resolve_folder([folder / CLIP_DIR], CLIP_ID,
                          lambda f: (f / "config.json").is_file() and has_model_weights(f))
    missing = []
    if not head.is_file():
        missing.append(f"{HEAD_FILE} (from {HEAD_URL})")
    if clip is None:
        missing.append(f"CLIP ViT-L/14 {CLIP_ID} (`hf download {CLIP_ID} --include '*.json' --include '*.txt' "
                       f"--include model.safetensors`, optionally with --local-dir {folder / CLIP_DIR})")
    if missing:
        raise MissingWeightsError(
            f"metric 'aesthetic' needs {' and '.join(missing)}: not found in {folder} nor in the local Hugging "
            f"Face cache. Put the files there, or pass --weights DIR (or set SPOBENCH_WEIGHTS)."
        )
    return head, clip


class Aesthetic(Metric):
    """LAION aesthetic predictor v2 (sac+logos+ava1, linear MSE head) on CLIP ViT-L/14; prompt-free."""

    name = "aesthetic"
    version = "1"
    needs_prompt = False

    def __init__(self, weights: str | Path | None = None, device: str = "cpu", batch_size: int = 16, **options):
        self.head_path, self.clip_dir = locate(weights)
        head_sha = sha256_of(self.head_path)
        clip_sha = combined_sha256([sha256_of(f) for f in weight_files(self.clip_dir)])
        super().__init__(weights=weights, device=device, batch_size=batch_size, head=HEAD_FILE, clip=CLIP_ID,
                         preprocess="shorter side -> image size (PIL bicubic), centre crop, OpenAI CLIP mean/std",
                         head_sha256=head_sha, clip_sha256=clip_sha, **options)
        self.checkpoint_sha256 = combined_sha256([head_sha, clip_sha])
        self._clip = None
        self._head = None

    def load(self):
        if self._clip is None:
            clip = load_clip_model(self.clip_dir, self.device)
            head = load_head(self.head_path)
            if head.layers[0].in_features != clip.config.projection_dim:
                raise ModelLoadError(f"{self.head_path}: head reads {head.layers[0].in_features}-d embeddings but "
                                     f"{self.clip_dir} gives {clip.config.projection_dim}-d")
            self._clip, self._head = clip, head.to(self.device)
        return self._clip

    def score_batch(self, images: list, prompts: list[str] | None = None) -> torch.Tensor:
        clip = self.load()
        size = int(clip.config.vision_config.image_size)
        pixels = torch.stack([to_normalized_tensor(resize_center_crop(im, size)) for im in images])
        return self._head(l2_normalize(image_embeds(clip, pixels.to(self.device))))
