"""TensorBoard image monitoring: what the model draws, and where each word of the prompt attends.

Both callbacks sample a fixed set of monitor prompts with fixed seeds every ``every_n_steps`` generator steps (and
once before training starts), so successive images differ only by what training changed:

- :class:`AttentionMapLogger`: per prompt one grid (``attention/<i>``): the image, then per word (attributes and
  nouns, in prompt order) its cross-attention heat map, averaged over the chosen layers, heads and all denoising
  steps, min-max normalised per word, blended over the image ("hot" colours: brighter = more attention).
- :class:`SampleImageLogger`: one grid (``samples/base_vs_finetuned``): top row the frozen base model (LoRA off),
  bottom row the current model, same prompts and seeds; also after every validation run.

Layouts (tile = ``tile`` px, L = 16 px label strip; see comat_lightning/files/images.py):
attention grid (3, L + tile, (1 + words) * tile); sample grid (3, L + 2 * tile, prompts * tile).

Costs nothing on other steps: the capture processors for the heat maps are installed only while the logger samples.
Every rank samples (sharded models need all ranks in a forward); rank 0 writes.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Optional

import torch
from lightning.pytorch import Callback

from comat_lightning.attention.capture import Block, LayerSelection, layer_selection
from comat_lightning.errors import InputError
from comat_lightning.files.paths import check_local_path
from comat_lightning.files.record_fields import CONCEPTS, PROMPT, SEED
from comat_lightning.text.entities import check_prompt

MONITOR_SEED = 1234  # default base of the monitor prompts' seeds (prompt i uses MONITOR_SEED + i)


class MonitorPrompts(Callback):
    """Shared by the image loggers: which prompts, which seeds, when, and where the images go.

    Args:
        prompts: monitor prompts; if None, ``prompt_file`` (.txt or .jsonl; a JSONL record may carry "seed" and
            "concepts"), else the first ``num_prompts`` validation prompts (or training prompts without validation).
        num_prompts: how many prompts are taken from a file or the data.
        seed: prompt ``i`` is sampled from seed ``seed + i`` (unless its record has a "seed").
        every_n_steps: log every this many generator steps (and before the first step).
        tile: side of each image in the grid, px.
    """

    def __init__(
        self,
        prompts: Optional[list[str]] = None,
        prompt_file: Optional[str] = None,
        num_prompts: int = 4,
        seed: int = MONITOR_SEED,
        every_n_steps: int = 100,
        tile: int = 128,
    ):
        owner = type(self).__name__
        if every_n_steps < 1:
            raise InputError(f"{owner}: every_n_steps must be >= 1, got {every_n_steps}")
        if num_prompts < 1:
            raise InputError(f"{owner}: num_prompts must be >= 1, got {num_prompts}")
        if tile < 16:
            raise InputError(f"{owner}: tile must be >= 16 px, got {tile}")
        if prompts is not None and not prompts:
            raise InputError(f"{owner}: prompts is an empty list; give prompts or leave it null")
        for i, prompt in enumerate(prompts or []):
            try:
                check_prompt(prompt)
            except InputError as err:
                raise InputError(f"{owner}: prompts[{i}]: {err}") from None
            if not prompt.strip():
                raise InputError(f"{owner}: prompts[{i}] is empty")
        check_local_path(f"{owner}.prompt_file", prompt_file, "prompt file")
        self.prompts, self.prompt_file, self.num_prompts = prompts, prompt_file, num_prompts
        self.seed, self.every_n_steps, self.tile = seed, every_n_steps, tile
        self._records: Optional[list[dict[str, Any]]] = None
        self._warned = False

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.prompt_file is not None:  # read now: a bad file fails before any model loads
            from datamodules.prompts import read_prompt_file

            self._records = read_prompt_file(self.prompt_file, option=f"{type(self).__name__}.prompt_file")[: self.num_prompts]

    def records(self, trainer) -> list[dict[str, Any]]:
        if self._records is None:
            if self.prompts is not None:
                self._records = [{"prompt": p} for p in self.prompts]
            else:
                data = trainer.datamodule
                source = getattr(data, "val_records", None) or getattr(data, "train_records", None) or []
                if not source:
                    raise InputError(f"{type(self).__name__}: no monitor prompts: set prompts or prompt_file")
                self._records = [{PROMPT: r[PROMPT], **{k: r[k] for k in ("concepts", "entities") if k in r}} for r in source[: self.num_prompts]]
        return self._records

    def seeds(self, records: list[dict[str, Any]]) -> list[int]:
        return [int(r[SEED]) if r.get(SEED) is not None else self.seed + i for i, r in enumerate(records)]

    def due(self, trainer, pl_module) -> bool:
        """A logging step, and somewhere to log to (without a TensorBoard logger nothing is sampled)."""
        if not self._tensorboard_loggers(trainer):
            if not self._warned:
                warnings.warn(f"{type(self).__name__}: no TensorBoardLogger in trainer.logger; it samples and logs nothing", stacklevel=2)
                self._warned = True
            return False
        return pl_module.generator_step % self.every_n_steps == 0

    @staticmethod
    def _tensorboard_loggers(trainer) -> list:
        from lightning.pytorch.loggers import TensorBoardLogger

        return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]

    def write(self, trainer, tag: str, image: torch.Tensor, step: int) -> None:
        """Rank 0 adds ``image`` (3, H, W) in [0, 1] to every TensorBoard logger of the trainer."""
        if not trainer.is_global_zero:
            return
        for logger in self._tensorboard_loggers(trainer):
            logger.experiment.add_image(tag, image.clamp(0, 1), global_step=step, dataformats="CHW")

    def log_images(self, trainer, pl_module) -> None:
        raise NotImplementedError

    def on_train_start(self, trainer, pl_module) -> None:
        if self.due(trainer, pl_module):  # step 0 (or a resumed step on the grid): the starting point
            self.log_images(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.due(trainer, pl_module):
            self.log_images(trainer, pl_module)


class AttentionMapLogger(MonitorPrompts):
    """Per-word cross-attention heat maps of the monitor prompts (see the module docstring).

    Args (besides :class:`MonitorPrompts`'):
        blocks / resolutions: the layers averaged (default: every cross-attention layer; maps of coarser layers are
            upsampled to the finest selected one).
    """

    def __init__(self, blocks: list[Block] = ["down", "mid", "up"], resolutions: Optional[list[int]] = None, **kwargs):  # noqa: B006
        super().__init__(**kwargs)
        self.layers = layer_selection(f"{type(self).__name__} blocks / resolutions", blocks, resolutions)

    def attention_requests(self, stage: str, default_layers: LayerSelection) -> list[tuple[str, LayerSelection]]:
        return [(f"{type(self).__name__}.blocks / resolutions", self.layers)] if stage == "fit" else []

    def log_images(self, trainer, pl_module) -> None:
        from comat_lightning.attention.summary import summarizing_attention
        from comat_lightning.files.images import attention_grid

        records = self.records(trainer)
        # Hooks run outside the training step's autocast: enter the trainer's precision context for the rollout.
        with trainer.precision_plugin.forward_context(), summarizing_attention(pl_module, self.layers, keep_steps=False) as summary:
            images = pl_module.rollout.sample_images([r[PROMPT] for r in records], self.seeds(records), step_hook=summary.step_hook)
        maps = summary.mean().cpu()  # (B, side, side, 77)
        tokenizer = pl_module.backbone.text_keys.tokenizer
        for i, (record, image) in enumerate(zip(records, images)):
            words, positions = monitor_words(record, tokenizer, pl_module.concept_parser)
            word_maps = torch.stack([maps[i, :, :, list(p)].mean(dim=-1) for p in positions]) if words else maps.new_zeros(0, 1, 1)
            grid = attention_grid(image, word_maps, words, tile=self.tile)
            self.write(trainer, f"attention/{i}_{_slug(record['prompt'])}", grid, pl_module.generator_step)


class SampleImageLogger(MonitorPrompts):
    """The monitor prompts from the frozen base (top row) and the current model (bottom row), same seeds."""

    _base_images: Optional[torch.Tensor] = None  # the base is frozen: sampled once per run

    def log_images(self, trainer, pl_module) -> None:
        from comat_lightning.files.images import sample_grid

        records = self.records(trainer)
        prompts, seeds = [r[PROMPT] for r in records], self.seeds(records)
        with trainer.precision_plugin.forward_context():  # hooks run outside the training step's autocast
            if self._base_images is None:
                self._base_images = pl_module.rollout.sample_images(prompts, seeds, base=True)
            current = pl_module.rollout.sample_images(prompts, seeds)
        step = pl_module.generator_step
        grid = sample_grid([self._base_images, current], prompts, ["base", f"step {step}"], tile=self.tile)
        self.write(trainer, "samples/base_vs_finetuned", grid, step)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and self._tensorboard_loggers(trainer):
            self.log_images(trainer, pl_module)


def monitor_words(record: dict[str, Any], tokenizer, parser) -> tuple[list[str], list[tuple[int, ...]]]:
    """(words, their token positions) shown for a prompt: the record's "concepts", else each entity's attributes and
    noun (hand-written "entities" or the spaCy parse), in prompt order; words cut off by the 77-token limit drop out."""
    from comat_lightning.text.entities import entities_from_json
    from comat_lightning.text.token_alignment import word_positions

    prompt = record[PROMPT]
    if record.get(CONCEPTS):
        words = [e.noun for e in entities_from_json(prompt, [[str(w), []] for w in record[CONCEPTS]])]
    else:
        words = [w for e in parser.entities_for(record) for w in (*e.attributes, e.noun)] or parser.nouns(prompt)
    words = sorted(set(words), key=lambda w: w.start)
    positions = word_positions(prompt, words, tokenizer)
    kept = [w for w in words if positions[w]]
    return [w.text for w in kept], [positions[w] for w in kept]


def _slug(prompt: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:limit]


__all__ = ["AttentionMapLogger", "MonitorPrompts", "SampleImageLogger", "monitor_words"]
