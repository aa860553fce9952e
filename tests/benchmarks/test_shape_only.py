"""The shape-only estimator (benchmarks/shape_only.py) that gives full-size memory and FLOPs without a GPU.

Its storage accounting is checked against hand values, and a fake-tensor training step against the same step run
for real: the fake run must see the same FLOPs and the same tensor memory, model by model, as the real one. The
SD3.5-Medium and FLUX.1-dev builders (configs only, loaded as fake tensors) are checked against the published
sizes, and fake loading against loading for real (tiny://sd3); the 8-bit Adam estimate against bitsandbytes.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.flop_counting import flop_counter
from benchmarks.shape_only import ShapeOnlyExecution, ShapeOnlyFit, allocated_bytes


def test_allocations_are_rounded_to_the_cuda_block():
    assert allocated_bytes(torch.empty(1000).untyped_storage()) == 4096  # 4000 B -> 8 blocks of 512
    assert allocated_bytes(torch.empty(3, dtype=torch.bfloat16).untyped_storage()) == 512
    assert allocated_bytes(torch.empty(128).untyped_storage()) == 512


@pytest.mark.parametrize("fake", [False, True], ids=["real", "fake"])
def test_storages_are_counted_from_creation_until_freed(fake):
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    a = mode.from_tensor(torch.ones(1000)) if fake else torch.ones(1000)  # made before tracking: not counted
    tracker = ShapeOnlyExecution()
    with mode if fake else contextlib.nullcontext(), tracker:
        b = a + 1  # new storage: 4096 B
        assert isinstance(b, FakeTensor) == fake
        assert tracker.live == 4096
        view = b.view(10, 100)  # a view shares its storage: nothing new
        assert tracker.live == 4096
        a.view(10, 100).t()  # nor does a view of a tensor made before tracking (a weight's t() in a linear layer)
        a.mul_(1)  # nor an in-place op on one
        assert tracker.live == 4096
        c = view * 2
        assert tracker.live == tracker.peak == 8192
        del c
        assert tracker.live == 4096 and tracker.peak == 8192
        finite = bool(torch.isfinite(b).all())
        total = float(b.sum())
    assert finite is True
    if fake:  # values are not computed: the reads get nominal answers, and are counted
        assert total == 1.0 and tracker.nominal_reads == {"bool": 1, "float": 1}
    else:
        assert total == 2000.0 and not tracker.nominal_reads


def test_ops_on_real_inputs_run_for_real_under_the_fake_mode():
    """Small real tensors (scheduler tables, token ids) stay real, so data-dependent lookups on them still work."""
    timesteps = torch.tensor([999, 666, 333, 0])
    with FakeTensorMode(allow_non_fake_inputs=True), ShapeOnlyExecution():
        index = (timesteps == 333).nonzero().item()
    assert index == 2


def test_attention_flops_on_cpu_are_counted_like_the_explicit_matmuls():
    """PyTorch's counter gives CPU SDPA 0 FLOPs; ours counts it as PyTorch counts the same attention written as
    matmuls (q k^T, then the weights times v): 2 * 2 * b * h * s_q * s_k * d forward, 2.5 times that backward."""
    q, k, v = (torch.randn(2, 4, 64, 32, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False) as pytorch_counter:
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with FlopCounterMode(display=False) as explicit:
        ((q @ k.transpose(-1, -2) / 32**0.5).softmax(-1) @ v).sum()
    with flop_counter() as forward:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with flop_counter() as backward:
        out.sum().backward()
    assert pytorch_counter.get_total_flops() == 0
    assert forward.get_total_flops() == explicit.get_total_flops() == 2 * 2 * 2 * 4 * 64 * 64 * 32
    assert backward.get_total_flops() == 2.5 * forward.get_total_flops()


def test_allocations_are_labelled_by_the_model_whose_submodule_made_them():
    """``vae.decode`` bypasses the VAE's ``forward`` (it calls ``vae.decoder``) and a loss reuses the UNet: the
    decoder's output is the VAE's, the reused UNet's stays the UNet's, the loss's head is the loss's."""

    class Vae(nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = nn.Linear(8, 8)

        def decode(self, x):
            return self.decoder(x)

    class Loss(nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet, self.head = unet, nn.Linear(8, 8)

        def forward(self, x):
            return self.head(self.unet(x))

    unet = nn.Linear(8, 8)
    vae, loss = Vae(), Loss(unet)
    tracker = ShapeOnlyExecution()
    for name, model in {"unet": unet, "vae": vae, "loss": loss}.items():
        tracker.label_model(model, name)
    x = torch.zeros(1, 8)
    with torch.no_grad(), tracker:
        outputs = [vae.decode(x), loss(x)]  # kept alive: both count at the peak
    # one 512-byte block each; the UNet's output inside the loss was live at the peak, then freed
    assert tracker.at_peak == {("vae", "forward"): 512, ("unet", "forward"): 512, ("loss", "forward"): 512}
    assert tracker.flops_by == {("vae", "forward"): 128, ("unet", "forward"): 128, ("loss", "forward"): 128}  # 2*8*8
    assert [tuple(output.shape) for output in outputs] == [(1, 8), (1, 8)]
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in [*vae.modules(), *loss.modules()])


def test_fake_training_step_matches_the_real_step(tiny_paths):
    """Two generator steps of the demo (all three losses): the same FLOPs, peak tensor memory and breakdown by
    model as the real step, and the real weights are back afterwards."""
    from benchmarks.bench_scale import bench_config, run_fit

    results = {}
    for fake in (False, True):
        config = bench_config(
            "tiny://sd", "tiny://blip", accelerator="cpu", precision="32-true", max_steps=2, resolution=64, batch=1,
            inference_steps=3, k=1,
        )  # fmt: skip
        callback = ShapeOnlyFit(fake=fake)
        module = run_fit(config, callback)
        results[fake] = callback.result
        assert not any(isinstance(t, FakeTensor) for t in [*module.parameters(), *module.buffers()])
    real, fake = results[False], results[True]
    assert fake["flops"] == real["flops"] > 0
    assert fake["flops_by"] == real["flops_by"] and sum(fake["flops_by"].values()) == fake["flops"]
    assert fake["weights"] == real["weights"]
    # every op's output shapes and dtypes are the real ones, so the accounting agrees to the block
    assert fake["peak_dynamic_bytes"] == real["peak_dynamic_bytes"] > 0
    assert fake["at_peak"] == real["at_peak"]
    # the checkpointed VAE decoder re-run in backward is the VAE's, not unlabelled
    assert {("unet", "forward"), ("vae", "backward")} <= set(fake["at_peak"])
    assert fake["nominal_reads"]["bool"] > 0  # the finiteness checks took their normal path


# ------------------------------------------------------------------------------------------ SD3.5-Medium, FLUX.1-dev

# Published sizes (parameters; SD3.5-Medium's transformer also holds a 384 x 384 x 1536 positional table as a buffer:
# its "2.5 B" counts it). The exact figures pin the builders' configs; the published ones are what they must match.
MMDIT_SIZES = {
    "sd35-medium": {"transformer": 2_243_171_520, "transformer buffers": 226_492_416, "vae": 83_819_683,
                    "text_encoders": [123_650_304, 694_659_840, 4_762_310_656]},
    "flux-dev": {"transformer": 11_901_408_320, "transformer buffers": 0, "vae": 83_819_683,
                 "text_encoders": [123_060_480, 4_762_310_656]},
}  # fmt: skip


def test_sd35_medium_and_flux_dev_are_built_from_configs_and_load_as_fake_tensors(tmp_path):
    """The configs-only builders write no weights; under fake_loading the pipelines load through the framework's own
    loader with the published sizes (SD3.5-Medium transformer 2.5 B with its positional table, FLUX.1-dev 11.9 B,
    T5-XXL 4.76 B), the dtypes a real load gives, and no storage; outside it nothing is patched."""
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    from benchmarks.full_size_models import configs_only, ensure, fake_loading
    from comat_lightning.models.mmdit import MMDiTBackbone

    patched = (ModelMixin.__dict__["from_pretrained"], PreTrainedModel.__dict__["from_pretrained"])
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    for name, sizes in MMDIT_SIZES.items():
        folder = ensure(tmp_path, name)
        assert configs_only(folder) and not [*folder.rglob("*.safetensors"), *folder.rglob("*.bin")]
        assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) < 2**20
        with fake_loading(mode):
            backbone = MMDiTBackbone.from_pretrained(str(folder))
        tensors = [*backbone.parameters(), *backbone.buffers()]
        assert all(isinstance(t, FakeTensor) for t in tensors)
        transformer = backbone.transformer
        assert sum(p.numel() for p in transformer.parameters()) == sizes["transformer"]
        assert sum(b.numel() for b in transformer.buffers()) == sizes["transformer buffers"]
        assert sum(p.numel() for p in backbone.vae.parameters()) == sizes["vae"]
        assert [sum(p.numel() for p in e.parameters()) for e in backbone.text_encoders] == sizes["text_encoders"]
        assert {p.dtype for p in transformer.parameters()} == {torch.float32}  # diffusers' default: fp32, then frozen_dtype
        assert {p.dtype for p in backbone.text_encoders[-1].parameters()} == ({torch.float16, torch.float32} if name == "sd35-medium" else {torch.bfloat16})
        assert backbone.latent_channels == 16 and backbone.vae_scale_factor == 8
    # the published "2.5 B" (with the positional table) and "11.9 B"; T5-XXL's encoder 4.76 B
    assert round((MMDIT_SIZES["sd35-medium"]["transformer"] + MMDIT_SIZES["sd35-medium"]["transformer buffers"]) / 1e9, 1) == 2.5
    assert round(MMDIT_SIZES["flux-dev"]["transformer"] / 1e9, 1) == 11.9
    assert round(MMDIT_SIZES["flux-dev"]["text_encoders"][1] / 1e9, 2) == 4.76
    assert (ModelMixin.__dict__["from_pretrained"], PreTrainedModel.__dict__["from_pretrained"]) == patched


def test_fake_loaded_pipeline_gives_the_same_estimate_as_a_loaded_one(tiny_paths, tmp_path):
    """tiny://sd3 loaded for real (its weights faked at the first batch) and its configs-only copy loaded as fake
    tensors (how SD3.5-Medium and FLUX.1-dev run) give the same FLOPs, weights and peak memory, model by model, with
    all three losses, bf16 frozen weights and gradient checkpointing."""
    from benchmarks.bench_scale import knob_estimates, shape_only_fit
    from benchmarks.full_size_models import configs_only_copy

    settings = dict(accelerator="cpu", precision="bf16-mixed", max_steps=2, resolution=64, batch=1, inference_steps=3, k=1,
                    attention_blocks=["joint"])  # fmt: skip
    copy = configs_only_copy(Path(tiny_paths["sd3"]), tmp_path / "sd3-configs-only")
    runs = {}
    for name, pipeline in {"loaded": tiny_paths["sd3"], "fake": str(copy)}.items():
        measure, module, losses, refused = shape_only_fit(pipeline, "tiny://blip", settings)
        runs[name] = measure.result, module, losses, refused
    (loaded, _, losses, refused), (fake, module, _, _) = runs["loaded"], runs["fake"]
    assert not refused and len(losses) == 3
    frozen = [p for p in module.backbone.unet.parameters() if not p.requires_grad]
    assert frozen and all(isinstance(p, FakeTensor) for p in frozen)  # loaded fake: nothing real to restore (the LoRA is)
    for key in ("flops", "flops_by", "weights", "peak_dynamic_bytes", "at_peak", "optimizer_state_bytes", "optimizer_params"):
        assert fake[key] == loaded[key], key
    assert fake["weights"]["unet (frozen)"] > 0 and fake["flops"] > 0
    # knobs: one rank is the run itself; N ranks divide the denoiser's weights and the optimizer state by N
    single = knob_estimates(module, fake, "adamw", 1)
    assert single["estimated_peak_allocated_gib"] == single["shape_only_peak_allocated_gib_one_device_adamw"]
    sharded = knob_estimates(module, fake, "adamw", 4)["fsdp2"]
    denoiser = (fake["weights"]["unet (trainable)"] + fake["weights"]["unet (frozen)"]) / 2**30
    assert 0 <= sharded["sharded_weights_gib_per_rank"] * 4 - denoiser < 2**-16  # + the discriminator head (a few KiB)
    assert sharded["optimizer_state_gib_per_rank"] * 4 == single["optimizer_state_gib"]


def test_the_8bit_adam_estimate_is_bitsandbytes_state():
    """adamw8bit_state_bytes gives the bytes of bitsandbytes' AdamW8bit state after a step (its CPU build), for
    tensors below and above its 4096-element threshold."""
    bnb = pytest.importorskip("bitsandbytes.optim")
    from benchmarks.shape_only import adamw8bit_state_bytes, optimizer_state_bytes

    params = [nn.Parameter(torch.randn(n)) for n in (100, 4095, 4096, 5000, 70_000)]
    optimizer = bnb.AdamW8bit(params, lr=1e-3)
    for param in params:
        param.grad = torch.randn_like(param)
    optimizer.step()
    assert optimizer_state_bytes(optimizer) == adamw8bit_state_bytes([p.numel() for p in params])
    adamw = torch.optim.AdamW(params, lr=1e-3)
    adamw.step()
    assert adamw8bit_state_bytes([70_000]) < optimizer_state_bytes(adamw) / 3  # 2 + 1/32 bytes per element vs 8
