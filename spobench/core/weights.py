"""Every load of outside weights goes through here: a model whose checkpoint misses a key, carries an
unexpected one or has a wrong shape is refused (transformers and diffusers would initialise it at random
and warn on a logger the CLI hides), and so is a model holding NaN or inf. One error line names the
file and the first offending keys.

``load_pretrained`` wraps ``from_pretrained`` of transformers and diffusers classes alike;
``check_state_dict`` does the same for a raw state dict loaded into an ``nn.Module``;
``check_finite`` is the NaN/inf check on its own (LoRA files, SPM heads);
``load_state_file`` reads a raw state-dict file (safetensors, or a pickle with
``torch.load(weights_only=True)``) and refuses anything that is not a mapping of tensors.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch

from spobench.core.errors import MissingWeightsError, ModelLoadError
from spobench.core.progress import quiet_libraries

SHOW = 5  # how many keys an error names


def _first(keys: Iterable, n: int = SHOW) -> str:
    keys = [k if isinstance(k, str) else str(k[0] if isinstance(k, (tuple, list)) else k) for k in keys]
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def mismatch_message(source: str, missing: Sequence = (), unexpected: Sequence = (),
                     mismatched: Sequence = ()) -> str | None:
    """One line saying what does not fit, or None when everything does."""
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} key(s): {_first(missing)}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} key(s): {_first(unexpected)}")
    if mismatched:
        parts.append(f"wrong shape for {len(mismatched)} key(s): {_first(mismatched)}")
    if not parts:
        return None
    return f"{source}: weights do not match the model ({'; '.join(parts)})"


def check_finite(tensors, source: str) -> None:
    """Refuse NaN/inf in a module's parameters and buffers or in a mapping of tensors."""
    if isinstance(tensors, torch.nn.Module):
        items = list(tensors.named_parameters()) + list(tensors.named_buffers())
    else:
        items = list(dict(tensors).items())
    for name, t in items:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            raise ModelLoadError(f"{source}: weight {name} holds NaN or inf; the file is corrupt")


def check_tensors(state: Mapping, source: str) -> None:
    """Refuse a mapping whose keys are not strings or whose values are not tensors (a pickle that
    ``weights_only`` accepts may still hold ints, strings or lists)."""
    if not isinstance(state, Mapping):
        raise ModelLoadError(f"{source}: holds a {type(state).__name__}, not a state dict of tensors")
    for k, v in state.items():
        if not isinstance(k, str):
            raise ModelLoadError(f"{source}: key {k!r} is a {type(k).__name__}, not a tensor name")
        if not isinstance(v, torch.Tensor):
            raise ModelLoadError(f"{source}: entry {k} is of type {type(v).__name__}, not a tensor")


