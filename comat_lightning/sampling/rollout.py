"""How the training module samples: the online model's rollouts for the losses, plain images for monitoring, the
frozen base model. :class:`Rollout` is a member object of :class:`~comat_lightning.training.module.CoMatModule`
(``module.rollout``), built when the models load; :class:`GeneratedBatch` is one rollout as the losses see it."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch
from torch import nn

from comat_lightning.attention.capture import AttentionStore, CaptureRequest, choose_capture_steps
from comat_lightning.files.record_fields import PROMPT
from comat_lightning.models.adapters import using_adapter
from comat_lightning.models.backbone import Conditioning, DiffusionBackbone
from comat_lightning.sampling.denoising import StepHook, denoise, initial_noise
from comat_lightning.sampling.step_policies import GradientStepPolicy

if TYPE_CHECKING:
    from comat_lightning.attention.summary import StepAveragedMaps


@dataclass
class GeneratedBatch:
    """One rollout of the online model, as the losses see it."""

    prompts: list[str]
    latents: torch.Tensor  # (B, 4, h, w) final latent, fp32, carries gradient during training
    images: Optional[torch.Tensor]  # (B, 3, H, W) = decoded / 2 + 0.5, not clamped; None if no loss needs it
    batch: dict[str, Any] = field(default_factory=dict)  # the datamodule's batch (extra JSONL fields)
    # One generator per sample, for a loss's own randomness (e.g. random crops): per sample, not per batch, so a
    # sample draws the same numbers whichever rank or batch it lands in (DDP on N ranks = one process on N x batch).
    generators: list[torch.Generator] = field(default_factory=list)
    attention: Optional[AttentionStore] = None  # recorded cross-attention maps, if an active loss asked for them
    seeds: list[int] = field(default_factory=list)  # per-sample noise seeds (a loss may derive its own streams)
    attention_summary: Optional["StepAveragedMaps"] = None  # validation/test: step-averaged maps for evaluation
    # The rollout's batch-level seed (the same on every rank), for a loss's batch-level randomness (e.g. one crop
    # offset for the whole batch); None when the batch was not made by a rollout.
    batch_seed: Optional[int] = None

    def records(self) -> list[dict[str, Any]]:
        """The batch as one record per sample (``{"prompt": ..., <JSONL fields>}``)."""
        return [{key: values[i] for key, values in self.batch.items()} for i in range(len(self.prompts))]


def choose_steps(
    policy: GradientStepPolicy, num_steps: int, capture: Optional[CaptureRequest], generator: torch.Generator
) -> tuple[list[int], list[int]]:
    """(gradient steps, the subset whose cross-attention maps are recorded) for one rollout."""
    steps = policy.select(num_steps, generator)
    if capture is None:
        return steps, []
    return steps, choose_capture_steps(steps, capture.num_steps, capture.with_replacement, generator)


def chain_step_hooks(*hooks: Optional[StepHook]) -> Optional[StepHook]:
    """One step hook that enters every given hook's context, in order (None entries are skipped)."""
    hooks = tuple(h for h in hooks if h is not None)
    if not hooks:
        return None
    if len(hooks) == 1:
        return hooks[0]

    @contextlib.contextmanager
    def chained(step: int, carries_grad: bool):
        with contextlib.ExitStack() as stack:
            for hook in hooks:
                stack.enter_context(hook(step, carries_grad))
            yield

    return chained


