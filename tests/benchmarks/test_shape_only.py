"""The shape-only estimator (benchmarks/shape_only.py) that gives full-size memory and FLOPs without a GPU.

Its storage accounting is checked against hand values, and a fake-tensor training step against the same step run
for real: the fake run must see the same FLOPs and the same tensor memory, model by model, as the real one.
"""

from __future__ import annotations

import contextlib

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
