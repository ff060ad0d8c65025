"""Backbones: SD-1.5, SDXL (diffusers) and the tiny backbone built from configs."""
