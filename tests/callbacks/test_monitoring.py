"""Monitoring and evaluation: the image loggers and scalars of a real demo run read back from TensorBoard, the
step-averaged attention they draw, the per-step figures checked against hand or autograd values, and
``validate`` writing its metrics."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, make_module, run_cli


def _events(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = log_dir.glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def _png(event) -> torch.Tensor:
    from PIL import Image

    return torch.from_numpy(__import__("numpy").array(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))).float() / 255


def _demo_config(tmp_path: Path, every_n_steps: int, tile: int) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / "tiny_demo.yaml").read_text())
    for callback in cfg["trainer"]["callbacks"]:
        if callback["class_path"].endswith(("AttentionMapLogger", "SampleImageLogger")):
            callback["init_args"].update(every_n_steps=every_n_steps, tile=tile)
    path = tmp_path / "tiny_demo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """4 generator steps of the demo (all three losses), images every 2 steps, validation every 2 steps."""
    import os

    tmp_path = tmp_path_factory.mktemp("monitoring")
    (tmp_path / "data").symlink_to(REPO / "data")
    config = _demo_config(tmp_path, every_n_steps=2, tile=64)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        cli = run_cli(["fit", "--config", str(config), "--trainer.max_steps=4", "--trainer.val_check_interval=2"])
    finally:
        os.chdir(cwd)
    return cli, tmp_path / "runs" / "tiny_demo" / "version_0"


def test_demo_logs_attention_and_sample_grids_of_the_documented_size(demo_run):
    from callbacks.image_logging import monitor_words

    cli, log_dir = demo_run
    acc = _events(log_dir)
    tags = acc.Tags()["images"]
    module = cli.model
    monitor = cli.datamodule.val_records
    for i, record in enumerate(monitor[:2]):  # AttentionMapLogger: num_prompts 2
        (tag,) = [t for t in tags if t.startswith(f"attention/{i}_")]
        words, _ = monitor_words(record, module.backbone.tokenizers[0], module.concept_parser)
        assert len(words) >= 2  # attributes and nouns, e.g. pink, flower, glass, vase
        events = acc.Images(tag)
        assert [e.step for e in events] == [0, 2, 4]  # before training, then every 2 generator steps
        assert all((e.height, e.width) == (16 + 64, (1 + len(words)) * 64) for e in events)
    samples = acc.Images("samples/base_vs_finetuned")
    # every 2 steps (0, 2, 4) and after each validation run (steps 2 and 4)
    assert sorted(e.step for e in samples) == [0, 2, 2, 4, 4]
    assert all((e.height, e.width) == (16 + 2 * 64, 4 * 64) for e in samples)  # 2 rows x 4 prompts
    first, last = _png(samples[0]), _png(samples[-1])
    tile = slice(16, 16 + 64)
    assert torch.equal(first[tile], last[tile])  # the base row is the frozen model: identical at every step
    assert not torch.equal(first[16 + 64 :], last[16 + 64 :])  # the fine-tuned row moved


def test_demo_logs_finite_training_scalars(demo_run):
    _, log_dir = demo_run
    acc = _events(log_dir)
    scalars = {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    expected = [
        "train/loss", "train/grad_norm", "train/lr", "train/concept_matching/reward_norm",
        "train/share/concept_matching", "train/share/attribute_concentration", "train/share/fidelity_preservation",
        "train/fidelity_preservation/discriminator_real_accuracy", "train/fidelity_preservation/discriminator_fake_accuracy",
        "train/fidelity_preservation/discriminator_grad_norm", "train/fidelity_preservation/discriminator_lr",
        "perf/seconds_per_step", "perf/images_per_second", "perf/peak_memory_gib",
        "val/metrics/caption_nll", "val/metrics/concept_overlap", "val/metrics/clip_score",
    ]  # fmt: skip
    for tag in expected:
        assert tag in scalars and scalars[tag] and all(math.isfinite(v) for v in scalars[tag]), tag
    for tag in ("train/grad_norm", "train/concept_matching/reward_norm", "perf/seconds_per_step", "perf/peak_memory_gib"):
        assert all(v > 0 for v in scalars[tag]), tag
    shares = [sum(s) for s in zip(*(scalars[f"train/share/{n}"] for n in ("concept_matching", "attribute_concentration", "fidelity_preservation")))]
    assert shares == pytest.approx([1.0] * 4, abs=1e-5)
    accuracies = scalars["train/fidelity_preservation/discriminator_real_accuracy"] + scalars["train/fidelity_preservation/discriminator_fake_accuracy"]
    assert all(0.0 <= v <= 1.0 for v in accuracies)
    assert len(scalars["val/metrics/caption_nll"]) == 2  # one value per validation run
    assert 0.0 <= min(scalars["val/metrics/concept_overlap"]) and max(scalars["val/metrics/concept_overlap"]) <= 0.5


def test_demo_writes_metrics_json_per_validation_and_counts_generator_steps_in_the_progress_bar(demo_run):
    from comat_lightning.runtime.progress import GeneratorStepProgress

    cli, log_dir = demo_run
    files = sorted((log_dir / "metrics").glob("*.json"))
    assert [f.name for f in files] == ["val_step0000002.json", "val_step0000004.json"]
    result = json.loads(files[-1].read_text())
    assert result["generator_step"] == 4 and set(result["metrics"]) == {"caption_nll", "concept_overlap", "clip_score"}
    bar = cli.trainer.progress_bar_callback
    assert isinstance(bar, GeneratorStepProgress)
    assert bar.total_steps(cli.trainer) == 4  # max_steps, not the batches of one epoch (the demo has 6 per epoch)


def test_a_corner_concentrated_map_is_brightest_in_that_corner_of_the_logged_image(tmp_path):
    """A constructed map (not the model): all attention of word 1 in the top-left 2x2 of an 8x8 map."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import TensorBoardLogger

    from callbacks.image_logging import AttentionMapLogger
    from comat_lightning.files.images import attention_grid

    image = torch.full((3, 64, 64), 0.5)
    maps = torch.zeros(2, 8, 8)
    maps[0, :2, :2] = 1.0  # word "cat": top-left corner
    maps[1] = torch.rand(8, 8)
    tile = 64
    trainer = Trainer(logger=TensorBoardLogger(tmp_path, name="run"), accelerator="cpu", enable_progress_bar=False)
    AttentionMapLogger(prompts=["a cat"]).write(trainer, "attention/0_a_cat", attention_grid(image, maps, ["cat", "dog"], tile=tile), step=3)
    trainer.logger.experiment.flush()  # SummaryWriter writes from a background thread: without this, a race
    (event,) = _events(Path(trainer.logger.log_dir)).Images("attention/0_a_cat")
    assert event.step == 3
    logged = _png(event)  # (H, W, 3)
    cat_tile = logged[16:, tile : 2 * tile]  # column 0 is the image, column 1 the first word
    brightness = cat_tile.mul(torch.tensor([0.299, 0.587, 0.114])).sum(-1)
    half = tile // 2
    quadrants = {
        "top-left": brightness[:half, :half].mean(), "top-right": brightness[:half, half:].mean(),
        "bottom-left": brightness[half:, :half].mean(), "bottom-right": brightness[half:, half:].mean(),
    }  # fmt: skip
    assert max(quadrants, key=quadrants.get) == "top-left"
    row, col = divmod(int(brightness.argmax()), tile)
    assert row < half and col < half


