"""spobench: post-train text-to-image diffusion models from preferences, and measure them."""

__version__ = "0.1.0"
