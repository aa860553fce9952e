"""Model FLOPs with ``torch.utils.flop_counter``, attention on CPU included.

``FlopCounterMode`` knows the GPU attention kernels (flash, memory-efficient, cuDNN) but not the one that
``F.scaled_dot_product_attention`` runs on CPU (``_scaled_dot_product_flash_attention_for_cpu``), so on CPU, and in
a shape-only run on fake CPU tensors, every SDPA call counted 0 FLOPs. These formulas give the CPU kernel the same
count as the GPU kernels (PyTorch's own ``sdpa_flop_count``), so a step counts the same FLOPs on either device.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


def _cpu_attention_flop(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)  # shapes (batch, heads, tokens, head dim)


def _cpu_attention_backward_flop(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


CPU_ATTENTION = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flop,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flop,
}


def flop_counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION)


# PyTorch's formulas merged with the CPU attention ones by FlopCounterMode itself (op packet -> formula taking the
# op's arguments and ``out_val``), so that op_flops counts exactly what a flop_counter() counts
FORMULAS = flop_counter().flop_registry


def op_flops(func, args, kwargs, out) -> int:
    """FLOPs of one dispatched op (``func`` an ``OpOverload``), as ``flop_counter()`` counts them; 0 for ops
    without a formula (elementwise ops, norms: FLOP counts follow the matmuls and convolutions)."""
    formula = FORMULAS.get(func._overloadpacket)
    return formula(*args, **kwargs, out_val=out) if formula is not None else 0


__all__ = ["CPU_ATTENTION", "flop_counter", "op_flops"]