@pytest.mark.parametrize("kept_resolution", [None, 8])
def test_step_averaged_maps_on_a_real_rollout_and_capture_is_removed_afterwards(tiny_paths, kept_resolution):
    """kept_resolution None: every layer is also recorded into the store's windows, and the summary equals the
    mean over layers of the recorded maps (head mean, cond half, resized to 8x8). 8: only the 8x8 layers are a
    loss's; the others are captured for the summary only, never enter windows, and get SDPA back afterwards."""
    import torch.nn.functional as F
    from diffusers.models.attention_processor import AttnProcessor2_0

    from comat_lightning.attention.capture import AttentionCaptureProcessor, LayerSelection, install_capture, select_layers
    from comat_lightning.attention.summary import summarizing_attention
    from comat_lightning.sampling.rollout import chain_step_hooks

    module = make_module(tiny_paths["sd"])
    unet, store = module.backbone.unet, module.attention_store
    everything = LayerSelection(("down", "mid", "up"))
    layers = select_layers(unet, everything, 8)
    assert {layer.resolution for layer in layers} == {4, 8}
    kept = [layer for layer in layers if kept_resolution is None or layer.resolution == kept_resolution]
    install_capture(unet, kept, store)
    steps = module.sampler.num_inference_steps
    with summarizing_attention(module, everything) as summary:
        assert all(isinstance(unet.get_submodule(layer.name).processor, AttentionCaptureProcessor) for layer in layers)
        record = lambda step, grad: store.recording(step, part="cond")  # noqa: E731
        with torch.no_grad():
            module.rollout.sample(["a red car", "a cat and a dog"], torch.Generator().manual_seed(0), step_hook=chain_step_hooks(record, summary.step_hook))
    stacked = summary.stacked()  # (S, B, 8, 8, 77)
    assert summary.num_steps == steps and stacked.shape == (steps, 2, 8, 8, 77)
    torch.testing.assert_close(stacked.sum(-1), torch.ones(steps, 2, 8, 8), atol=1e-5, rtol=0)  # rows of a softmax
    for step in range(steps):
        recorded = store.select(step)
        assert set(recorded) == {layer.name for layer in kept}
        if kept_resolution is None:
            per_layer = []
            for m in recorded.values():
                side = round(m.shape[2] ** 0.5)
                mean = m.float().mean(dim=1).reshape(2, side, side, 77).permute(0, 3, 1, 2)
                per_layer.append(F.interpolate(mean, size=(8, 8), mode="bilinear", align_corners=False).permute(0, 2, 3, 1))
            torch.testing.assert_close(stacked[step], torch.stack(per_layer).mean(0), atol=1e-6, rtol=1e-5)
    for layer in layers:
        processor = unet.get_submodule(layer.name).processor
        assert isinstance(processor, AttentionCaptureProcessor if layer in kept else AttnProcessor2_0), layer.name


