"""Batched speculative decoding throughput on the embedded pair: tokens/s at batch 1, 4, 8 for target-only, constant K
and SpecDec++, with the ratio to each policy's own batch-1 speed, and where the time goes.

Prompts are taken in groups of the largest batch size; within a group every (policy, batch size) decodes the same
prompts one after another, so machine noise hits them alike; 95% intervals are bootstrapped over groups. Greedy.
`--against-rev` also times the engine of an older git revision at batch 1 (the batch-1 regression check).

    python experiments/batched_bench.py --prompts 32 --new-tokens 64 --head runs/bf16-greedy/head-stats \
        --threshold 0.2 --against-rev c2b98b5 --out docs/batched-bench.md
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _report import report

from specdecpp import ConstantK, SamplingConfig, SpecDecPP, TargetOnly, load_pair, speculative_generate
from specdecpp.head import AcceptanceHead
from specdecpp.lowp import cpu_description
from specdecpp.prompts import load_prompts
from specdecpp.stats import bootstrap_interval

ROOT = Path(__file__).resolve().parents[1]


def old_engine(rev: str):
    """`speculative_generate` as it was at git revision `rev` (its package copied out under another name), with
    today's policies module, so that the policy objects both engines are given are of the classes they check for."""
    tmp = Path(tempfile.mkdtemp())
    archive = subprocess.run(["git", "archive", rev, "specdecpp"], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
    (tmp / "specdecpp").rename(tmp / "specdecpp_old")
    sys.path.insert(0, str(tmp))
    sys.modules["specdecpp_old.policies"] = importlib.import_module("specdecpp.policies")
    return importlib.import_module("specdecpp_old.decoding").speculative_generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--k", type=int, default=8, help="the constant K (8: the best constant on this pair in replay)")
    ap.add_argument("--head", default="runs/demo/head")
    ap.add_argument("--threshold", type=float, default=0.2)
    ap.add_argument("--dataset", default="alpaca")
    ap.add_argument("--against-rev", default=None, help="also time this git revision's engine at batch 1")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    pair = load_pair("default")
    head = AcceptanceHead.from_pretrained(args.head).eval()
    head.check_draft(pair.draft.config)
    policies = {"target-only": TargetOnly(), f"constant K={args.k}": ConstantK(args.k),
                f"SpecDec++ h={args.threshold}": SpecDecPP(head, args.threshold, k_min=1, k_max=32)}
    greedy, n_new, group = SamplingConfig(0), args.new_tokens, max(args.batch_sizes)
    prompts = [pair.encode(p) for p in load_prompts(args.dataset, "test", args.prompts)]
    eos = pair.tokenizer.eos_token_id
    engines = {(name, b): (speculative_generate, policy, b) for name, policy in policies.items()
               for b in args.batch_sizes}
    if args.against_rev:
        old = old_engine(args.against_rev)
        for name in list(policies)[:2]:
            engines[(name + f" @{args.against_rev}", 1)] = (old, policies[name], 1)

    def decode(engine, policy, ids, b):
        """Decode `ids` in batches of b: (tokens, seconds, time breakdown, outputs)."""
        tokens, parts, outs = 0, dict(draft=0.0, verify=0.0, steps=0, calls=0, wasted=0), []
        t0 = time.perf_counter()
        for lo in range(0, len(ids), b):
            chunk = ids[lo: lo + b]
            gens = engine(pair.target, pair.draft, chunk if b > 1 else chunk[0], policy, greedy, n_new, eos)
            gens = gens if b > 1 else [gens]
            last = max(gens, key=lambda g: g.stats.total_s).stats  # in the batch all along: its times are the batch's
            parts["draft"] += last.draft_s
            parts["verify"] += last.verify_s
            parts["steps"] += last.draft_calls + getattr(last, "wasted_draft_steps", 0)
            parts["calls"] += last.target_calls
            parts["wasted"] += sum(getattr(g.stats, "wasted_draft_steps", 0) for g in gens)
            tokens += sum(len(g.tokens) for g in gens)
            outs += [g.tokens for g in gens]
        return tokens, time.perf_counter() - t0, parts, outs

    for (engine, policy, b) in engines.values():  # warm-up: allocation and kernel choice for every shape
        decode(engine, policy, prompts[:b], b)
    per_group = {key: [] for key in engines}
    outputs = {key: [] for key in engines}
    for g in range(0, len(prompts), group):
        ids = prompts[g: g + group]
        for key, (engine, policy, b) in engines.items():
            tokens, secs, parts, outs = decode(engine, policy, ids, b)
            per_group[key].append((tokens, secs, parts))
            outputs[key] += outs
        print(f"group {g // group + 1}/{-(-len(prompts) // group)}: " + ", ".join(
            f"{k[0]} b={k[1]} {v[-1][0] / v[-1][1]:.1f} tok/s" for k, v in per_group.items()), flush=True)

    def col(key, i):
        return [x[i] for x in per_group[key]]

    lines = [f"Embedded pair (target `{pair.names['target']}`, draft `{pair.names['draft']}`), CPU "
             f"({cpu_description()}, {torch.get_num_threads()} threads, torch "
             f"{torch.__version__}); greedy, {len(prompts)} {args.dataset} test prompts, up to {n_new} new tokens; "
             f"SpecDec++ head `{args.head}`, k_max 32; 95% intervals bootstrapped over {-(-len(prompts) // group)} "
             f"groups of {group} prompts.", "",
             "| policy | batch | tokens/s | 95% interval | x own batch 1 | 95% interval | draft % | verify % | "
             "ms/draft step | ms/verify | wasted draft steps / row-step |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (name, b) in engines:
        tok, sec = col((name, b), 0), col((name, b), 1)
        parts = {k: sum(p[k] for p in col((name, b), 2)) for k in ("draft", "verify", "steps", "calls", "wasted")}
        tps = sum(tok) / sum(sec)
        lo, hi = bootstrap_interval([tok, sec], lambda n, t: n / t)
        base = (name, 1)
        ratio, rlo = "", ""
        if b != 1 and base in engines:
            ratio = f"{tps / (sum(col(base, 0)) / sum(col(base, 1))):.2f}"
            a, c = bootstrap_interval([tok, sec, col(base, 0), col(base, 1)], lambda n, t, nb, tb: (n / t) / (nb / tb))
            rlo = f"[{a:.2f}, {c:.2f}]"
        total = sum(sec)
        steps = max(parts["steps"], 1)
        lines.append(f"| {name} | {b} | {tps:.2f} | [{lo:.2f}, {hi:.2f}] | {ratio} | {rlo} | "
                     f"{100 * parts['draft'] / total:.0f} | {100 * parts['verify'] / total:.0f} | "
                     f"{1e3 * parts['draft'] / steps:.0f} | {1e3 * parts['verify'] / max(parts['calls'], 1):.0f} | "
                     f"{parts['wasted'] / (steps * b):.2f} |")
    lines.append("")
    for name in policies:  # bf16 draft: a batch's padded shapes may round differently from batch 1 (near-ties)
        ref = outputs[(name, 1)] if (name, 1) in engines else None
        for b in args.batch_sizes:
            if ref is not None and b != 1:
                same = sum(x == y for x, y in zip(outputs[(name, b)], ref))
                lines.append(f"- {name}, batch {b}: {same}/{len(ref)} outputs identical to batch 1")
    for key in engines:
        if "@" in key[0]:
            new = (key[0].split(" @")[0], 1)
            r = (sum(col(new, 0)) / sum(col(new, 1))) / (sum(col(key, 0)) / sum(col(key, 1)))
            a, c = bootstrap_interval([col(new, 0), col(new, 1), col(key, 0), col(key, 1)],
                                      lambda n, t, nb, tb: (n / t) / (nb / tb))
            lines.append(f"- batch 1, this engine / {key[0]}: {r:.3f}x [{a:.3f}, {c:.3f}]")
    report("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
