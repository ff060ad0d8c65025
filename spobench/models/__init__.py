"""The models: backbones (SD-1.5, SDXL, tiny) and the step-aware preference model."""
