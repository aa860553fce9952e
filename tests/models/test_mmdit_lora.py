"""A LoRA on the SD3 / FLUX transformer, exported by models/lora_files.py, loads with diffusers'
StableDiffusion3Pipeline / FluxPipeline.load_lora_weights and with our own loader, giving the same transformer
output as the model it came from."""

from __future__ import annotations

import pytest
import torch

# diffusers' DreamBooth-LoRA scripts for SD3 / FLUX target the image and the text stream of the joint attention.
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_exported_transformer_lora_loads_in_the_pipeline_and_in_our_loader(tiny_paths, tmp_path, name):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline
    from peft import LoraConfig

    from comat_lightning.models.lora_files import WEIGHT_NAME, load_denoiser_lora, save_denoiser_lora
    from comat_lightning.models.mmdit import MMDiTBackbone

    backbone = MMDiTBackbone.from_pretrained(tiny_paths[name], max_sequence_length=32).eval()
    transformer = backbone.transformer
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="gaussian"))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param_name, param in transformer.named_parameters():
            if "lora_B" in param_name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    cond = backbone.encode_prompts(["a red car"])
    latents = torch.randn(1, 16, 8, 8, generator=generator)
    t = backbone.make_scheduler(4, 8, "cpu").timesteps[1]

    def velocity(model):
        with torch.no_grad():
            return backbone.velocity(model, latents, t, cond, guidance=3.5)

    ours = velocity(transformer)
    folder = save_denoiser_lora(transformer, name, tmp_path / "lora")
    assert (folder / WEIGHT_NAME).is_file()

    pipe = (StableDiffusion3Pipeline if name == "sd3" else FluxPipeline).from_pretrained(tiny_paths[name])
    base = velocity(pipe.transformer)
    assert not torch.allclose(base, ours, atol=1e-4)  # the LoRA changes the output
    pipe.load_lora_weights(str(folder))
    assert torch.allclose(velocity(pipe.transformer), ours, atol=1e-5)

    fresh = MMDiTBackbone.from_pretrained(tiny_paths[name], max_sequence_length=32).transformer.eval()
    load_denoiser_lora(fresh, folder)
    assert torch.allclose(velocity(fresh), ours, atol=1e-5)
    assert all(p.requires_grad for n, p in fresh.named_parameters() if "lora_" in n)
