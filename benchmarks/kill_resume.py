"""Kill a training run at random moments, resume it, and check it ends exactly where an uninterrupted run ends.

    python benchmarks/kill_resume.py [--trials 6] [--steps 5] [--seed 0] [--config tiny_demo_flux]

The tiny demo (``--config``: tiny_demo (SD-style UNet), tiny_demo_sd3 or tiny_demo_flux; all three CoMat losses: concept matching, attribute concentration, fidelity preservation with its
discriminator) is trained for ``--steps`` generator steps with a checkpoint after every step (the last 3 kept), once
without interruption and then once per trial: ``python train.py fit`` is started, sent SIGKILL or SIGTERM
(alternating) at a moment drawn uniformly from the reference run's life inside `fit` (from its log folder's
creation: model loading, every step, checkpoint writes, the final export),
and then run again with ``--ckpt_path last`` until it finishes. A trial counts as identical when the final
generator LoRA, discriminator LoRA and head, both optimizers' states and the step counter equal the reference's
bit for bit. Results: printed, and appended to benchmarks/results/kill_resume.jsonl. tests/runtime/test_reliability.py
and tests/training/test_mmdit_scale.py use the same functions for one SIGKILL and one SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

REPO = Path(__file__).resolve().parents[1]


def log_folder(config: str = "tiny_demo") -> Path:
    """The run's folder, relative to its working folder: created by the logger in `fit`'s set-up, before models load."""
    return Path("runs") / config / "version_0"


def checkpoint_folder(config: str = "tiny_demo") -> Path:
    return log_folder(config) / "checkpoints"


CHECKPOINTS, LOG_FOLDER = checkpoint_folder(), log_folder()  # of configs/tiny_demo.yaml


def write_config(workdir: Path, keep: int = 3, config: str = "tiny_demo") -> Path:
    """``configs/<config>.yaml`` (a tiny demo) with a checkpoint after every generator step (the newest ``keep``
    step files kept, plus last.ckpt), no validation, no progress bar, and the prompt files addressed absolutely."""
    name = config
    config = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    trainer = config["trainer"]
    trainer.update(limit_val_batches=0, enable_progress_bar=False)
    for callback in trainer["callbacks"]:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"].update(every_n_train_steps=1, save_top_k=keep, monitor="train/generator_step", mode="max", save_last=True)
    for key in ("train_file", "val_file"):
        config["data"][key] = str(REPO / config["data"][key])
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"{name}.yaml"  # the run is named after the file: runs/<config>/...
    path.write_text(yaml.safe_dump(config))
    return path


@dataclass
class Run:
    returncode: int
    seconds: float
    log: str
    anchor_seconds: Optional[float]  # when the ``anchor`` file appeared, from start (None: it never did)


def run_fit(workdir: Path, steps: int, resume: bool = False, kill: Optional[tuple[signal.Signals, float]] = None,
            anchor: Optional[Path] = None, config: str = "tiny_demo") -> Run:
    """``python train.py fit`` in ``workdir``. ``kill=(signal, seconds)`` sends the signal that long after the file
    ``anchor`` (relative to ``workdir``) appears, or after start without an anchor."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(REPO / "train.py"), "fit", "--config", str(workdir / f"{config}.yaml"), f"--trainer.max_steps={steps}"]
    if resume:
        cmd.append("--ckpt_path=last")
    log_path = workdir / f"fit-{time.monotonic_ns()}.log"
    started = time.monotonic()
    anchored = None if anchor is not None else started
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
        sent = kill is None
        while process.poll() is None:
            now = time.monotonic()
            if anchored is None and (workdir / anchor).exists():
                anchored = now
            if not sent and anchored is not None and now - anchored >= kill[1]:
                process.send_signal(kill[0])
                sent = True
            time.sleep(0.01)
        returncode = process.wait(timeout=900)
    ended = time.monotonic()
    return Run(returncode, ended - started, log_path.read_text(), None if anchored is None else anchored - started)


def final_state(workdir: Path, config: str = "tiny_demo") -> dict:
    import torch

    return torch.load(workdir / checkpoint_folder(config) / "last.ckpt", map_location="cpu", weights_only=True)


def newest_checkpoint_step(workdir: Path, config: str = "tiny_demo") -> Optional[int]:
    """The generator step of the newest checkpoint in the run's folder (None: none written yet)."""
    import torch

    folder = workdir / checkpoint_folder(config)
    files = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime_ns) if folder.is_dir() else []
    return torch.load(files[-1], map_location="cpu", weights_only=True)["comat"]["generator_step"] if files else None


