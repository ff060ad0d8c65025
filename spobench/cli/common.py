"""What the commands share: the consoles, option checks that run while the command line is parsed (before
any file or model is touched), and the backbone loader of the commands that generate or score."""

from __future__ import annotations

from typing import Optional

from spobench.core.catalog import BACKBONES
from spobench.core.checks import SEED_MAX
from spobench.core.errors import InputError
from spobench.core.progress import make_console

# not a terminal (a pipe, a log file): WIDE columns, so tables and lines are whole (core.progress)
console = make_console()
err_console = make_console(stderr=True)


# -- option values: checked while the command line is parsed, before any file or model is touched ------
def _flag(param) -> str:
    return max(param.opts, key=len) if getattr(param, "opts", None) else f"--{param.name}"


def _number(*, min: float | None = None, max: float | None = None, gt: float | None = None,
            lt: float | None = None):
    """A typer callback: the option's number must be finite and within the bounds (one `error:` line
    naming the flag; click's own range errors are a usage box, and it lets nan and inf through)."""
    def check(ctx, param, value):
        from spobench.core.checks import check_number

        return value if value is None else check_number(_flag(param), value, min=min, max=max, gt=gt, lt=lt)
    return check


def _device(allow_auto: bool = False):
    """A typer callback: a device this machine has (spobench.core.checks.parse_device)."""
    def check(ctx, param, value):
        from spobench.core.checks import parse_device

        return parse_device(value, _flag(param), allow_auto=allow_auto)
    return check


_SEED = _number(min=0, max=SEED_MAX)
# the registered backbones, for --help (`spobench ls backbones` describes them)
BACKBONE_NAMES = " | ".join(BACKBONES.names())
_COUNT = _number(min=1)


def _tiny_clip_shape(hidden: int, patch: int) -> None:
    from spobench.core.checks import tiny_clip_problem

    for name, problem in tiny_clip_problem(hidden=hidden, patch=patch):
        raise InputError(f"--{name} {problem}")


def _backbone(name: str, model: Optional[str], device: str, dtype: str, lora: Optional[str] = None,
              unet: Optional[str] = None, vae: Optional[str] = None):
    from spobench.core.dtypes import torch_dtype
    from spobench.models.backbones import load_backbone

    bb = load_backbone(name, model, device=device, dtype=torch_dtype(dtype), unet=unet, vae=vae)
    if lora is not None:
        bb.load_lora(bb.resolve_lora(lora))
    return bb
