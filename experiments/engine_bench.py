"""Engine speed against transformers, measured side by side in one process on the same pair and prompts.

Two ratios, greedy decoding:
  * our engine at constant K  vs  `generate(assistant_model=draft, num_assistant_tokens=K, schedule="constant")`
  * our engine, target only   vs  `model.generate`
Runs are interleaved prompt by prompt (after a warm-up) so machine noise hits both sides alike; outputs are
checked token for token. Prints a markdown table and writes it to --out.

    python experiments/engine_bench.py --k 3 --new-tokens 64 --repeats 2 --out docs/engine-bench.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _report import report

from specdecpp import ConstantK, SamplingConfig, TargetOnly, load_pair
from specdecpp.lowp import cpu_description

PROMPTS = [
    "Give three tips for staying healthy.",
    "Explain why the sky is blue in two sentences.",
    "Write a Python function that reverses a string.",
    "What are the main differences between a cat and a dog as pets?",
    "Summarise the plot of Romeo and Juliet.",
    "List five countries in Europe and their capitals.",
]


def timed(fn):
    t = time.perf_counter()
    tokens = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return tokens, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="default")
    ap.add_argument("--draft", default=None, help="model reference, or an int for a self-draft depth")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    draft = int(args.draft) if args.draft and args.draft.isdigit() else args.draft
    pair = load_pair(args.target, draft, dtype=args.dtype, device=args.device)
    greedy = SamplingConfig(0)
    n = args.new_tokens

    # transformers (5.x) reads the assistant's settings from the *assistant's* generation config, not from generate()'s
    # arguments (left alone, it drafts up to 20 tokens with a 0.4 confidence cut-off): constant K is set there
    cfg = pair.draft.generation_config
    cfg.num_assistant_tokens, cfg.num_assistant_tokens_schedule, cfg.assistant_confidence_threshold = \
        args.k, "constant", 0.0
    calls = {"target": 0}
    pair.target.register_forward_pre_hook(lambda *_: calls.__setitem__("target", calls["target"] + 1))

    def hf(ids, assisted):
        extra = dict(assistant_model=pair.draft) if assisted else {}
        out = pair.target.generate(torch.tensor([ids], device=pair.device), max_new_tokens=n, do_sample=False, **extra)
        return out[0, len(ids):].tolist()

    methods = {
        "ours constant K": lambda ids: pair.generate(ids, ConstantK(args.k), greedy, n).tokens,
        "transformers assisted": lambda ids: hf(ids, True),
        "ours target-only": lambda ids: pair.generate(ids, TargetOnly(), greedy, n).tokens,
        "transformers generate": lambda ids: hf(ids, False),
    }
    encoded = [pair.encode(p) for p in PROMPTS]
    for fn in methods.values():  # warm-up
        fn(encoded[0][:8])
    tokens = {m: 0 for m in methods}
    seconds = {m: 0.0 for m in methods}
    target_calls = {m: 0 for m in methods}  # equal for the two speculative methods when they run the same K
    mismatches = 0
    for _ in range(args.repeats):
        for ids in encoded:
            outs = {}
            for m, fn in methods.items():
                before = calls["target"]
                outs[m], dt = timed(lambda: fn(ids))
                target_calls[m] += calls["target"] - before
                tokens[m] += len(outs[m])
                seconds[m] += dt
            mismatches += len({tuple(o) for o in outs.values()}) != 1
            print("  ".join(f"{m}: {seconds[m]:.1f}s" for m in methods), flush=True)
    tps = {m: tokens[m] / seconds[m] for m in methods}
    lines = [
        f"Pair: target `{args.target}`, draft `{pair.names['draft']}`, {args.dtype} on {args.device} "
        f"({cpu_description()}, torch {torch.__version__}); greedy, K = {args.k}, "
        f"{len(PROMPTS)} prompts x {args.repeats} repeats, up to {n} new tokens.", "",
        "| method | tokens | target calls | seconds | tokens/s |", "|---|---|---|---|---|",
        *[f"| {m} | {tokens[m]} | {target_calls[m]} | {seconds[m]:.1f} | {tps[m]:.2f} |" for m in methods], "",
        "- speculative, ours / transformers assisted: "
        f"**{tps['ours constant K'] / tps['transformers assisted']:.2f}x**",
        "- target-only, ours / transformers generate: "
        f"**{tps['ours target-only'] / tps['transformers generate']:.2f}x**",
        f"- prompts whose four outputs differ: {mismatches}",
    ]
    text = "\n".join(lines) + "\n"
    report(text, args.out)


if __name__ == "__main__":
    main()
