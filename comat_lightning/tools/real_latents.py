"""Precompute the real samples of the Fidelity Preservation loss: the frozen base model's final latents.

    python -m comat_lightning.tools.real_latents --config CONFIG.yaml --output DIR [--prompts FILE] [--shard-size 64]
                                            [--batch-size N] [--seed 0]
    torchrun --nproc_per_node 8 -m comat_lightning.tools.real_latents ...      # every GPU (SLURM: srun, the same)

The model is built exactly as training builds it (the same config, through the same CLI) and sampled with the
training sampler settings, with its LoRA disabled, at the config's precision (32-true or *-mixed; the latent
chain stays fp32). Prompts default to the config's ``data.train_file``. It is a ``trainer.predict`` job, as the
evaluation images of ``train.py predict`` are: Lightning's strategy runs it on one device or data-parallel over
the processes of a torchrun / SLURM launch (DDP, whatever the config's training strategy; no process group is
needed for sampling beyond the start and the end).

Prompt i (0-based, blank lines skipped) is sampled from its own generator seeded ``seed * 1000003 + i``, so its
latent does not depend on which batch, shard or process it lands in. Output, all written atomically (format:
``comat_lightning/tools/latent_shards.py``):

- ``DIR/shard-00000.safetensors`` ...: tensor ``"latents"`` (n, 4, h, w) float32 for prompts
  ``[k * shard_size, (k + 1) * shard_size)``, with metadata saying what made it;
- ``DIR/real_latents.jsonl`` (last, by the first process once every shard is valid): the prompt file's records, all
  fields kept, plus ``"latent": {"file": "shard-00000.safetensors", "index": i}`` and ``"latent_seed": s``. Train
  on it with ``data.train_file: DIR/real_latents.jsonl``.

Resumable on any number of processes: a shard that loads, has the right shape and was written for the same prompts,
model, sampler, precision and seed is kept; the others are split over the processes and (re)generated, each
process writing the shards it makes. SIGTERM or SIGINT stops every process after its current batch (exit status
128 + signal number): finished shards are kept, the rerun continues.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from lightning.pytorch.callbacks import Callback

from comat_lightning.files.record_fields import LATENT_SEED, PROMPT
from comat_lightning.runtime.stop_signals import StoppedBySignal
from comat_lightning.sampling.prediction import LATENT_JOB
from comat_lightning.sampling.seeds import SEED_STRIDE
from comat_lightning.tools.latent_shards import (
    FORMAT,
    LEFTOVER_PATTERN,
    Shard,
    check_shard,
    latent_seed,
    plan_shards,
    shard_metadata,
    write_shard,
)

JSONL_NAME = "real_latents.jsonl"
_PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed")


def latent_shape(module) -> tuple[int, int, int]:
    backbone = module.backbone
    size = module.sampler.resolution // backbone.vae_scale_factor
    return (backbone.latent_channels, size, size)


class LatentJobs(torch.utils.data.Dataset):
    """This process's batches of the real-latents job: filled by :class:`LatentShardWriter` once the processes are
    up (which shards need making is known only then), read by the predict loop after that. Each item is one batch
    (``"prompt"``, ``"latent_seed"``, ``"latent_job": {"shard", "offset"}``); every process gets the same number of
    items (empty ones at the end of a process with less work), so each reaches every batch boundary."""

    def __init__(self):
        self.items: list[dict[str, Any]] = []

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]

    def loader(self) -> torch.utils.data.DataLoader:
        # batch_size=None: an item already is a batch; the loader only hands it over (no worker processes).
        return torch.utils.data.DataLoader(self, batch_size=None, collate_fn=lambda item: item)


class LatentShardWriter(Callback):
    """Plans the job when predict starts, writes each shard as its last batch arrives, writes the index at the end.

    Start (every process): the first process removes leftover temporary files, checks every shard already in
    ``output`` and unlinks the index if any shard has to be made; the list of shards to make is broadcast, and
    process r takes every world_size-th of them from the r-th. End: after a barrier, the first process checks the
    shards the others made and writes ``real_latents.jsonl``."""

    def __init__(self, records: list[dict[str, Any]], output: Path, *, shard_size: int, batch_size: int, seed: int,
                 context: dict[str, str], jobs: LatentJobs, log: Callable[[str], None] = print,
                 progress: Optional[Callable[[int], None]] = None):  # fmt: skip
        self.records, self.output, self.jobs = records, output, jobs
        self.batch_size, self.seed, self.context = batch_size, seed, context
        self.say, self.progress = log, progress  # (a callback's `log` would be taken for LightningModule.log)
        self.prompts = [r[PROMPT] for r in records]
        self.shards = plan_shards(len(records), shard_size)
        self.counts = {"generated": 0, "regenerated": 0, "kept": 0}
        self._reasons: dict[int, str] = {}  # shard number -> why it is (re)made
        self._pending: dict[int, dict[int, torch.Tensor]] = {}  # shard number -> offset -> latents
        self._started: dict[int, float] = {}

    def metadata(self, shard: Shard) -> dict[str, str]:
        return shard_metadata(self.context, shard, self.prompts[shard.first : shard.first + shard.count], self.seed)

    def _where(self, shard: Shard) -> str:
        return f"[{shard.number + 1}/{len(self.shards)}] {shard.name} (prompts {shard.first}-{shard.first + shard.count - 1})"

    # -- start ------------------------------------------------------------------------------------------------------

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "predict":
            return
        self.output.mkdir(parents=True, exist_ok=True)
        # The shards' shape needs the loaded model, and the predict loop sizes its data before on_predict_start:
        # load it now (Lightning's own configure_model call, next, then finds it loaded).
        pl_module.configure_model()
        plan = self._plan(pl_module) if trainer.is_global_zero else None
        reasons: dict[int, str] = trainer.strategy.broadcast(plan, src=0)  # also: no one saves before the tidy-up
        self._reasons = reasons
        todo = [s for s in self.shards if s.number in reasons]
        rank, world = trainer.global_rank, trainer.world_size
        per_rank = [[self._batches(s) for s in todo[r::world]] for r in range(world)]
        counts = [sum(len(b) for b in shards) for shards in per_rank]
        mine = [batch for batches in per_rank[rank] for batch in batches]
        empty = {PROMPT: [], LATENT_SEED: [], LATENT_JOB: {"shard": -1, "offset": 0}}
        self.jobs.items = mine + [empty] * (max(counts, default=0) - len(mine))

    def _plan(self, pl_module) -> dict[int, str]:
        for leftover in self.output.glob(LEFTOVER_PATTERN):  # from a process killed while saving
            leftover.unlink(missing_ok=True)
        shape = latent_shape(pl_module)
        reasons = {}
        for shard in self.shards:
            reason = check_shard(self.output / shard.name, self.metadata(shard), (shard.count, *shape))
            if reason is None:
                self.counts["kept"] += 1
                self.say(f"{self._where(shard)}: kept")
                if self.progress is not None:
                    self.progress(shard.count)
            else:
                reasons[shard.number] = reason
                self.counts["generated" if reason == "missing" else "regenerated"] += 1
        if reasons:
            (self.output / JSONL_NAME).unlink(missing_ok=True)  # the index never names a shard being replaced
        return reasons

    def _batches(self, shard: Shard) -> list[dict[str, Any]]:
        out = []
        for offset in range(0, shard.count, self.batch_size):
            indices = range(shard.first + offset, shard.first + min(offset + self.batch_size, shard.count))
            out.append({
                PROMPT: [self.prompts[i] for i in indices],
                LATENT_SEED: [latent_seed(self.seed, i) for i in indices],
                LATENT_JOB: {"shard": shard.number, "offset": offset},
            })  # fmt: skip
        return out

    # -- writing ----------------------------------------------------------------------------------------------------

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch[PROMPT]:  # a shard's time runs from the start of its first batch
            self._started.setdefault(int(batch[LATENT_JOB]["shard"]), time.monotonic())

    def on_predict_batch_end(self, trainer, pl_module, prediction, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if prediction is None:
            return
        shard = self.shards[int(prediction[LATENT_JOB]["shard"])]
        latents = prediction["latents"]
        parts = self._pending.setdefault(shard.number, {})
        parts[int(prediction[LATENT_JOB]["offset"])] = latents
        if self.progress is not None:
            self.progress(len(latents))
        if sum(len(v) for v in parts.values()) < shard.count:
            return
        write_shard(self.output / shard.name, torch.cat([parts[k] for k in sorted(parts)]), self.metadata(shard))
        del self._pending[shard.number]
        done = f"generated in {time.monotonic() - self._started.pop(shard.number):.1f} s"
        reason = self._reasons[shard.number]
        self.say(f"{self._where(shard)}: {done}" if reason == "missing" else f"{self._where(shard)}: re{done}; the old file was {reason}")

    def on_predict_end(self, trainer, pl_module) -> None:
        trainer.strategy.barrier()  # every process's shards are written
        if not trainer.is_global_zero:
            return
        shape = latent_shape(pl_module)
        for shard in self.shards:  # made in this run, by any process: valid before the index names it
            if shard.number in self._reasons:
                problem = check_shard(self.output / shard.name, self.metadata(shard), (shard.count, *shape))
                if problem is not None:
                    raise RuntimeError(f"{shard.name} is {problem} after every process finished; rerun the same command")
        expected = {s.name for s in self.shards}
        unused = sorted(p.name for p in self.output.glob("shard-*.safetensors") if p.name not in expected)
        if unused:
            self.say(f"note: {len(unused)} shard file(s) in {self.output} are not used by this prompt file (e.g. {unused[0]}); left in place")
        from comat_lightning.tools.prepare_entities import write_jsonl_atomically

        indexed = []
        for shard in self.shards:
            for offset, i in enumerate(shard.indices):
                indexed.append({**self.records[i], "latent": {"file": shard.name, "index": offset}, LATENT_SEED: latent_seed(self.seed, i)})
        write_jsonl_atomically(indexed, self.output / JSONL_NAME)


def launch_arguments() -> list[str]:
    """Trainer options for the processes of a torchrun / SLURM launch (Lightning's own cluster environments read
    them): one device per process, DDP. Sampling needs no sharding (a frozen base fits where training fits)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    environment = next((env() for env in (TorchElasticEnvironment, SLURMEnvironment) if env.detect()), None)
    if environment is None or environment.world_size() <= 1:
        return ["--trainer.devices=1", "--trainer.num_nodes=1", "--trainer.strategy=auto"]
    import os

    per_node = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE") or environment.world_size())
    return [f"--trainer.devices={per_node}", f"--trainer.num_nodes={environment.world_size() // per_node}", "--trainer.strategy=ddp"]


