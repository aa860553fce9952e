"""Prompt files: every bad input named by file and line; JSONL extras carried into the batch."""

from __future__ import annotations

import warnings

import pytest

from datamodules import PromptDataModule, PromptFileError, read_prompt_file


def _write(tmp_path, name, content: bytes | str):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"prompt file {tmp_path}/nope.txt does not exist"):
        read_prompt_file(tmp_path / "nope.txt")


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_empty_file(tmp_path, content):
    path = _write(tmp_path, "p.txt", content)
    with pytest.raises(PromptFileError, match=f"{path}: no prompts"):
        read_prompt_file(path)


def test_blank_lines_are_skipped_with_a_count(tmp_path):
    path = _write(tmp_path, "p.txt", "a red car\n\n  \na blue bus\n\n")
    with pytest.warns(UserWarning, match=r"skipped 3 blank line\(s\)"):
        records = read_prompt_file(path)
    assert [r["prompt"] for r in records] == ["a red car", "a blue bus"]


def test_malformed_json_names_the_line(tmp_path):
    path = _write(tmp_path, "p.jsonl", '{"prompt": "a red car"}\n{"prompt": "a blue bus",\n')
    with pytest.raises(PromptFileError, match=rf"{path}:2: malformed JSON"):
        read_prompt_file(path)


def test_missing_prompt_key_names_the_line(tmp_path):
    path = _write(tmp_path, "p.jsonl", '{"prompt": "a red car"}\n\n{"text": "a blue bus"}\n')
    with pytest.raises(PromptFileError, match=rf"{path}:3: record has no \"prompt\" key \(keys: \['text'\]\)"):
        read_prompt_file(path)


@pytest.mark.parametrize("line", ['"just a string"', '{"prompt": 3}', '{"prompt": "  "}'])
def test_wrong_record_shapes(tmp_path, line):
    path = _write(tmp_path, "p.jsonl", line + "\n")
    with pytest.raises(PromptFileError, match=rf"{path}:1: "):
        read_prompt_file(path)


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = _write(tmp_path, "p.txt", b"a red car\na blue bus\na caf\xe9 table\n")
    with pytest.raises(PromptFileError, match=rf"{path}:3: not valid UTF-8 \(byte 0xe9\)"):
        read_prompt_file(path)


