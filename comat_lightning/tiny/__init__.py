"""Offline stand-in models built from configs (tiny://) and the shapes world's models (shapes://)."""
