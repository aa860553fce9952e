"""Prompt-only datamodules."""

from datamodules.prompts import PromptDataModule, PromptFileError, read_prompt_file

__all__ = ["PromptDataModule", "PromptFileError", "read_prompt_file"]
