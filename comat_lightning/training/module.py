"""CoMatModule: reward fine-tuning of a text-to-image UNet with no images, only prompts.

One generator step (``training_step``), top to bottom:

1. roll out the online model (UNet + LoRA) from noise with classifier-free guidance; gradient flows only
   through the denoising steps chosen by the :class:`GradientStepPolicy`; cross-attention maps are recorded at a
   few of them if a loss reads maps;
2. decode the final latent with the VAE when a loss needs pixels;
3. every active loss callback turns the generated batch into a weighted scalar;
4. backward into the LoRA weights, gradient norm clipped;
5. with an adversarial loss (Fidelity Preservation), the discriminator's gradient on the detached fake and real
   latents;
6. one AdamW step for each, or, if any loss term or gradient is NaN/inf, neither (comat_lightning/runtime/nonfinite.py).

The module holds what the losses need (frozen helper models they ``build``) and computes nothing no active loss
asks for. Models are loaded in ``configure_model`` (comat_lightning/models/loading.py: after option checks, and
after ``setup`` has refused a run with no loss), so a bad config fails in seconds, not after loading gigabytes.
Every run stops cleanly on SIGTERM/SIGINT with a checkpoint (comat_lightning/runtime/graceful_stop.py).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Literal, Optional

import torch
from jsonargparse import lazy_instance
from lightning.pytorch import LightningModule
from torch import nn

from comat_lightning.attention.capture import AttentionStore, Block, LayerSelection, install_capture, unique_layers
from comat_lightning.attention.summary import summarizing_attention
from comat_lightning.files.record_fields import PROMPT
from comat_lightning.models.adapters import LoraConfig
from comat_lightning.models.backbone import DiffusionBackbone, ModelFamily
from comat_lightning.models.loading import frozen_weight_dtype, load_backbone, store_frozen_weights
from comat_lightning.models.sharding import is_model_parallel, shard_denoiser, shard_trainable
from comat_lightning.runtime.checkpoint_state import capture_rng_states, restore_rng_states, use_atomic_checkpoint_io
from comat_lightning.runtime.nonfinite import NonFiniteGuard
from comat_lightning.runtime.step_statistics import StepClock, gradient_norm, peak_memory_gib
from comat_lightning.sampling.guided import AttentionGuidance, guidance_layers, is_transformer_denoiser
from comat_lightning.sampling.rollout import GeneratedBatch, Rollout, choose_steps
from comat_lightning.sampling.seeds import POLICY_OFFSET, step_seed, validation_seed
from comat_lightning.sampling.step_policies import EvenlySpacedSteps, GradientStepPolicy
from comat_lightning.text.entities import EntityParser
from comat_lightning.training.callback_contracts import EvaluatesRollouts
from comat_lightning.training.losses import AdversarialLoss, LossCallback, LossContext, LossNeeds, active_losses, merge_needs
from comat_lightning.training.options import OptimizerConfig, SamplerConfig, check_options
from comat_lightning.training.startup_checks import check_model_inputs, check_run_settings


class CoMatModule(LightningModule):
    """Args:
        pretrained_model: SD 1.x/2.x or SDXL pipeline, hub id or folder (``tiny://sd`` for the built-in demo).
        unet_path: replace the pipeline's UNet (e.g. the paper's SDXL UNet fine-tuned at 512 px).
        vae_path: replace the pipeline's VAE.
        model_family: "auto" reads model_index.json; "sd" or "sdxl" to force.
        revision / variant: passed to ``from_pretrained`` (variant e.g. "fp16" for smaller downloads).
        sampler: rollout settings.
        gradient_steps: which denoising steps carry gradient (CoMat: 5 evenly spaced with a random phase).
        finetune: "lora" (frozen base = the same UNet with the adapter disabled) or "full" (trains the whole
            UNet; keeps a frozen copy as the base).
        lora: LoRA settings (ignored for full fine-tuning).
        optimizer: generator optimizer settings.
        gradient_checkpointing: non-reentrant checkpointing of the UNet and the VAE decoder.
        frozen_dtype: storage of the frozen weights (base UNet, VAE, text encoders, captioner, segmenters). "auto":
            bfloat16 under ``trainer.precision: bf16-mixed`` (half the memory; autocast computes in bf16 anyway),
            else float32. Trainable weights (LoRA, discriminator head) and optimizer state always stay float32.
        seed: base of the per-step, per-rank noise seeds.
        nonfinite_limit: a NaN/inf in a loss term or gradient skips that update (both optimizers untouched); after
            this many such steps in a row the run stops with a checkpoint of the last good state.
        lora_weights: a diffusers-format UNet LoRA (file or folder; ours or any) loaded as the online adapter
            instead of a fresh one: sample with it (``predict``) or continue training from it.
        guidance: test-time attention guidance for ``predict`` (``AStarGuidance`` or ``AttendAndExciteGuidance``);
            None samples plainly.
        guidance_blocks / guidance_resolution: the cross-attention layers guidance reads (default: all blocks at
            the latent size / 4, i.e. 16x16 for SD1.5 at 512 px, 24x24 for SD2 at 768, 32x32 for SDXL at 1024;
            on SD3 / FLUX.1 the default is every joint attention layer, docs/mmdit.md).
    """

    def __init__(
        self,
        pretrained_model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5",
        unet_path: Optional[str] = None,
        vae_path: Optional[str] = None,
        model_family: ModelFamily = "auto",
        revision: Optional[str] = None,
        variant: Optional[str] = None,
        sampler: SamplerConfig = SamplerConfig(),
        gradient_steps: GradientStepPolicy = lazy_instance(EvenlySpacedSteps, num_gradient_steps=5),
        finetune: Literal["lora", "full"] = "lora",
        lora: LoraConfig = LoraConfig(),
        optimizer: OptimizerConfig = OptimizerConfig(),
        gradient_checkpointing: bool = True,
        frozen_dtype: Literal["auto", "float32", "bfloat16"] = "auto",
        seed: int = 0,
        nonfinite_limit: int = 3,  # one bad batch is noise; several in a row mean the run has diverged
        lora_weights: Optional[str] = None,
        guidance: Optional[AttentionGuidance] = None,
        guidance_blocks: list[Block] = ["down", "mid", "up"],  # noqa: B006 (read-only)
        guidance_resolution: Optional[int] = None,
    ):
        super().__init__()
        check_options(sampler, gradient_steps)  # the option groups (sampler, lora, optimizer) checked themselves
        self.model_source = dict(path=pretrained_model, unet_path=unet_path, vae_path=vae_path, family=model_family, revision=revision, variant=variant)
        self.sampler = sampler
        self.gradient_steps = gradient_steps
        self.finetune = finetune
        self.lora = lora
        self.optimizer_config = optimizer
        self.gradient_checkpointing = gradient_checkpointing
        self.frozen_dtype = frozen_dtype
        self.seed = seed
        self.nonfinite = NonFiniteGuard(nonfinite_limit, reduce_any=self._any_rank)
        self.lora_weights = lora_weights
        self.guidance = guidance
        self.concept_parser = EntityParser()  # default guidance concepts: the prompt's nouns (spaCy loads lazily)
        self.guidance_layers = LayerSelection(tuple(guidance_blocks), (guidance_resolution,) if guidance_resolution else None)
        self.automatic_optimization = False  # generator (and later discriminator) steps are explicit
        self.strict_loading = False  # checkpoints hold only the trainable weights; on_load_checkpoint checks them
        self.generator_step = 0  # Lightning's global_step counts every optimizer's steps; this counts ours
        self.backbone: Optional[DiffusionBackbone] = None
        self.base_unet: Optional[nn.Module] = None  # only for full fine-tuning
        self.loss_modules = nn.ModuleDict()
        self.losses: list[LossCallback] = []
        self.needs = LossNeeds()
        self.attention_store = AttentionStore()  # cross-attention maps of the current step (only if a loss asks)
        self.rollout: Optional[Rollout] = None  # built with the models (configure_model)
        self.loss_context: Optional[LossContext] = None  # what the losses see of this module
        self._clock = StepClock()

    # ------------------------------------------------------------------------------------------ set-up

    def setup(self, stage: str) -> None:
        """Gather the active losses and refuse, before any model loads, what this run cannot do."""
        self.losses = active_losses(self.trainer.callbacks)
        self.needs = merge_needs(self.losses)
        check_run_settings(self, stage)  # losses, trainer and precision settings
        check_model_inputs(self, stage)  # paths, layers and LoRA targets against the model's config files only
        use_atomic_checkpoint_io(self.trainer)

    def configure_model(self) -> None:
        """Load the models (once: Lightning may call this per stage), let each loss build its helpers, store frozen
        weights in ``frozen_dtype``, put capture processors on the layers that are read, shard under FSDP2."""
        if self.backbone is not None:
            return
        predicting = self._trainer is not None and self.trainer.state.fn == "predict"
        self.backbone, self.base_unet = load_backbone(
            self.model_source, self.sampler.resolution, self.finetune, self.lora, self.lora_weights, self.gradient_checkpointing,
            add_lora=not predicting,  # sampling the base needs no empty adapter
        )  # fmt: skip
        self.rollout = Rollout(self.backbone, self.sampler, self.attention_store, self.base_unet, device=lambda: self.device)
        self.loss_context = LossContext(self.backbone, self.rollout, self.sampler, self.gradient_checkpointing, self.loss_modules)
        read = [loss.needs.attention.layers for loss in self.losses if loss.needs.attention is not None]
        read += [self.guidance_selection()] if self.guidance is not None else []
        latent_size = self.sampler.resolution // self.backbone.vae_scale_factor
        install_capture(self.backbone.unet, unique_layers(self.backbone.unet, read, latent_size), self.attention_store)
        for loss in self.losses:
            helper = loss.build(self.loss_context)
            if helper is not None:
                self.loss_modules[loss.name] = helper.requires_grad_(False)
        if self.adversary is not None:  # the discriminator's LoRA and head are the only helper weights that train
            for param in self.adversary.discriminator_parameters(self.loss_context):
                param.requires_grad_(True)
        precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
        frozen = [self.backbone.unet, self.backbone.vae, *self.backbone.text_encoders, self.base_unet, *self.loss_modules.values()]
        store_frozen_weights(frozen, frozen_weight_dtype(self.frozen_dtype, precision))
        if is_model_parallel(self._trainer):  # FSDP2 over the data-parallel ranks: the UNet and what else trains
            mesh = self.device_mesh["data_parallel"]
            shard_denoiser(self.backbone.unet, mesh)
            for helper in self.loss_modules.values():
                shard_trainable(helper, mesh)

    def guidance_selection(self, latent_size: Optional[int] = None, joint: Optional[bool] = None) -> LayerSelection:
        """The layers guidance reads (:func:`guidance_layers`); the start-up checks give the arguments before loading."""
        joint = joint if joint is not None else is_transformer_denoiser(self.backbone.unet)
        latent = latent_size if latent_size is not None else self.sampler.resolution // self.backbone.vae_scale_factor
        return guidance_layers(self.guidance_layers, latent, joint)

    def choose_steps(self, generator: torch.Generator) -> tuple[list[int], list[int]]:
        """(gradient steps, the subset whose cross-attention maps are recorded) for one rollout."""
        return choose_steps(self.gradient_steps, self.sampler.num_inference_steps, self.needs.attention, generator)

    def train(self, mode: bool = True):
        super().train(mode)
        self.loss_modules.eval()  # frozen judges (captioner, detectors) never train: no dropout, no batch stats
        if self.backbone is not None:
            for frozen in (self.backbone.vae, self.backbone.text_encoders, self.base_unet):
                if frozen is not None:
                    frozen.eval()
        return self

    # ------------------------------------------------------------------------------------------ checkpoints

    def trainable_state_keys(self) -> set[str]:
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Only what training changes: the frozen multi-GB models are reloaded from their source on resume.
        keep = self.trainable_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["comat"] = {
            "generator_step": self.generator_step,
            "model_source": self.model_source,
            "finetune": self.finetune,
            "rng": capture_rng_states(),
            "nonfinite": self.nonfinite.state_dict(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # FSDP2 (ModelParallelStrategy) loads the weights into the sharded modules itself and hands over the rest.
        missing = sorted(self.trainable_state_keys() - set(checkpoint["state_dict"])) if "state_dict" in checkpoint else []
        if missing:
            raise KeyError(
                f"checkpoint lacks {len(missing)} trainable weights of this model (e.g. {missing[0]}): it was written "
                "with a different LoRA rank/target modules, fine-tuning mode or base model"
            )
        state = checkpoint.get("comat", {})
        self.generator_step = int(state.get("generator_step", 0))
        self.nonfinite.load_state_dict(state.get("nonfinite", {}))
        restore_rng_states(state.get("rng"))

    # ------------------------------------------------------------------------------------------ the rest

    @property
    def adversary(self) -> Optional[AdversarialLoss]:
        return next((loss for loss in self.losses if isinstance(loss, AdversarialLoss)), None)

    def predict_step(self, batch: dict, batch_idx: int):
        """Images for ``batch`` (see comat_lightning/sampling/prediction.py), with ``guidance`` if set."""
        from comat_lightning.sampling.prediction import predict_batch

        # Lightning predicts under inference_mode; guidance needs autograd on the latent (and tensors made in
        # inference mode can never join a graph), so it is lifted here.
        with torch.inference_mode(False):
            return predict_batch(self, batch)

    def configure_callbacks(self):
        """Lightning's default progress bar counts batches per epoch; ours counts generator steps toward max_steps.
        Every run stops cleanly on SIGTERM/SIGINT and on too many non-finite steps (comat_lightning/runtime/graceful_stop.py)."""
        from comat_lightning.runtime.graceful_stop import GracefulStop
        from comat_lightning.runtime.progress import generator_step_bar

        default_bar = self.trainer.progress_bar_callback
        bar = generator_step_bar(default_bar)
        if bar is not None:  # Lightning only replaces a callback by a subclass of it: its default bar goes here
            self.trainer.callbacks.remove(default_bar)
        extra = [bar] if bar is not None else []
        if not any(isinstance(cb, GracefulStop) for cb in self.trainer.callbacks):  # a configured one keeps its settings
            extra.append(GracefulStop())
        return extra

    def configure_optimizers(self):
        cfg = self.optimizer_config
        critic = self.adversary.discriminator_parameters(self.loss_context) if self.adversary is not None else []
        critic_ids = {id(p) for p in critic}
        params = [p for p in self.parameters() if p.requires_grad and id(p) not in critic_ids]
        optimizer = cfg.build(params)
        warmup = max(cfg.warmup_steps, 0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
        if not critic:
            return [optimizer], [schedule]
        critic_optimizer, critic_schedule = self.adversary.configure_discriminator_optimizer(critic)
        return [optimizer, critic_optimizer], [schedule, critic_schedule]

    # ------------------------------------------------------------------------------------------ training
    # (sampling mechanics: comat_lightning/sampling/rollout.py)

    def training_step(self, batch: dict, batch_idx: int):
        self._clock.start(self.device)
        optimizers, schedules = self.optimizers(), self.lr_schedulers()
        (optimizer, critic_optimizer), (lr_schedule, critic_schedule) = (
            (optimizers, schedules) if isinstance(optimizers, list) else ((optimizers, None), (schedules, None))
        )
        self.nonfinite.start_step()
        # 1-4. Generator phase: rollout, decode, loss terms, backward. Only the generator's weights require grad (the
        #      discriminator is frozen for its term).
        with self.toggled_optimizer(optimizer) if critic_optimizer is not None else contextlib.nullcontext():
            loss, generated, logs = self._generator_backward(batch, optimizer)
        self.generator_step += 1
        # 5. Discriminator phase (adversarial loss only), on the detached fake and the real latents. It reads only
        #    its own weights, so computing its gradient before the generator's update changes nothing.
        if critic_optimizer is not None and not self.nonfinite.skipping:
            with self.toggled_optimizer(critic_optimizer):
                logs.update(self._discriminator_backward(generated, critic_optimizer, critic_schedule))
        # 6. Both updates, or neither: a NaN/inf anywhere skips the step (comat_lightning/runtime/nonfinite.py).
        apply, warning = self.nonfinite.finish_step(self.generator_step)
        if apply:
            optimizer.step()
            lr_schedule.step()
            if critic_optimizer is not None:
                # The plain torch optimizer: Lightning's wrapper would count this as a training step, and
                # `trainer.max_steps`, checkpoint and logging intervals would no longer count generator steps.
                critic_optimizer.optimizer.step()
                critic_schedule.step()
        elif self.trainer.is_global_zero:
            warnings.warn(warning, stacklevel=1)
        for opt in (optimizer, critic_optimizer):
            if opt is not None:
                opt.zero_grad(set_to_none=True)  # free the gradients now, not at the next step (memory)
        self.attention_store.clear()  # release the maps (and the graph they hold) before the next step

        logs["skipped_steps"] = torch.tensor(float(self.nonfinite.skipped_total))
        batch_size = len(generated.prompts)
        for name, value in logs.items():
            self.log(f"train/{name}", value, batch_size=batch_size)
        for name in ("loss", *(term.name for term in self.losses)):  # the progress bar: short names, not logged twice
            self.log(name, logs[name], prog_bar=True, logger=False, batch_size=batch_size)
        self.log("train/lr", lr_schedule.get_last_lr()[0], batch_size=batch_size)
        self.log("train/generator_step", float(self.generator_step), batch_size=batch_size)
        seconds = self._clock.seconds(self.device)
        self.log("perf/seconds_per_step", seconds, batch_size=batch_size)
        self.log("perf/images_per_second", batch_size * self.trainer.world_size / seconds, batch_size=batch_size)
        self.log("perf/peak_memory_gib", peak_memory_gib(self.device), batch_size=batch_size)
        return loss

    def _generator_backward(self, batch: dict, optimizer):
        # 1-2. Rollout with gradient through the policy's steps. The step choice is the same on every rank (so
        #    ranks do equal work); the noise is drawn per sample of the global batch, so it differs across ranks
        #    (the official code drew identical noise) and N ranks draw what one process with N x the batch would.
        #    Cross-attention maps (if a loss reads them) are recorded at a few of those steps.
        seed = step_seed(self.seed, self.generator_step)
        steps, capture = self.choose_steps(torch.Generator().manual_seed(seed + POLICY_OFFSET))
        generated = self.generate(batch, seed=seed, gradient_steps=steps, capture_steps=capture)
        # 3. Weighted loss terms from the active loss callbacks (generate decoded the images if one needs pixels).
        terms, extras = self.loss_terms(generated)
        loss = torch.stack(list(terms.values())).sum()
        # 4. Gradient, clipped. A loss with no graph (e.g. attribute concentration alone on a batch where no entity
        #    was found) has nothing to back-propagate: the update is then a no-op for the weights, but still counts.
        #    A non-finite term is not back-propagated at all (on any rank: the decision is shared).
        optimizer.zero_grad(set_to_none=True)
        grad_norm = torch.zeros(())
        if self.nonfinite.check(terms) and loss.requires_grad:
            grad_norm = self._backward_clipped(loss, optimizer, self.optimizer_config.grad_clip, "generator gradient")
        logs = {"loss": loss.detach(), **{name: value.detach() for name, value in {**terms, **extras}.items()}}
        # Each term's share of the total: which loss drives the update (0 when the total is 0).
        total = loss.detach()
        logs.update({f"share/{name}": (value.detach() / total if total != 0 else torch.zeros(())) for name, value in terms.items()})
        logs["grad_norm"] = grad_norm
        for term in self.losses:  # scalars only known after backward (e.g. the captioner's gradient on the image)
            logs.update({f"{term.name}/{k}": v for k, v in term.gradient_logs().items()})
        return loss.detach(), generated, logs

    def _discriminator_backward(self, generated: GeneratedBatch, optimizer, lr_schedule) -> dict[str, torch.Tensor]:
        adversary = self.adversary
        prefix = f"{adversary.name}/discriminator"
        loss, extras = adversary.discriminator_loss(self.loss_context, generated)
        optimizer.zero_grad(set_to_none=True)
        if self.nonfinite.check({f"{prefix} loss": loss}):
            extras["grad_norm"] = self._backward_clipped(loss, optimizer, adversary.grad_clip, f"{prefix} gradient")
        extras["lr"] = torch.tensor(lr_schedule.get_last_lr()[0])
        return {prefix: loss.detach(), **{f"{prefix}_{k}": v.detach() for k, v in extras.items()}}

    def _backward_clipped(self, loss: torch.Tensor, optimizer, clip: Optional[float], name: str) -> torch.Tensor:
        """Back-propagate ``loss`` into ``optimizer``'s weights and clip their gradient norm to ``clip`` (None: no
        clipping) unless it is non-finite (recorded as ``name``: the update will be skipped). Returns the norm
        before clipping."""
        self.manual_backward(loss)
        norm = gradient_norm(p for group in optimizer.param_groups for p in group["params"])
        if self.nonfinite.check({name: norm}) and clip is not None:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")
        return norm

    def _any_rank(self, flag: bool) -> bool:
        return self.trainer.strategy.reduce_boolean_decision(flag, all=False) if self._trainer is not None else flag

    def validation_step(self, batch: dict, batch_idx: int) -> GeneratedBatch:
        return self._evaluation_step(batch, batch_idx, "val")

    def test_step(self, batch: dict, batch_idx: int) -> GeneratedBatch:
        return self._evaluation_step(batch, batch_idx, "test")

    def _evaluation_step(self, batch: dict, batch_idx: int, stage: str) -> GeneratedBatch:
        """One gradient-free rollout per batch; the loss terms are logged as ``<stage>/<name>``, and the rollout is
        returned for evaluation callbacks (``callbacks.CompositionMetrics``), with the images decoded and, if
        they ask, the step-averaged attention maps of the layers they read."""
        # Fixed seeds per batch index, outside the range training uses, so validation curves are comparable.
        seed = validation_seed(self.seed, batch_idx)
        _, capture = self.choose_steps(torch.Generator().manual_seed(seed))  # maps at the steps training would use
        evaluator = next((cb for cb in self.trainer.callbacks if isinstance(cb, EvaluatesRollouts)), None)
        layers = evaluator.evaluation_layers(self.guidance_selection()) if evaluator is not None else None
        with summarizing_attention(self, layers) if layers is not None else contextlib.nullcontext() as summary:
            step_hook = summary.step_hook if summary is not None else None
            generated = self.generate(batch, seed=seed, capture_steps=capture, decode=evaluator is not None or None, step_hook=step_hook)
        generated.attention_summary = summary
        terms, extras = self.loss_terms(generated)
        self.attention_store.clear()
        batch_size = len(generated.prompts)
        for name, value in {**terms, **extras}.items():
            self.log(f"{stage}/{name}", value, on_epoch=True, sync_dist=True, batch_size=batch_size)
        if terms:
            self.log(f"{stage}/loss", torch.stack(list(terms.values())).sum(), on_epoch=True, sync_dist=True, batch_size=batch_size)
        return generated

    def loss_terms(self, generated: GeneratedBatch) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        terms, extras = {}, {}
        for loss in self.losses:
            value, logs = loss.compute(self.loss_context, generated)
            terms[loss.name] = loss.weight * value
            extras.update({f"{loss.name}/{k}": v for k, v in logs.items()})
        return terms, extras

    def generate(self, batch: dict, seed: int, gradient_steps=(), capture_steps=(), decode=None, step_hook=None, sample_ids=None) -> GeneratedBatch:
        """A rollout of ``batch`` as the active losses need it (decoded if one reads pixels or ``decode``; maps kept
        if one reads them), each sample seeded by its index in the global batch (see ``Rollout.generate``)."""
        return self.rollout.generate(
            batch, seed, gradient_steps, capture_steps, decode=self.needs.decoded_image if decode is None else decode,
            keep_attention=self.needs.attention is not None, step_hook=step_hook,
            sample_ids=self._sample_ids(len(batch[PROMPT])) if sample_ids is None else sample_ids,
        )  # fmt: skip

    def _sample_ids(self, batch_size: int) -> list[int]:
        """Global indices of this rank's samples: Lightning's DistributedSampler deals the dataset out in turn
        (rank r gets items r, r + N, ...), so local sample i is item i * N + r of the global batch."""
        world = self.trainer.world_size if self._trainer is not None else 1
        rank = self.global_rank if self._trainer is not None else 0
        return [i * world + rank for i in range(batch_size)]


