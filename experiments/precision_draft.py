"""Measure a lower-precision copy of the embedded target as its draft (the default pair).

Mean acceptance E_{Y~q}[min(1, p/q)] = sum_v min(p_v, q_v) at temperature 1 (exact, no sampling) and greedy top-1
agreement along target-sampled Alpaca responses (teacher-forced passes of both models), and the time of one
greedy decoding step of the draft relative to the target's (interleaved repeats, median of per-repeat ratios).

    python experiments/precision_draft.py --prompts 24 --out docs/precision-draft.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _report import report

from specdecpp import SamplingConfig, TargetOnly, load_pair, speculative_generate
from specdecpp.lowp import cpu_description
from specdecpp.prompts import load_prompts


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    pairs = {d: load_pair("default", f"copy:{d}") for d in args.dtypes}
    target = next(iter(pairs.values())).target
    encode = next(iter(pairs.values())).encode
    acc = {d: [] for d in args.dtypes}
    top1 = {d: [] for d in args.dtypes}
    margin_low = []
    for i, prompt in enumerate(load_prompts("alpaca", "train", args.prompts)):
        ids = encode(prompt)
        gen = speculative_generate(target, None, ids, TargetOnly(), SamplingConfig(1.0), args.new_tokens,
                                   generator=torch.Generator().manual_seed(i))
        full = torch.tensor([ids + gen.tokens])
        resp = slice(len(ids) - 1, full.shape[1] - 1)  # positions predicting the response tokens
        p = target(full).logits[0, resp].float().softmax(-1)
        top2 = p.topk(2, -1).values
        margin_low += (top2[:, 0] - top2[:, 1] < 0.05).float().tolist()
        for d, pair in pairs.items():
            q = pair.draft(full).logits[0, resp].float().softmax(-1)
            acc[d] += torch.minimum(p, q).sum(-1).tolist()
            top1[d] += (p.argmax(-1) == q.argmax(-1)).float().tolist()

    ids = encode("Write a short story about a robot.")

    def per_token(model):
        t = time.perf_counter()
        n = len(speculative_generate(model, None, ids, TargetOnly(), SamplingConfig(0), 32).tokens)
        return (time.perf_counter() - t) / n

    for pair in pairs.values():  # warm-up
        per_token(pair.draft)
    per_token(target)
    ratios = {d: [] for d in args.dtypes}
    t_target = []
    for _ in range(args.repeats):  # interleaved: machine noise hits both sides alike
        t = per_token(target)
        t_target.append(t)
        for d, pair in pairs.items():
            ratios[d].append(per_token(pair.draft) / t)
    rows = ["| draft | mean acceptance min(1,p/q), T=1 | greedy top-1 agreement | draft/target step time "
            "(median [min, max] of repeats) |", "|---|---|---|---|"]
    for d in args.dtypes:
        a, g = sum(acc[d]) / len(acc[d]), sum(top1[d]) / len(top1[d])
        r = ratios[d]
        rows.append(f"| copy:{d} | {a:.4f} | {g:.4f} | {statistics.median(r):.2f} [{min(r):.2f}, {max(r):.2f}] |")
    n_pos = len(acc[args.dtypes[0]])
    text = ("\n".join(rows) + f"\n\n{args.prompts} Alpaca train prompts, {n_pos} target-sampled response positions "
            f"(T = 1); greedy step times over {args.repeats} interleaved repeats of 32 tokens, target step "
            f"{statistics.median(t_target) * 1000:.1f} ms (median) on {cpu_description()}. "
            f"Share of positions where the "
            f"target's own top-2 margin is below 0.05: {sum(margin_low) / len(margin_low):.3f}.\n")
    report(text, args.out)


if __name__ == "__main__":
    main()
