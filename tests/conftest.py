"""Shared fixtures: offline mode, the tiny model zoo in a per-session folder, small modules.

Heavy libraries are imported once per session (pytest runs every test in one process); models are the tiny
ones from comat_lightning.tiny_zoo, built once per session and loaded through ``from_pretrained``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

# Must be set before transformers / diffusers / huggingface_hub are imported anywhere.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("COMAT_TINY_ZOO", str(Path(tempfile.gettempdir()) / f"comat_tiny_zoo_{os.getuid()}"))

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def tiny_paths() -> dict[str, str]:
    from comat_lightning.tiny.zoo import TINY_MODELS, TINY_SCHEME, resolve_model_path

    return {name: resolve_model_path(TINY_SCHEME + name) for name in TINY_MODELS}


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def make_module(path: str, losses=(), **overrides):
    """A CoMatModule on a tiny model, models loaded, attached to a minimal trainer-free setup."""
    from comat_lightning.sampling.step_policies import EvenlySpacedSteps
    from comat_lightning.training.losses import merge_needs
    from comat_lightning.training.module import CoMatModule, SamplerConfig

    kwargs = dict(
        pretrained_model=path,
        sampler=SamplerConfig(resolution=64, num_inference_steps=4, guidance_scale=7.5),
        gradient_steps=EvenlySpacedSteps(2),
        gradient_checkpointing=False,
    )
    kwargs.update(overrides)
    module = CoMatModule(**kwargs)
    module.losses = list(losses)
    module.needs = merge_needs(module.losses)
    module.configure_model()
    return module


def run_cli(args: list[str], run: bool = True):
    """Run the real CLI in-process (the same code as ``python train.py``); ``run=False`` only parses and
    instantiates trainer, model, datamodule and callbacks."""
    from unittest import mock

    from comat_lightning.cli import main

    with mock.patch.object(sys, "argv", ["train.py"]):  # LightningCLI warns when pytest's argv is also present
        return main(args=args, run=run)


def instantiate_cli(args: list[str]):
    return run_cli(args, run=False)


def tensorboard_images(log_dir: Path) -> list[str]:
    """The image tags under ``log_dir`` (all event files, recursively)."""
    import glob

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: list[str] = []
    for events in sorted(glob.glob(str(log_dir / "**" / "events.out.tfevents.*"), recursive=True)):
        acc = EventAccumulator(events, size_guidance={"images": 1})
        acc.Reload()
        tags += acc.Tags()["images"]
    return tags


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar under ``log_dir`` (all event files, recursively): tag -> [(step, value), ...]."""
    import glob

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list] = {}
    for events in sorted(glob.glob(str(log_dir / "**" / "events.out.tfevents.*"), recursive=True)):
        acc = EventAccumulator(events)
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out
