"""GenEval (Ghosh et al., 2023): object-focused prompt alignment, one 0/1 verdict per image.

Pipeline, as GenEval's ``evaluation/evaluate_images.py``: an instance-segmentation detector finds
COCO objects; :mod:`spobench.metrics.geneval_rules` keeps the confident ones and judges the prompt's
clauses (objects, counts, colours, relative positions); colours come from CLIP ViT-L/14 zero-shot
over 10 colours x 3 templates on each object's mask pasted onto grey and cropped to its box. The
per-image output is 1.0 (correct) or 0.0 with the prompt's GenEval tag, so the evaluator reports
per-tag accuracy and the overall score (unweighted mean of the six tags).

Detector: transformers' Mask2Former (Swin-S, COCO instance, ``facebook/mask2former-swin-small-coco-
instance``) with mmdet's test-time pipeline and ``MaskFormerFusionHead.instance_postprocess`` re-done
here: resize to fit (1333, 800) keeping the aspect ratio, normalise with ImageNet mean/std, pad to a
multiple of 32; top-100 over (query x class) softmax scores without the no-object column; masks
upsampled bilinearly to the padded input, cropped, upsampled to the original size and thresholded at
logit 0; score = class probability x mean mask probability inside the mask; box = the mask's tight box
(``mask2bbox``, x2/y2 exclusive).

What differs from GenEval's mmdet original (``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco``,
mmdet 2.27, open_clip + clip_benchmark):

* detector weights: the original Mask2Former release (Detectron2-trained, converted to transformers)
  instead of mmdet's own re-training of the same architecture and schedule. Same classes and
  recipe, different weights, so detections and verdicts are close but not identical and scores are
  not bit-comparable with published GenEval numbers (record ``detector=mask2former-hf``);
* the Swin backbone and pixel decoder are transformers' implementations (same architecture);
* resize: torch bilinear (no antialiasing, rounded to uint8) instead of cv2 ``INTER_LINEAR`` on
  uint8 (fixed-point weights): inputs may differ by one grey level;
* masks are upsampled only for the queries in the top 100, and masks of detections at or below the
  lowest kept score (0.3) are dropped after scoring; neither changes a verdict. The top-100 list is
  sorted (mmdet's ``topk(sorted=False)`` order is unspecified); only ties in score could order
  differently;
* colour CLIP: transformers' ``CLIPModel`` with OpenAI's ViT-L/14 weights (the same weights open_clip
  loads as ``ViT-L-14``/``openai``), run in fp32; clip_benchmark runs it under CUDA autocast (fp16),
  which can flip a near-tie colour;
* images are taken as given (GenEval re-opens files with ``ImageOps.exif_transpose``; generated PNGs
  carry no EXIF orientation);
* metadata: when the evaluator passes none, each prompt's row is looked up in GenEval's vendored
  ``evaluation_metadata.jsonl`` (prompts are unique there).

Formats: both hub folders ship ``model.safetensors`` beside ``pytorch_model.bin``
(``facebook/mask2former-swin-small-coco-instance`` since its safetensors conversion, PR #2;
``openai/clip-vit-large-patch14`` too); only ``model.safetensors`` is read, and a pickle-only folder is
refused. Both load through :func:`spobench.core.weights.load_pretrained`: a missing, unexpected (except the
detector's ``criterion.`` loss buffer), wrong-shaped or NaN weight is an error naming the file and the
key, never a randomly initialised detector or CLIP that still gives verdicts.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from spobench.core.errors import MissingWeightsError, ModelLoadError
from spobench.metrics.base import Metric, MetricOutput, find_weights, sha256_of
from spobench.metrics.clip_common import combined_sha256, has_model_weights, load_clip_model, weight_files
from spobench.core.weights import load_pretrained
from spobench.metrics.geneval_rules import (
    COLORS,
    OBJECT_NAMES,
    THRESHOLD,
    COUNTING_THRESHOLD,
    Detection,
    color_crop,
    color_templates,
    evaluate_detections,
    metadata_for_prompt,
)
from spobench.metrics.imagereward import CLIP_MEAN, CLIP_STD, clip_preprocess

DETECTOR_DIR = "mask2former-swin-small-coco-instance"
CLIP_DIR = "clip-vit-large-patch14"
HOW_TO_GET = (
    f"Download the transformers folders facebook/mask2former-swin-small-coco-instance (into {DETECTOR_DIR}/) and "
    f"openai/clip-vit-large-patch14 (into {CLIP_DIR}/) from the Hugging Face hub, e.g. "
    f"`huggingface-cli download facebook/mask2former-swin-small-coco-instance --local-dir <DIR>/{DETECTOR_DIR}`."
)

# mmdet's test pipeline for the Mask2Former COCO configs
TEST_SCALE = (1333, 800)
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
SIZE_DIVISOR = 32
MAX_PER_IMAGE = 100


# -- detector: inputs and mmdet-style post-processing (pure torch) ------------------------------

def rescale_size(width: int, height: int, scale: tuple[int, int] = TEST_SCALE) -> tuple[int, int]:
    """mmcv's ``rescale_size`` for keep-ratio resizing: (new_w, new_h)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(width * float(factor) + 0.5), int(height * float(factor) + 0.5)


