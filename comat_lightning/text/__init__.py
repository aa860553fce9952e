"""Prompts as entities (spaCy parse) and their positions among the text encoder's tokens."""
