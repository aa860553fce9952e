"""The CUDA correctness smoke of benchmarks/gpu_check.py: what must hold on a GPU that the CPU tests cannot show.

Each function runs the real path (``Trainer.predict``, ``train.py fit`` through bench_scale.run_fit, the model's
own VAE) on the model it is given: full size on the GPU, tiny models in the dry run.
"""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path


def optimizer_state_dtypes(optimizer) -> dict:
    """Counts of optimizer state tensors by (device, dtype): bitsandbytes' 8-bit AdamW keeps uint8 state for
    tensors of >= 4096 elements and fp32 for smaller ones."""
    import collections

    import torch

    counts = collections.Counter(f"{v.device.type}:{str(v.dtype).removeprefix('torch.')}" for state in optimizer.state.values()
                                 for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)  # fmt: skip
    return dict(counts)


def predicted_images(model: str, resolution: int, steps: int, precision: str, cuda: bool):
    """One image through ``Trainer.predict`` (plain sampling, fixed seed) as a float CPU tensor."""
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader

    from comat_lightning.sampling.step_policies import EvenlySpacedSteps
    from comat_lightning.training.module import CoMatModule, SamplerConfig
    from datamodules.prompts import collate_prompts

    module = CoMatModule(pretrained_model=model, sampler=SamplerConfig(resolution=resolution, num_inference_steps=steps),
                         gradient_steps=EvenlySpacedSteps(1), gradient_checkpointing=False)  # fmt: skip
    trainer = Trainer(accelerator="gpu" if cuda else "cpu", devices=1, precision=precision, logger=False, enable_progress_bar=False,
                      enable_model_summary=False)  # fmt: skip
    loader = DataLoader([{"prompt": "a red car and a blue bus", "index": 0, "seed": 0}], batch_size=1, collate_fn=collate_prompts)
    return trainer.predict(module, dataloaders=loader)[0]["images"]


def vae_decode_finite(model: str, resolution: int, cuda: bool) -> bool:
    """The model's VAE with bf16 weights decodes random latents to finite pixels."""
    import torch
    from diffusers import AutoencoderKL

    from comat_lightning.tiny.zoo import resolve_model_path

    vae = AutoencoderKL.from_pretrained(resolve_model_path(model), subfolder="vae", torch_dtype=torch.bfloat16).to("cuda" if cuda else "cpu")
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latents = torch.randn(1, vae.config.latent_channels, resolution // factor, resolution // factor, device=vae.device, dtype=torch.bfloat16)
    with torch.no_grad():
        return bool(torch.isfinite(vae.decode(latents / vae.config.scaling_factor).sample).all())


def resume_round_trip(pipeline: str, captioner: str, cuda: bool, resolution: int, inference_steps: int, train_file: Path) -> dict:
    """Fit 2 generator steps and save a checkpoint; resume it to step 3: the resumed run starts from the saved
    trainable weights (bit for bit) and continues the step count."""
    import torch
    from lightning.pytorch import Callback

    from benchmarks.bench_scale import bench_config, run_fit

    class Trainable(Callback):
        def __init__(self):
            self.at_start: dict = {}

        def on_train_start(self, trainer, pl_module):
            self.at_start = {n: p.detach().float().cpu().clone() for n, p in pl_module.named_parameters() if p.requires_grad}

    def config(max_steps: int) -> dict:
        return bench_config(pipeline, captioner, accelerator="gpu" if cuda else "cpu", precision="bf16-mixed", max_steps=max_steps,
                            resolution=resolution, batch=1, inference_steps=min(inference_steps, 10), k=1, train_file=train_file)  # fmt: skip

    with tempfile.TemporaryDirectory() as folder:
        ckpt = str(Path(folder) / "step2.ckpt")
        first = run_fit(config(2))
        first.trainer.save_checkpoint(ckpt)
        saved = {n: p.detach().float().cpu().clone() for n, p in first.named_parameters() if p.requires_grad}
        del first
        gc.collect()
        watch = Trainable()
        resumed = run_fit(config(3), watch, ckpt_path=ckpt)
    same = saved.keys() == watch.at_start.keys() and all(torch.equal(saved[n], watch.at_start[n]) for n in saved)
    return {"trainable_tensors": len(saved), "weights_restored_exactly": same, "generator_step_after_resume": resumed.generator_step,
            "passed": bool(same and resumed.generator_step == 3)}  # fmt: skip
