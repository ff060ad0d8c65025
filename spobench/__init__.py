"""spobench: post-train text-to-image diffusion models from preferences, and measure them."""

__version__ = "0.1.0"

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"  # models and tokenizers shipped in the package
