"""Shape-only execution: a full-size training step's memory and FLOPs on a machine without the GPU it is meant for.

A step's peak memory and FLOPs follow from tensor shapes and dtypes, not values. PyTorch's ``FakeTensorMode``
runs every operator's shape, dtype and aliasing logic without computing anything, so the real training step
(the module's ``training_step`` under the real Trainer, with its autocast, checkpointing, LoRA and losses) can run
at SDXL size in minutes on a laptop CPU. :class:`ShapeOnlyExecution` sits above the fake mode and:

- runs ops whose inputs are all real tensors for real (tokenisation, scheduler tables, seeds, layout masks): they
  are tiny, and keeping them real keeps data-dependent control flow (e.g. a scheduler's timestep lookup) exact;
- answers a read of a fake scalar with a nominal value (``True`` for a finiteness check, 1 for numbers): the
  step takes its normal path (no NaN skip) and only logged figures are affected;
- counts the bytes of every storage an op creates until it is freed, rounded up to 512 bytes as the CUDA caching
  allocator does, labelled by the model that made it (forward or backward pass), and keeps the breakdown at the
  peak.

Models too large for the machine that runs this (SD3.5-Medium with T5-XXL, FLUX.1-dev) never load for real: their
pipeline folders hold configs only, and ``full_size_models.fake_loading`` builds them as fake tensors of the fit's
own fake mode (``ShapeOnlyFit(fake_mode=...)``); a tiny pipeline loaded both ways gives the same figures.

What it does not see: the CUDA context and kernels' workspaces (about 0.5 GiB), the caching allocator's reserved
but free blocks (fragmentation), and CUDA-only autocast rules (the step runs under CPU autocast, whose bf16 op
lists differ from CUDA's in a few ops). It estimates ``torch.cuda.max_memory_allocated``; it does not measure it.
"""

from __future__ import annotations

import collections
import functools
import warnings
import weakref
from typing import Callable, Optional

import torch
from lightning.pytorch import Callback
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from benchmarks.flop_counting import flop_counter, op_flops

_CUDA_BLOCK = 512  # the caching allocator's smallest block: every allocation is rounded up to a multiple of it
_NOMINAL = {bool: True, int: 1, float: 1.0}


def _has_storage(value) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type != "meta"


def allocated_bytes(storage: torch.UntypedStorage) -> int:
    return allocated_bytes_of(storage.nbytes())