def test_step_averaged_maps_reduce_layers_by_hand():
    """The listener's reduction on hand-made probabilities: head mean, cond half, bilinear resize, layer mean."""
    import torch.nn.functional as F

    from comat_lightning.attention.capture import CrossAttentionLayer
    from comat_lightning.attention.summary import StepAveragedMaps

    fine = CrossAttentionLayer("fine", "up", 4, heads=2)
    coarse = CrossAttentionLayer("coarse", "mid", 2, heads=2)
    summary = StepAveragedMaps([fine, coarse])
    p_fine = torch.rand(4, 2, 16, 3)  # [uncond x2, cond x2]
    p_coarse = torch.rand(4, 2, 4, 3)
    with summary.step_hook(0):
        summary("fine", p_fine)
        summary("coarse", p_coarse)
        summary("other", torch.rand(4, 2, 16, 3))  # not selected: ignored
    expected_fine = p_fine[2:].mean(1).reshape(2, 4, 4, 3)
    expected_coarse = F.interpolate(p_coarse[2:].mean(1).reshape(2, 2, 2, 3).permute(0, 3, 1, 2), size=(4, 4), mode="bilinear", align_corners=False)
    expected = (expected_fine + expected_coarse.permute(0, 2, 3, 1)) / 2
    torch.testing.assert_close(summary.stacked()[0], expected)
    torch.testing.assert_close(summary.mean(), expected)


def test_reward_norm_is_the_norm_of_the_caption_loss_gradient_on_the_image(tiny_paths):
    from callbacks.concept_matching import ConceptMatchingLoss

    loss = ConceptMatchingLoss(captioner=tiny_paths["blip"], weight=0.5, max_crop=0)
    module = make_module(tiny_paths["sd"], losses=[loss])
    generated = module.generate({"prompt": ["a red car", "a blue bird"]}, seed=1, gradient_steps=[3])
    value, _ = loss.compute(module.loss_context, generated)
    (grad,) = torch.autograd.grad(value, generated.images, retain_graph=True)
    expected = grad.flatten(1).norm(dim=1).mean()
    (loss.weight * value).backward()
    logs = loss.gradient_logs()
    torch.testing.assert_close(logs["reward_norm"], expected, rtol=1e-5, atol=1e-8)
    assert loss.gradient_logs() == {}  # consumed once per step


def test_gradient_norm_by_hand():
    from comat_lightning.runtime.step_statistics import gradient_norm

    a, b, c = (torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(3)))
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([12.0])  # c has no gradient
    assert gradient_norm([a, b, c]).item() == pytest.approx(13.0)
    assert gradient_norm([c]).item() == 0.0


def test_discriminator_accuracy_counts_pixels_on_the_right_side_of_zero(tiny_paths):
    from callbacks.fidelity_preservation import FidelityPreservationLoss

    loss = FidelityPreservationLoss(real_latents="on_the_fly", lora_rank=4)
    module = make_module(tiny_paths["sd"], losses=[loss])
    generated = module.generate({"prompt": ["a red car", "a cat"]}, seed=2)
    with torch.no_grad():
        _, logs = loss.discriminator_loss(module.loss_context, generated)
        discriminator = module.loss_modules[loss.name]
        fake = discriminator(generated.latents)
        real = discriminator(loss.real_batch(module, generated))
    assert logs["real_accuracy"].item() == pytest.approx((real > 0).float().mean().item())
    assert logs["fake_accuracy"].item() == pytest.approx((fake < 0).float().mean().item())


def test_validate_writes_the_metrics_json_with_the_judges_value(tmp_path, monkeypatch):
    """`train.py validate` on the demo: metrics logged and written; caption NLL recomputed from the same seeds."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").symlink_to(REPO / "data")
    cli = run_cli(["validate", "--config", str(REPO / "configs" / "tiny_demo.yaml")])
    (path,) = (tmp_path / "runs" / "tiny_demo" / "version_0" / "metrics").glob("val_step*.json")
    result = json.loads(path.read_text())
    assert result["stage"] == "val" and set(result["metrics"]) == {"caption_nll", "concept_overlap", "clip_score"}
    logged = cli.trainer.callback_metrics
    for name, value in result["metrics"].items():
        assert logged[f"val/metrics/{name}"].item() == pytest.approx(value)
    # The judge as a metric: the captioner's NLL (no crop) of the same fixed-seed rollouts, mean over the 4 images.
    module, data = cli.model, cli.datamodule
    scorer = module.loss_modules["concept_matching"]
    nll = []
    with torch.no_grad():
        for batch_idx, batch in enumerate(data.val_dataloader()):
            generated = module.generate(batch, seed=module.seed + 2**40 + batch_idx * 1_000, decode=True)
            nll.append(scorer(generated.images.clamp(0, 1), generated.prompts, crop=False)[0])
    assert result["metrics"]["caption_nll"] == pytest.approx(torch.cat(nll).mean().item(), rel=1e-5)
