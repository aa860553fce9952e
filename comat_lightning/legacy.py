"""Module paths of earlier releases, kept importable: a config or script that names ``comat_lightning.rollout.
EvenlySpacedSteps`` still works, with a warning naming the new place (better: the short name,
``comat_lightning.EvenlySpacedSteps``). An old module that was split looks each name up in its successors."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

# old module -> the modules its names now live in (first match wins)
MOVED: dict[str, tuple[str, ...]] = {
    "comat_lightning.rollout": ("comat_lightning.sampling.step_policies", "comat_lightning.sampling.denoising"),
    "comat_lightning.masks": ("comat_lightning.judges.masks", "comat_lightning.files.mask_files"),
    "comat_lightning.input_checks": ("comat_lightning.training.startup_checks", "comat_lightning.files.paths"),
    "comat_lightning.tiny_zoo": ("comat_lightning.tiny.zoo", "comat_lightning.tiny.tokenizers"),
    "comat_lightning.module": ("comat_lightning.training.module",),
    "comat_lightning.options": ("comat_lightning.training.options",),
    "comat_lightning.model_loading": ("comat_lightning.models.loading",),
    "comat_lightning.training_state": ("comat_lightning.runtime.checkpoint_state",),
    "comat_lightning.checkpoint_files": ("comat_lightning.runtime.checkpoint_files",),
    "comat_lightning.nonfinite": ("comat_lightning.runtime.nonfinite",),
    "comat_lightning.stop_signals": ("comat_lightning.runtime.stop_signals",),
    "comat_lightning.step_statistics": ("comat_lightning.runtime.step_statistics",),
    "comat_lightning.data_parallel": ("comat_lightning.runtime.data_parallel",),
    "comat_lightning.sharding": ("comat_lightning.models.sharding",),
    "comat_lightning.guided_sampling": ("comat_lightning.sampling.guided",),
    "comat_lightning.prediction": ("comat_lightning.sampling.prediction",),
    "comat_lightning.attention_capture": ("comat_lightning.attention.capture",),
    "comat_lightning.attention_summary": ("comat_lightning.attention.summary",),
    "comat_lightning.attention_guidance": ("comat_lightning.attention.concept_maps",),
    "comat_lightning.diffusion_model": ("comat_lightning.models.backbone",),
    "comat_lightning.adapters": ("comat_lightning.models.adapters",),
    "comat_lightning.lora_export": ("comat_lightning.models.lora_files",),
    "comat_lightning.captioner": ("comat_lightning.judges.captioner",),
    "comat_lightning.discriminator": ("comat_lightning.judges.discriminator",),
    "comat_lightning.grounded_sam": ("comat_lightning.judges.grounded_sam",),
    "comat_lightning.metrics": ("comat_lightning.judges.metrics",),
    "comat_lightning.prompt_parsing": ("comat_lightning.text.entities",),
    "comat_lightning.token_alignment": ("comat_lightning.text.token_alignment",),
    "comat_lightning.atomic_files": ("comat_lightning.files.atomic",),
    "comat_lightning.image_grids": ("comat_lightning.files.images",),
    "comat_lightning.real_latents": ("comat_lightning.tools.real_latents",),
    "comat_lightning.prepare_entities": ("comat_lightning.tools.prepare_entities",),
    "comat_lightning.tiny_detection_zoo": ("comat_lightning.tiny.detection_zoo",),
    "callbacks.loss_base": ("comat_lightning.training.losses",),
    "callbacks.graceful_stop": ("comat_lightning.runtime.graceful_stop",),
    "callbacks.progress": ("comat_lightning.runtime.progress",),
    "callbacks.attention_segregation": ("callbacks.astar_losses",),
}


def new_place(old: str) -> str:
    """Where an old dotted name (module or module.attribute) lives now, for messages."""
    for module, successors in MOVED.items():
        if old == module or old.startswith(module + "."):
            name = old[len(module) + 1 :]
            for successor in successors:
                if not name or hasattr(importlib.import_module(successor), name):
                    return f"{successor}.{name}" if name else successor
            return f"{successors[0]}.{name}"
    return old


class _LegacyModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        for successor in MOVED[self.__name__]:
            module = importlib.import_module(successor)
            if hasattr(module, name):
                value = getattr(module, name)
                home = getattr(value, "__module__", None) or successor  # where it is defined, not re-imported
                home = home if home.split(".")[0] in ("comat_lightning", "callbacks") else successor
                short = f"comat_lightning.{name}" if name in _short_names() else f"{home}.{name}"
                warnings.warn(f"{self.__name__}.{name} moved to {short}; please use that name", FutureWarning, stacklevel=2)
                return value
        raise AttributeError(f"{self.__name__} (now {', '.join(MOVED[self.__name__])}) has no attribute {name!r}")


def _short_names() -> dict:
    import comat_lightning

    return comat_lightning.SHORT_NAMES


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec):
        return _LegacyModule(spec.name)

    def exec_module(self, module):
        module.__doc__ = f"Moved: {', '.join(MOVED[module.__name__])}."


def install() -> None:
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