def test_jsonl_extras_reach_the_batch(tmp_path):
    path = _write(tmp_path, "p.jsonl", '{"prompt": "a red car", "entities": [["car", ["red"]]]}\n{"prompt": "a cat"}\n')
    dm = PromptDataModule(train_file=str(path), batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert sorted(batch["prompt"]) == ["a cat", "a red car"]
    by_prompt = dict(zip(batch["prompt"], batch["entities"]))
    assert by_prompt == {"a red car": [["car", ["red"]]], "a cat": None}


def test_long_prompts_get_one_warning_with_the_count(tmp_path, tiny_paths):
    long_prompt = " ".join(["red car"] * 60)
    path = _write(tmp_path, "p.txt", f"a cat\n{long_prompt}\n{long_prompt} again\n")
    dm = PromptDataModule(train_file=str(path), tokenizer_model=tiny_paths["sd"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("fit")
    messages = [str(w.message) for w in caught if "truncated" in str(w.message)]
    assert len(messages) == 1 and messages[0].startswith("2 of 3 train prompts are longer than the text encoder's 77 tokens")


def test_val_split_is_seeded_and_disjoint(tmp_path):
    path = _write(tmp_path, "p.txt", "\n".join(f"prompt {i}" for i in range(20)))
    splits = []
    for _ in range(2):
        dm = PromptDataModule(train_file=str(path), val_size=5, seed=3)
        dm.setup("fit")
        splits.append([r["prompt"] for r in dm.val_records])
        assert len(dm.train_records) == 15 and not {r["prompt"] for r in dm.train_records} & set(splits[-1])
    assert splits[0] == splits[1]
    with pytest.raises(ValueError, match="data.val_size=20 leaves no training prompts"):
        PromptDataModule(train_file=str(path), val_size=20).setup("fit")


def test_bad_datamodule_options():
    with pytest.raises(ValueError, match="data.batch_size must be >= 1"):
        PromptDataModule(train_file="x.txt", batch_size=0)


# ----------------------------------------------------------------------------------------------- data order


def _prompts(tmp_path, n: int = 10):
    return _write(tmp_path, "order.txt", "\n".join(f"prompt {i}" for i in range(n)))


def _epoch_order(dm: PromptDataModule, epoch: int) -> list[str]:
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)  # what Lightning does at each epoch start
    return [p for batch in loader for p in batch["prompt"]]


def test_training_order_is_a_function_of_seed_and_epoch(tmp_path):
    path = _prompts(tmp_path)
    first = PromptDataModule(train_file=str(path), batch_size=2, seed=3)
    first.setup("fit")
    epochs = [_epoch_order(first, e) for e in range(3)]
    assert len({tuple(e) for e in epochs}) == 3 and all(sorted(e) == sorted(epochs[0]) for e in epochs)
    fresh = PromptDataModule(train_file=str(path), batch_size=2, seed=3)  # a new process resumed at epoch 2
    fresh.setup("fit")
    assert _epoch_order(fresh, 2) == epochs[2]
    other = PromptDataModule(train_file=str(path), batch_size=2, seed=4)
    other.setup("fit")
    assert _epoch_order(other, 0) != epochs[0]


class _Recorder:
    """A minimal LightningModule (built lazily: Lightning is imported by the test) recording each batch's prompts."""

    @staticmethod
    def make():
        import torch
        from lightning.pytorch import LightningModule

        class Recorder(LightningModule):
            def __init__(self):
                super().__init__()
                self.weight = torch.nn.Parameter(torch.zeros(1))
                self.seen: list[list[str]] = []

            def training_step(self, batch, batch_idx):
                self.seen.append(list(batch["prompt"]))
                return ((self.weight - 1) ** 2).sum()

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        return Recorder()


def _fit(path, ckpt_dir, max_steps: int, ckpt_path=None, num_workers: int = 0) -> list[list[str]]:
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = _Recorder.make()
    dm = PromptDataModule(train_file=str(path), batch_size=2, seed=5, num_workers=num_workers)
    # step=N.ckpt at every step (written by on_train_batch_end); last.ckpt once more at the end of fit (written by
    # on_train_epoch_end, which also runs when max_steps stops an epoch half-way).
    checkpoints = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_top_k=-1, filename="{step}", save_last=True)
    trainer = Trainer(
        max_steps=max_steps, max_epochs=-1, accelerator="cpu", devices=1, logger=False, callbacks=[checkpoints],
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    assert not [w for w in caught if "not resumable" in str(w.message)]  # Lightning's mid-epoch resume warning
    return module.seen


@pytest.mark.parametrize(
    "resume_step, checkpoint, num_workers",
    [(5, "step", 0), (7, "step", 0), (7, "last", 0), (13, "step", 1)],
    ids=["epoch boundary", "mid-epoch", "mid-epoch, last.ckpt of a max_steps stop", "mid-epoch, worker process"],
)
def test_resume_continues_with_exactly_the_uninterrupted_batches(tmp_path, resume_step, checkpoint, num_workers):
    path = _prompts(tmp_path)  # 10 prompts, batch 2: 5 batches per epoch
    total = 16
    uninterrupted = _fit(path, tmp_path / "a", max_steps=total, num_workers=num_workers)
    assert len(uninterrupted) == total and uninterrupted[:5] != uninterrupted[5:10]  # epochs are reshuffled
    # An interrupted run: stopped after resume_step steps, then a fresh Trainer (and data module) resumes it.
    first = _fit(path, tmp_path / "b", max_steps=resume_step, num_workers=num_workers)
    name = f"step={resume_step}.ckpt" if checkpoint == "step" else "last.ckpt"
    resumed = _fit(path, tmp_path / "c", max_steps=total, ckpt_path=tmp_path / "b" / name, num_workers=num_workers)
    assert first + resumed == uninterrupted
