"""The rollout engine: plain DDIM trajectories with per-step log-probs (DDPO, D3PO, generation) and
the pieces every trainer's sampling is built from (CFG predictions, DDIM log-probs, per-row noise).
SPO's candidate pools are SPO's own: ``spobench.trainers.spo_pools``.

Every random draw comes from explicit per-row ``torch.Generator``s (one per prompt/image), so a
prompt with a seed gives the same rollout whatever batch it is in.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from spobench.models.backbones.base import Backbone, Conditioning
from spobench.engine.ddim import NoiseSchedule, Reduction, step_distribution
from spobench.engine.flow_sde import NOISE_LEVEL as FLOW_SDE_NOISE  # what generation with eta > 0 samples on a flow backbone

Generators = Sequence[torch.Generator]


def make_generators(seeds: Sequence[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def randn(shape: tuple[int, ...], generators: Generators, device=None, dtype=torch.float32) -> torch.Tensor:
    """One standard-normal draw of ``shape`` per row, each row from its own generator."""
    rows = [torch.randn(shape, generator=g, device=g.device, dtype=dtype) for g in generators]
    return torch.stack(rows).to(device)


def sampler_name(family: str, eta: float) -> str:
    """The name manifests and reports give the sampler :meth:`RolloutEngine.sample` uses."""
    if family == "flow":
        return "euler-ode" if eta == 0 else f"flow-sde (a = {FLOW_SDE_NOISE})"
    return "ddim"


@dataclass
class SamplerConfig:
    num_steps: int = 20
    guidance_scale: float = 5.0
    eta: float = 1.0
    reduction: Reduction = "mean"
    resolution: int | None = None  # None: the backbone's default


@dataclass
class Trajectory:
    """A plain DDIM rollout: x_T ... x_0 with the log-prob of each transition."""

    latents: torch.Tensor  # (B, S+1, C, H, W) when kept, else (B, 1, C, H, W) = x_0 only
    log_probs: torch.Tensor  # (B, S)
    timesteps: torch.Tensor  # (S,)
    cond: Conditioning

    @property
    def x0(self) -> torch.Tensor:
        return self.latents[:, -1]


# scorer(x0_hat latents (N, C, H, W), timestep of the scored sample (>= 0), row -> prompt index (N,))
Scorer = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]


class RolloutEngine:
    """Samples from a backbone with the sampler config; holds no state between rollouts (the backbone
    caches the unconditional embedding)."""

    PROMPT_CACHE = 512  # prompts whose encodings are kept (SD-1.5: ~240 KB each in fp32)

    def __init__(self, backbone: Backbone, sampler: SamplerConfig | None = None):
        self.backbone = backbone
        self.sampler = sampler or SamplerConfig()
        self._sched: NoiseSchedule | None = None
        # prompt -> its one-row Conditioning: the text encoders are frozen, so a round's rollout and its
        # training micro-batches (which revisit the same prompts) encode each prompt once
        self._prompt_cache: OrderedDict[tuple, Conditioning] = OrderedDict()

    @property
    def sched(self) -> NoiseSchedule:
        """The DDIM schedule, built when first asked for: a flow backbone has none (its SDE grid is
        ``engine.samplers.FlowSteps``'), yet shares the engine's prompt cache and noise."""
        if self._sched is None:
            self._sched = NoiseSchedule.from_backbone(self.backbone, self.sampler.num_steps)
        return self._sched

    # -- pieces ----------------------------------------------------------------------------------
    def timesteps(self) -> torch.Tensor:
        return self.backbone.timesteps(self.sampler.num_steps)

    def initial_noise(self, generators: Generators) -> torch.Tensor:
        shape = self.backbone.latent_shape(self.sampler.resolution)
        return randn(shape, generators, device=self.backbone.device)

    def encode(self, prompts: Sequence[str]) -> tuple[Conditioning, Conditioning]:
        """(cond, uncond) for ``prompts``; each distinct prompt not seen lately is encoded (all of them in
        one text-encoder call), the others come from the cache (padded to max length, a prompt's row
        does not depend on its batch)."""
        bb, res = self.backbone, self.sampler.resolution
        where = (res, bb.device, bb.dtype)
        cache = self._prompt_cache
        missing = list(dict.fromkeys(p for p in prompts if (p, *where) not in cache))
        with torch.no_grad():
            if missing:
                enc = bb.encode_prompts(missing, res).detach()
                for i, p in enumerate(missing):
                    cache[(p, *where)] = enc.index(slice(i, i + 1))
            rows = []
            for p in prompts:
                cache.move_to_end((p, *where))
                rows.append(cache[(p, *where)])
            while len(cache) > max(self.PROMPT_CACHE, len(prompts)):
                cache.popitem(last=False)
            cond = Conditioning.cat(rows)
            uncond = bb.encode_unconditional(len(prompts), res)
        return cond, uncond

    def check_log_probs(self) -> None:
        """Refuse (one named line) a scheduler whose last step has no density, where one is needed."""
        self.sched.check_log_probs(self.backbone.source or self.backbone.name)

    def predict(self, x: torch.Tensor, t, cond: Conditioning, uncond: Conditioning) -> torch.Tensor:
        return self.backbone.predict(x, t, cond, guidance_scale=self.sampler.guidance_scale, uncond=uncond)

    def log_prob(self, x_t: torch.Tensor, t, x_prev: torch.Tensor, cond: Conditioning,
                 uncond: Conditioning | None = None, reduction: Reduction | None = None) -> torch.Tensor:
        """log p(x_prev | x_t, c) under the backbone as it is now (LoRA on or off), with grad if enabled.

        ``x_prev`` may be (B, C, H, W) or (B, m, C, H, W): m samples sharing one x_t cost ONE UNet call
        (the 1-forward-per-pair trick: SPO's winner and loser share x_t).
        """
        self.check_log_probs()
        if uncond is None:
            uncond = self.backbone.encode_unconditional(x_t.shape[0], self.sampler.resolution)
        out = self.predict(x_t, t, cond, uncond)
        dist = step_distribution(out, x_t, t, self.sched, self.sampler.eta)
        return dist.log_prob(x_prev, reduction or self.sampler.reduction)

    # -- plain trajectories -----------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompts: Sequence[str], generators: Generators, keep_latents: bool = True,
               x_T: torch.Tensor | None = None, progress: Callable[[int], None] | None = None,
               log_probs: bool = True) -> Trajectory:
        """DDIM (eta from the sampler config) from x_T to x_0 with per-step log-probs (zeros when eta
        = 0 or ``log_probs`` is False: generation needs none, and may use any scheduler).

        A flow backbone (``family = "flow"``) samples its own way instead (:meth:`sample_flow`)."""
        if getattr(self.backbone, "family", "diffusion") == "flow":
            return self.sample_flow(prompts, generators, keep_latents, x_T, progress, log_probs)
        log_probs = log_probs and self.sampler.eta > 0
        if log_probs:
            self.check_log_probs()
        cond, uncond = self.encode(prompts)
        x = self.initial_noise(generators) if x_T is None else x_T
        ts = self.timesteps()
        kept, lps = [x], []
        for i, t in enumerate(ts):
            out = self.predict(x, t, cond, uncond)
            dist = step_distribution(out, x, t, self.sched, self.sampler.eta)
            if self.sampler.eta > 0:
                x_prev = dist.sample(randn(x.shape[1:], generators, device=x.device))
            else:
                x_prev = dist.mean
            lps.append(dist.log_prob(x_prev, self.sampler.reduction) if log_probs
                       else torch.zeros(x.shape[0], device=x.device))
            x = x_prev
            if keep_latents:
                kept.append(x)
            if progress:
                progress(i + 1)
        latents = torch.stack(kept if keep_latents else [x], dim=1)
        return Trajectory(latents=latents, log_probs=torch.stack(lps, dim=1), timesteps=ts, cond=cond)

    @torch.no_grad()
    def sample_flow(self, prompts: Sequence[str], generators: Generators, keep_latents: bool = True,
                    x_T: torch.Tensor | None = None, progress: Callable[[int], None] | None = None,
                    log_probs: bool = True) -> Trajectory:
        """:meth:`sample` on a flow backbone: ``flow_sde.sample_sde`` on the backbone's grid, the Euler ODE
        (noise level 0: diffusers' FlowMatchEulerDiscreteScheduler step) at eta = 0, as generation uses, else
        the SDE at Flow-GRPO's a = 0.7. The result's ``timesteps`` are the transformer's (t * 1000)."""
        from spobench.engine.flow_sde import FlowSchedule, sample_sde

        s, bb = self.sampler, self.backbone
        sched = FlowSchedule.from_backbone(bb, s.num_steps, FLOW_SDE_NOISE if s.eta > 0 else 0.0, s.resolution)
        cond, uncond = self.encode(prompts)
        x = self.initial_noise(generators) if x_T is None else x_T
        traj = sample_sde(lambda xx, t: bb.predict(xx, t, cond, uncond=uncond, guidance_scale=s.guidance_scale),
                          x, sched, lambda i: randn(x.shape[1:], generators, device=x.device),
                          keep_latents=keep_latents, reduction=s.reduction, progress=progress)
        lps = traj.log_probs if log_probs else torch.zeros_like(traj.log_probs)
        return Trajectory(latents=traj.latents, log_probs=lps, timesteps=bb.timesteps(s.num_steps), cond=cond)
