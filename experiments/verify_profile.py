"""Where a verifying call's cost goes: the engine's verifying forward against the model's bare forward of the same
tokens on a warm cache, per number of scored tokens k and per dtype, with a per-operator profile at one k.

  * bare: `model(k tokens, cache=cache, logits_to_keep=k)`, then the cache cropped back;
  * engine: `decoding._RowCache` on the same k tokens (position ids, validity bookkeeping, `rows_products`), then
    its rollback; plus the verify maths on the k logits rows (`probs`, acceptance, residual, draw) timed apart.
Calls alternate bare / engine at each repeat (machine noise hits both alike); the table gives medians and T(k)/T(1).

    python experiments/verify_profile.py --dtypes float32 bfloat16 --out docs/verify-profile.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _report import report

from specdecpp.decoding import _RowCache
from specdecpp.lowp import cpu_description
from specdecpp.models import load_model, load_tokenizer, resolve
from specdecpp.sampling import SamplingConfig, acceptance_prob, probs, residual, sample

PROMPT = ("Write a Python function that parses a CSV file of sales records (date, region, amount), groups the amounts "
          "by region and month, and returns a dictionary of totals. Explain each step in a short comment.")


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def verify_maths(logits: torch.Tensor, tokens: torch.Tensor, sampling: SamplingConfig, g: torch.Generator) -> None:
    """What `_verify` does with the logits of a k-token call at T = 1 (k - 1 candidates)."""
    p = probs(logits, sampling)[0]
    q = torch.softmax(torch.randn_like(p, dtype=torch.float32), -1)  # stands in for the draft's q_1..q_K
    k = p.shape[0] - 1
    acc = acceptance_prob(p[torch.arange(k), tokens[:k]], q[torch.arange(k), tokens[:k]])
    n = int((torch.rand(k, generator=g) < acc).long().cumprod(0).sum())
    sample(residual(p[n][None], q[min(n, k - 1)][None] if n < k else torch.zeros_like(p[n][None])), g)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="qwen2.5-coder-1.5b")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--ks", nargs="+", type=int, default=[1, 2, 3, 5, 9, 13, 17])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile-k", type=int, default=9)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    tok = load_tokenizer(resolve(args.target))
    prompt = list(tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                          tokenize=True, return_dict=True)["input_ids"])
    extra = torch.randint(100, 20000, (max(args.ks),)).tolist()  # the scored tokens: any ids do for timing
    sampling, g = SamplingConfig(temperature=1.0), torch.Generator().manual_seed(0)
    lines = [f"# A verifying call: engine against bare forward\n\nTarget `{args.target}` on {cpu_description()}, "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads; prompt of {len(prompt)} tokens, warm "
             f"cache; median of {args.repeats} alternating repeats. T(k) = one call scoring k tokens (k - 1 "
             f"candidates and the round's last token), in ms; ratios to the same column's k = 1.\n\n`python "
             f"experiments/verify_profile.py --target {args.target} --dtypes {' '.join(args.dtypes)}`\n"]
    profiles = []
    for dtype in args.dtypes:
        model = load_model(args.target, dtype)
        bare_cache = _RowCache(model, 1)
        bare_cache([prompt])  # prefill both caches the engine's way; the bare side then uses its DynamicCache
        engine = _RowCache(model, 1)
        engine([prompt])
        n = len(prompt)

        def bare(k):
            with torch.inference_mode():
                model(input_ids=torch.tensor([extra[:k]]), cache=bare_cache.cache, use_cache=True,
                      logits_to_keep=k)
                bare_cache.cache.crop(-k)  # a negative count removes that many columns

        def ours(k, keep=None):
            with torch.inference_mode():
                out = engine([extra[:k]], keep=k)
                engine.rollback([n])
            if keep is not None:
                keep.append(out.logits)

        rows = []
        for k in args.ks:
            bare(k), ours(k)  # warm-up at this shape
            tb, te, tm = [], [], []
            for _ in range(args.repeats):
                tb.append(timed(lambda: bare(k)))
                kept = []
                te.append(timed(lambda: ours(k, kept)))
                tm.append(timed(lambda: verify_maths(kept[0], torch.tensor(extra[:k]), sampling, g)))
            rows.append((k, *(1000 * statistics.median(t) for t in (tb, te, tm))))
        one_b, one_e = rows[0][1], rows[0][2]
        lines += [f"\n## {dtype}\n", "| k | bare ms | T(k)/T(1) bare | engine ms | T(k)/T(1) engine | engine / bare | "
                  "verify maths ms |", "|---|---|---|---|---|---|---|"]
        for k, b, e, m in rows:
            lines.append(f"| {k} | {b:.1f} | {b / one_b:.2f} | {e:.1f} | {e / one_e:.2f} | {e / b:.3f} | {m:.2f} |")
        from torch.profiler import ProfilerActivity, profile

        k = args.profile_k
        for name, fn in (("bare", lambda: bare(k)), ("engine", lambda: ours(k))):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    fn()
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=40)
            profiles.append(f"\n### {dtype}, {name}, k = {k} (3 calls)\n\n```\n{table.strip()}\n```")
    report("\n".join(lines + ["\n## Per-operator profiles"] + profiles) + "\n", args.out)


if __name__ == "__main__":
    main()
