"""Precompute the real samples of the Fidelity Preservation loss: the frozen base model's final latents.

    python -m comat_lightning.tools.real_latents --config CONFIG.yaml --output DIR [--prompts FILE] [--shard-size 64]
                                            [--batch-size N] [--seed 0]

The model is built exactly as training builds it (the same config, through the same CLI) and sampled with the
training sampler settings, with its LoRA disabled, on the config's trainer accelerator (one device) and precision
(32-true or *-mixed; the latent chain stays fp32). Prompts default to the config's ``data.train_file``.

Prompt i (0-based, blank lines skipped) is sampled from its own generator seeded ``seed * 1000003 + i``, so its
latent does not depend on which batch or shard it lands in. Output, all written atomically:

- ``DIR/shard-00000.safetensors`` ...: tensor ``"latents"`` (n, 4, h, w) float32 for prompts
  ``[k * shard_size, (k + 1) * shard_size)``; string metadata: format, config, model, sampler, precision, seed,
  seed_rule, first_index, count, seeds (first..last), prompts_sha256;
- ``DIR/real_latents.jsonl`` (last, once every shard is valid): the prompt file's records, all fields kept, plus
  ``"latent": {"file": "shard-00000.safetensors", "index": i}`` and ``"latent_seed": s``. Train on it with
  ``data.train_file: DIR/real_latents.jsonl``.

Resumable: a shard that loads, has the right shape and was written for the same prompts, model, sampler, precision
and seed is kept; a missing, corrupt or stale one is (re)generated. Every prompt gets exactly one latent. SIGTERM
or SIGINT stops the command at the next batch (exit status 128 + signal number; a second signal exits at once):
finished shards are kept, the rerun continues from the shard in hand.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from comat_lightning.files.atomic import atomic_write
from comat_lightning.files.record_fields import LATENT_SEED, PROMPT
from comat_lightning.runtime.stop_signals import StoppedBySignal, StopRequest
from comat_lightning.sampling.seeds import SEED_STRIDE, prompt_seed
from datamodules.latents import LATENTS_KEY  # the tensor name the datamodule reads

FORMAT = "comat-real-latents/1"
JSONL_NAME = "real_latents.jsonl"
# Metadata that must match for a kept shard to be the shard this run would write ("config" is only recorded:
# the same settings under another config path give the same latents).
_MUST_MATCH = ("format", "model", "sampler", "precision", "seed", "first_index", "count", "seeds", "prompts_sha256")
_PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed")


def latent_seed(seed: int, index: int) -> int:
    """The noise seed of prompt ``index``: distinct per prompt, independent of batching and sharding."""
    return prompt_seed(seed, index)


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.safetensors"


@dataclass(frozen=True)
class Shard:
    number: int
    first: int  # index of its first prompt
    count: int

    @property
    def name(self) -> str:
        return shard_name(self.number)


def plan_shards(num_prompts: int, shard_size: int) -> list[Shard]:
    return [Shard(k, first, min(shard_size, num_prompts - first)) for k, first in enumerate(range(0, num_prompts, shard_size))]


def shard_metadata(context: dict[str, str], shard: Shard, prompts: Sequence[str], seed: int) -> dict[str, str]:
    digest = hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()
    seeds = f"{latent_seed(seed, shard.first)}..{latent_seed(seed, shard.first + shard.count - 1)}"
    return {**context, "first_index": str(shard.first), "count": str(shard.count), "seeds": seeds, "prompts_sha256": digest}


def check_shard(path: Path, metadata: dict[str, str], shape: tuple[int, ...]) -> Optional[str]:
    """Why the shard at ``path`` cannot be kept (completing "the old file was ..."), or None if it is exactly
    what this run would write."""
    from safetensors import SafetensorError, safe_open

    if not path.exists():
        return "missing"
    try:
        with safe_open(str(path), framework="pt") as handle:
            written = handle.metadata() or {}
            if LATENTS_KEY not in handle.keys():
                return f'without a "{LATENTS_KEY}" tensor'
            latents = handle.get_tensor(LATENTS_KEY)
    except (SafetensorError, OSError) as err:
        return f"unreadable ({err})"
    if tuple(latents.shape) != tuple(shape) or latents.dtype != torch.float32:
        return f"of shape {tuple(latents.shape)} {latents.dtype}, not {tuple(shape)} torch.float32"
    if not torch.isfinite(latents).all():
        return "holding non-finite values"
    stale = [key for key in _MUST_MATCH if written.get(key) != metadata.get(key)]
    if stale:
        return f"written with other settings ({', '.join(stale)})"
    return None


def write_shard(path: Path, latents: torch.Tensor, metadata: dict[str, str]) -> None:
    """Save to a temporary file in the same folder, then rename over ``path``: never a half-written shard."""
    from safetensors.torch import save_file

    # ".<shard name>.<pid>.tmp": what start-up removes as leftovers of a killed process (".shard-*.tmp")
    with atomic_write(path, tmp_suffix=f".{os.getpid()}.tmp") as tmp:
        save_file({LATENTS_KEY: latents.to(torch.float32).contiguous()}, str(tmp), metadata=metadata)


def generate_latents(
    module,
    prompts: Sequence[str],
    seeds: Sequence[int],
    batch_size: int,
    forward_context: Callable = contextlib.nullcontext,
    progress: Optional[Callable[[int], None]] = None,
    stop: Optional[StopRequest] = None,
) -> torch.Tensor:
    """Final latents (n, 4, h, w) float32 on the CPU of the module's frozen base, one generator per prompt;
    ``progress(n)`` is told after each batch of n prompts. A ``stop`` request raises :class:`StoppedBySignal` at
    the next batch boundary (the unfinished shard is not written)."""
    out = []
    for start in range(0, len(prompts), batch_size):
        if stop is not None and stop.requested:
            raise StoppedBySignal(stop.received, f"{stop.signal_name}: stopped")
        # diffusers' randn_tensor draws sample i from generators[i] (initial noise and every DDPM step's noise).
        generators = [torch.Generator().manual_seed(s) for s in seeds[start : start + batch_size]]
        with torch.no_grad(), forward_context(), module.rollout.frozen_base() as unet:
            latents = module.rollout.sample(list(prompts[start : start + batch_size]), generators, unet=unet)
        out.append(latents.detach().to("cpu", torch.float32))
        if progress is not None:
            progress(len(latents))
    return torch.cat(out)


def latent_shape(module) -> tuple[int, int, int]:
    backbone = module.backbone
    size = module.sampler.resolution // backbone.vae_scale_factor
    return (backbone.unet.config.in_channels, size, size)


def write_real_latents(
    module,
    records: list[dict[str, Any]],
    output: Path,
    *,
    shard_size: int,
    batch_size: int,
    seed: int,
    context: dict[str, str],
    forward_context: Callable = contextlib.nullcontext,
    log: Callable[[str], None] = print,
    progress: Optional[Callable[[int], None]] = None,
    stop: Optional[StopRequest] = None,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
) -> dict[str, int]:
    """Make ``output`` hold one valid shard per ``shard_size`` prompts and the JSONL index; return the counts.
    ``progress(n)`` is told each time n more prompts are done (generated, or found in a valid shard). A ``stop``
    request ends the run at the next batch boundary with :class:`StoppedBySignal`: finished shards are on disk and
    a rerun keeps them. Data-parallel: process ``rank`` of ``world_size`` makes the shards whose number % world_size
    == rank (a shard's latents depend only on its prompts' indices, not on who makes it), then ``barrier()``; rank 0
    checks every shard and writes the index. A rerun with another number of processes keeps every valid shard."""
    from comat_lightning.tools.prepare_entities import write_jsonl_atomically

    output.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        for leftover in output.glob(".shard-*.tmp"):  # from a process killed while saving
            leftover.unlink(missing_ok=True)
    barrier()  # no rank saves before the leftovers are gone
    index = output / JSONL_NAME
    prompts = [r[PROMPT] for r in records]
    shape = latent_shape(module)
    shards = plan_shards(len(records), shard_size)
    counts = {"generated": 0, "regenerated": 0, "kept": 0}
    for shard in shards:
        if shard.number % world_size != rank:
            continue
        path = output / shard.name
        span = slice(shard.first, shard.first + shard.count)
        metadata = shard_metadata(context, shard, prompts[span], seed)
        where = f"[{shard.number + 1}/{len(shards)}] {shard.name} (prompts {shard.first}-{shard.first + shard.count - 1})"
        reason = check_shard(path, metadata, (shard.count, *shape))
        if reason is None:
            counts["kept"] += 1
            log(f"{where}: kept")
            if progress is not None:
                progress(shard.count)
            continue
        index.unlink(missing_ok=True)  # the index never names a shard that is being replaced
        started = time.monotonic()
        seeds = [latent_seed(seed, i) for i in range(span.start, span.stop)]
        try:
            latents = generate_latents(module, prompts[span], seeds, batch_size, forward_context, progress, stop)
        except StoppedBySignal as stopped:
            done = sum(1 for s in shards if s.number < shard.number)
            stopped.message = (f"{stopped.message} during {shard.name}: shards before it ({done} of {len(shards)}) are "
                               "complete; rerun the same command to continue")  # fmt: skip
            raise
        write_shard(path, latents, metadata)
        counts["generated" if reason == "missing" else "regenerated"] += 1
        done = f"generated in {time.monotonic() - started:.1f} s"
        log(f"{where}: {done}" if reason == "missing" else f"{where}: re{done}; the old file was {reason}")
    barrier()  # every rank's shards are written
    if rank != 0:
        return counts
    for shard in (s for s in shards if s.number % world_size != rank):  # another rank's shard: valid before the index names it
        metadata = shard_metadata(context, shard, prompts[shard.first : shard.first + shard.count], seed)
        problem = check_shard(output / shard.name, metadata, (shard.count, *shape))
        if problem is not None:
            raise RuntimeError(f"{shard.name} is {problem} after every process finished; rerun the same command")
    expected = {s.name for s in shards}
    unused = sorted(p.name for p in output.glob("shard-*.safetensors") if p.name not in expected)
    if unused:
        log(f"note: {len(unused)} shard file(s) in {output} are not used by this prompt file (e.g. {unused[0]}); left in place")
    indexed = []
    for shard in shards:
        for offset in range(shard.count):
            i = shard.first + offset
            entry = {"file": shard.name, "index": offset}
            indexed.append({**records[i], "latent": entry, LATENT_SEED: latent_seed(seed, i)})
    write_jsonl_atomically(indexed, index)
    return counts


def build_module(config: Path):
    """(module with models loaded, trainer, datamodule) from ``config`` through the training CLI."""
    from unittest import mock

    from comat_lightning.cli import main as cli_main

    # The CLI is given its arguments explicitly; this command's own argv must not look like extra CLI arguments.
    with mock.patch.object(sys, "argv", [sys.argv[0]]):
        cli = cli_main(args=["--config", str(config), "--trainer.logger=false"], run=False)
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
    from comat_lightning.runtime.data_parallel import launched_processes

    rank, world_size, local_rank, barrier = launched_processes(cuda=trainer.strategy.root_device.type == "cuda")
    module.configure_model()
    device = torch.device("cuda", local_rank) if trainer.strategy.root_device.type == "cuda" else trainer.strategy.root_device
    module.to(device).eval()
    context = {
        "format": FORMAT,
        "config": str(args.config.resolve()),
        "model": json.dumps(module.model_source, sort_keys=True),
        "sampler": json.dumps(dataclasses.asdict(module.sampler), sort_keys=True),
        "precision": precision,
        "seed": str(args.seed),
        "seed_rule": f"seed * {SEED_STRIDE} + prompt index",
    }
    where = f"{module.device}" + (f", process {rank} of {world_size}" if world_size > 1 else "")
    print(f"{len(records)} prompts from {prompts_file}, {precision} on {where}, batches of {batch_size}", flush=True)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(records), unit="prompt", desc="real latents", dynamic_ncols=True, disable=rank != 0)
    try:
        with StopRequest(what="sampling") as stop:  # SIGTERM/SIGINT: stop at the next batch, keep finished shards
            counts = write_real_latents(
                module,
                records,
                args.output,
                shard_size=args.shard_size,
                batch_size=batch_size,
                seed=args.seed,
                context=context,
                forward_context=trainer.precision_plugin.forward_context,
                log=bar.write,  # lines above the bar, not through it
                progress=bar.update,
                stop=stop,
                rank=rank,
                world_size=world_size,
                barrier=barrier,
            )
    except StoppedBySignal as stopped:
        bar.close()
        print(stopped.message, file=sys.stderr, flush=True)
        return stopped.code
    bar.close()
    if rank != 0:
        return 0
    print(
        f"{len(records)} prompts -> {counts['generated'] + counts['regenerated'] + counts['kept']} shards in {args.output} "
        f"({counts['generated']} generated, {counts['regenerated']} regenerated, {counts['kept']} kept) in "
        f"{time.monotonic() - started:.0f} s; index: {args.output / JSONL_NAME}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
