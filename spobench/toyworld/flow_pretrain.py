"""Pretrain the tiny flow backbone (``tiny-flow``) on the tiny world by rectified flow: the base model of the
tiny flow world, trained on the same web-like renders (``pretrain.toy_batch``) in the same loop as the tiny
U-Net (``pretrain.Pretrainer``; only the objective and the trained modules differ). Objective (SD3 paper,
Esser et al. 2024, Eq. 1-3 with the rectified-flow path, Sec. 3.1):

    x_t = (1 - t) x_0 + t eps,   v = eps - x_0,   t = sigmoid(n), n ~ N(0, 1) (SD3's logit-normal; or
    t ~ U(0, 1), ``t_sampling``),
    L = || v_theta(x_t, t, c) - v ||^2,

with 10% of prompts dropped to "" so that classifier-free guidance works. Every draw of a step comes from a
generator seeded by (seed, step), so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spobench.toyworld.pretrain import PretrainConfig, Pretrainer, _to_model_space


@dataclass
class FlowPretrainConfig(PretrainConfig):
    steps: int = 1500
    ema_decay: float = 0.995  # ~200-step average: a run of 1500 steps (0.999 would still hold early weights)
    # "logit_normal": t = sigmoid(N(logit_mean, logit_std)), SD3's default (what tiny-flow-base was trained
    # with); it puts 0.16% of its draws above t = 0.95, where the Euler sampler starts. "uniform": t ~ U(0, 1)
    # (rectified flow, Liu et al. 2022): at step 200 its x0 error at t = 1 was 0.127 against 0.193
    t_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0


class FlowPretrainer(Pretrainer):
    """The tiny flow backbone's transformer and both CLIP text encoders, trained whole by rectified flow."""

    run_name = "tiny-flow-pretrain"

    def trained_modules(self) -> dict[str, torch.nn.Module]:
        return {"transformer": self.bb.transformer, "text_encoder": self.bb.text_encoders[0],
                "text_encoder_2": self.bb.text_encoders[1]}

    def batch_loss(self, step: int) -> torch.Tensor:
        cfg = self.cfg
        prompts, images = self.batch_fn(cfg.seed, step, cfg.batch_size)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        drop = torch.rand(len(prompts), generator=g) < cfg.prompt_dropout
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        x0 = _to_model_space(images)
        if cfg.t_sampling == "uniform":
            t = torch.rand(len(prompts), generator=g)
        elif cfg.t_sampling == "logit_normal":
            t = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(len(prompts), generator=g))
        else:
            raise ValueError(f"t_sampling must be 'uniform' or 'logit_normal', not {cfg.t_sampling!r}")
        eps = torch.randn(x0.shape, generator=g)
        tt = t.view(-1, 1, 1, 1)
        x_t = (1 - tt) * x0 + tt * eps  # the rectified-flow path
        pred = self.bb.velocity(x_t, t, self.bb.encode_with_grad(prompts))
        return torch.nn.functional.mse_loss(pred.float(), eps - x0)
