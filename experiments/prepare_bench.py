"""Response generation for training data: batched (left padding) against one prompt at a time, same prompts.

    python experiments/prepare_bench.py --prompts 16 --new-tokens 32 --out docs/prepare-bench.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _report import report

from specdecpp.data import sample_responses
from specdecpp.models import load_pair
from specdecpp.prompts import load_prompts
from specdecpp.sampling import SamplingConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    pair = load_pair("default")
    encoded = [pair.encode(p) for p in load_prompts("alpaca", "train", args.prompts)]
    eos, cfg = {pair.tokenizer.eos_token_id}, SamplingConfig(1.0)
    sample_responses(pair.target, encoded[:2], cfg, 2, eos, pair.tokenizer.pad_token_id, torch.Generator())  # warm-up

    def timed(batches):
        g = torch.Generator().manual_seed(0)
        t = time.perf_counter()
        n = sum(len(r) for b in batches
                for r in sample_responses(pair.target, b, cfg, args.new_tokens, eos, pair.tokenizer.pad_token_id, g))
        return n, time.perf_counter() - t

    n_one, s_one = timed([[p] for p in encoded])
    n_all, s_all = timed([encoded])
    text = (f"{args.prompts} Alpaca prompts, up to {args.new_tokens} new tokens each, SmolLM2-135M-Instruct fp32 on "
            f"CPU, T = 1.\n\n| mode | tokens | seconds | tokens/s |\n|---|---|---|---|\n"
            f"| one prompt at a time | {n_one} | {s_one:.1f} | {n_one / s_one:.1f} |\n"
            f"| one batch of {args.prompts} (left padding) | {n_all} | {s_all:.1f} | {n_all / s_all:.1f} |\n\n"
            f"Batched / one at a time: **{(n_all / s_all) / (n_one / s_one):.1f}x** tokens/s.\n")
    report(text, args.out)


if __name__ == "__main__":
    main()
