"""The SPO authors' step-aware preference models, imported unchanged into an spobench SPM folder.

They publish ``sd-v1-5_step-aware_preference_model.bin`` and ``sdxl_step-aware_preference_model.bin``
(hub repo ``SPO-Diffusion-Models/Step-Aware_Preference_Models``): a ``torch.save``d state dict of their
``StepAwarePreferenceModel``, whose ``.model`` is a time-conditioned transformers ``CLIPModel`` trained
from PickScore. Layout and equations read from RockeyCoss/SPO at commit
ecb68d886bf566552271e51f0a0410828438630e, ``spo/preference_models/models/time_conditioned_clip.py`` and
``step_aware_preference_model.py``:

* every key starts with ``model.``; the plain CLIP keys are ``CLIPModel``'s;
* ``model.t_embedder.mlp.{0,2}``: Linear(256, D), SiLU, Linear(D, D) on the [cos | sin] sinusoid of t
  (max period 10000) - spobench's ``time_embed``;
* ``model.vision_model.encoder.layers.{i}.adaLN_modulation.1``: Linear(D, 6D) after SiLU, chunked
  shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp; ``h + gate * branch(LN(h) * (1 + scale)
  + shift)``, the gate multiplying the branch directly (bias initialised to 1) - spobench's
  ``layer_mods.{i}`` with gates ``1 + g``, so the gate biases are imported minus one, weights as they are;
* ``model.vision_model.adaLN_modulation.1``: Linear(D, 2D) after SiLU, ``pooled * (1 + scale) + shift``
  after ``post_layernorm``, before ``visual_projection`` - spobench's ``pooled_mod``.

Their checkpoints were written by transformers 4.27 (the SPM trainer's pin), which still saved the
``position_ids`` buffers of the two embeddings; those are accepted when they hold what CLIP computes
(their own loader tolerates exactly such keys).

The config, tokenizer and preprocessor settings come from the PickScore folder (``--clip``) and the
processor folder (laion ViT-H) - not its weights: the checkpoint holds every CLIP weight. The imported
SPM scores with the official input path (``preprocess["resize"] = "spo"``, see ``spobench.models.spm``).

Why import once instead of reading the ``.bin`` on every run: the folder is safetensors (no pickle read
again, memory-mapped loads), checked once, and every command that takes an SPM folder uses it unchanged.
"""

from __future__ import annotations

import hashlib
import re
import zipfile
from pathlib import Path

import torch

from spobench.core.errors import InputError, MissingWeightsError, ModelLoadError

PREFIX = "model."
HUB_REPO = "SPO-Diffusion-Models/Step-Aware_Preference_Models"
SOURCE = "RockeyCoss/SPO@ecb68d886bf566552271e51f0a0410828438630e"
# transformers 4.27 saved these persistent; current CLIP keeps them as non-persistent buffers
LEGACY_BUFFERS = ("model.text_model.embeddings.position_ids", "model.vision_model.embeddings.position_ids")
GATE_CHUNKS = (2, 5)  # gate_msa, gate_mlp among the 6 chunks of a layer's adaLN_modulation

HOW_TO_GET = (f"Download it with `hf download {HUB_REPO} sd-v1-5_step-aware_preference_model.bin --local-dir DIR` "
              "(or sdxl_step-aware_preference_model.bin).")


def import_hint(path: str | Path) -> str:
    """What to say when a file is given where an SPM folder is wanted (the official ``.bin`` is converted once)."""
    return (f"{path} is a file, not an SPM folder; an official SPO step-aware preference model is imported once "
            f"with `spobench spm import {path} --clip PICKSCORE_DIR --out SPM_DIR`, then give SPM_DIR")


def official_key(key: str) -> str:
    """spobench SPM state-dict key -> the official checkpoint's key."""
    if key.startswith("clip."):
        return PREFIX + key.removeprefix("clip.")
    if key.startswith("time_embed."):
        return PREFIX + "t_embedder." + key.removeprefix("time_embed.")
    m = re.fullmatch(r"layer_mods\.(\d+)\.1\.(weight|bias)", key)
    if m:
        return f"{PREFIX}vision_model.encoder.layers.{m[1]}.adaLN_modulation.1.{m[2]}"
    m = re.fullmatch(r"pooled_mod\.1\.(weight|bias)", key)
    if m:
        return f"{PREFIX}vision_model.adaLN_modulation.1.{m[1]}"
    raise AssertionError(f"no official name for SPM key {key}")  # a new SPM parameter needs a mapping here


