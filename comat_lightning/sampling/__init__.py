"""Denoising: the differentiable rollout, gradient-step policies, test-time guidance and prediction."""
