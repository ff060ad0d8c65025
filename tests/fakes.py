"""A backbone small enough to reason about: a 1x1 conv "UNet" that still takes timesteps and text.

Used by engine tests so that they check sampling math and bookkeeping, not a model."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler

from spobench.models.backbones.base import Backbone, BackboneDefaults, Conditioning


class _FakeUNet(torch.nn.Module):
    def __init__(self, channels: int = 3):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 1)
        self.text = torch.nn.Linear(4, channels)
        self.config = type("Cfg", (), {"in_channels": channels})()

    @property
    def dtype(self):
        return self.conv.weight.dtype

    def forward(self, x, t, encoder_hidden_states, return_dict=False, **_):
        h = self.conv(x) + self.text(encoder_hidden_states.mean(1))[:, :, None, None]
        h = h * (1 + t.float()[:, None, None, None] / 1000)
        return (torch.tanh(h),)


class FakeBackbone(Backbone):
    name = "fake"
    defaults = BackboneDefaults(resolution=8)

    def __init__(self, prediction_type: str = "epsilon", seed: int = 0):
        torch.manual_seed(seed)
        sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              timestep_spacing="leading", prediction_type=prediction_type)
        super().__init__(unet=_FakeUNet(), scheduler=sched, pixel_space=True, source="fake")

    def encode_prompts(self, prompts, resolution=None) -> Conditioning:
        rows = [torch.tensor([float(len(p)), float(sum(map(ord, p)) % 97), 1.0, 0.0]) for p in prompts]
        return Conditioning(torch.stack(rows)[:, None, :].expand(-1, 2, -1) / 10)