def detector_inputs(image) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """(pixel_values (1, 3, Hp, Wp), resized (h, w), original (H, W)) as mmdet's test pipeline:
    Resize(keep_ratio) -> Normalize -> Pad(size_divisor=32, zeros)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    H, W = arr.shape[:2]
    new_w, new_h = rescale_size(W, H)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1)[None]
    if (new_h, new_w) != (H, W):
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False).round().clamp(0, 255)
    x = (x - torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)) / torch.tensor(PIXEL_STD).view(1, 3, 1, 1)
    pad_h = -new_h % SIZE_DIVISOR
    pad_w = -new_w % SIZE_DIVISOR
    x = F.pad(x, (0, pad_w, 0, pad_h), value=0.0)
    return x, (new_h, new_w), (H, W)


def mask2bbox(masks: torch.Tensor) -> torch.Tensor:
    """mmdet's ``mask2bbox``: tight (x1, y1, x2 + 1, y2 + 1) boxes of (N, H, W) bool masks; zeros
    for empty masks."""
    n = masks.shape[0]
    boxes = torch.zeros((n, 4), dtype=torch.float32)
    x_any = masks.any(dim=1)
    y_any = masks.any(dim=2)
    for i in range(n):
        x = torch.where(x_any[i])[0]
        y = torch.where(y_any[i])[0]
        if len(x) > 0 and len(y) > 0:
            boxes[i] = torch.tensor([x[0], y[0], x[-1] + 1, y[-1] + 1], dtype=torch.float32)
    return boxes


def instance_postprocess(class_logits: torch.Tensor, mask_logits: torch.Tensor, padded_hw: tuple[int, int],
                         resized_hw: tuple[int, int], original_hw: tuple[int, int], max_per_image: int = MAX_PER_IMAGE,
                         keep_masks_above: float | None = None, chunk: int = 16) -> list[dict]:
    """mmdet's Mask2Former instance inference for one image.

    ``class_logits``: (Q, C + 1) with the no-object class last; ``mask_logits``: (Q, h, w) at the
    decoder's resolution of the padded input. Returns up to ``max_per_image`` dicts with ``label``
    (class index), ``score``, ``box`` (x1, y1, x2, y2) and ``mask`` ((H, W) bool numpy array at the
    original size, or None when ``score <= keep_masks_above``), sorted by score.
    """
    class_logits = class_logits.float()
    num_queries, num_classes = class_logits.shape[0], class_logits.shape[1] - 1
    scores = F.softmax(class_logits, dim=-1)[:, :-1]
    labels = torch.arange(num_classes).unsqueeze(0).repeat(num_queries, 1).flatten(0, 1)
    k = min(max_per_image, scores.numel())
    top_scores, top_idx = scores.flatten(0, 1).topk(k, sorted=True)
    top_labels = labels[top_idx]
    top_query = torch.div(top_idx, num_classes, rounding_mode="floor")

    queries = sorted(set(top_query.tolist()))
    mask_score: dict[int, float] = {}
    boxes: dict[int, torch.Tensor] = {}
    binaries: dict[int, torch.Tensor] = {}
    best_for_query: dict[int, float] = {}
    for s, q in zip(top_scores.tolist(), top_query.tolist()):
        best_for_query[q] = max(best_for_query.get(q, 0.0), s)
    rh, rw = resized_hw
    for start in range(0, len(queries), chunk):
        qs = queries[start:start + chunk]
        m = mask_logits[qs].float()[:, None]
        m = F.interpolate(m, size=tuple(padded_hw), mode="bilinear", align_corners=False)[:, :, :rh, :rw]
        m = F.interpolate(m, size=tuple(original_hw), mode="bilinear", align_corners=False)[:, 0]
        binary = m > 0
        ms = (m.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
        bb = mask2bbox(binary)
        for j, q in enumerate(qs):
            mask_score[q] = float(ms[j])
            boxes[q] = bb[j]
            if keep_masks_above is None or best_for_query[q] * mask_score[q] > keep_masks_above:
                binaries[q] = binary[j]
    out = []
    for s, label, q in zip(top_scores.tolist(), top_labels.tolist(), top_query.tolist()):
        score = s * mask_score[q]
        keep = keep_masks_above is None or score > keep_masks_above
        out.append({"label": int(label), "score": float(score), "query": int(q), "box": boxes[q].tolist(),
                    "mask": binaries[q].cpu().numpy() if keep and q in binaries else None})
    out.sort(key=lambda d: -d["score"])
    return out


def _instance_model_class():
    from torch import nn
    from transformers import Mask2FormerModel, Mask2FormerPreTrainedModel

    class Mask2FormerInstanceSegmentation(Mask2FormerPreTrainedModel):
        """``Mask2FormerForUniversalSegmentation`` without its training criterion (which needs scipy):
        the same ``model``/``class_predictor`` modules and checkpoint keys, inference only."""

        main_input_name = "pixel_values"

        def __init__(self, config):
            super().__init__(config)
            self.model = Mask2FormerModel(config)
            self.class_predictor = nn.Linear(config.hidden_dim, config.num_labels + 1)
            self.post_init()

        def forward(self, pixel_values):
            out = self.model(pixel_values=pixel_values, output_hidden_states=True, return_dict=True)
            class_logits = self.class_predictor(out.transformer_decoder_intermediate_states[-1].transpose(0, 1))
            return class_logits, out.masks_queries_logits[-1]

    return Mask2FormerInstanceSegmentation


_IGNORED_DETECTOR_KEYS = ("criterion.",)  # the training loss's class-weight buffer


def load_detector(folder: str | Path):
    """The Mask2Former folder (``model.safetensors``), loaded with every weight accounted for."""
    cls = _instance_model_class()
    model = load_pretrained(cls, folder, safetensors_only=True, ignore_unexpected=_IGNORED_DETECTOR_KEYS,
                            what="Mask2Former")
    if model.config.num_labels != len(OBJECT_NAMES):
        raise ModelLoadError(f"{folder}: a COCO instance model has {len(OBJECT_NAMES)} classes, this one "
                             f"{model.config.num_labels}")
    return model.eval()


def load_color_clip(folder: str | Path, device: str = "cpu"):
    """GenEval's colour CLIP (``model.safetensors``, strict) and its tokenizer."""
    from transformers import CLIPTokenizer

    clip = load_clip_model(folder, device)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(f"{folder}: cannot load the CLIP tokenizer ({first})") from None
    return clip, tokenizer


