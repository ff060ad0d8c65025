"""MSPO: multi-step SPO (paper Sec. 4.5, Fig. 4; Table 7), for models like SDXL whose single steps
change too little for the SPM to tell candidates apart.

From the shared x_t, k candidates x_{t-1}^i are drawn as in SPO, then each is denoised j-1 more
steps with its own noise (``spo_pools.pool_rollout`` with ``PoolConfig.inner_steps = j``); the SPM
scores the candidates' x0_hat at t-j and the best/worst segment give the pair. As in the official
SDXL code, the pool's label applies to EACH transition of the two segments:

    s = 0:      x_t      -> x^w_{t-1}    vs   x_t      -> x^l_{t-1}     (shared x_t: one row, m = 2)
    s = 1..j-1: x^w_{t-s} -> x^w_{t-s-1} vs   x^l_{t-s} -> x^l_{t-s-1}  (own starts: one row per side)

each a term of the SPO loss (Eq. 4) at its own timestep. Segments are laid as the official SDXL
pipeline lays them (``tail = "merge"``): where a segment would start at the last transition
(t = 1 -> 0), that transition ends the segment still open, which then has j + 1 transitions (at 20
steps: j = 1, 3, 5; see ``spo_pools.py``). All rows of a micro-batch still go through
ONE policy and ONE reference UNet call; a kept pool costs 1 + 2(j-1) policy rows (and as many
reference rows; x2 for CFG) where the official loop runs 2j of each. Everything else (threshold,
clamp, reduction, loop) is SPO's (``spo.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from spobench.core.catalog import register_trainer
from spobench.core.config import setting
from spobench.trainers.base import TrainerConfig
from spobench.trainers.spo import PairItem, SPOConfig, SPOTrainer
from spobench.trainers.spo_pools import PoolStep


@dataclass
class MSPOConfig(SPOConfig):
    inner_steps: int = setting(4, "j: denoising steps per candidate before scoring (paper: 4 for SDXL; Table 7; "
                                  "the official SDXL config's num_inner_step = 3 counts the steps after the "
                                  "first, also j = 4)", min=1)
    tail: Literal["merge", "own"] = setting("merge", "the last transition (t=1 -> 0): appended to the open "
                                            "segment (merge, the official SDXL pipeline) or its own pool (own)")


@register_trainer("mspo")
class MSPOTrainer(SPOTrainer):
    """Multi-step SPO (paper Sec. 4.5)."""

    name: ClassVar[str] = "mspo"
    Config: ClassVar[type[TrainerConfig]] = MSPOConfig

    cfg: MSPOConfig

    def pool_inner_steps(self) -> int:
        return self.cfg.inner_steps

    def pool_tail(self) -> str:
        return self.cfg.tail

    def pair_items(self, step: PoolStep, b: int, prompt: int, n: int, score_gap: float, prob_gap: float) -> list[PairItem]:
        """Every transition of the winning and losing segments, labelled by the pool."""
        w, l = int(step.win[b]), int(step.lose[b])
        seg_w, seg_l = step.segments[b, w], step.segments[b, l]  # (j', C, H, W)
        items = []
        for s in range(seg_w.shape[0]):
            shared = s == 0
            items.append(PairItem(
                key=(prompt, n, s), prompt=prompt, t=int(step.timesteps[s]),
                x_t=(step.x_t[b] if shared else seg_w[s - 1]).cpu(), x_w=seg_w[s].cpu(), x_l=seg_l[s].cpu(),
                x_t_lose=None if shared else seg_l[s - 1].cpu(), score_gap=score_gap, prob_gap=prob_gap,
            ))
        return items
