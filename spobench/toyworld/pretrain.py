"""Pretrain the tiny backbone on the tiny world: the base model every tiny-world recipe starts from.

The data mimic web data: every render follows its prompt, but its quality knobs are mixed (some clean,
many spoiled), so base samples follow prompts yet spread widely in aesthetics - the situation in
which SPO is meant to help. Objective: v-prediction MSE (Salimans & Ho, 2022)

    x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps,   v = sqrt(a_t) eps - sqrt(1 - a_t) x_0,
    L = || v_theta(x_t, t, c) - v ||^2,

with 10% of prompts dropped to "" so classifier-free guidance works. Measured before this module:
epsilon-prediction failed on this pixel-space model (x0 estimates blow up at high t) while
v-prediction without x0 clipping learned colours/positions in ~10 min and shapes in ~35 min on 2 cores.

Each step's batch is a pure function of (seed, step); the steps run in the shared loop
(``spobench.trainers.loop``) whose checkpoints hold the weights, the EMA, the optimizer, the LR schedule,
the step and the losses, so ``resume`` continues exactly where a killed run stopped.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from spobench.core.io import atomic_write_json
from spobench.trainers.loop import Loop, Round, Schedule, Task

# (seed, step, batch_size) -> (prompts, uint8 images (B, H, W, 3))
BatchFn = Callable[[int, int, int], tuple[list[str], np.ndarray]]


@dataclass
class PretrainConfig:
    steps: int = 2500
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-2
    warmup: int = 100
    prompt_dropout: float = 0.1  # CFG needs an unconditional model
    ema_decay: float = 0.999
    seed: int = 0
    checkpoint_every: int = 250
    grad_clip: float = 1.0


def _to_model_space(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class Pretrainer(Task):
    """Trains the tiny backbone's UNet and text encoder from scratch (whole modules, not a LoRA) in the
    shared loop (``spobench.trainers.loop``): one round = one optimizer step on one batch."""

    run_name = "tiny-pretrain"  # the loop's run name and the checkpoint's model identity

    def __init__(self, backbone, config: PretrainConfig, batch_fn: BatchFn, out: str | Path):
        from spobench.core.checkpoint import ModuleWeights

        self.bb, self.cfg, self.batch_fn, self.out = backbone, config, batch_fn, Path(out)
        self.modules = torch.nn.ModuleDict(self.trained_modules())
        self.modules.requires_grad_(True).train()
        self.ema = copy.deepcopy(self.modules).requires_grad_(False).eval()
        self.opt = torch.optim.AdamW(self.modules.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: min(1.0, (s + 1) / max(1, config.warmup)))
        self.losses: list[float] = []
        self._on_step: Callable[[int, float], None] | None = None
        weights = ModuleWeights({"modules": self.modules, "ema": self.ema}, {"model": self.run_name})
        self.loop = Loop(self, out=self.out, name=self.run_name, weights=weights,
                         params=list(self.modules.parameters()), optimizer=self.opt, scheduler=self.sched,
                         schedule=Schedule(max_grad_norm=config.grad_clip, checkpoint_every=config.checkpoint_every,
                                           keep_checkpoints=1),
                         config=asdict(config))

    @property
    def step(self) -> int:
        return self.loop.progress.step

    def trained_modules(self) -> dict[str, torch.nn.Module]:
        """What pretraining trains, whole: the denoiser and the text encoder(s)."""
        return {"unet": self.bb.unet, "text_encoder": self.bb.text_encoder}

    # -- the loop's task -------------------------------------------------------------------------
    def rounds_per_epoch(self) -> int:
        return self.cfg.steps

    def round(self, epoch: int, rnd: int) -> Round:
        return Round(epoch, rnd, [rnd])  # one item: the batch of step ``rnd``, a pure function of (seed, step)

    def loss(self, items: list, total: int) -> tuple[torch.Tensor, dict]:
        loss = self.batch_loss(items[0])
        self._loss = loss.detach()
        return loss, {}

    def batch_loss(self, step: int) -> torch.Tensor:
        cfg = self.cfg
        prompts, images = self.batch_fn(cfg.seed, step, cfg.batch_size)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        drop = torch.rand(len(prompts), generator=g) < cfg.prompt_dropout
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        x0 = _to_model_space(images)
        t = torch.randint(0, self.bb.num_train_timesteps, (len(prompts),), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = self.bb.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        v = a.sqrt() * eps - (1 - a).sqrt() * x0
        cond = self._encode_with_grad(prompts)
        pred = self.bb.unet_forward(x_t, t, cond)
        return torch.nn.functional.mse_loss(pred.float(), v)

    def _encode_with_grad(self, prompts: list[str]):
        """The backbone's prompt encoding, but with grad: pretraining trains the text encoder too."""
        from spobench.models.backbones.base import Conditioning

        ids = self.bb._token_ids(self.bb.tokenizer, prompts)
        return Conditioning(self.bb.text_encoder(ids, return_dict=True).last_hidden_state)

    def after_step(self, log: dict) -> None:
        # EMA with warm-up: a constant 0.999 from step 0 would keep half of the random init after
        # 700 steps (seen: pure-noise samples from the EMA while the live weights drew shapes)
        before = self.step - 1
        decay = min(self.cfg.ema_decay, (1 + before) / (10 + before))
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.modules.parameters()):
                e.lerp_(p, 1 - decay)
        self.losses.append(self._loss.item())

    def state_dict(self) -> dict:
        return {"losses": self.losses}

    def load_state_dict(self, state: dict) -> None:
        self.losses = [float(v) for v in state.get("losses", [])]

    # -- driving it --------------------------------------------------------------------------------
    def train_step(self) -> float:
        self.loop.run_round()
        return self.losses[-1]

    def save_checkpoint(self) -> Path:
        return self.loop.save()

    def load_checkpoint(self) -> bool:
        """Continue from the run folder's latest checkpoint; False when it has none."""
        from spobench.trainers.loop import refuse_old_checkpoint

        refuse_old_checkpoint(self.out / "checkpoint", "state.pt", "toy pretrain")
        return self.loop.resume() is not None

    def export(self, folder: str | Path, use_ema: bool = True) -> Path:
        """Write the (EMA) weights as a tiny-backbone diffusers folder."""
        src = self.ema if use_ema else self.modules
        live = {k: v.clone() for k, v in self.modules.state_dict().items()}
        self.modules.load_state_dict(src.state_dict())
        try:
            self.bb.save_pretrained(folder)
        finally:
            self.modules.load_state_dict(live)
        atomic_write_json(Path(folder) / "pretrain.json", {"step": self.step, "config": asdict(self.cfg),
                                                           "final_loss_avg100": float(np.mean(self.losses[-100:]))})
        return Path(folder)

    def run(self, progress: Callable[[int, float], None] | None = None) -> None:
        self._on_step = progress
        self.loop.run()

    def report(self, rnd: Round, steps: list[dict]) -> tuple[list[dict], str]:
        if self._on_step:
            self._on_step(self.step, self.losses[-1])
        return [], ""


