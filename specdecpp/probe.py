"""Choosing what runs fast on this machine by measuring it: the dtype of a draft that is a copy of its target, and
the dtype of a whole pair.

Which low-precision dtype steps fastest depends on the CPU (bf16 is native with AVX512-BF16 or AMX and emulated
without; fp16 likewise), and naming one by rule has been wrong before (a bf16 copy slower than its fp32 target on
Xeons without fast bf16). So `copy:auto` times one decode step of each candidate copy against the target's, and
`dtype: auto` times a speculative round (k draft steps and the target's (k + 1)-token verifying call, with the
engine's choice of products for that many rows) of the pair in each dtype; each keeps the fastest and remembers the
measurements per CPU (model name, cores and the instruction-set flags that decide it: `lowp.cpu_description`) and
models, so it is measured once per machine kind.
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
from .lowp import cpu_description, dtype_name, has_slow_linears, rows_products

CANDIDATES = (torch.bfloat16, torch.float16)  # a float32 copy is the target itself: never faster
PAIR_CANDIDATES = (torch.float32, torch.bfloat16, torch.float16)
PASSES = 4  # turns of the pair probe: each candidate's best of 4 rounds
ROUND_K = 4  # drafts in the timed round: about the best constant K of the sibling pair at T = 1 on Alpaca


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


def round_seconds(target: nn.Module, draft: nn.Module, k: int = ROUND_K, repeats: int = 1) -> float:
    """Wall time of one speculative round here: k one-token draft forwards and one (k + 1)-token target forward,
    each model computing those rows as the engine does (`lowp.rows_products`); best of `repeats` after a warm-up."""
    rows = (torch.arange(10, 11 + k, device=target.device) % target.config.vocab_size)[None]
    one = rows[:, :1]
    slow = has_slow_linears(target)

    def once() -> float:
        t0 = time.perf_counter()
        for _ in range(k):
            draft(input_ids=one)
        with rows_products(target, k + 1, slow):
            target(input_ids=rows)
        return time.perf_counter() - t0

    with torch.inference_mode():
        return min(once() for _ in range(repeats + 1))  # the warm-up call pays for kernel selection: never least


def choose_copy_dtype(target: nn.Module, model_name: str, cache_file: Path | None,
                      ratio: Callable[[nn.Module, nn.Module], float] | None = None) -> tuple[torch.dtype, dict]:
    """The fastest dtype for a copy of `target` as its draft on this CPU, and the measured step ratios
    (copy / target) of every candidate. Read from `cache_file` when this CPU and model were measured before."""
    def measure(dtype):
        return (ratio or draft_step_ratio)(target, copy.deepcopy(target).to(dtype))

    return _fastest(cache_file, model_name, CANDIDATES, measure)


def choose_pair_dtype(target: nn.Module, draft: nn.Module, names: str, cache_file: Path | None,
                      timer: Callable[[nn.Module, nn.Module], float] | None = None,
                      passes: int = PASSES) -> tuple[torch.dtype, dict]:
    """The dtype in which the fp32 pair (target, draft) runs a speculative round fastest on this CPU, and the measured
    seconds of a round in each candidate (best of `passes`). Read from `cache_file` when this CPU and pair were
    measured before. The candidates take turns, one round each per pass, so that a load which comes or goes while
    the probe runs slows every candidate alike instead of the ones measured last (all copies are held at once)."""
    pairs = {}

    def measure(dtype):
        if dtype not in pairs:
            pairs[dtype] = (target, draft) if dtype == torch.float32 else \
                (copy.deepcopy(target).to(dtype), copy.deepcopy(draft).to(dtype))
        return (timer or round_seconds)(*pairs[dtype])

    return _fastest(cache_file, names, PAIR_CANDIDATES, measure, passes)


def _fastest(cache_file: Path | None, name: str, candidates, measure: Callable[[torch.dtype], float],
             passes: int = 1):
    """The candidate dtype with the least measurement (best of `passes`, the candidates taking turns), and every
    measurement, for `name` on this CPU (cached)."""
    key = cache_key(name)
    cached = _read(cache_file)
    if key in cached:
        measured = cached[key]
    else:
        times = {dtype: [] for dtype in candidates}
        for _ in range(passes):
            for dtype in candidates:
                times[dtype].append(measure(dtype))
        measured = {dtype_name(dtype): min(t) for dtype, t in times.items()}
        if cache_file is not None:
            atomic.write_text(cache_file, json.dumps({**cached, key: measured}, indent=2))
    return getattr(torch, min(measured, key=measured.get)), measured


def cache_key(name: str) -> str:
    """What a measurement of `name` (a model, or a pair) is cached under: it and this CPU's description."""
    return f"{name} | {cpu_description()}"


def _read(cache_file: Path | None) -> dict:
    if cache_file is None or not cache_file.is_file():
        return {}
    try:
        return json.loads(cache_file.read_text())
    except ValueError:  # damaged: measured again and rewritten
        return {}
