"""The Backbone: everything the rollout engine and the trainers need from a text-to-image model.

A backbone wraps a diffusers Stable-Diffusion-shaped pipeline (UNet2DConditionModel, text
encoder(s), VAE, DDIM scheduler). The engine only talks to this interface:

* ``encode_prompts`` / ``encode_unconditional`` -> :class:`Conditioning`
* ``predict`` -> the model output (epsilon or v) for ``x_t`` with classifier-free guidance,
  conditional and unconditional rows batched into ONE UNet call
* ``timesteps`` -> the DDIM schedule (SD's "leading" spacing: 951 ... 1 for 20 steps)
* ``decode`` / ``encode_images`` -> latents <-> images in [0, 1]
* LoRA: ``add_lora``, ``lora_disabled()`` (the reference model is the same UNet with its adapter
  off, never a deep copy), ``save_lora`` in diffusers' format, ``load_lora``.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from spobench.core.counters import Counters
from spobench.core.progress import quiet_libraries
from spobench.models.backbones.lora_files import DEFAULT_LORA_TARGETS, LORA_WEIGHT_NAME, read_lora, write_lora


@dataclass
class Conditioning:
    """Text conditioning whose rows align with a latent batch."""

    hidden: torch.Tensor  # (B, L, D) encoder_hidden_states
    pooled: torch.Tensor | None = None  # SDXL: pooled text_embeds (B, 1280)
    time_ids: torch.Tensor | None = None  # SDXL: micro-conditioning add_time_ids (B, 6)

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def _map(self, fn) -> "Conditioning":
        return Conditioning(
            fn(self.hidden),
            None if self.pooled is None else fn(self.pooled),
            None if self.time_ids is None else fn(self.time_ids),
        )

    def index(self, idx) -> "Conditioning":
        return self._map(lambda x: x[idx])

    def repeat_interleave(self, n: int) -> "Conditioning":
        return self._map(lambda x: x.repeat_interleave(n, dim=0))

    def expand(self, n: int) -> "Conditioning":
        """A single-row conditioning broadcast to ``n`` rows."""
        assert len(self) == 1, "expand() is for single-row conditionings"
        return self._map(lambda x: x.expand(n, *x.shape[1:]))

    def to(self, device=None, dtype=None) -> "Conditioning":
        return self._map(lambda x: x.to(device=device, dtype=dtype if x.is_floating_point() else None))

    def detach(self) -> "Conditioning":
        return self._map(lambda x: x.detach())

    @staticmethod
    def cat(parts: Sequence["Conditioning"]) -> "Conditioning":
        first = parts[0]
        return Conditioning(
            torch.cat([p.hidden for p in parts]),
            None if first.pooled is None else torch.cat([p.pooled for p in parts]),
            None if first.time_ids is None else torch.cat([p.time_ids for p in parts]),
        )

    def unet_kwargs(self) -> dict:
        kwargs: dict = {"encoder_hidden_states": self.hidden}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kwargs


@dataclass
class BackboneDefaults:
    """Per-backbone training and sampling defaults (the paper's Sec. 5.1 values for real models)."""

    lora_rank: int = 4
    lr: float = 6e-5
    spo_threshold: float = 0.3  # official SPO: 0.3 for SD-1.5, 0.4 for SDXL
    spo_k: int = 4  # SPO/MSPO candidates per pool: the paper's k = 4 (Table 6); SDXL overrides it
    resolution: int = 512
    num_steps: int = 20
    # learning rates of the other trainers (None: ``lr``): each reference's own setting
    d3po_lr: float | None = None  # D3PO reference: 3e-5
    ddpo_lr: float | None = None  # DDPO reference (LoRA): 3e-4
    dpo_lr: float | None = None  # Diffusion-DPO reference: 1e-8 x 2048 pairs a step = 2.048e-5
    dpo_warmup: int = 0  # Diffusion-DPO LR warm-up (reference: 500 steps)
    dpo_hflip: bool = False  # Diffusion-DPO random flips (reference: on; the tiny world has left/right prompts)
    spm_lr: float = 1e-4  # step-aware preference model (paper Sec. 5.1: 3e-6 SD-1.5, 1e-6 SDXL)
    # where an SPM starts (train-spm without --init): this metric's weights folder, else (when absent)
    # this folder shipped in spobench/assets
    spm_init: str = "pickscore"
    spm_init_shipped: str | None = None
    # What a trainer uses when the user names none; None: the setting is required (real backbones:
    # no prompt list, preference model or reward can be assumed).
    prompts: str | None = None  # training prompt set
    scorer: str | None = None  # SPO/MSPO step scorer (an SPM folder or metric:<name>)
    reward: str | None = None  # DDPO/D3PO reward on x_0 (metric:<name> or an SPM folder)
    # flow backbones (sd3.py): None where a backbone has no published value (the sampler's own default)
    lora_alpha: float | None = None  # None: = rank (scale 1)
    guidance_scale: float | None = None  # CFG weight of the published sampler


class Backbone:
    """Base class; subclasses implement prompt encoding and loading (see ``sd.py``, ``tiny.py``)."""

    name: str = "base"
    family: str = "diffusion"  # "diffusion": DDIM over alphas_cumprod; "flow": rectified flow (models/backbones/sd3.py)
    defaults: BackboneDefaults = BackboneDefaults()
    pipeline_class: type | None = None  # the diffusers pipeline class for LoRA save/load

    def __init__(self, *, unet, scheduler, vae=None, pixel_space: bool = False, source: str = ""):
        self.unet = unet
        self.vae = vae
        self.scheduler = scheduler
        self.pixel_space = pixel_space
        self.source = source
        self.counters = Counters()
        self._uncond_cache: dict[tuple, Conditioning] = {}
        self.lora_rank: int | None = None
        self._tuner_layers: list | None = None  # peft's LoRA layers, found once per adapter

    # -- facts -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        # The first parameter (conv_in) is a frozen one, so this is the dtype of the frozen parts even
        # when the LoRA parameters are kept in float32. diffusers' ``ModelMixin.dtype`` gives the same
        # answer but walks every module (3.4 ms a call on the tiny UNet, ~1% of an SPO round).
        return next(self.unet.parameters()).dtype

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.scheduler.alphas_cumprod

    @property
    def final_alpha_cumprod(self) -> torch.Tensor:
        return self.scheduler.final_alpha_cumprod

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    @property
    def vae_scale_factor(self) -> int:
        if self.pixel_space or self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, resolution: int | None = None) -> tuple[int, int, int]:
        res = resolution or self.defaults.resolution
        s = res // self.vae_scale_factor
        return (self.unet.config.in_channels, s, s)

    def identity(self) -> dict:
        """What a manifest records about this backbone."""
        return {"backbone": self.name, "source": self.source, "prediction_type": self.prediction_type,
                "lora_rank": self.lora_rank}

    # -- prompts -----------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str], resolution: int | None = None) -> Conditioning:
        raise NotImplementedError

    def encode_unconditional(self, n: int, resolution: int | None = None) -> Conditioning:
        """The empty-prompt conditioning, encoded once and broadcast (CFG's unconditional branch)."""
        key = (resolution, self.device, self.dtype)
        if key not in self._uncond_cache:
            with torch.no_grad():
                self._uncond_cache[key] = self.encode_prompts([""], resolution).detach()
        return self._uncond_cache[key].expand(n)

    # -- the UNet ----------------------------------------------------------------------------
    def unet_forward(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """One UNet call; counted in ``counters`` by rows and whether grad is on."""
        self.counters.add_unet(x.shape[0], torch.is_grad_enabled())
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        return self.unet(x, t.to(x.device), **cond.to(x.device, self.dtype).unet_kwargs(), return_dict=False)[0]

    def predict(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor | int,
        cond: Conditioning,
        guidance_scale: float = 1.0,
        uncond: Conditioning | None = None,
    ) -> torch.Tensor:
        """Model output (epsilon or v, see ``prediction_type``) for ``x_t`` at ``t``.

        With ``guidance_scale != 1`` the unconditional and conditional rows go through the UNet in
        one call and are combined as ``u + w (c - u)`` (classifier-free guidance).
        """
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        x_in = x_t.to(self.dtype)
        if guidance_scale == 1.0:
            return self.unet_forward(x_in, t, cond).to(x_t.dtype)
        if uncond is None:
            uncond = self.encode_unconditional(x_t.shape[0])
        out = self.unet_forward(torch.cat([x_in, x_in]), torch.cat([t, t]), Conditioning.cat([uncond, cond]))
        u, c = out.to(x_t.dtype).chunk(2)
        return u + guidance_scale * (c - u)

    def timesteps(self, num_steps: int) -> torch.Tensor:
        """DDIM timesteps as the scheduler spaces them (SD: "leading", steps_offset=1 -> 951..1)."""
        sched = copy.deepcopy(self.scheduler)
        sched.set_timesteps(num_steps)
        return sched.timesteps.clone()

    # -- the training objective's noising (offline trainers: Diffusion-DPO) -----------------
    def training_timestep(self, generator: torch.Generator) -> int | float:
        """One timestep of the training objective's expectation: t ~ U{0, ..., T-1} (DDPM training)."""
        return int(torch.randint(0, self.num_train_timesteps, (1,), generator=generator))

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor,
                        t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, the regression target of ``predict``) for ``prediction_type``: eps, v = sqrt(a_t) eps -
        sqrt(1 - a_t) x_0 (``get_velocity``) or x_0; x_t from the scheduler's ``add_noise``."""
        x_t = self.scheduler.add_noise(x0, noise, t)
        kind = self.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = self.scheduler.get_velocity(x0, noise, t)
        elif kind == "sample":
            target = x0
        else:
            raise ValueError(f"unsupported prediction_type {kind!r}")
        return x_t, target

    # -- latents <-> images ------------------------------------------------------------------
    def decode(self, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Latents -> images in [0, 1], (B, 3, H, W) float32. ``clamp=False`` keeps values the VAE put
        outside [-1, 1] (mapped to outside [0, 1]) for a scorer that clamps after its own resize."""
        self.counters.vae_decodes += latents.shape[0]
        if self.pixel_space:
            x = latents
        else:
            z = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
            if getattr(self.vae.config, "shift_factor", None):
                z = z + self.vae.config.shift_factor
            x = self.vae.decode(z, return_dict=False)[0]
        x = x.float() / 2 + 0.5
        return x.clamp(0, 1) if clamp else x

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [0, 1] (B, 3, H, W) -> latents (a sample of the VAE posterior)."""
        self.counters.vae_encodes += images.shape[0]
        x = images * 2 - 1
        if self.pixel_space:
            return x.to(self.dtype)
        dist = self.vae.encode(x.to(self.vae.dtype)).latent_dist
        z = dist.sample(generator=generator)
        if getattr(self.vae.config, "shift_factor", None):
            z = z - self.vae.config.shift_factor
        return z * self.vae.config.scaling_factor

    # -- LoRA --------------------------------------------------------------------------------
    def add_lora(self, rank: int | None = None, alpha: float | None = None,
                 targets: Sequence[str] = DEFAULT_LORA_TARGETS, seed: int = 0, rank_pattern: dict | None = None,
                 alpha_pattern: dict | None = None) -> list[torch.nn.Parameter]:
        """Attach a peft LoRA adapter to the UNet; only its parameters require grad. Returns them.

        ``rank_pattern`` / ``alpha_pattern``: per-module exceptions (published LoRAs whose modules
        differ in rank or kohya alpha), as peft's ``LoraConfig`` takes them."""
        from peft import LoraConfig

        rank = rank or self.defaults.lora_rank
        self.unet.requires_grad_(False)
        cfg = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                         target_modules=list(targets), rank_pattern=dict(rank_pattern or {}),
                         alpha_pattern=dict(alpha_pattern or {}))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.unet.add_adapter(cfg)
        self.lora_rank = rank
        self._tuner_layers = None
        params = [p for n, p in self.unet.named_parameters() if "lora_" in n]
        for p in params:
            p.data = p.data.float()
            p.requires_grad_(True)
        return params

    @property
    def has_lora(self) -> bool:
        return self.lora_rank is not None

    @contextlib.contextmanager
    def lora_disabled(self) -> Iterator[None]:
        """The reference model: the same UNet with its adapter switched off."""
        if not self.has_lora:
            yield
            return
        # Exactly what diffusers' ``disable_adapters``/``enable_adapters`` do (each layer's own
        # ``enable_adapters``, which also toggles requires_grad), without walking every module of the
        # UNet on each switch: that walk was 40 ms per reference forward on the tiny UNet.
        layers = self._lora_layers()
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)

    @contextlib.contextmanager
    def lora_merged(self, reduced_precision: bool = False) -> Iterator[bool]:
        """The policy for no-grad forwards (rollouts): W + scaling * B A folded into each adapted layer's
        frozen weight and the adapter switched off, so a forward runs one matmul per layer instead of
        three. The same function up to float rounding (W x + s B (A x) vs (W + s B A) x).

        Runs its body under ``torch.no_grad()`` (a merged weight carries no gradient to the LoRA). On
        exit every layer gets back its original weight tensor (swapped, not un-merged by a subtraction),
        so training after it sees bit-identical weights. Yields whether it merged: not without a LoRA,
        and not when the frozen weights are bf16/fp16 unless ``reduced_precision`` (rounding W + s B A
        to 8 or 11 mantissa bits can swallow a small LoRA update; then the adapter stays as it is)."""
        layers = self._lora_layers() if self.has_lora else []
        merge = bool(layers) and (reduced_precision or self.dtype == torch.float32)
        swapped: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        with torch.no_grad():
            try:
                if merge:
                    for layer in layers:
                        base = layer.get_base_layer()
                        w = base.weight
                        delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A)
                        swapped.append((w, w.data))
                        w.data = (w.data.float() + delta.float()).to(w.dtype) if w.dtype != torch.float32 \
                            else w.data + delta
                        layer.enable_adapters(False)
                yield merge
            finally:
                for w, original in swapped:
                    w.data = original
                if merge:
                    for layer in layers:
                        layer.enable_adapters(True)

    def _lora_layers(self) -> list:
        if self._tuner_layers is None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            self._tuner_layers = [m for m in self.unet.modules() if isinstance(m, BaseTunerLayer)]
        return self._tuner_layers

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """LoRA weights in diffusers' key format (what ``load_lora_weights`` reads)."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        return convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet))

    def lora_config(self) -> dict:
        """The adapter's peft ``LoraConfig`` as a dict (rank, alpha, targets): saved beside the
        weights so that ``load_lora_weights`` and :meth:`load_lora` rebuild the same scaling
        (without it diffusers assumes ``lora_alpha == r``). Sets (peft's ``target_modules``) become
        sorted lists: diffusers lists a set in hash order, which differs between processes."""
        cfg = self.unet.peft_config["default"].to_dict()
        return {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in cfg.items()}

    def save_lora(self, directory: str | Path) -> Path:
        """Write ``pytorch_lora_weights.safetensors`` in diffusers' format (atomic: temp dir + rename),
        byte-identical for identical weights (sorted header: ``io.canonical_safetensors``)."""
        from spobench.core.io import atomic_dir

        with atomic_dir(directory) as tmp:
            write_lora(tmp / LORA_WEIGHT_NAME, self.pipeline_class, self.lora_state_dict(), self.lora_config())
        return Path(directory) / LORA_WEIGHT_NAME

    def load_lora(self, path: str | Path, rank: int | None = None) -> None:
        """Load a UNet LoRA into the UNet: a file saved by :meth:`save_lora`, or any published one
        in the key layouts diffusers' loaders read (see :func:`read_lora`): ``save_lora_weights``'
        ``unet.<module>.lora.down.weight`` / ``lora_A``, the older attention-processor names
        (``unet.<...>.processor.to_q_lora.down.weight``, with or without the ``unet.`` prefix) and
        kohya's ``lora_unet_<module>.lora_down.weight`` + ``.alpha``.

        Rank, alpha and target modules come from the file's adapter metadata when it has some, else
        from the weights (rank from each ``lora_B``, alpha from kohya's ``.alpha`` or = rank, targets
        = the modules the file covers). Keys and shapes are checked against the adapter BEFORE
        anything is copied, so a LoRA for another backbone raises :class:`ModelLoadError` and leaves
        the UNet as it was (an adapter added by this call is removed again); so do NaN/inf weights.
        """
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

        from spobench.core.errors import ModelLoadError
        from spobench.core.weights import mismatch_message

        file, state, config = self._read_lora(path)
        added = not self.has_lora
        try:
            if added:
                self.add_lora(rank or config["r"], alpha=config["lora_alpha"], targets=tuple(config["target_modules"]),
                              rank_pattern=config.get("rank_pattern"), alpha_pattern=config.get("alpha_pattern"))
        except (ValueError, KeyError, TypeError) as err:  # peft: "Target modules ... not found in the base model"
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise ModelLoadError(f"{file}: LoRA does not fit the {self.name} UNet ({first}); was it trained on "
                                 "another backbone?") from None
        expected = {k: v.shape for k, v in get_peft_model_state_dict(self.unet).items()}
        unexpected = sorted(set(state) - set(expected))
        missing = sorted(set(expected) - set(state))
        mismatched = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(expected[k])}" for k in state
                            if k in expected and state[k].shape != expected[k])
        problem = mismatch_message(str(file), missing, unexpected, mismatched)
        if problem:
            if added:
                self.unet.delete_adapters("default")
                self.lora_rank = None
                self._tuner_layers = None
            raise ModelLoadError(f"{problem}; is it a LoRA for the {self.name} UNet (another backbone or rank?)")
        set_peft_model_state_dict(self.unet, state)

    def _read_lora(self, path: str | Path) -> tuple[Path, dict, dict]:
        """(file, peft-keyed state dict, LoraConfig kwargs) of a LoRA for this backbone's denoiser."""
        return read_lora(path, self.pipeline_class, self.unet.config)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def to(self, device=None, dtype=None) -> "Backbone":
        """Move the frozen parts to ``device``/``dtype``; LoRA parameters stay float32."""
        for m in self.modules().values():
            kwargs = {}
            if device is not None:
                kwargs["device"] = device
            if dtype is not None and getattr(m, "dtype", None) != dtype:
                kwargs["dtype"] = dtype  # (diffusers warns on any to(dtype=...), even a no-op one)
            if kwargs:
                with quiet_libraries():  # diffusers 0.42 warns about "modules kept in float32: []" on any cast
                    m.to(**kwargs)
        for n, p in self.unet.named_parameters():
            if "lora_" in n:
                p.data = p.data.float()
        self._uncond_cache.clear()
        return self

    def modules(self) -> dict[str, torch.nn.Module]:
        mods = {"unet": self.unet}
        if self.vae is not None:
            mods["vae"] = self.vae
        return mods
