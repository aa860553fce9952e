"""The command line: ``python train.py fit --config configs/demo.yaml`` (LightningCLI subcommands)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

from lightning.pytorch.cli import LightningCLI

from comat_lightning.command_errors import full_traceback_wanted, short_report
from comat_lightning.training.module import CoMatModule
from datamodules.prompts import PromptDataModule


class CoMatCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The datamodule reads the tokenizer of the model being trained to report over-long prompts.
        parser.link_arguments("model.pretrained_model", "data.tokenizer_model")
        # Real latents in the data are checked against the latent size the model will generate.
        parser.link_arguments("model.sampler.resolution", "data.latent_resolution")

    def parse_arguments(self, parser, args) -> None:
        try:
            super().parse_arguments(parser, args)
        except argparse.ArgumentError as error:
            error.option_names = option_names(parser, args)  # for "did you mean ...?" in the short report
            raise

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        self._resume_from = name_runs_after_config(config, resume=config.get("ckpt_path") == "last")

    def before_fit(self) -> None:
        self._resolve_last_checkpoint("fit")
        log_dir = self.trainer.log_dir if self.trainer.logger is not None else None
        if log_dir is not None:
            from comat_lightning.runtime.run_folders import DiscardFailedStart

            self.trainer.callbacks.append(DiscardFailedStart(Path(log_dir)))

    def before_validate(self) -> None:
        self._resolve_last_checkpoint("validate")

    def before_test(self) -> None:
        self._resolve_last_checkpoint("test")

    def before_predict(self) -> None:
        self._resolve_last_checkpoint("predict")

    def _resolve_last_checkpoint(self, subcommand: str) -> None:
        """``--ckpt_path last``: the newest checkpoint of the run that loads (found when the run folder was chosen,
        else in the checkpoint folders). Lightning would take the newest ``last*.ckpt`` and fail on it if it is
        unreadable; we warn and take the previous good one."""
        config = self.config_init[subcommand]
        if config.get("ckpt_path") != "last":
            return
        from comat_lightning.runtime.checkpoint_files import checkpoint_folders, resume_path

        folders = checkpoint_folders(self.trainer)
        path = getattr(self, "_resume_from", None) or resume_path(folders)
        if path is None:
            where = ", ".join(str(f) for f in folders) or "(no ModelCheckpoint callback)"
            warnings.warn(f"--ckpt_path last: no loadable checkpoint in {where}; starting from the beginning", stacklevel=1)
        config["ckpt_path"] = str(path) if path is not None else None


SUBCOMMANDS = ("fit", "validate", "test", "predict")


def name_runs_after_config(config, resume: bool = False) -> Optional[Path]:
    """One run, one folder (comat_lightning/runtime/run_folders.py). With a TensorBoard logger:

    - a logger without a name logs under ``<save_dir>/<config stem>``: two configs that differ only in their
      callbacks (an ablation) never share a folder;
    - a logger without a version gets one here: the next free ``version_N`` for a new run; for ``--ckpt_path
      last`` (``resume``), the version whose checkpoint is resumed, so the resumed run continues in the same
      folder and TensorBoard shows one run;
    - a ModelCheckpoint without a dirpath writes to ``version_N/checkpoints``: different runs of one config never
      mix their checkpoints.

    Returns the checkpoint to resume from when ``resume`` found one (else None)."""
    files = [f for f in (config.get("config") or []) if f]
    trainer = config.get("trainer")
    logger = trainer.get("logger") if trainer is not None else None
    if not hasattr(logger, "class_path") or not str(logger.class_path).endswith("TensorBoardLogger"):
        return None
    from comat_lightning.runtime.run_folders import next_version, resume_version

    init = logger.init_args
    if init.get("name") in (None, "lightning_logs"):
        init.name = Path(str(files[-1])).stem if files else "lightning_logs"
    run_root = Path(init.get("save_dir") or ".") / str(init.name)
    resume_from = None
    if init.get("version") is None:
        version, resume_from = resume_version(run_root.absolute()) if resume else (None, None)
        init.version = version if version is not None else next_version(run_root)
    version = init.version
    run_dir = run_root / (version if isinstance(version, str) else f"version_{version}")
    for callback in trainer.get("callbacks") or []:
        if str(getattr(callback, "class_path", "")).endswith("ModelCheckpoint") and callback.init_args.get("dirpath") is None:
            callback.init_args.dirpath = str(run_dir / "checkpoints")
    return resume_from


def option_names(parser, args) -> list[str]:
    """Every ``--option`` of the subcommand being parsed (``fit``, ...), or of the top-level parser."""
    argv = list(args) if isinstance(args, (list, tuple)) else sys.argv[1:]
    subcommands = getattr(getattr(parser, "_subcommands_action", None), "choices", None) or {}
    chosen = next((subcommands[a] for a in argv if a in subcommands), parser)
    return [o for action in chosen._actions for o in action.option_strings if o.startswith("--")]


# Third-party messages that are harmless for this project, by the logger that emits them. Silenced only by the
# entry point (command_line), never by library code: a user embedding the package keeps them.
KNOWN_NOISE = {
    "lightning.pytorch.utilities.rank_zero": (
        "💡 Tip:",  # litlogger / litmodels advertisements
        "will override existing callbacks passed to Trainer: RichProgressBar",  # the module brings its own bar
    ),
    "transformers.utils.import_utils": ("requires torchvision (not installed)",),  # the PIL processors are used
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),  # optional CPU kernels package
}


def quiet_startup() -> None:
    """Silence :data:`KNOWN_NOISE` and known-harmless deprecation warnings of our dependencies (once)."""
    if getattr(quiet_startup, "done", False):
        return
    quiet_startup.done = True
    for name, starts in KNOWN_NOISE.items():
        logging.getLogger(name).addFilter(lambda record, starts=starts: not any(s in record.getMessage() for s in starts))
    # Per-file "Loading weights" / "Writing model shards" bars of transformers and the hub: the run's own bar and
    # log lines say what happens; these would interleave with them.
    import huggingface_hub.utils
    import transformers.utils.logging

    huggingface_hub.utils.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    # torch's pytree deprecates LeafSpec isinstance checks that Lightning still makes; nothing for us to change.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)


def command_line(argv: list[str] | None = None) -> None:
    """``python train.py ...``: :func:`main`, with configuration and input errors reported in a few lines (the
    option, file:line or class path, and the closest valid name) and exit status 2 instead of a traceback and a
    usage dump. ``COMAT_TRACEBACK=1`` keeps the full traceback."""
    given, argv = argv, sys.argv[1:] if argv is None else argv
    quiet_startup()
    try:
        main(args=given, exit_on_error=False)
    except Exception as error:  # noqa: BLE001 - reported briefly only if it is the user's to fix
        report = None if full_traceback_wanted() else short_report(error, argv, getattr(error, "option_names", None))
        if report is None:
            raise
        print(report, file=sys.stderr)
        raise SystemExit(2) from None


def main(args=None, run: bool = True, exit_on_error: bool = True) -> CoMatCLI:
    # Tokenizers' thread pool warns (and can deadlock) when DataLoader workers fork after first use.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The frozen models (VAE, text encoders, captioner) are in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    # Checkpoints are taken after the generator step's update on purpose (a resume continues from there).
    warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization and every_n_train_steps.*")
    return CoMatCLI(
        CoMatModule,
        PromptDataModule,
        save_config_kwargs={"overwrite": True},
        # exit_on_error=False: a parse error is raised (argparse.ArgumentError) for command_line() to report.
        parser_kwargs={"exit_on_error": exit_on_error, **{c: {"exit_on_error": exit_on_error} for c in SUBCOMMANDS}},
        args=args,
        run=run,
        auto_configure_optimizers=False,  # the module owns its optimizers (manual optimization)
    )