def read_checkpoint(file: str | Path) -> dict[str, torch.Tensor]:
    """The official ``.bin``: ``torch.load(weights_only=True)`` (memory-mapped when the file allows),
    and nothing but a flat mapping of names to tensors."""
    file = Path(file)
    if not file.exists():
        raise MissingWeightsError(f"{file}: no such file. {HOW_TO_GET}")
    if not file.is_file():
        raise InputError(f"{file}: not a file (give the official step-aware preference model .bin)")
    try:
        # the zip format (torch >= 1.6) can be memory-mapped: a 4 GB checkpoint is not read into RAM twice
        state = torch.load(str(file), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except Exception as e:  # noqa: BLE001 - truncated zip, foreign bytes, or a pickle of other objects
        text = str(e)
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if found:
            raise ModelLoadError(f"{file}: holds Python objects other than tensors ({found[1]}); a state dict "
                                 "of tensors is expected and nothing else in it is run") from None
        first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "") or "unexpected end of file"
        raise ModelLoadError(f"{file}: cannot read it as a torch.save'd state dict "
                             f"({type(e).__name__}: {first[:200]}); truncated or not a checkpoint") from None
    if not isinstance(state, dict):
        raise ModelLoadError(f"{file}: holds a {type(state).__name__}, not a state dict of tensors")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            what = type(value).__name__ + (" (a nested state dict?)" if isinstance(value, dict) else "")
            raise ModelLoadError(f"{file}: holds more than tensors: entry {key!r} is a {what}; a flat "
                                 "state dict of tensors is expected")
    return state


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _clip_config(folder: Path):
    from transformers import CLIPConfig

    file = folder / "config.json"
    if not file.is_file():
        raise MissingWeightsError(f"{folder}: no config.json; --clip takes the PickScore folder "
                                  "(yuvalkirstain/PickScore_v1), whose config.json and tokenizer are used")
    try:
        config = CLIPConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - malformed JSON, wrong model type
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(f"{file}: not a CLIPModel config ({type(e).__name__}: {first[:200]})") from None
    if getattr(config, "model_type", None) != "clip":
        raise ModelLoadError(f"{file}: model_type {config.model_type!r}, not a CLIPModel config")
    return config


def load_official(file: str | Path, clip: str | Path, processor: str | Path | None = None):
    """A ``StepAwarePreferenceModel`` holding the official checkpoint ``file``, its CLIP config and
    tokenizer from the PickScore folder ``clip`` (``processor``: the laion ViT-H folder when ``clip``
    lacks the tokenizer or preprocessor config). Refuses a missing, unexpected or wrong-shaped key
    (official names), NaN/inf, and non-tensor content, with one line naming the file."""
    from transformers import CLIPModel

    from spobench.models.spm import StepAwarePreferenceModel
    from spobench.models.spm_files import _resolve_folder, _tokenizer_and_preprocess
    from spobench.core.weights import check_finite, check_state_dict, mismatch_message

    file = Path(file)
    state = read_checkpoint(file)  # first: it needs torch only, and most bad files fail here
    folder = _resolve_folder(clip, "--clip")
    config = _clip_config(folder)
    tokenizer, preprocess = _tokenizer_and_preprocess(folder, processor, config.vision_config.image_size,
                                                      resize="spo")

    # the model on the meta device: its layout (names, shapes) costs nothing; the file's tensors become its weights
    with torch.device("meta"):
        spm = StepAwarePreferenceModel(CLIPModel(config), tokenizer, preprocess=preprocess,
                                       base=f"{file.name} (official SPO step-aware preference model)")
    own = spm.state_dict()
    layout = {official_key(k): k for k in own}
    missing = [k for k in layout if k not in state]
    unexpected = [k for k in state if k not in layout and k not in LEGACY_BUFFERS]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[layout[k]].shape)}" for k in layout
                  if k in state and tuple(state[k].shape) != tuple(own[layout[k]].shape)]
    message = mismatch_message(str(file), missing, unexpected, mismatched)
    if message:
        raise ModelLoadError(message + " - not an official step-aware preference model of this CLIP "
                                       f"({folder / 'config.json'})")
    not_float = [k for k in layout if not state[k].is_floating_point()]
    if not_float:
        raise ModelLoadError(f"{file}: weight {not_float[0]} is {state[not_float[0]].dtype}, not floating point")
    check_finite(state, str(file))
    for key in LEGACY_BUFFERS:
        if key in state:
            n = state[key].shape[-1]
            if tuple(state[key].shape) != (1, n) or not torch.equal(state[key].long().flatten(), torch.arange(n)):
                raise ModelLoadError(f"{file}: {key} is not 0..{n - 1} (the positions CLIP uses)")

    converted = {}
    for key, name in layout.items():
        value = state[key].float()
        if name.startswith("layer_mods.") and name.endswith(".bias"):
            gates = value.double().chunk(6)
            value = torch.cat([g - 1 if i in GATE_CHUNKS else g for i, g in enumerate(gates)]).float()
        converted[name] = value
    check_state_dict(spm, converted, str(file))
    spm.load_state_dict(converted, assign=True)
    for module in spm.clip.modules():  # the non-persistent position buffers are still on the meta device
        if getattr(module, "position_ids", None) is not None and module.position_ids.is_meta:
            n = module.position_ids.shape[-1]
            module.register_buffer("position_ids", torch.arange(n).expand((1, -1)), persistent=False)
    left = [n for n, t in list(spm.named_parameters()) + list(spm.named_buffers()) if t.is_meta]
    assert not left, f"tensors not materialised on import: {left[:3]}"
    spm.origin = {"kind": "official SPO step-aware preference model", "file": str(file),
                  "bytes": file.stat().st_size, "sha256": _sha256(file), "clip_config": str(folder / "config.json"),
                  "layout": SOURCE, "hub_repo": HUB_REPO}
    return spm.eval()


def import_official(file: str | Path, clip: str | Path, out: str | Path, *, processor: str | Path | None = None,
                    overwrite: bool = False) -> Path:
    """Write the official checkpoint ``file`` as an spobench SPM folder ``out`` (safetensors), which
    ``--set scorer=OUT``, ``eval-spm OUT`` and recipes then use unchanged. Everything is checked before
    anything is written; ``out`` appears whole or not at all."""
    from spobench.core import outdir

    out = Path(out)
    outdir.check(out, overwrite=overwrite, resumable=False)  # before the load: a 4 GB read
    spm = load_official(file, clip, processor)
    spm.save(out)
    outdir.write_marker(out, "spm import")  # made by spobench: a later --overwrite may replace it
    return out