# -- colour classifier --------------------------------------------------------------------------

class ColorClassifier:
    """clip_benchmark's zero-shot classifier over GenEval's colours for one class name at a time."""

    def __init__(self, model, tokenizer, device: str = "cpu"):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.image_size = int(model.config.vision_config.image_size)
        self._weights: dict[str, torch.Tensor] = {}

    @staticmethod
    def _features(out) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.no_grad()
    def class_weights(self, classname: str) -> torch.Tensor:
        """(D, 10): per colour, the mean of the normalised template embeddings, renormalised."""
        if classname not in self._weights:
            columns = []
            for color in COLORS:
                texts = [t.format(c=color) for t in color_templates(classname)]
                enc = self.tokenizer(texts, padding="max_length", truncation=True,
                                     max_length=self.model.config.text_config.max_position_embeddings,
                                     return_tensors="pt").to(self.device)
                emb = self._features(self.model.get_text_features(input_ids=enc.input_ids,
                                                                  attention_mask=enc.attention_mask))
                emb = F.normalize(emb.float(), dim=-1).mean(dim=0)
                columns.append(emb / emb.norm())
            self._weights[classname] = torch.stack(columns, dim=1)
        return self._weights[classname]

    @torch.no_grad()
    def logits(self, image, detections: Sequence[Detection], classname: str) -> torch.Tensor:
        pixels = torch.stack([clip_preprocess(color_crop(image, d), self.image_size, CLIP_MEAN, CLIP_STD)
                              for d in detections]).to(self.device)
        feats = self._features(self.model.get_image_features(pixel_values=pixels))
        return 100.0 * F.normalize(feats.float(), dim=-1) @ self.class_weights(classname)

    def __call__(self, image, detections: Sequence[Detection], classname: str) -> list[str]:
        return [COLORS[i] for i in self.logits(image, detections, classname).argmax(1).tolist()]


