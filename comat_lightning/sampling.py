"""How a :class:`~comat_lightning.module.CoMatModule` samples: rollouts for the losses, plain images for monitoring.

A mixin, so that the module file keeps the training algorithm and this file the sampling mechanics. It expects
``self.backbone`` (a loaded DiffusionBackbone), ``self.sampler`` (SamplerConfig), ``self.gradient_steps``,
``self.needs`` (merged LossNeeds), ``self.attention_store`` and ``self.base_unet`` (full fine-tuning only).
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
from torch import nn

from callbacks.loss_base import GeneratedBatch
from comat_lightning.adapters import using_adapter
from comat_lightning.attention_capture import choose_capture_steps
from comat_lightning.diffusion_model import Conditioning
from comat_lightning.rollout import StepHook, initial_noise, sample_latents


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


class RolloutSampling:
    _empty_prompt: Optional[Conditioning] = None

    def choose_steps(self, generator: torch.Generator) -> tuple[list[int], list[int]]:
        """(gradient steps, the subset whose cross-attention maps are recorded) for one rollout."""
        steps = self.gradient_steps.select(self.sampler.num_inference_steps, generator)
        request = self.needs.attention
        if request is None:
            return steps, []
        return steps, choose_capture_steps(steps, request.num_steps, request.with_replacement, generator)

    def generate(
        self, batch: dict, seed: int, gradient_steps=(), capture_steps=(), decode: Optional[bool] = None,
        step_hook: Optional[StepHook] = None, sample_ids: Optional[Sequence[int]] = None,
    ) -> GeneratedBatch:  # fmt: skip
        """Roll out the online model for ``batch["prompt"]``; decode if an active loss needs pixels (or ``decode``);
        record the conditional pass's cross-attention maps at ``capture_steps``; ``step_hook`` sees every step.

        Sample i draws its noise from its own generator seeded ``seed + sample_ids[i]`` (default ids 0..B-1), so
        an image does not depend on which batch or rank it is sampled in."""
        prompts = list(batch["prompt"])
        seeds = [seed + int(i) for i in (range(len(prompts)) if sample_ids is None else sample_ids)]
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        store = self.attention_store
        store.clear()
        capture_steps = set(capture_steps)

        def record(step: int, carries_grad: bool):
            return store.recording(step, part="cond") if step in capture_steps else contextlib.nullcontext()

        hook = chain_step_hooks(record if capture_steps else None, step_hook)
        latents = self.sample(prompts, generators, gradient_steps=gradient_steps, step_hook=hook)
        images = self.decode(latents) if (self.needs.decoded_image if decode is None else decode) else None
        attention = store if self.needs.attention is not None else None
        return GeneratedBatch(
            prompts=prompts, latents=latents, images=images, batch=batch, generators=generators, attention=attention, seeds=seeds,
            batch_seed=seed,
        )

    def sample(
        self, prompts: list[str], generator, gradient_steps=(), unet: Optional[nn.Module] = None, step_hook=None
    ) -> torch.Tensor:
        """Final latents (B, 4, h, w), fp32. ``unet`` defaults to the online UNet; ``generator`` is one
        torch.Generator for the batch or one per prompt (then each image is independent of its batch)."""
        backbone, cfg = self.backbone, self.sampler
        scheduler = self.make_scheduler()  # a fresh instance: schedulers keep per-rollout state
        scheduler.set_timesteps(cfg.num_inference_steps, device=self.device)
        latent_size = cfg.resolution // backbone.vae_scale_factor
        latents = initial_noise(len(prompts), backbone.unet.config.in_channels, latent_size, generator, self.device, scheduler.init_noise_sigma)
        return sample_latents(
            unet or backbone.unet,
            scheduler,
            backbone.encode_prompts(prompts, cfg.resolution),
            self.empty_prompt().expand(len(prompts)),
            latents,
            cfg.guidance_scale,
            generator=generator,
            gradient_steps=gradient_steps,
            detach_unet_input=cfg.detach_unet_input,
            step_hook=step_hook,
        )

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
        vae = self.backbone.vae
        fp16 = torch.is_autocast_enabled(self.device.type) and torch.get_autocast_dtype(self.device.type) == torch.float16
        with torch.autocast(self.device.type, enabled=False) if fp16 else contextlib.nullcontext():
            dtype = torch.float32 if fp16 else vae.dtype
            image = vae.decode((latents / vae.config.scaling_factor).to(dtype)).sample
        return image.float() / 2 + 0.5

    def make_scheduler(self):
        import diffusers

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


__all__ = ["RolloutSampling", "chain_step_hooks"]
