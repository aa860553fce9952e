"""CoMat's Fidelity Preservation loss: an adversarial term that keeps the online model's latents looking like the
frozen base model's.

- Generator term (``compute``, part of the generator loss): non-saturating BCE, ``BCE(D(fake), 1)`` averaged over
  latent pixels and the batch; the module runs it with the discriminator's parameters frozen (Lightning's
  ``toggled_optimizer``), so its gradient reaches the generator's LoRA only.
- Discriminator step (``discriminator_loss``, after the generator step): one discriminator pass over the detached
  fake and the real latents together, ``[fake; real]``, then BCE against ``[0; 1]``: one mean over the concatenation
  (official, ``discriminator_reduction: concat_mean``) or ``BCE(real, 1) + BCE(fake, 0)``, the sum of the two
  halves' means (``sum_of_means``, twice the official value, so the 1.0 gradient clip bites at half the
  official gradient); with the discriminator's own AdamW and gradient clip.

Real latents: final latents of the frozen base model for the same prompts, precomputed by
``python -m comat_lightning.tools.real_latents`` into the JSONL (``real_latents: data``), or generated on the fly by
the base UNet with the LoRA disabled (``real_latents: on_the_fly``: one more full sampling per step, about twice
the rollout cost).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from comat_lightning.errors import InputError, OptionProblems
from comat_lightning.files.paths import check_local_path
from comat_lightning.files.record_fields import LATENT, REAL_LATENT
from comat_lightning.judges.discriminator import LatentDiscriminator, add_discriminator_lora
from comat_lightning.models.adapters import LoraConfig
from comat_lightning.sampling.seeds import REAL_LATENT_OFFSET
from comat_lightning.training.losses import AdversarialLoss, GeneratedBatch, LossContext, LossNeeds, check_choice
from comat_lightning.training.options import OptimizerConfig, OptimizerName


class FidelityPreservationLoss(AdversarialLoss):
    """Args:
        weight: generator-term weight (CoMat: 1.0 for SD1.5, 0.5 for SDXL).
        real_latents: "data" (batch["real_latent"] from the JSONL) or "on_the_fly" (base UNet, LoRA disabled).
        discriminator_model: None = the generator's own base UNet under a second LoRA (no extra UNet held); or a
            pipeline (hub id / folder) whose UNet becomes a separate backbone (official SDXL code: an SD1.5 UNet).
        lora_rank / lora_alpha / target_modules / lora_init: the discriminator's LoRA (init as ``model.lora.init``:
            "gaussian" A ~ N(0, 1/rank), official; "kaiming" as PEFT's default).
        lr, betas, weight_decay, grad_clip: the discriminator's AdamW (published lr: 2e-5 SD1.5 / 5e-5 SDXL).
        optimizer: "adamw", or bitsandbytes' "adamw8bit" / "paged_adamw8bit" (8-bit state).
        discriminator_reduction: "concat_mean" (official: one BCE mean over the fake and real logits together) or
            "sum_of_means" (BCE(real, 1) + BCE(fake, 0): each half weighs as a whole loss; 2x the official value).
    """

    needs = LossNeeds()  # reads the final latents only

    def __init__(
        self,
        weight: float = 1.0,
        real_latents: Literal["data", "on_the_fly"] = "data",
        discriminator_model: Optional[str] = None,
        lora_rank: int = 128,
        lora_alpha: Optional[float] = None,
        target_modules: list[str] = ["to_q", "to_k", "to_v", "to_out.0"],  # noqa: B006 (read-only)
        lora_init: Literal["gaussian", "kaiming"] = "gaussian",
        lr: float = 2e-5,
        betas: tuple[float, float] = (0.0, 0.999),
        weight_decay: float = 1e-2,
        grad_clip: Optional[float] = 1.0,
        optimizer: OptimizerName = "adamw",
        discriminator_reduction: Literal["concat_mean", "sum_of_means"] = "concat_mean",
        name: str = "fidelity_preservation",
    ):
        super().__init__(weight=weight, name=name)
        owner = "FidelityPreservationLoss"
        check_choice(owner, "real_latents", real_latents, ("data", "on_the_fly"))
        check_choice(owner, "discriminator_reduction", discriminator_reduction, ("concat_mean", "sum_of_means"))
        try:  # the discriminator's LoRA and AdamW: the generator's option groups, under this loss's option names
            self.lora = LoraConfig(rank=lora_rank, alpha=lora_alpha, target_modules=list(target_modules), init=lora_init)
            self.optimizer_config = OptimizerConfig(name=optimizer, lr=lr, betas=tuple(betas), weight_decay=weight_decay, grad_clip=grad_clip)
        except OptionProblems as err:
            names = {"rank": "lora_rank", "alpha": "lora_alpha", "init": "lora_init", "name": "optimizer"}
            raise err.renamed(owner, names) from None
        check_local_path(f"{owner}.discriminator_model", discriminator_model, "pipeline folder")
        self.real_latents = real_latents
        self.discriminator_model = discriminator_model
        self.grad_clip = grad_clip
        self.discriminator_reduction = discriminator_reduction

    @property
    def optimizer_name(self) -> str:
        return self.optimizer_config.name

    @property
    def optimizer(self) -> str:
        """The discriminator optimizer's name (the ``optimizer`` option); settable until the optimizers are built."""
        return self.optimizer_config.name

    @optimizer.setter
    def optimizer(self, name: str) -> None:
        try:  # re-checked as at construction
            self.optimizer_config = dataclasses.replace(self.optimizer_config, name=name)
        except OptionProblems as err:
            raise err.renamed("FidelityPreservationLoss", {"name": "optimizer"}) from None

    def lora_targets(self, stage: str) -> list[tuple[str, list[str]]]:
        """On the generator's own UNet (no ``discriminator_model``), the discriminator's LoRA targets its modules."""
        if self.discriminator_model is not None:
            return []
        return [(f"FidelityPreservationLoss (name {self.name!r}) target_modules", list(self.lora.target_modules))]

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Runs after the datamodule's setup and before any model loads: training prompts without a real latent
        # would otherwise fail at the first batch that holds one.
        records = getattr(trainer.datamodule, "train_records", None)
        if stage != "fit" or self.real_latents != "data" or not records:
            return
        missing = [record for record in records if not record.get(LATENT)]
        if missing:
            locate = getattr(trainer.datamodule, "location_of", lambda record: None)
            first = locate(missing[0]) or f"prompt {missing[0].get('prompt')!r}"
            raise InputError(
                f"FidelityPreservationLoss(real_latents='data'): {len(missing)} of {len(records)} training prompts have "
                f"no \"latent\" (first: {first}); run `python -m comat_lightning.tools.real_latents --config <config> --output "
                "<dir>` and train on <dir>/real_latents.jsonl, or set real_latents: on_the_fly"
            )

    # ---------------------------------------------------------------------------------------- the network

    def build(self, context: LossContext) -> LatentDiscriminator:
        scheduler = context.rollout.timed_scheduler(device="cpu")
        last_timestep = scheduler.timesteps[-1]  # the discriminator judges (nearly) clean latents
        if self.discriminator_model is None:
            unet, empty, shared = context.backbone.unet, context.rollout.empty_prompt(), True
        else:
            unet, empty = self._separate_backbone(context)
            shared = False
        add_discriminator_lora(unet, self.lora)
        flow = context.backbone if context.rollout.flow_matching else None  # SD3 / FLUX.1: the transformer's velocity
        return LatentDiscriminator(unet, empty, last_timestep, scheduler, shared=shared, flow=flow, guidance=context.sampler.guidance_scale)

    def _separate_backbone(self, context: LossContext):
        from comat_lightning.models.adapters import checkpoint_keeping_adapters
        from comat_lightning.models.backbone import DiffusionBackbone

        other = DiffusionBackbone.from_pretrained(self.discriminator_model)
        if other.vae_scale_factor != context.backbone.vae_scale_factor or other.unet.config.in_channels != context.backbone.unet.config.in_channels:
            raise InputError(
                f"FidelityPreservationLoss: discriminator_model {self.discriminator_model!r} works on different latents "
                f"({other.unet.config.in_channels} channels, factor {other.vae_scale_factor}) than the generator"
            )
        other.requires_grad_(False)
        with torch.no_grad():
            empty = other.encode_prompts([""], context.sampler.resolution)
        if context.gradient_checkpointing:
            other.unet.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_keeping_adapters)
        return other.unet.eval(), empty  # text encoders and VAE are dropped: only the empty prompt was needed

    def discriminator_parameters(self, context: LossContext) -> list[torch.nn.Parameter]:
        discriminator: LatentDiscriminator = context.helper(self.name)
        return discriminator.lora_parameters() + list(discriminator.head.parameters())

    def configure_discriminator_optimizer(self, params):
        optimizer = self.optimizer_config.build(params)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)  # constant, as published

    # ---------------------------------------------------------------------------------------- the two losses

    def compute(self, context: LossContext, generated: GeneratedBatch):
        logits = context.helper(self.name)(generated.latents)  # (B, h, w)
        loss = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
        return loss, {"fake_score": torch.sigmoid(logits.detach()).mean()}

    def discriminator_loss(self, context: LossContext, generated: GeneratedBatch):
        discriminator = context.helper(self.name)
        real = self.real_batch(context, generated)
        fake = generated.latents.detach()
        # One pass over [fake; real] (as the official code): per-sample ops, so the same logits as two passes.
        logits = discriminator(torch.cat([fake, real]))  # (2B, h, w)
        fake_logits, real_logits = logits[: len(fake)], logits[len(fake) :]
        targets = torch.cat([torch.zeros_like(fake_logits), torch.ones_like(real_logits)])
        if self.discriminator_reduction == "concat_mean":
            loss = F.binary_cross_entropy_with_logits(logits, targets)
        else:
            loss = F.binary_cross_entropy_with_logits(real_logits, targets[len(fake) :]) + F.binary_cross_entropy_with_logits(
                fake_logits, targets[: len(fake)]
            )
        real_logits, fake_logits = real_logits.detach(), fake_logits.detach()
        logs = {
            "real_score": torch.sigmoid(real_logits).mean(),
            "fake_score": torch.sigmoid(fake_logits).mean(),
            # Per latent pixel, the share the discriminator gets right (logit > 0 means "real"): near 1 on both
            # means the generator's latents have drifted visibly from the base model's; near 0.5 that they have not.
            "real_accuracy": (real_logits > 0).float().mean(),
            "fake_accuracy": (fake_logits < 0).float().mean(),
        }
        return loss, logs

    def real_batch(self, context: LossContext, generated: GeneratedBatch) -> torch.Tensor:
        """(B, 4, h, w) fp32 real latents for the batch's prompts."""
        if self.real_latents == "on_the_fly":
            generators = [torch.Generator().manual_seed(seed + REAL_LATENT_OFFSET) for seed in generated.seeds]
            with torch.no_grad(), context.rollout.frozen_base() as base:
                return context.rollout.sample(generated.prompts, generators, unet=base)
        real = generated.batch.get(REAL_LATENT)
        if real is None:
            raise ValueError(
                "FidelityPreservationLoss(real_latents='data') needs real latents in the batch: run "
                "`python -m comat_lightning.tools.real_latents --config <config> --output <dir>` and train on the "
                "<dir>/real_latents.jsonl it writes, or set real_latents: on_the_fly (about 2x sampling cost)"
            )
        if real.shape != generated.latents.shape:
            raise ValueError(f"real latents of shape {tuple(real.shape)} do not match the generated {tuple(generated.latents.shape)}")
        return real.to(device=generated.latents.device, dtype=torch.float32)