# -- the plugin ---------------------------------------------------------------------------------

def _weights_sha256(folder: Path, what: str) -> str:
    if not has_model_weights(folder):
        raise MissingWeightsError(f"metric 'geneval' needs {what} weights (model.safetensors) in {folder} "
                                  f"(not found). {HOW_TO_GET}")
    return combined_sha256([sha256_of(f) for f in weight_files(folder)])


class GenEval(Metric):
    """GenEval: 1 if the image satisfies its prompt's object/count/colour/position clauses, else 0."""

    name = "geneval"
    version = "1"
    has_tags = True

    def __init__(self, weights: str | Path | None = None, device: str = "cpu", batch_size: int = 8, **options):
        options.setdefault("detector", "mask2former-hf")
        super().__init__(weights=weights, device=device, batch_size=batch_size, **options)
        self.folder = find_weights(self.name, weights, (f"{DETECTOR_DIR}/config.json", f"{CLIP_DIR}/config.json"),
                                   HOW_TO_GET)
        det_sha = _weights_sha256(self.folder / DETECTOR_DIR, "Mask2Former")
        clip_sha = _weights_sha256(self.folder / CLIP_DIR, "CLIP")
        both = f"{det_sha}:{clip_sha}"
        self.checkpoint_sha256 = hashlib.sha256(both.encode()).hexdigest()
        self._detector = None
        self._colors: ColorClassifier | None = None

    def load(self):
        if self._detector is None:
            detector = load_detector(self.folder / DETECTOR_DIR).to(self.device)
            clip, tokenizer = load_color_clip(self.folder / CLIP_DIR, self.device)
            self._detector, self._colors = detector, ColorClassifier(clip, tokenizer, self.device)
        return self._detector

    @torch.no_grad()
    def detect(self, image) -> list[Detection]:
        """All top-100 detections of ``image`` (masks kept only where a verdict could use them)."""
        detector = self.load()
        pixels, resized, original = detector_inputs(image)
        class_logits, mask_logits = detector(pixels.to(self.device))
        dets = instance_postprocess(class_logits[0].cpu(), mask_logits[0].cpu(), tuple(pixels.shape[-2:]), resized,
                                    original, keep_masks_above=min(THRESHOLD, COUNTING_THRESHOLD))
        return [Detection(OBJECT_NAMES[d["label"]], tuple(d["box"]), d["score"], d["mask"]) for d in dets]

    def score(self, images: Sequence, prompts: Sequence[str], metadata: Sequence[dict] | None = None) -> MetricOutput:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        rows = list(metadata) if metadata is not None else [metadata_for_prompt(p) for p in prompts]
        self.load()
        scores, tags, details = [], [], []
        for image, row in zip(images, rows):
            image = image.convert("RGB")
            correct, reason, objects = evaluate_detections(
                self.detect(image), row, lambda dets, cls, im=image: self._colors(im, dets, cls))
            scores.append(1.0 if correct else 0.0)
            tags.append(row["tag"])
            details.append({"reason": reason, "detected": {k: [list(map(float, d.box)) + [d.score] for d in v]
                                                           for k, v in objects.items()}})
        return MetricOutput(scores=np.asarray(scores, dtype=np.float64), tags=tags, details=details)
