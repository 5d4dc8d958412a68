"""Where one preparation batch's time goes on the bf16 pair, and what fp32 products (lowp.py) change.

    python experiments/lowp.py --prompts 16 --repeats 3 --out docs/lowp.md

Stages of one batch (Alpaca train prompts, greedy, up to 128 target tokens): the target's batched sampling, its
teacher-forced pass, and the bf16 draft's teacher-forced pass with native bf16 products and with fp32 products of
the same values (interleaved, `--repeats` times). Then how far the two draft passes agree: logits, argmax, and the
greedy label (draft argmax = target argmax); and how often each agrees with the draft's one-token-at-a-time argmax
(the engine's path) along --incremental rows.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _report import report
from transformers import DynamicCache

from specdecpp.data import pad_token_id, sample_responses
from specdecpp.lowp import fp32_linears
from specdecpp.models import load_pair
from specdecpp.prompts import load_prompts
from specdecpp.sampling import SamplingConfig


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--incremental", type=int, default=8, help="rows decoded one token at a time for the check")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    pair = load_pair("default", "copy:bfloat16")
    pad = pad_token_id(pair.tokenizer)
    prompts = [pair.encode(p) for p in load_prompts("alpaca", "train", args.prompts)]
    responses, t_sample = timed(lambda: sample_responses(pair.target, prompts, SamplingConfig(0.0), 128,
                                                         {pair.tokenizer.eos_token_id}, pad, torch.Generator()))
    seqs = [p + r for p, r in zip(prompts, responses)]
    width = max(map(len, seqs))
    ids, mask = torch.full((len(seqs), width), pad), torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, : len(s)], mask[row, : len(s)] = torch.tensor(s), 1
    target_logits, t_target = timed(lambda: pair.target(input_ids=ids, attention_mask=mask).logits)
    native_s, fp32_s = [], []
    for _ in range(args.repeats):
        native, t = timed(lambda: pair.draft(input_ids=ids, attention_mask=mask).logits)
        native_s.append(t)
        with fp32_linears(pair.draft):
            emulated, t = timed(lambda: pair.draft(input_ids=ids, attention_mask=mask).logits)
        fp32_s.append(t)
    ratios = [a / b for a, b in zip(native_s, fp32_s)]
    positions = torch.zeros_like(mask, dtype=torch.bool)  # response positions: logits at t predict token t + 1
    for row, (p, r) in enumerate(zip(prompts, responses)):
        positions[row, len(p) - 1: len(p) + len(r) - 1] = True
    n = int(positions.sum())
    tgt = target_logits.argmax(-1)
    a, b = native.argmax(-1), emulated.argmax(-1)
    rows = []
    agree = {"native": 0, "fp32": 0, "n": 0}
    for row in range(min(args.incremental, len(seqs))):
        p, s = len(prompts[row]), seqs[row]
        cache = DynamicCache(config=pair.draft.config)
        out = pair.draft(input_ids=torch.tensor([s[:p]]), past_key_values=cache)
        steps = [int(out.logits[0, -1].argmax())]
        for t in range(p, len(s) - 1):
            out = pair.draft(input_ids=torch.tensor([[s[t]]]), past_key_values=cache)
            steps.append(int(out.logits[0, -1].argmax()))
        steps = torch.tensor(steps)
        agree["native"] += int((a[row, p - 1: len(s) - 1] == steps).sum())
        agree["fp32"] += int((b[row, p - 1: len(s) - 1] == steps).sum())
        agree["n"] += len(steps)
    rows.append(f"| target: batched greedy sampling, {n} tokens | {t_sample:.1f} |")
    rows.append(f"| target: teacher-forced pass (fp32) | {t_target:.1f} |")
    rows.append(f"| draft: teacher-forced pass, native bf16 products | {statistics.median(native_s):.1f} |")
    rows.append(f"| draft: teacher-forced pass, fp32 products (lowp.py) | {statistics.median(fp32_s):.1f} |")
    text = (f"One preparation batch on the embedded pair: {len(seqs)} Alpaca train prompts, greedy, up to 128 target "
            f"tokens ({n} response positions, batch width {width}); median of {args.repeats} interleaved repeats for "
            f"the draft passes.\n\n| stage | seconds |\n|---|---|\n" + "\n".join(rows) +
            f"\n\nNative / fp32 products, per repeat: {', '.join(f'{r:.2f}x' for r in ratios)}.\n\n"
            f"Agreement of the two draft passes over the {n} response positions: logits bit-equal "
            f"{float((native == emulated)[positions].float().mean()):.3f}; argmax equal "
            f"{float((a == b)[positions].float().mean()):.4f}; greedy label (draft argmax = target argmax) equal "
            f"{float(((a == tgt) == (b == tgt))[positions].float().mean()):.4f}; label-0 positions: native "
            f"{int(((a != tgt) & positions).sum())}, fp32 {int(((b != tgt) & positions).sum())}.\n\n"
            f"Against the draft's one-token-at-a-time argmax (the engine's path; prompt as one block, then one token "
            f"per step) over {agree['n']} positions of {min(args.incremental, len(seqs))} rows: native pass agrees at "
            f"{agree['native']}, fp32 pass at {agree['fp32']}.\n")
    report(text, args.out)


if __name__ == "__main__":
    main()
