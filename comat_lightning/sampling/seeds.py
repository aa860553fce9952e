"""Every noise seed of the framework, from one base seed (``model.seed``), in one place.

Each image draws from its own generator, so an image depends on its seed only, not on the batch or rank it is
sampled in (N data-parallel ranks draw what one process with N x the batch draws). Streams are kept apart by
offsets far above any index the rules below produce for base seeds < 10^6.
"""

from __future__ import annotations

SEED_STRIDE = 1_000_003  # between base seeds: prompt i of base seed s is s * SEED_STRIDE + i
STEP_STRIDE = 4099  # between generator steps: sample i (< 4099) of a step adds i
VALIDATION_OFFSET = 2**40  # validation and test rollouts: fixed per batch index, so curves are comparable
POLICY_OFFSET = 2**41  # the gradient-step policy's and capture steps' draws of a generator step
REAL_LATENT_OFFSET = 2**42  # on-the-fly real latents of fidelity preservation, per sample
CROP_OFFSET = 2**43  # concept matching's one crop offset per batch


def prompt_seed(base_seed: int, index: int) -> int:
    """The noise seed of prompt ``index`` of a prompt file (prediction, real latents)."""
    return base_seed * SEED_STRIDE + index


def step_seed(base_seed: int, generator_step: int) -> int:
    """The rollout seed of a generator step; sample i of the global batch adds its index i. A pure function of the
    step, so a resumed run draws the same noise."""
    return base_seed * SEED_STRIDE + generator_step * STEP_STRIDE


def validation_seed(base_seed: int, batch_index: int) -> int:
    """The rollout seed of validation / test batch ``batch_index``, outside the range training uses."""
    return base_seed + VALIDATION_OFFSET + batch_index * 1_000
