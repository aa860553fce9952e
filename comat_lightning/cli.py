"""The command line: ``python train.py fit --config configs/demo.yaml`` (LightningCLI subcommands)."""

from __future__ import annotations

import os
import warnings

from lightning.pytorch.cli import LightningCLI

from comat_lightning.module import CoMatModule
from datamodules.prompts import PromptDataModule


class CoMatCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The datamodule reads the tokenizer of the model being trained to report over-long prompts.
        parser.link_arguments("model.pretrained_model", "data.tokenizer_model")


def main(args=None, run: bool = True) -> CoMatCLI:
    # Tokenizers' thread pool warns (and can deadlock) when DataLoader workers fork after first use.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The frozen models (VAE, text encoders, captioner) are in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    return CoMatCLI(
        CoMatModule,
        PromptDataModule,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        auto_configure_optimizers=False,  # the module owns its optimizers (manual optimization)
    )
