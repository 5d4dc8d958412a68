"""The main job on the embedded default pair: every length policy on a few real prompts, side by side.

    python -m specdecpp.demo [--new-tokens 32] [--temperature 0]

Greedy by default, so every policy must print the same text as the target alone; the table shows what each
policy cost to get there. The SpecDec++ row uses an untrained stand-in head until one is trained.
"""

from __future__ import annotations

import argparse

import torch

from .models import load_pair
from .policies import Confidence, ConstantK, Heuristic, Oracle, SpecDecPP, TargetOnly
from .sampling import SamplingConfig
from .stats import GenerationStats

PROMPTS = [
    "What is the capital of France?",
    "Give three tips for staying healthy.",
    "Write a Python function that returns the square of a number.",
]


def aggregate(stats: list[GenerationStats]) -> dict:
    """Ratios of sums over prompts (not means of per-prompt ratios)."""
    new = sum(s.new_tokens for s in stats)
    return {
        "tokens/s": new / sum(s.total_s for s in stats),
        "verif. rate": sum(s.target_calls for s in stats) / new,
        "discard rate": sum(s.discarded for s in stats) / new,
        "accept. len": new / sum(s.target_calls for s in stats),
        "new tokens": new,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Compare length policies on the embedded pair.")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    args = ap.parse_args(argv)

    pair = load_pair("default")
    hidden = pair.draft.config.hidden_size
    torch.manual_seed(0)
    policies = [TargetOnly(), ConstantK(2), Heuristic(k=2), Confidence(0.5, k_max=6),
                SpecDecPP(torch.nn.Linear(hidden, 1), threshold=0.7, k_min=1, k_max=6), Oracle(lookahead=6)]
    sampling = SamplingConfig(temperature=args.temperature)
    print(f"target: {pair.names['target']} ({pair.target.config.num_hidden_layers} layers), "
          f"draft: self-draft of its first {pair.draft.config.num_hidden_layers} layers; {sampling}")
    pair.generate(PROMPTS[0], TargetOnly(), sampling, max_new_tokens=4)  # warm-up
    rows, texts = [], {}
    for policy in policies:
        outs = [pair.generate(p, policy, sampling, args.new_tokens, seed=i) for i, p in enumerate(PROMPTS)]
        rows.append((repr(policy), aggregate([o.stats for o in outs])))
        texts[repr(policy)] = outs[-1].text
    cols = list(rows[0][1])
    print(f"\n{'policy':<46}" + "".join(f"{c:>14}" for c in cols))
    base = rows[0][1]["tokens/s"]
    for name, agg in rows:
        print(f"{name:<46}" + "".join(f"{agg[c]:>14.3f}" if isinstance(agg[c], float) else f"{agg[c]:>14}"
                                      for c in cols) + f"   speedup {agg['tokens/s'] / base:.2f}x")
    print(f"\nlast prompt: {PROMPTS[-1]!r}\n{texts['target()']}")
    if sampling.greedy:
        same = all(t == texts["target()"] for t in texts.values())
        print(f"\nevery policy produced the target's greedy text: {same}")
    print("(the oracle's timing includes the lookahead it does not book; SpecDec++ uses an untrained head here)")


if __name__ == "__main__":
    main()
