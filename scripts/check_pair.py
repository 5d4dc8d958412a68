"""Check a draft/target pair before using it: greedy decoding equals transformers' `generate`, tokens per target
call at constant K, and the pair's costs on this machine (c, r, v) for the draft in fp32 and bf16.

    python scripts/check_pair.py qwen2.5-coder-1.5b --prompts 3 --new-tokens 64 --out docs/qwen-pair-check.md

The named pair is fetched on first use (specdecpp.fetch). Costs are best-of-7 timings of bare forwards
(`specdecpp.costs.measure_costs`); run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import gc
import resource
import time
from pathlib import Path

import torch

from specdecpp import ConstantK, SamplingConfig, TargetOnly, load_pair
from specdecpp.costs import measure_costs
from specdecpp.lowp import cpu_description
from specdecpp.models import load_model
from specdecpp.prompts import load_prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("target", default="qwen2.5-coder-1.5b", nargs="?")
    ap.add_argument("--draft", default=None)
    ap.add_argument("--prompts", type=int, default=3, help="prompts per set (alpaca test, humaneval, gsm8k)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    command = f"python scripts/check_pair.py {args.target} --prompts {args.prompts} --new-tokens {args.new_tokens}"
    lines = [f"# Pair check: {args.target}", "",
             f"`{command}` on {cpu_description()}, {torch.get_num_threads()} threads, fp32 models.", ""]
    t0 = time.perf_counter()
    pair = load_pair(args.target, args.draft)
    sizes = [sum(p.numel() for p in m.parameters()) / 1e9 for m in (pair.target, pair.draft)]
    seconds = time.perf_counter() - t0
    lines.append(f"Loaded in {seconds:.0f} s: target {sizes[0]:.2f}B, draft {sizes[1]:.2f}B parameters.")
    k_columns = " | ".join(f"K = {k}: tokens / target call" for k in args.k)
    lines += ["", f"| set | prompt | equal to `generate` | {k_columns} |", "|---|---|---|" + "---|" * len(args.k)]
    greedy, equal, total = SamplingConfig(temperature=0), 0, 0
    for dataset in ("alpaca", "humaneval", "gsm8k"):
        for pid, prompt in enumerate(load_prompts(dataset, "test", args.prompts)):
            ids = pair.encode(prompt)
            ref = pair.target.generate(torch.tensor([ids]), max_new_tokens=args.new_tokens, do_sample=False,
                                       eos_token_id=pair.tokenizer.eos_token_id)[0, len(ids):].tolist()
            gens = [pair.generate(ids, ConstantK(k), greedy, args.new_tokens) for k in args.k]
            ok = all(g.tokens == ref for g in gens)
            equal, total = equal + ok, total + 1
            lines.append(f"| {dataset} | {pid} | {'yes' if ok else 'NO'} | "
                         + " | ".join(f"{g.stats.mean_acceptance_length:.2f}" for g in gens) + " |")
            print(lines[-1], flush=True)
    pair.generate(pair.encode("hi"), TargetOnly(), greedy, 2)
    lines += ["", f"Greedy output equal to transformers' `generate` on {equal}/{total} prompts, for every K.", "",
              "## Costs (one target step = 1)", "",
              "| draft dtype | target dtype | one-token target call (ms) | c (draft step) | r (verifying call) | "
              "v (per scored token) |", "|---|---|---|---|---|---|"]

    def costs_row(draft, target, names):
        cm = measure_costs(target, draft)
        lines.append(f"| {names[0]} | {names[1]} | {cm.target_s * 1e3:.0f} | {cm.draft:.3f} | {cm.round_cost:.3f} | "
                     f"{cm.verify:.4f} |")
        print(lines[-1], flush=True)

    costs_row(pair.draft, pair.target, ("float32", "float32"))
    names = pair.names
    draft_bf16 = load_model(names["draft"], "bfloat16")
    costs_row(draft_bf16, pair.target, ("bfloat16", "float32"))
    del pair
    gc.collect()
    target_bf16 = load_model(names["target"], "bfloat16")
    costs_row(draft_bf16, target_bf16, ("bfloat16", "bfloat16"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    lines += ["", f"Peak memory of this process: {peak:.1f} GB."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
