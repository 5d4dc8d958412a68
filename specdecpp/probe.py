"""Choosing what runs fast on this machine by measuring it: the dtype of a draft that is a copy of its target.

Which low-precision dtype steps fastest depends on the CPU (bf16 is native with AVX512-BF16 or AMX and emulated
without; fp16 likewise), and naming one by rule has been wrong before (a bf16 copy slower than its fp32 target on
Xeons without fast bf16). So `copy:auto` times one cached decode step of each candidate copy against the target's,
keeps the fastest, and remembers the choice per CPU (model name, cores and the instruction-set flags that decide
it: `lowp.cpu_description`) and model, so it is measured once per machine kind.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from . import atomic
from .lowp import cpu_description

CANDIDATES = (torch.bfloat16, torch.float16)  # a float32 copy is the target itself: never faster


def draft_step_ratio(target: nn.Module, draft: nn.Module, tokens: int = 1, repeats: int = 5) -> float:
    """Measured time of one draft forward over the time of one target forward (`tokens` tokens, best of `repeats`
    after a warm-up call: a first call pays for kernel selection)."""
    ids = (torch.arange(10, 10 + tokens, device=target.device) % target.config.vocab_size)[None]

    def best(model):
        times = []
        with torch.inference_mode():
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                model(input_ids=ids)
                times.append(time.perf_counter() - t0)
        return min(times[1:])

    return best(draft) / best(target)


def choose_copy_dtype(target: nn.Module, model_name: str, cache_file: Path | None,
                      ratio: Callable[[nn.Module, nn.Module], float] | None = None) -> tuple[torch.dtype, dict]:
    """The fastest dtype for a copy of `target` as its draft on this CPU, and the measured step ratios
    (copy / target) of every candidate. Read from `cache_file` when this CPU and model were measured before."""
    key = f"{model_name} | {cpu_description()}"
    cached = _read(cache_file)
    if key in cached:
        ratios = cached[key]
    else:
        ratios = {}
        for dtype in CANDIDATES:
            candidate = copy.deepcopy(target).to(dtype)
            ratios[str(dtype).removeprefix("torch.")] = (ratio or draft_step_ratio)(target, candidate)
            del candidate
        if cache_file is not None:
            atomic.write_text(cache_file, json.dumps({**cached, key: ratios}, indent=2))
    best = min(ratios, key=ratios.get)
    return getattr(torch, best), ratios


def _read(cache_file: Path | None) -> dict:
    if cache_file is None or not cache_file.is_file():
        return {}
    try:
        return json.loads(cache_file.read_text())
    except ValueError:  # damaged: measured again and rewritten
        return {}