def check_state_dict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str, *,
                     ignore_missing: Sequence[str] = (), ignore_unexpected: Sequence[str] = (),
                     file_key: Callable[[str], str] | None = None) -> None:
    """Refuse a state dict whose keys or shapes differ from ``module``'s (before ``load_state_dict``).

    ``ignore_*`` are key prefixes that may legitimately differ (e.g. buffers a checkpoint never holds).
    ``file_key``: for a state dict renamed from a foreign layout, maps a module key back to the key
    the file spells, so that the error names what the user can find in the file (shapes stay the
    module's)."""
    check_tensors(state, source)
    name = file_key or (lambda k: k)
    own = module.state_dict()
    missing = [name(k) for k in own if k not in state and not k.startswith(tuple(ignore_missing))]
    unexpected = [name(k) for k in state if k not in own and not k.startswith(tuple(ignore_unexpected))]
    mismatched = [f"{name(k)} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                  if k in state and tuple(state[k].shape) != tuple(v.shape)]
    message = mismatch_message(source, *(list(dict.fromkeys(x)) for x in (missing, unexpected, mismatched)))
    if message:
        raise ModelLoadError(message)
    check_finite({name(k): v for k, v in state.items()}, source)


def load_state_file(path: str | Path, *, nested: Sequence[str] = ("state_dict",)) -> dict[str, torch.Tensor]:
    """The state dict in a raw weights file, every value a tensor, or one ``ModelLoadError`` line.

    ``.safetensors`` files are read with safetensors; anything else with ``torch.load(weights_only=True)``
    (a pickle may hold tensors and plain containers only: no code runs). ``nested``: keys under which
    a checkpoint may wrap its state dict (``{"state_dict": ...}``), unwrapped once."""
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(f"{path}: no such weights file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip/pickle, a pickle with code in it, a foreign file...
        text = str(err)
        if "WeightsUnpickler error:" in text:  # torch's refusal is a page of advice around one phrase
            cause = text.split("WeightsUnpickler error:", 1)[1].strip().split("\n\n")[0]
            why = "not a weights-only pickle: " + " ".join(cause.split())
        else:
            why = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(err).__name__)
        why = why.split(". ")[0]  # torch appends advice about corrupted checkpoints to the cause
        raise ModelLoadError(f"{path}: cannot be read as a weights-only state dict "
                             f"({type(err).__name__}: {why[:300]})") from None
    for key in nested:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    check_tensors(obj, str(path))
    return dict(obj)


@contextmanager
def _quiet(*names: str):
    """transformers/diffusers log the loading report at WARNING; we raise on it instead."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _weights_file(folder: Path) -> str:
    for name in ("model.safetensors", "diffusion_pytorch_model.safetensors", "model.safetensors.index.json",
                 "diffusion_pytorch_model.safetensors.index.json", "pytorch_model.bin", "diffusion_pytorch_model.bin"):
        if (folder / name).exists():
            return str(folder / name)
    return str(folder)


def _shapes(mismatched) -> list[str]:
    """transformers/diffusers ``mismatched_keys`` entries ``(key, checkpoint shape, model shape)`` as
    ``"key (a, b) vs (c, d)"`` (the form :func:`check_state_dict` uses), sorted."""
    out = []
    for m in mismatched:
        if isinstance(m, (tuple, list)) and len(m) == 3:
            out.append(f"{m[0]} {tuple(m[1])} vs {tuple(m[2])}")
        else:
            out.append(str(m[0] if isinstance(m, (tuple, list)) else m))
    return sorted(out)


def _mismatched_keys(klass, folder: Path, kw: dict) -> list[str]:
    """Which keys have the wrong shape, when ``from_pretrained`` only said that some do (transformers 5
    logs the keys in a report and raises a sentence): load again with ``ignore_mismatched_sizes`` to
    read the report. Only on this error path; [] when that fails too."""
    try:
        with _quiet("transformers.modeling_utils", "diffusers.models.modeling_utils", "transformers"), \
                quiet_libraries():  # no "Loading weights" bar
            _, info = klass.from_pretrained(str(folder), output_loading_info=True, ignore_mismatched_sizes=True, **kw)
    except Exception:  # noqa: BLE001 - the first error is reported instead
        return []
    return _shapes(info.get("mismatched_keys", []))


def load_pretrained(klass, folder: str | Path, *, subfolder: str | None = None, safetensors_only: bool = True,
                    ignore_unexpected: Sequence[str] = (), ignore_missing: Sequence[str] = (),
                    what: str | None = None, **kwargs):
    """``klass.from_pretrained(folder)`` with every weight accounted for.

    ``safetensors_only``: True for folders spobench writes and formats published as safetensors; False
    where the official release is a ``.bin`` (transformers then reads it with ``weights_only=True``).
    Raises ``ModelLoadError`` (missing/unexpected/mismatched keys, NaN, unreadable file) or
    ``MissingWeightsError`` (no weights at all) with the file's name."""
    folder = Path(folder)
    where = folder / subfolder if subfolder else folder
    source = _weights_file(where)
    kw = dict(kwargs)
    kw.setdefault("local_files_only", True)
    if safetensors_only:
        kw["use_safetensors"] = True
    if subfolder:
        kw["subfolder"] = subfolder
    label = what or getattr(klass, "__name__", "model")
    try:
        with _quiet("transformers.modeling_utils", "diffusers.models.modeling_utils", "transformers"), \
                quiet_libraries():  # no "Loading weights" bar
            model, info = klass.from_pretrained(str(folder), output_loading_info=True, **kw)
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if not where.exists() or "no file named" in first.lower() or "does not appear to have" in first.lower():
            raise MissingWeightsError(f"{source}: no {label} weights ({first})") from None
        raise ModelLoadError(f"{source}: cannot read {label} weights ({first})") from None
    except (RuntimeError, ValueError, KeyError, TypeError, EnvironmentError) as err:
        text = str(err).strip().splitlines()
        first = next((ln for ln in text if ln.strip()), type(err).__name__)
        if "ignore_mismatched_sizes" in first or "size mismatch" in first.lower():
            shapes = _mismatched_keys(klass, folder, kw)
            if shapes:
                raise ModelLoadError(mismatch_message(source, mismatched=shapes)) from None
            first = "wrong shape for some keys (" + first[:200] + ")"
        raise ModelLoadError(f"{source}: cannot load {label} ({type(err).__name__}: {first})") from None
    except Exception as err:  # safetensors' SafetensorError and friends: a truncated or foreign file
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ModelLoadError(f"{source}: cannot read {label} weights ({type(err).__name__}: {first})") from None
    # transformers 5 reports sets: sorted, so that the same file always gives the same line
    missing = sorted(str(k) for k in info.get("missing_keys", []) if not str(k).startswith(tuple(ignore_missing)))
    unexpected = sorted(str(k) for k in info.get("unexpected_keys", [])
                        if not str(k).startswith(tuple(ignore_unexpected)))
    message = mismatch_message(source, missing, unexpected, _shapes(info.get("mismatched_keys", [])))
    if message:
        raise ModelLoadError(message)
    check_finite(model, source)
    return model
