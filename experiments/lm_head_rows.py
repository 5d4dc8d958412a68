"""What a forward of k new tokens after a cached prompt costs when it asks for the last token's logits by count
(`logits_to_keep=1`: HF slices the hidden states, a strided view), for all k, or by index (a tensor, what the
engine's row cache passes). On a CPU a bf16 LM head on the strided slice takes a batched product that copies the
vocabulary matrix.

    python experiments/lm_head_rows.py qwen2.5-coder-0.5b --out docs/lm-head-rows.md   # bf16 and fp32

Best of 5 per cell, on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _report import report
from transformers import DynamicCache

from specdecpp.lowp import cpu_description
from specdecpp.models import load_model


@torch.inference_mode()
def best_ms(model, k: int, keep, prompt: int = 100, reps: int = 5) -> float:
    times = []
    for _ in range(reps):
        cache = DynamicCache(config=model.config)
        model(input_ids=torch.randint(0, 1000, (1, prompt)), cache=cache, use_cache=True, logits_to_keep=1)
        ids, pos = torch.randint(0, 1000, (1, k)), torch.arange(prompt, prompt + k)[None]
        t0 = time.perf_counter()
        model(input_ids=ids, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=keep)
        times.append(time.perf_counter() - t0)
    return 1000 * min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default="qwen2.5-coder-0.5b")
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 40])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    lines = [f"# LM head: the last token's logits by count or by index\n\n`python experiments/lm_head_rows.py "
             f"{args.model} --dtypes {' '.join(args.dtypes)} --rows {' '.join(map(str, args.rows))}` on "
             f"{cpu_description()}, {torch.get_num_threads()} threads; ms, best of 5, after a cached 100-token "
             "prompt.\n", "| dtype | new tokens k | keep 1 by count | keep all k | keep 1 by index |",
             "|---|---|---|---|---|"]
    for dtype in args.dtypes:
        model = load_model(args.model, dtype)
        for k in args.rows:
            cells = [best_ms(model, k, keep) for keep in (1, k, torch.tensor([k - 1]))]
            lines.append(f"| {dtype} | {k} | " + " | ".join(f"{c:.0f}" for c in cells) + " |")
            print(lines[-1], flush=True)
        del model
    report("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
