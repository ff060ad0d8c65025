"""Backbones: SD-1.5, SDXL (diffusers) and the tiny backbone built from configs."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing torch/diffusers here would make `import spobench.models.backbones` heavy
    import torch

    from spobench.models.backbones.base import Backbone


def load_backbone(name: str, source: str | None = None, device="cpu", dtype: torch.dtype | None = None, *,
                  unet: str | None = None, vae: str | None = None) -> Backbone:
    """Load the backbone registered as ``name`` from ``source`` (a diffusers folder or hub id;
    None = the backbone's default), with ``unet`` / ``vae`` replaced by a released component (a
    UNet-only or VAE-only folder or hub id) when given. Errors are
    :class:`spobench.core.errors.ModelLoadError` (bad source) or the registry's unknown-name error, each
    one line for the CLI."""
    import torch

    from spobench.core.catalog import BACKBONES

    overrides = {k: v for k, v in (("unet", unet), ("vae", vae)) if v is not None}
    return BACKBONES.get(name).load(source, device=device, dtype=dtype or torch.float32, **overrides)


__all__ = ["load_backbone"]
