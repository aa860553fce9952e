"""The command line: ``python train.py fit --config configs/demo.yaml`` (LightningCLI subcommands)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from comat_lightning.training.module import CoMatModule
from datamodules.prompts import PromptDataModule


class CoMatCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The datamodule reads the tokenizer of the model being trained to report over-long prompts.
        parser.link_arguments("model.pretrained_model", "data.tokenizer_model")
        # Real latents in the data are checked against the latent size the model will generate.
        parser.link_arguments("model.sampler.resolution", "data.latent_resolution")

    def before_instantiate_classes(self) -> None:
        name_runs_after_config(self.config.get(self.subcommand) if self.subcommand else self.config)

    def before_fit(self) -> None:
        self._resolve_last_checkpoint("fit")

    def before_validate(self) -> None:
        self._resolve_last_checkpoint("validate")

    def before_test(self) -> None:
        self._resolve_last_checkpoint("test")

    def before_predict(self) -> None:
        self._resolve_last_checkpoint("predict")

    def _resolve_last_checkpoint(self, subcommand: str) -> None:
        """``--ckpt_path last``: the newest checkpoint in the run's checkpoint folder that loads. Lightning would take
        the newest ``last*.ckpt`` and fail on it if it is unreadable; we warn and take the previous good one."""
        config = self.config_init[subcommand]
        if config.get("ckpt_path") != "last":
            return
        from comat_lightning.runtime.checkpoint_files import checkpoint_folders, resume_path

        folders = checkpoint_folders(self.trainer)
        path = resume_path(folders)
        if path is None:
            where = ", ".join(str(f) for f in folders) or "(no ModelCheckpoint callback)"
            warnings.warn(f"--ckpt_path last: no loadable checkpoint in {where}; starting from the beginning", stacklevel=1)
        config["ckpt_path"] = str(path) if path is not None else None


def name_runs_after_config(config) -> None:
    """Runs are named after their (last) config file unless the config names them: a TensorBoard logger without
    a name logs to ``<save_dir>/<config stem>/version_N`` and a ModelCheckpoint without a dirpath writes to
    ``<save_dir>/<config stem>/checkpoints``, a fixed folder, so ``--ckpt_path last`` finds the run's last
    checkpoint from a new process. Two configs that differ only in their callbacks (an ablation) thus never share
    a checkpoint folder."""
    files = [f for f in (config.get("config") or []) if f]
    trainer = config.get("trainer")
    logger = trainer.get("logger") if trainer is not None else None
    if not files or not hasattr(logger, "class_path") or not str(logger.class_path).endswith("TensorBoardLogger"):
        return
    init = logger.init_args
    if init.get("name") in (None, "lightning_logs"):
        init.name = Path(str(files[-1])).stem
    for callback in trainer.get("callbacks") or []:
        if str(getattr(callback, "class_path", "")).endswith("ModelCheckpoint") and callback.init_args.get("dirpath") is None:
            callback.init_args.dirpath = str(Path(init.get("save_dir") or ".") / init.name / "checkpoints")


def main(args=None, run: bool = True) -> CoMatCLI:
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
        args=args,
        run=run,
        auto_configure_optimizers=False,  # the module owns its optimizers (manual optimization)
    )
