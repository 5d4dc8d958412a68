"""Check a draft/target pair before using it: greedy decoding equals transformers' `generate` of the same-dtype
target (where it differs, the target's top-2 logit gap at the first differing token says whether it was a near-tie
flip), tokens per target call at constant K, and the pair's costs on this machine (c, r, v) per dtype.

    python scripts/check_pair.py qwen2.5-coder-1.5b --prompts 3 --new-tokens 64 --out docs/qwen-pair-check.md
    python scripts/check_pair.py qwen2.5-coder-1.5b --dtype auto   # the dtype a round runs fastest in here

The named pair is fetched on first use (specdecpp.fetch). Costs are best-of-7 timings of bare forwards
(`specdecpp.costs.measure_costs`); run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import time
from pathlib import Path

import torch

from specdecpp import ConstantK, SamplingConfig, TargetOnly, load_pair
from specdecpp.costs import measure_costs
from specdecpp.fetch import cache_dir
from specdecpp.lowp import cpu_description
from specdecpp.models import PAIR_DTYPE_CACHE, load_model, pair_name
from specdecpp.probe import ROUND_K, cache_key
from specdecpp.prompts import load_prompts

COST_ROWS = [("float32", "float32"), ("bfloat16", "float32"), ("bfloat16", "bfloat16"), ("float16", "float16")]


@torch.inference_mode()
def top2_gap(target, ids: list[int], ref: list[int], out: list[int]) -> float:
    """The target's top-2 logit gap (its own dtype, from one forward) at the first token where `out` leaves `ref`."""
    i = next((i for i, (a, b) in enumerate(zip(ref, out)) if a != b), min(len(ref), len(out)))  # or where one ends
    logits = target(input_ids=torch.tensor([ids + ref[:i]])).logits[0, -1].float()
    top = logits.topk(2).values
    return float(top[0] - top[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("target", default="qwen2.5-coder-1.5b", nargs="?")
    ap.add_argument("--draft", default=None)
    ap.add_argument("--prompts", type=int, default=3, help="prompts per set (alpaca test, humaneval, gsm8k)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--dtype", default="float32", help="both models' dtype, or auto (load_pair)")
    ap.add_argument("--near-tie", type=float, default=0.5, help="a flip at a top-2 logit gap below this is a near-tie")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    command = (f"python scripts/check_pair.py {args.target} --prompts {args.prompts} --new-tokens {args.new_tokens} "
               f"--dtype {args.dtype}")
    t0 = time.perf_counter()
    pair = load_pair(args.target, args.draft, dtype=args.dtype)
    lines = [f"# Pair check: {args.target}", "", f"`{command}` on {cpu_description()}, {torch.get_num_threads()} "
             f"threads, {str(pair.target.dtype).removeprefix('torch.')} models.", ""]
    if args.dtype == "auto":  # what the choice rested on: a round's seconds per dtype, measured once per CPU kind
        measured = json.loads((cache_dir() / PAIR_DTYPE_CACHE).read_text())
        seconds = measured[cache_key(pair_name(pair.names["target"], pair.names["draft"]))]
        lines += [f"dtype auto: a round of {ROUND_K} drafts and its verifying call took " + ", ".join(
            f"{v * 1000:.0f} ms in {k}" for k, v in seconds.items()) + ".", ""]
    sizes = [sum(p.numel() for p in m.parameters()) / 1e9 for m in (pair.target, pair.draft)]
    seconds = time.perf_counter() - t0
    lines.append(f"Loaded in {seconds:.0f} s: target {sizes[0]:.2f}B, draft {sizes[1]:.2f}B parameters.")
    k_columns = " | ".join(f"K = {k}: tokens / target call" for k in args.k)
    lines += ["", f"| set | prompt | equal to `generate` | {k_columns} |", "|---|---|---|" + "---|" * len(args.k)]
    greedy, equal, total, flips = SamplingConfig(temperature=0), 0, 0, []
    for dataset in ("alpaca", "humaneval", "gsm8k"):
        for pid, prompt in enumerate(load_prompts(dataset, "test", args.prompts)):
            ids = pair.encode(prompt)
            ref = pair.target.generate(torch.tensor([ids]), max_new_tokens=args.new_tokens, do_sample=False,
                                       eos_token_id=pair.tokenizer.eos_token_id)[0, len(ids):].tolist()
            gens = [pair.generate(ids, ConstantK(k), greedy, args.new_tokens) for k in args.k]
            ok = all(g.tokens == ref for g in gens)
            equal, total = equal + ok, total + 1
            gaps = [top2_gap(pair.target, ids, ref, g.tokens) for g in gens if g.tokens != ref]
            flips += gaps
            verdict = "yes" if ok else "NO (top-2 gaps " + ", ".join(f"{x:.3f}" for x in gaps) + ")"
            lines.append(f"| {dataset} | {pid} | {verdict} | "
                         + " | ".join(f"{g.stats.mean_acceptance_length:.2f}" for g in gens) + " |")
            print(lines[-1], flush=True)
    pair.generate(pair.encode("hi"), TargetOnly(), greedy, 2)
    near = sum(x < args.near_tie for x in flips)
    lines += ["", f"Greedy output equal to transformers' `generate` on {equal}/{total} prompts, for every K; "
              f"{len(flips)} outputs differ, {near} of them first at a near-tie (the target's top-2 logit gap at the "
              f"first differing token below {args.near_tie}).", "",
              "## Costs (one target step = 1)", "",
              "| draft dtype | target dtype | one-token target call (ms) | c (draft step) | r (verifying call) | "
              "v (per scored token) |", "|---|---|---|---|---|---|"]

    def costs_row(draft, target, names):
        cm = measure_costs(target, draft)
        lines.append(f"| {names[0]} | {names[1]} | {cm.target_s * 1e3:.0f} | {cm.draft:.3f} | {cm.round_cost:.3f} | "
                     f"{cm.verify:.4f} |")
        print(lines[-1], flush=True)

    names = pair.names
    del pair
    gc.collect()
    models = {}

    def model(role: str, dtype: str):  # each (role, dtype) loaded once, only while a row needs it
        if (role, dtype) not in models:
            models[role, dtype] = load_model(names[role], dtype)
        return models[role, dtype]

    for i, (draft_dtype, target_dtype) in enumerate(COST_ROWS):
        costs_row(model("draft", draft_dtype), model("target", target_dtype), (draft_dtype, target_dtype))
        following = COST_ROWS[i + 1: i + 2]
        for key in set(models) - {("draft", d) for d, _ in following} - {("target", t) for _, t in following}:
            del models[key]  # what the next row does not use
        gc.collect()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    lines += ["", f"Peak memory of this process: {peak:.1f} GB."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
