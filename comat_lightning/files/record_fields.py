"""The fields of a prompt record (one JSONL line; a .txt line is ``{"prompt": line}``) and of the batches the
datamodule makes from records (each field a list over the batch). One name each, used by every reader and writer."""

from __future__ import annotations

PROMPT = "prompt"  # the text to generate (required)
ENTITIES = "entities"  # hand-written entities for attribute concentration (else the spaCy parse)
MASKS = "masks"  # {noun phrase: mask} for JsonlMasks (attribute concentration)
LATENT = "latent"  # {"file", "index"}: the real latent of fidelity preservation, in a safetensors shard
LATENT_SEED = "latent_seed"  # the seed the real latent was sampled with (written by tools.real_latents)
REAL_LATENT = "real_latent"  # in a batch: the loaded real latent (B, C, h, w)
CONCEPTS = "concepts"  # guidance: words of the prompt to strengthen
TOKEN_INDICES = "token_indices"  # guidance: token positions instead of concept words
LAYOUT = "layout"  # guidance: {concept: mask} replacing A-STAR's retention targets
SEED = "seed"  # prediction: the image's noise seed
INDEX = "index"  # prediction: the record's 0-based position in its file (image names and default seeds)
