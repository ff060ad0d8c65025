"""Compute counters shared by every trainer, so that recipes compare cost the way the paper's
"computational cost" paragraph does: UNet rows (with and without grad), VAE decodes, reward/SPM
passes and wall time."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field


@dataclass
class Counters:
    unet_rows_grad: int = 0  # one row = one sample through the UNet (CFG doubles the rows)
    unet_rows_nograd: int = 0
    unet_calls: int = 0
    vae_decodes: int = 0
    vae_encodes: int = 0
    reward_image_passes: int = 0  # SPM / reward model image rows
    reward_text_passes: int = 0
    started: float = field(default_factory=time.perf_counter, repr=False)

    def add_unet(self, rows: int, grad: bool) -> None:
        self.unet_calls += 1
        if grad:
            self.unet_rows_grad += rows
        else:
            self.unet_rows_nograd += rows

    @property
    def wall_s(self) -> float:
        return time.perf_counter() - self.started

    def as_dict(self) -> dict[str, float]:
        d = asdict(self)
        d.pop("started")
        d["wall_s"] = round(self.wall_s, 3)
        return d

    def reset(self) -> None:
        for k, v in asdict(Counters()).items():
            setattr(self, k, v)
        self.started = time.perf_counter()