# -- the tiny world's pretraining data ------------------------------------------------------------
P_CLEAN = 0.25  # share of clean renders; the rest carry independent spoils, like web data
P_KNOB = 0.4  # each spoil is present with this probability ...
KNOB_RANGE = (0.15, 1.0)  # ... at a strength uniform in this range


def web_knobs(rng: np.random.Generator):
    """Quality knobs mixed the way web data is: some clean, most spoiled in some way."""
    from spobench.toyworld.render import CLEAN, Knobs

    if rng.random() < P_CLEAN:
        return CLEAN
    vals = {n: float(rng.uniform(*KNOB_RANGE)) if rng.random() < P_KNOB else 0.0 for n in Knobs.names()}
    return Knobs(**vals)


def toy_batch(seed: int, step: int, batch_size: int) -> tuple[list[str], np.ndarray]:
    """A pretraining batch, a pure function of (seed, step): scenes from both splits' contents
    (pretraining data cover the world; the SPO training and validation prompt lists are disjoint
    from each other, not from what the base model saw), rendered with web-like quality."""
    from spobench.toyworld.grammar import VAL_FRACTION, sample_scene, to_prompt
    from spobench.toyworld.render import render

    prompts, images = [], []
    for i in range(batch_size):
        rng = np.random.default_rng([seed, step, i])
        scene = sample_scene(rng, split="val" if rng.random() < VAL_FRACTION else "train")
        prompts.append(to_prompt(scene))
        images.append(render(scene, web_knobs(rng), rng_seed=int(rng.integers(2**31))))
    return prompts, np.stack(images)