def differences(a: dict, b: dict) -> list[str]:
    """What differs between two checkpoints' training state (empty: bit-identical weights, optimizer states and
    generator step)."""
    import torch

    diffs = []
    if a["comat"]["generator_step"] != b["comat"]["generator_step"]:
        diffs.append(f"generator_step {a['comat']['generator_step']} != {b['comat']['generator_step']}")
    if a["state_dict"].keys() != b["state_dict"].keys():
        diffs.append("different weight names")
    diffs += [f"weight {k}" for k in a["state_dict"] if k in b["state_dict"] and not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    for i, (x, y) in enumerate(zip(a["optimizer_states"], b["optimizer_states"])):
        for key, state in x["state"].items():
            other = y["state"].get(key, {})
            diffs += [f"optimizer {i} state {key}.{name}" for name, v in state.items() if not torch.equal(v, other.get(name, torch.empty(0)))]
    return diffs


def trial(workdir: Path, steps: int, kill_signal: signal.Signals, at: float, config: str = "tiny_demo") -> dict:
    """One run killed ``at`` seconds after its log folder appeared, then resumed until finished; what happened."""
    write_config(workdir, config=config)
    killed = run_fit(workdir, steps, kill=(kill_signal, at), anchor=log_folder(config), config=config)
    written = newest_checkpoint_step(workdir, config)
    resumes = []
    for _ in range(3):  # a SIGTERM'd run exits at a step boundary; one resume should finish it
        resumed = run_fit(workdir, steps, resume=True, config=config)
        resumes.append(resumed.returncode)
        if resumed.returncode == 0:
            break
    folder = workdir / checkpoint_folder(config)
    step_files = sorted(p.name for p in folder.glob("*.ckpt")) if folder.is_dir() else []
    return {"signal": kill_signal.name, "at_seconds": round(at, 2), "killed_returncode": killed.returncode,
            "checkpointed_step_when_killed": written, "resume_returncodes": resumes,
            "stderr_tail": killed.log.strip().splitlines()[-1:] if killed.log.strip() else [], "checkpoint_files": step_files}  # fmt: skip


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default="tiny_demo", help="a tiny demo of configs/ (tiny_demo, tiny_demo_sd3, tiny_demo_flux)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/comat_kill_resume"))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "kill_resume.jsonl")
    args = parser.parse_args(argv)
    import shutil

    shutil.rmtree(args.workdir, ignore_errors=True)
    reference_dir = args.workdir / "reference"
    write_config(reference_dir, config=args.config)
    reference = run_fit(reference_dir, args.steps, anchor=log_folder(args.config), config=args.config)
    if reference.returncode != 0 or reference.anchor_seconds is None:
        print(reference.log[-3000:], file=sys.stderr)
        return 1
    expected = final_state(reference_dir, args.config)
    # Kill moments: uniform over the reference run's life after its log folder appears (set-up hooks, model
    # loading, every step, checkpoint writes, the final export), so that every kill lands inside `fit`.
    window = reference.seconds - reference.anchor_seconds
    print(f"reference: {args.steps} generator steps, {reference.seconds:.1f} s in all, {window:.1f} s after the log folder appeared")
    rng = random.Random(args.seed)
    results = []
    for i in range(args.trials):
        kill_signal = signal.SIGKILL if i % 2 == 0 else signal.SIGTERM
        at = rng.uniform(0.0, window)
        outcome = trial(args.workdir / f"trial{i}", args.steps, kill_signal, at, args.config)
        diffs = differences(expected, final_state(args.workdir / f"trial{i}", args.config)) if outcome["resume_returncodes"][-1:] == [0] else ["did not finish"]
        outcome["identical"] = not diffs
        outcome["differences"] = diffs[:5]
        results.append(outcome)
        print(f"trial {i}: {kill_signal.name} at {at:.1f} s -> exit {outcome['killed_returncode']} with step "
              f"{outcome['checkpointed_step_when_killed']} checkpointed, resumed {outcome['resume_returncodes']}: "
              f"{'identical' if not diffs else 'DIFFERENT: ' + '; '.join(diffs[:3])}", flush=True)  # fmt: skip
    identical = sum(r["identical"] for r in results)
    print(f"{identical}/{len(results)} killed-and-resumed runs ended bit-identical to the uninterrupted run")
    record = {
        "command": " ".join(["python", "benchmarks/kill_resume.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{platform.machine()} {os.cpu_count()} cores", "python": platform.python_version(),
        "config": args.config, "steps": args.steps, "reference_seconds": round(reference.seconds, 1), "kill_window_seconds": round(window, 1), "identical": identical, "trials": results,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as out:
        out.write(json.dumps(record) + "\n")
    print(f"appended to {args.out}")
    return 0 if identical == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
