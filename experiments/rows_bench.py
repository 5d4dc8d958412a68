"""One forward of m new token rows after a 100-token cached context, the bf16 draft with its own kernels against
fp32 products of the same values (lowp.fp32_linears, copies already made): where `lowp.FP32_FROM_ROWS` comes from.

    python experiments/rows_bench.py --out docs/rows-bench.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _report import report
from transformers import DynamicCache

from specdecpp.lowp import fp32_linears
from specdecpp.models import load_model


def best_ms(model, m: int, context: int = 100, repeats: int = 5) -> float:
    ids, new = torch.randint(100, 1000, (1, context)), torch.randint(100, 1000, (1, m))
    best = float("inf")
    for _ in range(repeats):
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        t0 = time.perf_counter()
        model(input_ids=new, cache=cache, use_cache=True, logits_to_keep=1)
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    draft = load_model("default", "bfloat16").eval()
    lines = ["Embedded bf16 draft, one forward of m new tokens after a 100-token cached context, best of 5 (ms):", "",
             "| m | native bf16 | fp32 products |", "|---|---|---|"]
    for m in args.rows:
        native = best_ms(draft, m)
        with fp32_linears(draft):
            fp32 = best_ms(draft, m)
        lines.append(f"| {m} | {native:.1f} | {fp32:.1f} |")
    report("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
