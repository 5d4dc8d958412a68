"""Are the replay's batched branches the draft's one-call-at-a-time branches on a real pair?

Saved traces (every benchmark replay) draw all of a trace's branches as the rows of one batch over the teacher-forced
cache with later positions masked (`Trace.complete_branches`); `Trace.branch` draws one from a cropped copy of the
cache, one call a step, which is what experiments/replay_check.py compared with the engine. This script draws both
on the same traces and counts the branch tokens that differ, and the time of each route.

    python experiments/branch_check.py --target qwen2.5-coder-1.5b --prompts 3 --out docs/qwen-branch-check.md
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

from _report import report

from specdecpp.data import pad_token_id
from specdecpp.lowp import cpu_description
from specdecpp.models import draft_ref, load_pair
from specdecpp.prompts import load_prompts
from specdecpp.replay import make_traces


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="default", help="a model reference (default: the embedded pair)")
    ap.add_argument("--draft", default=None, help="the draft (default: the target's default draft)")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--branch-length", type=int, default=16)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    pair = load_pair(args.target, draft_ref(args.draft))
    tok = pair.tokenizer
    prompts = [pair.encode(p) for p in load_prompts("alpaca", "test", args.prompts)]
    traces = dict(make_traces(pair.target, pair.draft, prompts, args.new_tokens, {tok.eos_token_id},
                              pad_token_id(tok), batch_size=len(prompts)))
    tokens = differ = 0
    max_stat = 0.0
    seconds = {"batched": 0.0, "one call a step": 0.0}
    for trace in traces.values():
        batched = copy.copy(trace)
        batched.branches = {}
        t0 = time.perf_counter()
        batched.complete_branches(args.branch_length)
        seconds["batched"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        for m, b in batched.branches.items():
            for s, (y, token) in enumerate(b.steps, 1):
                y_lazy, lazy = trace.branch(m, s)
                tokens += 1
                differ += y != y_lazy
                max_stat = max(max_stat, abs(token.prob - lazy.prob), abs(token.margin - lazy.margin))
        seconds["one call a step"] += time.perf_counter() - t0
    mismatches = sum(len(t.mismatches) for t in traces.values())
    if not tokens:
        raise SystemExit(f"the draft never left the target's output ({mismatches} mismatches): nothing to compare")
    text = (f"Replay branches, batched vs one call a step: {pair.names['target']} target, {pair.names['draft']} draft "
            f"({next(pair.draft.parameters()).dtype}), {args.prompts} Alpaca test prompts x up to {args.new_tokens} "
            f"greedy tokens, branches of up to {args.branch_length - 1} tokens after each of {mismatches} mismatches; "
            f"{cpu_description()}.\n\n"
            f"Branch tokens compared: {tokens}; differing: **{differ}**. Largest difference in q(Y) or the top-2 "
            f"margin: {max_stat:.2e}. Time: batched {seconds['batched']:.1f} s, one call a step "
            f"{seconds['one call a step']:.1f} s ({seconds['one call a step'] / seconds['batched']:.1f}x).\n")
    report(text, args.out)


if __name__ == "__main__":
    main()
