"""Keeping a run alive and resumable: signals, non-finite guard, checkpoint state, progress, statistics."""
