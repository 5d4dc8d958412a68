"""Batched forwards of a bfloat16/float16 model on a CPU without native kernels for those types.

On an AVX2 CPU (no AVX512-BF16/AMX) PyTorch's bf16 matrix products are about 5x slower than fp32 ones, while a
one-row decode step (a matrix-vector product, bound by reading the weights) is faster in bf16. Teacher-forced
passes (training-data preparation, head training, replay traces) are matrix products, so `fp32_linears` runs a
low-precision model's `nn.Linear` layers as fp32 products of the same bf16/fp16 values with the output rounded
back to the model's dtype. That is what the native kernels compute too (fp32 accumulation, one rounding), up to
the order of summation: outputs differ by one rounding step in about 1e-4 of entries, as the native batched and
one-row kernels differ from each other. Everything else (norms, attention, activations) runs as before.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

LOW_PRECISION = (torch.bfloat16, torch.float16)


def _fp32_linear(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", enabled=False):  # under bf16 autocast the product would be cast back down
        return nn.functional.linear(x.float(), weight, bias).to(x.dtype)


def _slow_on_cpu(module: nn.Module) -> bool:
    """A low-precision Linear on the CPU, not sharded (FSDP gathers a layer's weights only inside its forward)."""
    if not isinstance(module, nn.Linear):
        return False
    w = module.weight
    return w.dtype in LOW_PRECISION and w.device.type == "cpu" and not hasattr(w, "placements")


@contextmanager
def fp32_linears(model: nn.Module):
    """Inside: the model's low-precision `nn.Linear` layers on the CPU compute in fp32 (see the module docstring);
    every other layer, and any model without such layers, runs as before. Restored on exit. For inference only:
    the fp32 weights are copies."""
    patched = []
    copies: dict[int, torch.Tensor] = {}  # tied weights (embedding / LM head) converted once
    for module in model.modules():
        if _slow_on_cpu(module):
            w = copies.setdefault(id(module.weight), module.weight.detach().float())
            b = None if module.bias is None else module.bias.detach().float()
            module.forward = lambda x, w=w, b=b: _fp32_linear(w, b, x)
            patched.append(module)
    try:
        yield model
    finally:
        for module in patched:
            del module.forward  # back to the class's forward