def allocated_bytes_of(nbytes: int) -> int:
    """``nbytes`` rounded up to the caching allocator's 512-byte blocks."""
    return -(-nbytes // _CUDA_BLOCK) * _CUDA_BLOCK


class ShapeOnlyExecution(TorchDispatchMode):
    """Enter after (inside) a ``FakeTensorMode(allow_non_fake_inputs=True)``. ``live`` / ``peak`` are bytes of
    storages created since entering; ``at_peak`` maps (model, pass) -> bytes live at the peak."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.at_peak: dict[tuple[str, str], int] = {}
        self.nominal_reads: collections.Counter = collections.Counter()
        self._live_by: collections.Counter = collections.Counter()
        self._seen = WeakIdKeyDictionary()
        self._models: list[str] = []
        self._hooks: list = []
        self._labelled: set = set()  # modules already hooked, each under one name
        self.flops_by: collections.Counter = collections.Counter()  # (model, pass) -> FLOPs, as flop_counter() counts
        self._snapshot_at = 0

    def reset_peak(self) -> None:
        self.peak, self._snapshot_at, self.at_peak = self.live, 0, {}

    def label_model(self, module: nn.Module, name: str) -> None:
        """Allocations made inside a forward of ``module`` or of any of its submodules carry ``name``. Hooking every
        submodule, not only the root, also labels calls that bypass the root's ``forward`` (``vae.decode`` runs
        ``vae.decoder``) and checkpointed blocks re-run in backward. A submodule that an earlier-labelled model
        owns keeps that label (a loss that reuses the UNet does not relabel it). The hooks are removed when the
        mode is exited."""
        def enter(*_) -> None:
            self._models.append(name)

        def leave(*_) -> None:  # returns None: a forward hook's return value would replace the output
            self._models.pop()

        for sub in module.modules():
            if sub not in self._labelled:
                self._labelled.add(sub)
                self._hooks += [sub.register_forward_pre_hook(enter), sub.register_forward_hook(leave, always_call=True)]

    def __exit__(self, *exc):
        while self._hooks:
            self._hooks.pop().remove()
        self._labelled.clear()
        return super().__exit__(*exc)

    def _free(self, nbytes: int, key: tuple[str, str]) -> None:
        self.live -= nbytes
        self._live_by[key] -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = tree_flatten((args, kwargs))[0]
        fake = any(isinstance(t, FakeTensor) for t in inputs)
        if fake and func is torch.ops.aten._local_scalar_dense.default:
            kind = {torch.bool: bool}.get(inputs[0].dtype, float if inputs[0].is_floating_point() else int)
            self.nominal_reads[kind.__name__] += 1
            return _NOMINAL[kind]
        if fake:
            out = func(*args, **kwargs)
        else:
            with unset_fake_temporarily():
                out = func(*args, **kwargs)
        key = (self._models[-1] if self._models else "other", "backward" if torch._C._current_graph_task_id() != -1 else "forward")
        self.flops_by[key] += op_flops(func, args, kwargs, out)
        # An output that shares an input's storage (a view such as a weight's ``t()`` in ``linear``, an in-place op)
        # allocated nothing, even when that storage predates the tracking (the weights): it is not counted.
        input_storages = {t.untyped_storage()._cdata for t in inputs if _has_storage(t)}
        for tensor in tree_flatten(out)[0]:
            if _has_storage(tensor):
                storage = tensor.untyped_storage()
                if storage._cdata not in input_storages and storage not in self._seen:
                    nbytes = allocated_bytes(storage)
                    self._seen[storage] = nbytes
                    self.live += nbytes
                    self._live_by[key] += nbytes
                    weakref.finalize(storage, self._free, nbytes, key)
        if self.live > self.peak:
            self.peak = self.live
            if self.live > self._snapshot_at * 1.005:  # a copy per 0.5 % of growth, not per op
                self._snapshot_at = self.live
                self.at_peak = {k: v for k, v in self._live_by.items() if v > 0}
        return out


def fake_weights(module: nn.Module, fake_mode: FakeTensorMode) -> Callable[[], None]:
    """Replace every parameter and buffer of ``module`` by a fake copy (same shape, dtype, requires_grad) and
    return a function that puts the real ones back."""
    originals: list[tuple[dict, str, torch.Tensor]] = []
    for sub in module.modules():
        for table in (sub._parameters, sub._buffers):
            for name, tensor in list(table.items()):
                if tensor is None or isinstance(tensor, FakeTensor):
                    continue
                originals.append((table, name, tensor))
                copy = fake_mode.from_tensor(tensor.detach())
                table[name] = nn.Parameter(copy, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else copy

    def restore() -> None:
        for table, name, tensor in originals:
            table[name] = tensor

    return restore


def weight_bytes(module: Optional[nn.Module], trainable: Optional[bool] = None, seen: Optional[set] = None) -> int:
    """Bytes of ``module``'s parameters and buffers (``trainable``: only parameters that do / do not require grad);
    a storage already in ``seen`` (shared with a model counted before) is not counted again. Fake tensors (models
    loaded by ``full_size_models.fake_loading``) count the bytes their real storage would take; storages are told
    apart by their storage object, not their data pointer (0 for every fake one)."""
    if module is None:
        return 0
    seen = set() if seen is None else seen
    tensors = list(module.parameters()) + ([] if trainable is not None else list(module.buffers()))
    total = 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if (trainable is None or tensor.requires_grad == trainable) and storage._cdata not in seen:
            seen.add(storage._cdata)
            total += allocated_bytes(storage)
    return total


class ShapeOnlyFit(Callback):
    """Makes a ``trainer.fit`` of two generator steps shape-only. The models load for real (``configure_model``);
    at the first batch their weights become fake and the optimizers are rebuilt over them. Step 0 counts FLOPs
    (``flop_counter()``, a ``FlopCounterMode``; it keeps backward tensors alive, so it never overlaps the memory
    count); step 1, with the optimizer state step 0 created, is the memory count. The real weights are put back when
    training ends.

    ``result`` then holds: ``weights`` (bytes by model, before the step), ``peak_dynamic_bytes`` (tensors the step
    creates, optimizer state included), ``at_peak`` (that figure by (model, pass)), ``flops`` (step 0),
    ``flops_by`` (step 0's by (model, pass)), ``nominal_reads``.

    ``fake_mode``: the FakeTensorMode to run in; it must be the one whose fake tensors some models were loaded with
    (``full_size_models.fake_loading``: models too large to load for real), as fake tensors of two modes do not
    mix. Such weights stay fake after the fit (there is nothing real to put back)."""

    def __init__(self, fake: bool = True, fake_mode: Optional[FakeTensorMode] = None):
        self.fake = fake  # False: the same accounting over real execution (to check the fake run against)
        self.fake_mode = fake_mode
        self.result: dict = {}
        self._contexts: list = []
        self._restore: Optional[Callable[[], None]] = None
        self._tracker: Optional[ShapeOnlyExecution] = None

    def setup(self, trainer, pl_module, stage):
        # Weights loaded fake (fake_loading) cannot go through ``Module.to``: PyTorch swaps fake parameters, and
        # refuses to swap a tensor that the fake mode's memo refers to weakly. Lightning moves the module to its
        # device after configure_model and back to the CPU at teardown; on the CPU both are no-ops for the fake
        # ones, so they are hidden from those two calls (the real tensors still move).
        strategy = trainer.strategy
        for name in ("model_to_device", "teardown"):
            setattr(strategy, name, functools.partial(_fake_tensors_hidden, getattr(strategy, name), pl_module))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.generator_step == 0:
            self.result["weights"] = model_weights(pl_module)
            self._tracker = ShapeOnlyExecution()
            for name, module in labelled_models(pl_module).items():
                self._tracker.label_model(module, name)
            if self.fake:
                fake_mode = self.fake_mode or FakeTensorMode(allow_non_fake_inputs=True)
                self._restore = fake_weights(pl_module, fake_mode)
                self._enter(fake_mode, warnings.catch_warnings())
                with fake_mode:
                    optimizers, _ = pl_module.configure_optimizers()
                self._real_optimizers = trainer.strategy.optimizers
                trainer.strategy.optimizers = optimizers  # Lightning's wrappers and toggling follow the fake weights
                # The step's schedulers still point at the real optimizers, which never step: PyTorch's warning
                # about the call order is expected here (silenced until the run ends).
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            self._enter(self._tracker)
            self._flops = flop_counter()
            self._enter(self._flops)
        else:
            self._tracker.reset_peak()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.generator_step == 1:
            self._exit()  # the FLOP counter only
            self.result.update(flops=self._flops.get_total_flops(), flops_by=dict(self._tracker.flops_by))
        else:
            tracker = self._tracker
            self.result.update(peak_dynamic_bytes=tracker.peak, at_peak=tracker.at_peak, nominal_reads=dict(tracker.nominal_reads))
            optimizers = trainer.strategy.optimizers
            self.result.update(optimizer_state_bytes=sum(optimizer_state_bytes(o) for o in optimizers),
                               optimizer_params=[[p.numel() for g in o.param_groups for p in g["params"]] for o in optimizers])  # fmt: skip

    def on_exception(self, trainer, pl_module, exception):
        self.on_train_end(trainer, pl_module)  # real weights back, so that Lightning's teardown can move them

    def on_train_end(self, trainer, pl_module):
        while self._contexts:
            self._exit()
        if self._restore is not None:
            self._restore()
            self._restore = None
            trainer.strategy.optimizers = self._real_optimizers

    def _enter(self, *contexts) -> None:
        for context in contexts:
            context.__enter__()
            self._contexts.append(context)

    def _exit(self) -> None:
        self._contexts.pop().__exit__(None, None, None)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in ``optimizer``'s state (each storage once)."""
    storages = {t.untyped_storage()._cdata: t.untyped_storage() for state in optimizer.state.values() for t in state.values()
                if isinstance(t, torch.Tensor)}  # fmt: skip
    return sum(allocated_bytes(storage) for storage in storages.values())


_BNB_BLOCK, _BNB_MIN_8BIT = 256, 4096  # bitsandbytes' blockwise quantisation block and its min_8bit_size default


def adamw8bit_state_bytes(numels: list[int]) -> int:
    """CUDA bytes of bitsandbytes' ``AdamW8bit`` state for parameters of ``numels`` elements: per
    tensor of at least 4096 elements two uint8 states and two fp32 absmax vectors (one value per 256 elements);
    smaller tensors keep two fp32 states; plus the two shared 256-entry quantisation maps. Its ``step`` is a Python
    int (no tensor)."""
    total = 2 * allocated_bytes_of(256 * 4)
    for numel in numels:
        if numel < _BNB_MIN_8BIT:
            total += 2 * allocated_bytes_of(4 * numel)
        else:
            total += 2 * allocated_bytes_of(numel) + 2 * allocated_bytes_of(4 * -(-numel // _BNB_BLOCK))
    return total


def _fake_tensors_hidden(call: Callable[[], None], module: nn.Module) -> None:
    """``call()`` with every fake parameter and buffer of ``module`` set to None in its module's table (the order of
    the tables is kept), then put back."""
    hidden = []
    for sub in module.modules():
        for table in (sub._parameters, sub._buffers):
            for name, tensor in table.items():
                if isinstance(tensor, FakeTensor):
                    hidden.append((table, name, tensor))
    for table, name, _ in hidden:
        table[name] = None
    try:
        call()
    finally:
        for table, name, tensor in hidden:
            table[name] = tensor


def labelled_models(module) -> dict[str, nn.Module]:
    """The models of a CoMatModule by name: UNet, VAE, text encoders and each loss's helper."""
    backbone = module.backbone
    models = {"unet": backbone.unet, "vae": backbone.vae}
    models.update({f"text_encoder_{i}": encoder for i, encoder in enumerate(backbone.text_encoders)})
    models.update(dict(module.loss_modules.items()))
    return models


def model_weights(module) -> dict[str, int]:
    """Bytes of weights and buffers by model, each storage once (a helper that reuses the UNet adds only its own
    weights); the UNet split into its trainable part (LoRA) and its frozen base."""
    models, seen = labelled_models(module), set()
    unet = models.pop("unet")
    weights = {"unet (trainable)": weight_bytes(unet, True, seen), "unet (frozen)": weight_bytes(unet, False, seen)}
    weights.update({name: weight_bytes(model, seen=seen) for name, model in models.items()})
    weights["other"] = weight_bytes(module, seen=seen)
    return weights


__all__ = ["ShapeOnlyExecution", "ShapeOnlyFit", "adamw8bit_state_bytes", "allocated_bytes", "allocated_bytes_of", "fake_weights", "labelled_models",
           "model_weights", "optimizer_state_bytes", "weight_bytes"]
