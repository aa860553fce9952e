"""Command-line tools around training: real latents for fidelity preservation, entity preparation."""
