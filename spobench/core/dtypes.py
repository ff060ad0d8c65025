"""The one dtype map: the names settings, recipes and ``--dtype`` accept, to torch dtypes.

The names are short on purpose (what accelerate's ``mixed_precision`` and the official SPO configs
call them); torch is imported only when a name is turned into a dtype, so ``--help`` stays fast.
"""

from __future__ import annotations

from spobench.core.errors import InputError

NAMES = ("fp32", "bf16", "fp16")


def torch_dtype(name: str, flag: str = "--dtype"):
    """``name`` (one of :data:`NAMES`) as a ``torch.dtype``; anything else is one line naming ``flag``."""
    import torch

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name not in dtypes:
        raise InputError(f"{flag} must be one of {', '.join(NAMES)} (got {name!r})")
    return dtypes[name]
