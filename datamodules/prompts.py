"""Prompt-only data: CoMat trains from text prompts alone.

Files are ``.txt`` (one prompt per line) or ``.jsonl`` (one JSON object per line with a ``"prompt"`` string; any
other fields, e.g. precomputed entity parses or a real-latent reference, are carried into the batch as lists).
An optional ``"entities"`` field (hand-written or from ``python -m comat_lightning.prepare_entities``) is checked
against its prompt when the file is read.
Bad files fail with a message naming the file and line; blank lines are skipped and counted.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from comat_lightning.prompt_parsing import entities_from_json


class PromptFileError(ValueError):
    """A prompt file that cannot be used; the message names the file and line."""


def read_prompt_file(path: str | Path) -> list[dict[str, Any]]:
    """Read prompt records from ``path`` (.txt or .jsonl); each record has at least a non-empty ``"prompt"``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist" if not path.exists() else f"prompt file {path} is not a file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise PromptFileError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[err.start]:02x}); save the file as UTF-8") from None
    is_jsonl = path.suffix.lower() in (".jsonl", ".json")
    records, blank = [], 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            blank += 1
            continue
        if not is_jsonl:
            records.append({"prompt": line.strip()})
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise PromptFileError(f"{path}:{number}: malformed JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise PromptFileError(f"{path}:{number}: expected a JSON object like {{\"prompt\": \"...\"}}, got {type(record).__name__}")
        if "prompt" not in record:
            raise PromptFileError(f"{path}:{number}: record has no \"prompt\" key (keys: {sorted(record)})")
        if not isinstance(record["prompt"], str) or not record["prompt"].strip():
            raise PromptFileError(f"{path}:{number}: \"prompt\" must be a non-empty string, got {record['prompt']!r}")
        record["prompt"] = record["prompt"].strip()
        if record.get("entities") is not None:
            # Checked here, against the prompt, so that a typo fails at load time with its line, not mid-training.
            try:
                entities_from_json(record["prompt"], record["entities"])
            except ValueError as err:
                raise PromptFileError(f"{path}:{number}: bad \"entities\": {err}") from None
        records.append(record)
    if not records:
        raise PromptFileError(f"{path}: no prompts (the file is empty or has only blank lines)")
    if blank:
        warnings.warn(f"{path}: skipped {blank} blank line(s)", stacklevel=2)
    return records


class PromptDataset(Dataset):
    def __init__(self, records: list[dict[str, Any]]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.records[index]


def collate_prompts(records: list[dict[str, Any]]) -> dict[str, list]:
    """Batch as a dict of lists; a field missing from some records is None there."""
    keys = list(dict.fromkeys(k for r in records for k in r))
    return {k: [r.get(k) for r in records] for k in keys}


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
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if val_size < 0:
            raise ValueError(f"data.val_size must be >= 0, got {val_size}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        self.train_file, self.val_file, self.val_size = train_file, val_file, val_size
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.tokenizer_model = tokenizer_model
        self.train_records: list[dict] = []
        self.val_records: list[dict] = []

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_records or self.val_records:
            return
        records = read_prompt_file(self.train_file)
        if self.val_file:
            self.val_records = read_prompt_file(self.val_file)
        elif self.val_size:
            if self.val_size >= len(records):
                raise ValueError(f"data.val_size={self.val_size} leaves no training prompts: {self.train_file} has {len(records)}")
            order = torch.randperm(len(records), generator=torch.Generator().manual_seed(self.seed)).tolist()
            held_out = set(order[: self.val_size])
            self.val_records = [r for i, r in enumerate(records) if i in held_out]
            records = [r for i, r in enumerate(records) if i not in held_out]
        self.train_records = records
        if self.tokenizer_model:
            self._warn_long_prompts()

    def _warn_long_prompts(self) -> None:
        from comat_lightning.diffusion_model import load_tokenizer

        tokenizer = load_tokenizer(self.tokenizer_model)
        limit = tokenizer.model_max_length
        for name, records in (("train", self.train_records), ("val", self.val_records)):
            if not records:
                continue
            lengths = [len(ids) for ids in tokenizer([r["prompt"] for r in records]).input_ids]
            too_long = sum(n > limit for n in lengths)
            if too_long:
                warnings.warn(
                    f"{too_long} of {len(records)} {name} prompts are longer than the text encoder's {limit} tokens "
                    f"(longest: {max(lengths)}) and will be truncated",
                    stacklevel=2,
                )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            PromptDataset(self.train_records),
            batch_size=self.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(self.seed),
            num_workers=self.num_workers,
            collate_fn=collate_prompts,
            drop_last=len(self.train_records) >= self.batch_size,  # equal batches on every rank and step
        )

    def val_dataloader(self) -> DataLoader:
        if not self.val_records:
            return []
        return DataLoader(
            PromptDataset(self.val_records),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate_prompts,
        )
