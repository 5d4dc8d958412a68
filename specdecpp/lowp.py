"""Batched forwards of a bfloat16/float16 model on a CPU without native kernels for those types.
A CPU with AVX512-BF16 or AMX-BF16 has them for bf16 (AVX512-FP16 or AMX-FP16 for fp16): there a bf16 model runs
its own kernels everywhere (on a 2-core AMD EPYC with AVX512-BF16 a bare bf16 forward of 9 tokens costs about
1.2 one-token steps, the fp32 products 2.2 fp32 steps, docs/qwen-pair-check-avx512bf16.md).

On an AVX2 CPU (no AVX512-BF16/AMX) PyTorch's bf16 matrix products are about 5x slower than fp32 ones, while a
one-row decode step (a matrix-vector product, bound by reading the weights) is faster in bf16. Teacher-forced
passes (training-data preparation, head training, replay traces) are matrix products, so `fp32_linears` runs a
low-precision model's `nn.Linear` layers as fp32 products of the same bf16/fp16 values with the output rounded
back to the model's dtype. That is what the native kernels compute too (fp32 accumulation, one rounding), up to
the order of summation: outputs differ by one rounding step in about 1e-4 of entries, as the native batched and
one-row kernels differ from each other. Everything else (norms, attention, activations) runs as before.

The fp32 copies are made on first use and kept with the model (refreshed when a weight changes): the memory of an
fp32 copy of the model's linear weights, for as long as the model lives, instead of a conversion (0.35-0.5 s for
the embedded 135M draft) at every entry. The engine (`rows_products`) switches to fp32 products for forwards of
`FP32_FROM_ROWS` or more token rows (a prompt's prefill, a batch of 8), where they are faster.
"""

from __future__ import annotations

import functools
import os
import platform
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

LOW_PRECISION = (torch.bfloat16, torch.float16)
DTYPE_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16")  # what makes a dtype fast


NATIVE_FLAGS = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}


def _cpuinfo() -> list[str]:
    return Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's instruction-set flags (Linux /proc/cpuinfo; none elsewhere)."""
    return frozenset(next((line.split(":", 1)[1].split() for line in _cpuinfo() if line.startswith("flags")), []))


def native_kernels(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies `dtype` matrices natively (fast many-row products), not by emulation."""
    return bool(cpu_flags() & set(NATIVE_FLAGS.get(dtype, ())))


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16" for torch.bfloat16: how records, caches and heads name a dtype."""
    return str(dtype).removeprefix("torch.")


def cpu_description() -> str:
    """The CPU a timing came from: model name, cores, and the instruction-set flags that decide which dtype is fast
    on it (every measured number names it)."""
    name = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")),
                platform.processor() or platform.machine())
    return f"{name}, {os.cpu_count()} cores, {' '.join(f for f in DTYPE_FLAGS if f in cpu_flags()) or 'no AVX2'}"
FP32_FROM_ROWS = 8  # embedded bf16 draft, 2-core CPU (docs/rows-bench.md): 8 rows 75 ms either way, 16 rows
# 133 native vs 91 fp32, 64 rows 471 vs 217


def _fp32_linear(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", enabled=False):  # under bf16 autocast the product would be cast back down
        return nn.functional.linear(x.float(), weight, bias).to(x.dtype)


def _slow_on_cpu(module: nn.Module) -> bool:
    """A low-precision Linear on a CPU without native kernels for its dtype, not sharded (FSDP gathers a layer's
    weights only inside its forward)."""
    if not isinstance(module, nn.Linear):
        return False
    w = module.weight
    return (w.dtype in LOW_PRECISION and w.device.type == "cpu" and not native_kernels(w.dtype)
            and not hasattr(w, "placements"))


def _fp32_copy(model: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """The fp32 copy of `weight` kept on `model`, made again if the weight changed (in place or replaced)."""
    copies = model.__dict__.setdefault("_fp32_copies", {})  # id -> (weight, version, copy); not in state_dict
    held = copies.get(id(weight))
    if held is None or held[0] is not weight or held[1] != weight._version:
        held = copies[id(weight)] = (weight, weight._version, weight.detach().float())
    return held[2]


def has_slow_linears(model: nn.Module) -> bool:
    return any(map(_slow_on_cpu, model.modules()))


@contextmanager
def fp32_linears(model: nn.Module):
    """Inside: the model's low-precision `nn.Linear` layers on the CPU compute in fp32 (see the module docstring);
    every other layer, and any model without such layers, runs as before. Restored on exit. For inference only:
    the fp32 weights are copies (kept with the model for the next entry)."""
    patched = []
    for module in model.modules():
        if _slow_on_cpu(module):
            w = _fp32_copy(model, module.weight)
            b = None if module.bias is None else module.bias.detach().float()
            module.forward = lambda x, w=w, b=b: _fp32_linear(w, b, x)
            patched.append(module)
    used = {id(m.weight) for m in patched}
    for key in [k for k in model.__dict__.get("_fp32_copies", {}) if k not in used]:  # weights no longer there
        del model.__dict__["_fp32_copies"][key]
    try:
        yield model
    finally:
        for module in patched:
            del module.forward  # back to the class's forward


def rows_products(model: nn.Module, rows: int, slow: bool):
    """The engine's choice for one forward of `rows` token rows: fp32 products for a model with slow linears
    (`slow`, from `has_slow_linears`) from FP32_FROM_ROWS rows on, the model's own kernels otherwise."""
    return fp32_linears(model) if slow and rows >= FP32_FROM_ROWS else nullcontext()
