"""Prompt-only data: CoMat trains from text prompts alone.

Files are ``.txt`` (one prompt per line) or ``.jsonl`` (one JSON object per line with a ``"prompt"`` string; any
other fields, e.g. precomputed entity parses or a real-latent reference, are carried into the batch as lists).
Files are read and every line checked by datamodules/prompt_files.py: the known optional fields (``"entities"``,
hand-written or from ``python -m comat_lightning.tools.prepare_entities``, ``"concepts"``, ``"token_indices"``, ``"seed"``,
``"masks"``, ``"layout"``, ``"latent"``) are checked against their prompt when the file is read. An optional ``"latent": {"file": ..., "index": ...}`` (written by
``python -m comat_lightning.tools.real_latents``) names the frozen base model's final latent for the prompt: every
reference is checked against its file's header at ``setup`` (before any model loads), and each batch whose records
all have one gets ``batch[REAL_LATENT]`` (B, 4, h, w) float32 (see datamodules/latents.py).
Bad files fail with a message naming the file and line; blank lines are skipped and counted.

The training order is a pure function of (``seed``, epoch), and the train loader is resumable mid-epoch: its
position is saved in Lightning checkpoints, so a resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from comat_lightning.errors import InputError
from comat_lightning.files.record_fields import INDEX, LATENT, LAYOUT, PROMPT, REAL_LATENT
from datamodules.latents import (
    LatentRef,
    LatentReferenceError,
    check_latent_refs,
    expected_latent_shape,
    load_latent,
    parse_latent_ref,
    resolve_latent_file,
)
from datamodules.prompt_files import PromptFileError, read_numbered_prompt_file, read_prompt_file


def attach_latents(
    sources: list[tuple[Path, list[tuple[int, dict[str, Any]]]]], expected: Optional[tuple[int, int, int]], resolution: Optional[int] = None
) -> list[list[dict]]:
    """Check every ``"latent"`` reference of the numbered records of each (file, records) source against its
    file's header (one read per file), and return the records with ``"latent"`` resolved to an absolute path."""
    located: list[tuple[Path, int]] = []
    refs: list[LatentRef] = []
    out = []
    for path, numbered in sources:
        records = []
        files: dict[str, Path] = {}  # thousands of records share a shard: resolve each name once
        for line, record in numbered:
            if record.get(LATENT) is not None:
                name, index = parse_latent_ref(record[LATENT])  # its form was checked when the file was read
                if name not in files:
                    files[name] = resolve_latent_file(name, path.parent)
                ref = LatentRef(files[name], index)
                located.append((path, line))
                refs.append(ref)
                record = {**record, LATENT: ref.to_json()}
            records.append(record)
        out.append(records)
    try:
        check_latent_refs(refs, expected, resolution)
    except LatentReferenceError as err:
        path, line = located[err.position]
        raise PromptFileError(f"{path}:{line}: {err}") from None
    return out


