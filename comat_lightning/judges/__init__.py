"""Frozen models that score or segment images: captioner, discriminator, mask providers, metrics."""