class Rollout:
    """Samples with one loaded backbone and the sampler options.

    Args:
        backbone: the loaded models; its UNet is the online model (LoRA active).
        sampler: resolution, steps, CFG scale, scheduler class, detached UNet input (a ``SamplerConfig``).
        attention_store: where the capture processors record maps.
        base_unet: the frozen base for full fine-tuning (None: the online UNet with its adapter disabled).
        device: the device to sample on, asked at each call (the module's device may change after loading).
    """

    def __init__(self, backbone: DiffusionBackbone, sampler, attention_store: AttentionStore, base_unet: Optional[nn.Module], device: Callable[[], torch.device]):
        self.backbone, self.sampler, self.attention_store, self.base_unet = backbone, sampler, attention_store, base_unet
        self._device = device
        self._empty_prompt: Optional[Conditioning] = None

    @property
    def device(self) -> torch.device:
        return self._device()

    def generate(
        self, batch: dict, seed: int, gradient_steps=(), capture_steps=(), decode: bool = False, keep_attention: bool = False,
        step_hook: Optional[StepHook] = None, sample_ids: Optional[Sequence[int]] = None,
    ) -> GeneratedBatch:  # fmt: skip
        """Roll out the online model for ``batch["prompt"]``; decode if ``decode``; record the conditional pass's
        cross-attention maps at ``capture_steps`` (handed over if ``keep_attention``); ``step_hook`` sees every
        step. Sample i draws its noise from its own generator seeded ``seed + sample_ids[i]`` (default ids 0..B-1),
        so an image does not depend on which batch or rank it is sampled in."""
        prompts = list(batch[PROMPT])
        seeds = [seed + int(i) for i in (range(len(prompts)) if sample_ids is None else sample_ids)]
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        store = self.attention_store
        store.clear()
        capture_steps = set(capture_steps)

        def record(step: int, carries_grad: bool):
            return store.recording(step, part="cond" if self.cfg_batch else "all") if step in capture_steps else contextlib.nullcontext()

        hook = chain_step_hooks(record if capture_steps else None, step_hook)
        latents = self.sample(prompts, generators, gradient_steps=gradient_steps, step_hook=hook)
        images = self.decode(latents) if decode else None
        return GeneratedBatch(
            prompts=prompts, latents=latents, images=images, batch=batch, generators=generators,
            attention=store if keep_attention else None, seeds=seeds, batch_seed=seed,
        )  # fmt: skip

    def start(self, count: int, generator) -> tuple[object, torch.Tensor]:
        """A fresh scheduler set to the sampler's steps (schedulers keep per-rollout state) and the start latent
        (B, C, h, w) of ``count`` images."""
        backbone, cfg = self.backbone, self.sampler
        size = cfg.resolution // backbone.vae_scale_factor
        scheduler = self.timed_scheduler()
        sigma = getattr(scheduler, "init_noise_sigma", 1.0)  # flow matching starts from unit noise (its scheduler has no such field)
        latents = initial_noise(count, backbone.latent_channels, size, generator, self.device, sigma)
        return scheduler, latents

    @property
    def flow_matching(self) -> bool:
        """An MMDiT flow-matching backbone (SD3 / FLUX.1) rather than a UNet family."""
        from comat_lightning.models.mmdit import MMDiTBackbone

        return isinstance(self.backbone, MMDiTBackbone)

    @property
    def cfg_batch(self) -> bool:
        """Whether the denoiser runs on an [uncond, cond] batch (classifier-free guidance); FLUX.1-dev's
        guidance-distilled transformer runs the conditional batch alone, so its maps are the whole batch's."""
        return not getattr(self.backbone, "guidance_distilled", False)

    def sample(
        self, prompts: list[str], generator, gradient_steps=(), unet: Optional[nn.Module] = None, step_hook=None, latent_update=None
    ) -> torch.Tensor:
        """Final latents (B, 4, h, w), fp32. ``unet`` defaults to the online UNet; ``generator`` is one
        torch.Generator for the batch or one per prompt (then each image is independent of its batch)."""
        scheduler, latents = self.start(len(prompts), generator)
        cfg = self.sampler
        if self.flow_matching:
            from comat_lightning.sampling.flow_matching import flow_denoise

            uncond = None if self.backbone.guidance_distilled else self.empty_prompt().expand(len(prompts))
            return flow_denoise(
                self.backbone, unet or self.backbone.unet, scheduler, self.backbone.encode_prompts(prompts), uncond, latents,
                cfg.guidance_scale, gradient_steps=gradient_steps, detach_model_input=cfg.detach_unet_input, step_hook=step_hook,
                latent_update=latent_update,
            )  # fmt: skip
        return denoise(
            unet or self.backbone.unet, scheduler, self.backbone.encode_prompts(prompts, cfg.resolution), self.empty_prompt().expand(len(prompts)),
            latents, cfg.guidance_scale, generator=generator, gradient_steps=gradient_steps, detach_unet_input=cfg.detach_unet_input,
            step_hook=step_hook, latent_update=latent_update,
        )  # fmt: skip

    @torch.no_grad()
    def sample_images(self, prompts: Sequence[str], seeds: Sequence[int], base: bool = False, step_hook: Optional[StepHook] = None) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1] on the CPU, one seed per prompt, from the online model or (``base``) the
        frozen base: the same seed gives the same starting noise to both, so the pair shows what training changed."""
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        with self.frozen_base() if base else contextlib.nullcontext(None) as unet:
            latents = self.sample(list(prompts), generators, unet=unet, step_hook=step_hook)
        return self.decode(latents).clamp(0, 1).float().cpu()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode with gradient; returns x / 2 + 0.5, not clamped (the reward sees the raw decoder output).
        Never in fp16: SDXL's VAE overflows there, so fp16 autocast is lifted to fp32 for the decode."""
        vae, device = self.backbone.vae, self.device
        fp16 = torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == torch.float16
        with torch.autocast(device.type, enabled=False) if fp16 else contextlib.nullcontext():
            dtype = torch.float32 if fp16 else vae.dtype
            image = vae.decode(self.backbone.latents_for_vae(latents).to(dtype)).sample
        return image.float() / 2 + 0.5

    def timed_scheduler(self, device=None):
        """A new scheduler set to the sampler's steps, its timesteps on ``device`` (default: the sampling device): the
        sampler's class (UNet families), or on SD3 / FLUX.1 the pipeline's own timesteps (SD3's shift, FLUX's
        resolution-dependent mu)."""
        cfg, device = self.sampler, device or self.device
        if self.flow_matching:
            return self.backbone.make_scheduler(cfg.num_inference_steps, cfg.resolution // self.backbone.vae_scale_factor, device)
        scheduler = self.make_scheduler()
        scheduler.set_timesteps(cfg.num_inference_steps, device=device)
        return scheduler

    def make_scheduler(self):
        """A new instance of the sampler's scheduler class from the model's scheduler config: each consumer
        (rollout, discriminator, validation) gets its own."""
        import diffusers

        if self.flow_matching:
            return diffusers.FlowMatchEulerDiscreteScheduler.from_config(self.backbone.scheduler_config)
        return getattr(diffusers, self.sampler.scheduler).from_config(self.backbone.scheduler_config)

    def empty_prompt(self) -> Conditioning:
        """The unconditional embedding, encoded once (batch 1) and cached on the current device."""
        cached = self._empty_prompt
        if cached is None or cached.embeds.device != self.device:
            self._empty_prompt = cached = self.backbone.encode_prompts([""], self.sampler.resolution)
        return cached

    @contextlib.contextmanager
    def frozen_base(self):
        """The frozen base UNet: the online UNet with its adapter disabled (LoRA) or the kept copy (full)."""
        if self.base_unet is not None:
            yield self.base_unet
            return
        unet = self.backbone.unet
        with using_adapter(unet, None):  # not PEFT's disable/enable_adapters: those also flip requires_grad
            yield unet


__all__ = ["GeneratedBatch", "Rollout", "chain_step_hooks", "choose_steps"]