class PromptDataset(Dataset):
    """Records as they were read; an item whose record has a ``"latent"`` also carries the tensor, loaded lazily
    (one row of one shard), under ``REAL_LATENT``."""

    def __init__(self, records: list[dict[str, Any]]):
        self.records = records
        self.latents = [LatentRef(Path(r[LATENT]["file"]), r[LATENT]["index"]) if r.get(LATENT) else None for r in records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ref = self.latents[index]
        return self.records[index] if ref is None else {**self.records[index], REAL_LATENT: load_latent(ref)}


def collate_prompts(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch as a dict of lists; a field missing from some records is None there. Real latents are stacked into
    ``batch[REAL_LATENT]`` (B, 4, h, w) only when every record of the batch has one (absent otherwise)."""
    latents = [item.get(REAL_LATENT) for item in items]
    records = [{k: v for k, v in item.items() if k != REAL_LATENT} for item in items]
    keys = list(dict.fromkeys(k for r in records for k in r))
    batch: dict[str, Any] = {k: [r.get(k) for r in records] for k in keys}
    if latents and all(t is not None for t in latents):
        batch[REAL_LATENT] = torch.stack(latents)
    return batch


class EpochSampler(DistributedSampler):
    """This rank's share of a permutation seeded by ``seed + epoch`` (torch's DistributedSampler order): a pure
    function of (seed, epoch, rank), unlike a DataLoader ``generator`` whose state advances across epochs, so a
    fresh process resumed at epoch e draws epoch e's order, not epoch 0's. Lightning calls ``set_epoch`` each
    epoch and, seeing a DistributedSampler, does not replace it under DDP. :meth:`start_at` makes the next pass
    (only) use a given epoch's order from a given item on: mid-epoch resume, driven by :class:`ResumableDataLoader`."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self._next: Optional[tuple[int, int]] = None  # (epoch, first item) of the next pass

    def start_at(self, epoch: int, item: int) -> None:
        self._next = (epoch, item)

    def __iter__(self):
        (epoch, start), self._next = self._next or (self.epoch, 0), None
        lightning_epoch, self.epoch = self.epoch, epoch  # DistributedSampler reads self.epoch
        try:
            indices = list(super().__iter__())
        finally:
            self.epoch = lightning_epoch
        return iter(indices[start:])


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position (data epoch, batches handed out in it) is part of Lightning's checkpoints.

    Lightning 2.6 saves ``state_dict()`` of every train loader that has one (``FitLoop.on_save_checkpoint`` via
    ``CombinedLoader._state_dicts``) and, on resume, calls ``load_state_dict`` before the first ``iter()``
    (``FitLoop.setup_data``). The loader has a length, so Lightning's fetcher does not prefetch: the count is
    exactly the batches the training loop took. A pass starts at its first ``next()``, after Lightning's
    ``set_epoch``, also with worker processes (which would otherwise draw indices at ``iter()``).

    The first pass after a resume continues the saved data epoch from the saved batch, whatever epoch Lightning
    sets: a checkpoint written by ``on_train_epoch_end`` after ``max_steps`` stopped mid-epoch (e.g. ModelCheckpoint's
    last.ckpt) counts that epoch as finished, so Lightning resumes at epoch e + 1 but still expects only the
    remaining batches. The offset between the two numberings is then kept for the later epochs.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._position = (0, 0)  # (data epoch, batches handed out in it)
        self._resume: Optional[tuple[int, int]] = None
        self._epoch_offset = 0  # data epoch - Lightning's epoch; non-zero only after the resume described above

    def __iter__(self):
        return self._iterate()

    def _iterate(self):
        sampler = self.sampler
        lightning_epoch = int(getattr(sampler, "epoch", 0))
        epoch, skip = lightning_epoch + self._epoch_offset, 0
        if self._resume is not None and hasattr(sampler, "start_at"):
            (epoch, skip), self._resume = self._resume, None
            self._epoch_offset = epoch - lightning_epoch
        if hasattr(sampler, "start_at"):
            sampler.start_at(epoch, skip * self.batch_size)
        self._position = (epoch, skip)
        handed_out = skip
        for batch in super().__iter__():
            handed_out += 1
            self._position = (epoch, handed_out)
            yield batch

    def state_dict(self) -> dict[str, Any]:
        epoch, batches = self._position
        return {"epoch": epoch, "batches": batches, "layout": self._layout()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if state.get(LAYOUT) != self._layout():
            # Another prompt file, batch size, seed or number of ranks: that epoch's order is not this one's.
            warnings.warn(
                f"train data differs from the checkpoint's ({state.get('layout')} -> {self._layout()}): the resumed "
                f"epoch {epoch} restarts from its first batch instead of batch {batches}",
                stacklevel=2,
            )
            batches = 0
        if batches >= len(self):  # saved after the epoch's last batch: the next one starts afresh
            epoch, batches = epoch + 1, 0
        self._position = self._resume = (epoch, batches)

    def _layout(self) -> dict[str, Any]:
        sampler = self.sampler
        return {
            "items": len(self.dataset),
            "batch_size": self.batch_size,
            "seed": getattr(sampler, "seed", None),
            "replicas": getattr(sampler, "num_replicas", 1),
        }


class PromptDataModule(LightningDataModule):
    """Args:
        train_file: .txt or .jsonl prompt file.
        val_file: separate validation prompts; if absent, ``val_size`` prompts are split off ``train_file``.
        val_size: number of training prompts held out for validation when there is no ``val_file`` (0 = none).
        batch_size: prompts per device per generator step (published: 4 for SD1.5, 6 for SDXL).
        num_workers: DataLoader workers (prompt loading is trivial: 0 is right almost always).
        seed: seed of the train/val split and of the shuffling.
        tokenizer_model: a pipeline (hub id or folder) whose first tokenizer sets the prompt length limit;
            prompts longer than it are truncated by the text encoder, which is reported once. Linked from
            ``model.pretrained_model`` by train.py.
        latent_resolution: image resolution (px) the real latents must come from: each must be the latent of
            that resolution for ``tokenizer_model``'s VAE (its config's factor and channels; SD's 8 and 4 when the
            config cannot be read), e.g. (4, 64, 64) for SD1.5 at 512. None: only (c, h, w) with one common shape.
        predict_file: prompts for ``train.py predict`` (default: ``train_file``); records get their 0-based
            ``"index"`` in the file (image names and default seeds derive from it).
        test_file: held-out prompts for ``train.py test`` (default: the validation prompts).
    """

    def __init__(
        self,
        train_file: str,
        val_file: Optional[str] = None,
        val_size: int = 0,
        batch_size: int = 4,
        num_workers: int = 0,
        seed: int = 0,
        tokenizer_model: Optional[str] = None,
        latent_resolution: Optional[int] = None,
        predict_file: Optional[str] = None,
        test_file: Optional[str] = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise InputError(f"data.batch_size must be >= 1, got {batch_size}")
        if val_size < 0:
            raise InputError(f"data.val_size must be >= 0, got {val_size}")
        if num_workers < 0:
            raise InputError(f"data.num_workers must be >= 0, got {num_workers}")
        if latent_resolution is not None and (latent_resolution <= 0 or latent_resolution % 8):
            raise InputError(f"data.latent_resolution must be a positive multiple of 8 (the VAE factor), got {latent_resolution}")
        self.train_file, self.val_file, self.val_size = train_file, val_file, val_size
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.tokenizer_model = tokenizer_model
        self.latent_resolution = latent_resolution
        self.predict_file = predict_file
        self.test_file = test_file
        self.train_records: list[dict] = []
        self.val_records: list[dict] = []
        self.predict_records: list[dict] = []
        self.test_records: list[dict] = []
        self._locations: dict[int, tuple[dict, str]] = {}  # id(record) -> (record, "file:line")

    def _expected_latent_shape(self) -> Optional[tuple[int, int, int]]:
        """The model's latent shape at ``latent_resolution``, from its VAE config (no weights are read)."""
        if self.latent_resolution is None:
            return None
        from comat_lightning.training.startup_checks import vae_geometry

        geometry = vae_geometry(self.tokenizer_model) if self.tokenizer_model else None
        return expected_latent_shape(self.latent_resolution, *geometry) if geometry else expected_latent_shape(self.latent_resolution)

    def setup(self, stage: Optional[str] = None) -> None:
        # Lightning runs datamodule.setup before configure_model: every file problem fails before any model loads.
        if stage == "predict":
            option, path = ("data.predict_file", self.predict_file) if self.predict_file else ("data.train_file", self.train_file)
            numbered = read_numbered_prompt_file(path, option)
            self.predict_records = [{**record, INDEX: i} for i, (_, record) in enumerate(numbered)]
            self._locate(path, numbered, self.predict_records)
            from comat_lightning.judges.masks import JsonlMasks  # predict reads "layout" masks as JsonlMasks(field=LAYOUT)

            JsonlMasks(field=LAYOUT).check_records(self.predict_records, self.location_of)
            return
        if stage == "test" and self.test_file:
            numbered = read_numbered_prompt_file(self.test_file, "data.test_file")
            self.test_records = [record for _, record in numbered]
            self._locate(self.test_file, numbered, self.test_records)
            return
        if self.train_records or self.val_records:
            return
        sources = [(Path(self.train_file), read_numbered_prompt_file(self.train_file, "data.train_file"))]
        if self.val_file:
            sources.append((Path(self.val_file), read_numbered_prompt_file(self.val_file, "data.val_file")))
        attached = attach_latents(sources, self._expected_latent_shape(), self.latent_resolution)
        for (path, numbered), source_records in zip(sources, attached):
            self._locate(path, numbered, source_records)
        records, *val = attached
        if val:
            self.val_records = val[0]
        elif self.val_size:
            if self.val_size >= len(records):
                raise InputError(f"data.val_size={self.val_size} leaves no training prompts: {self.train_file} has {len(records)}")
            order = torch.randperm(len(records), generator=torch.Generator().manual_seed(self.seed)).tolist()
            held_out = set(order[: self.val_size])
            self.val_records = [r for i, r in enumerate(records) if i in held_out]
            records = [r for i, r in enumerate(records) if i not in held_out]
        self.train_records = records
        if self.tokenizer_model:
            self._warn_long_prompts()

    def _locate(self, path: str | Path, numbered: list[tuple[int, dict]], records: list[dict]) -> None:
        for (line, _), record in zip(numbered, records):
            self._locations[id(record)] = (record, f"{path}:{line}")

    def location_of(self, record: dict) -> Optional[str]:
        """"file:line" of a record this datamodule holds (for messages of checks made after reading), else None."""
        held, location = self._locations.get(id(record), (None, None))
        return location if held is record else None  # the entry keeps its record alive: an id is never reused

    def _warn_long_prompts(self) -> None:
        from comat_lightning.models.backbone import load_tokenizer

        tokenizer = load_tokenizer(self.tokenizer_model)
        limit = tokenizer.model_max_length
        for name, records in (("train", self.train_records), ("val", self.val_records)):
            if not records:
                continue
            lengths = [len(ids) for ids in tokenizer([r[PROMPT] for r in records]).input_ids]
            too_long = sum(n > limit for n in lengths)
            if too_long:
                warnings.warn(
                    f"{too_long} of {len(records)} {name} prompts are longer than the text encoder's {limit} tokens "
                    f"(longest: {max(lengths)}) and will be truncated",
                    stacklevel=2,
                )

    def train_dataloader(self) -> DataLoader:
        dataset = PromptDataset(self.train_records)
        # Each rank's share is decided here (not by Lightning, which leaves a DistributedSampler alone).
        distributed = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        replicas, rank = (distributed["num_replicas"], distributed["rank"]) if distributed else (1, 0)
        sampler = EpochSampler(dataset, num_replicas=replicas, rank=rank, seed=self.seed)
        return ResumableDataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_prompts,
            drop_last=len(sampler) >= self.batch_size,  # equal batches on every rank and step
        )

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(
            PromptDataset(self.predict_records), batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers, collate_fn=collate_prompts
        )

    def val_dataloader(self) -> DataLoader:
        return self._evaluation_loader(self.val_records)

    def test_dataloader(self) -> DataLoader:
        if not self.test_file and not self.val_records:
            raise InputError("train.py test needs held-out prompts: set data.test_file (or data.val_file / data.val_size)")
        return self._evaluation_loader(self.test_records if self.test_file else self.val_records)

    def _evaluation_loader(self, records: list[dict]) -> DataLoader:
        if not records:
            return []
        return DataLoader(
            PromptDataset(records),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate_prompts,
        )


__all__ = [
    "REAL_LATENT", "EpochSampler", "PromptDataModule", "PromptDataset", "PromptFileError", "ResumableDataLoader",
    "attach_latents", "collate_prompts", "read_numbered_prompt_file", "read_prompt_file",
]  # fmt: skip