def build_module(config: Path):
    """(module, trainer, datamodule) from ``config`` through the training CLI, the trainer set for this job: the
    launch's processes (one device each), no logger, no distributed sampler (the writer splits the work)."""
    from unittest import mock

    from comat_lightning.cli import main as cli_main

    job = [*launch_arguments(), "--trainer.logger=false", "--trainer.use_distributed_sampler=false", "--trainer.enable_progress_bar=false"]
    # The CLI is given its arguments explicitly; this command's own argv must not look like extra CLI arguments.
    with mock.patch.object(sys, "argv", [sys.argv[0]]):
        cli = cli_main(args=["--config", str(config), *job], run=False)
    return cli.model, cli.trainer, cli.datamodule


def main(argv: Optional[Sequence[str]] = None) -> int:
    summary = __doc__.split("\n\n")[0]
    cli = argparse.ArgumentParser(prog="python -m comat_lightning.tools.real_latents", description=summary)
    cli.add_argument("--config", type=Path, required=True, help="the training config (YAML)")
    cli.add_argument("--output", type=Path, required=True, help="folder for the shards and real_latents.jsonl")
    cli.add_argument("--prompts", type=Path, help="prompt file (.txt or .jsonl); default: the config's data.train_file")
    cli.add_argument("--shard-size", type=int, default=64, help="prompts per shard file (default: %(default)s)")
    cli.add_argument("--batch-size", type=int, help="prompts per sampling batch (default: the config's data.batch_size)")
    cli.add_argument("--seed", type=int, default=0, help="base of the per-prompt seeds (default: %(default)s)")
    args = cli.parse_args(argv)
    if args.shard_size < 1:
        cli.error(f"--shard-size must be >= 1, got {args.shard_size}")
    if args.batch_size is not None and args.batch_size < 1:
        cli.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.seed < 0:
        cli.error(f"--seed must be >= 0, got {args.seed}")
    if not args.config.is_file():
        cli.error(f"--config {args.config} is not a file")

    # Imported after argument parsing: they pull in torch, Lightning and diffusers, which `--help` does not need.
    from comat_lightning.errors import InputError
    from comat_lightning.training.losses import LossCallback
    from comat_lightning.training.startup_checks import check_model_inputs
    from datamodules.prompts import read_prompt_file

    started = time.monotonic()
    try:  # everything that can be refused before a model loads
        module, trainer, datamodule = build_module(args.config)
        precision = str(trainer.precision)
        if precision not in _PRECISIONS:
            raise InputError(f"trainer.precision={precision} in {args.config}: real latents are sampled in {', '.join(_PRECISIONS)}")
        check_model_inputs(module, "predict")  # the base model alone samples: its paths and resolution
        prompts_file = args.prompts or Path(datamodule.train_file)
        records = read_prompt_file(prompts_file, "--prompts" if args.prompts else "data.train_file")
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    batch_size = args.batch_size or datamodule.batch_size
    context = {
        "format": FORMAT,
        "config": str(args.config.resolve()),
        "model": json.dumps(module.model_source, sort_keys=True),
        "sampler": json.dumps(dataclasses.asdict(module.sampler), sort_keys=True),
        "precision": precision,
        "seed": str(args.seed),
        "seed_rule": f"seed * {SEED_STRIDE} + prompt index",
    }
    rank, world_size = trainer.global_rank, trainer.world_size
    where = f"{trainer.strategy.root_device}" + (f", process {rank} of {world_size}" if world_size > 1 else "")
    print(f"{len(records)} prompts from {prompts_file}, {precision} on {where}, batches of {batch_size}", flush=True)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(records), unit="prompt", desc="real latents", dynamic_ncols=True, disable=rank != 0)
    jobs = LatentJobs()
    writer = LatentShardWriter(
        records, args.output, shard_size=args.shard_size, batch_size=batch_size, seed=args.seed, context=context, jobs=jobs,
        log=bar.write,  # lines above the bar, not through it
        progress=bar.update,
    )  # fmt: skip
    # The losses' helpers (captioner, segmenter, discriminator) are not needed to sample the base: not loaded.
    trainer.callbacks[:] = [cb for cb in trainer.callbacks if not isinstance(cb, (LossCallback, LatentShardWriter))] + [writer]
    try:  # GracefulStop (every run has it) turns SIGTERM/SIGINT into StoppedBySignal after the current batch
        trainer.predict(module, dataloaders=jobs.loader(), return_predictions=False)
    except StoppedBySignal as stopped:
        bar.close()
        return stopped.code
    bar.close()
    if rank != 0:
        return 0
    counts = writer.counts
    print(
        f"{len(records)} prompts -> {counts['generated'] + counts['regenerated'] + counts['kept']} shards in {args.output} "
        f"({counts['generated']} generated, {counts['regenerated']} regenerated, {counts['kept']} kept) in "
        f"{time.monotonic() - started:.0f} s; index: {args.output / JSONL_NAME}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
