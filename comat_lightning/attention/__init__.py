"""Cross-attention maps: capture during a rollout, step-averaged summaries, concept-map maths."""
