"""Measure how well self-drafts of the embedded target (its first k layers) agree with it.

For each k: mean acceptance E_{Y~q}[min(1, p/q)] = sum_v min(p_v, q_v) at temperature 1 (exact, no sampling),
greedy top-1 agreement, and the measured time of one draft step relative to one target step. All k come from one
teacher-forced target pass over target-sampled responses (a k-layer self-draft's logits are the target's
final norm and LM head applied to the output of layer k). Writes a markdown table; the predicted speedup uses
the parameter-count cost ratio (deterministic) since
step times on a shared 2-core machine are noisy.

    python experiments/self_draft.py --prompts 24 --out docs/default-pair.md
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import torch
from _report import report

from specdecpp import SamplingConfig, TargetOnly, load_pair, self_draft, speculative_generate
from specdecpp.prompts import BUNDLED


def alpaca_prompts(data_dir: Path, n: int) -> list[str]:
    path = data_dir / "alpaca" / "alpaca_data.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass --data-dir (the folder holding alpaca/, gsm8k/, humaneval/)")
    out = []
    with gzip.open(path, "rt") as f:
        for line in f:
            r = json.loads(line)
            out.append(r["instruction"] + (f"\nInput: {r['input']}" if r["input"] else ""))
            if len(out) == n:
                return out
    return out


def predicted_speedup(alpha: float, c: float, k_max: int = 12) -> tuple[float, int]:
    """Best constant-K speedup under i.i.d. acceptance alpha and draft/target cost ratio c (Leviathan et al.)."""
    best = max(((1 - alpha ** (k + 1)) / ((1 - alpha) * (k * c + 1)), k) for k in range(1, k_max + 1))
    return best


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", type=Path, default=BUNDLED, help="folder holding alpaca/ (default: bundled)")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 8, 12, 16, 20, 22, 24, 26, 28])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    pair = load_pair("default")
    target, norm, head = pair.target, pair.target.model.norm, pair.target.lm_head
    acc = {k: [] for k in args.layers}
    top1 = {k: [] for k in args.layers}
    for i, prompt in enumerate(alpaca_prompts(args.data_dir, args.prompts)):
        ids = pair.encode(prompt)
        gen = pair.generate(ids, TargetOnly(), SamplingConfig(1.0), max_new_tokens=args.new_tokens, seed=i)
        full = torch.tensor([ids + gen.tokens])
        out = target(full, output_hidden_states=True)
        resp = slice(len(ids) - 1, full.shape[1] - 1)  # positions predicting the response tokens
        p = out.logits[0, resp].float().softmax(-1)
        for k in args.layers:
            q = head(norm(out.hidden_states[k][0, resp])).float().softmax(-1)
            acc[k] += torch.minimum(p, q).sum(-1).tolist()
            top1[k] += (p.argmax(-1) == q.argmax(-1)).float().tolist()

    # time per step: greedy decoding of one prompt, draft alone vs target alone
    ids = pair.encode("Write a short story about a robot.")
    def per_token(model):
        speculative_generate(model, None, ids, TargetOnly(), SamplingConfig(0), 4)  # warm-up
        t = time.perf_counter()
        n = len(speculative_generate(model, None, ids, TargetOnly(), SamplingConfig(0), 48).tokens)
        return (time.perf_counter() - t) / n

    t_target = per_token(target)
    def matmul_params(model):  # what a decode step multiplies by: the layers and the LM head (not the embedding)
        return sum(p.numel() for p in model.model.layers.parameters()) + model.lm_head.weight.numel()

    rows = ["| k (layers of 30) | mean acceptance min(1,p/q), T=1 | greedy top-1 agreement | draft/target cost "
            "(matmul params) | draft/target step time (measured) | predicted best constant-K speedup (K) |",
            "|---|---|---|---|---|---|"]
    for k in args.layers:
        a, g = sum(acc[k]) / len(acc[k]), sum(top1[k]) / len(top1[k])
        draft = self_draft(target, k)
        c = matmul_params(draft) / matmul_params(target)
        s, best_k = predicted_speedup(a, c)
        rows.append(f"| {k} | {a:.3f} | {g:.3f} | {c:.2f} | {per_token(draft) / t_target:.2f} | {s:.2f} ({best_k}) |")
    n_pos = len(acc[args.layers[0]])
    text = "\n".join(rows) + f"\n\n{args.prompts} Alpaca prompts, {n_pos} response positions, target step " \
                             f"{t_target * 1000:.1f} ms on this machine.\n"
    report(text, args.out)


if __name__ == "__main__":
    main()
