"""Is the T = 1 replay the engine's distribution on the real pair? Two tests with the prompt-to-prompt variance
taken out, by conditioning on the engine's own output X of each generation.

The replay's coupling (specdecpp/replay.py) says: given X, a position j that a round drafts was accepted with
probability a_j = min(1, q_j(X_j) / p_j(X_j)) (p, q teacher-forced along X), independently of everything before it.
1. Calibration: over every position the engine drafted up to and including its round's first rejection,
   sum(accepted - a_j) has mean 0 and variance sum a_j (1 - a_j) if the premise holds. z-scores per offset in the
   round (1 = a round's first token) and in all; a long-round bias shows at high offsets.
2. The replay itself given X: `draws` replays of the same policy on traces built on X (one `score_along` pass, then
   `draw_trace` with fresh draws and branches) estimate E[tokens per target call | X]. The engine's realized tokens
   per call minus that has mean zero if the replay is exact in distribution; a 95% bootstrap interval over prompts
   (seeds resampled with their prompt).

    python experiments/replay_given_engine.py --offset 15 --prompts 15 --seeds 0 1 --draws 3 \
        --out-dir docs/records/replay-given-engine-humaneval --out docs/replay-given-engine-humaneval.md
    python experiments/replay_given_engine.py --offset 15 --prompts 15 --seeds 2 3 --draws 3 \
        --policies "online_confidence h=0.8" --out-dir docs/records/replay-given-engine-humaneval \
        --out docs/replay-given-engine-humaneval.md
    python experiments/replay_given_engine.py --offset 15 --prompts 15 --seeds 4 5 6 7 --draws 3 \
        --policies "online_confidence h=0.8" --out-dir docs/records/replay-given-engine-humaneval-fresh \
        --out docs/replay-given-engine-humaneval-fresh.md
    python experiments/replay_given_engine.py --dataset alpaca --offset 15 --prompts 15 --seeds 0 1 --draws 3 \
        --out-dir docs/records/replay-given-engine-alpaca --out docs/replay-given-engine-alpaca.md
    python experiments/replay_given_engine.py --dataset gsm8k --offset 15 --prompts 15 --seeds 0 1 --draws 3 \
        --out-dir docs/records/replay-given-engine-gsm8k --out docs/replay-given-engine-gsm8k.md
    python experiments/replay_given_engine.py --offset 15 --prompts 7 --seeds 0 1 --draws 4 --plain-seeds \
        --out-dir docs/records/replay-given-engine-humaneval-plain-seeds \
        --out docs/replay-given-engine-humaneval-plain-seeds.md

The engine seeds each prompt from (seed, prompt), as bench.py does; `--plain-seeds` gives every prompt of a seed
the same stream, as bench.py did before (the prompts' first draws then coincide).
Each generation's record is appended to OUT_DIR/records.jsonl as it finishes; a rerun skips what is there.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from _report import report
from tqdm import tqdm

from specdecpp import load_pair
from specdecpp.atomic import write_text
from specdecpp.models import load_tokenizer, resolve
from specdecpp.policies import ConstantK, OnlineConfidence
from specdecpp.prompts import load_prompts
from specdecpp.replay import draw_trace, replay_generation, score_along, verified_positions
from specdecpp.sampling import SamplingConfig, derived_seed
from specdecpp.stats import bootstrap_interval

POLICIES = {"constant k=6": lambda: ConstantK(6),
            "online_confidence h=0.8": lambda: OnlineConfidence(0.8, lr=0.05, k_max=16)}


def generate(pair, prompt, name, seed, sampling, max_new_tokens, draws, eos, plain_seeds=False) -> dict:
    engine_seed = seed if plain_seeds else derived_seed("engine", seed, [prompt])  # as bench.py seeds a prompt
    gen = pair.generate(prompt, POLICIES[name](), sampling, max_new_tokens, seed=engine_seed)
    x = list(gen.tokens)
    rounds = [{"drafted": r.drafted, "accepted": r.accepted} for r in gen.stats.rounds]
    scored = score_along(pair.draft, prompt, x, eos, sampling, pair.target)  # p and q along X, shared by the draws
    replayed = []
    for d in range(draws):
        draws_from = torch.Generator(pair.draft.device).manual_seed(derived_seed("given-engine", prompt, x, d))
        stats = replay_generation(draw_trace(scored, draws_from), POLICIES[name](), max_new_tokens)
        replayed.append([stats.new_tokens, stats.target_calls])
    return {"x": x, "rounds": rounds, "a": scored.accept_x.tolist(), "replayed": replayed,
            "new_tokens": gen.stats.new_tokens, "target_calls": gen.stats.target_calls}


def summarize(records: list[dict], eos: set[int]) -> str:
    lines = []
    for name in POLICIES:
        rs = [r for r in records if r["policy"] == name]
        if not rs:
            continue
        engine = [r["new_tokens"] / r["target_calls"] for r in rs]
        replay = [sum(n / c for n, c in r["replayed"]) / len(r["replayed"]) for r in rs]
        diff = [e - p for e, p in zip(engine, replay)]
        lo, hi = bootstrap_interval([diff, [1.0] * len(rs)], lambda d, n: d / n,
                                    groups=[r["prompt_id"] for r in rs])
        lines += [f"\n## {name}: {len({r['prompt_id'] for r in rs})} prompts x seeds "
                  f"{sorted({r['seed'] for r in rs})}, {len(rs)} generations, {len(rs[0]['replayed'])} replay draws "
                  "each\n",
                  f"Tokens per target call: engine {sum(engine) / len(rs):.3f}, replay given the engine's output "
                  f"{sum(replay) / len(rs):.3f}; engine - replay {sum(diff) / len(rs):+.3f} [{lo:+.3f}, {hi:+.3f}] "
                  "(95% bootstrap over prompts).\n",
                  "| offset in round | positions | accepted | expected (sum a_j) | z |", "|---|---|---|---|---|"]
        by_offset: dict[str, list[float]] = {}
        for r in rs:
            for j, i, ok in verified_positions([(c["drafted"], c["accepted"]) for c in r["rounds"]], r["x"], eos):
                for key in (str(i) if i <= 8 else "9+", "all"):
                    cell = by_offset.setdefault(key, [0, 0, 0.0, 0.0])
                    a = r["a"][j]
                    cell[0] += 1
                    cell[1] += ok
                    cell[2] += a
                    cell[3] += a * (1 - a)
        for key in sorted(by_offset, key=lambda k: (k == "all", k == "9+", k)):
            n, ok, exp, var = by_offset[key]
            z = (ok - exp) / math.sqrt(var) if var > 0 else float("nan")
            lines.append(f"| {key} | {n} | {ok} | {exp:.1f} | {z:+.2f} |")
    return "\n".join(lines)


def _read_records(path: Path) -> list[dict]:
    """The records so far; a last line cut short by a kill is dropped (its generation runs again), the rest kept."""
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    try:
        return [json.loads(line) for line in lines]
    except json.JSONDecodeError:
        records = [json.loads(line) for line in lines[:-1]]  # an earlier damaged line is not ours to drop: raises
        write_text(path, "".join(json.dumps(r) + "\n" for r in records))
        return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="qwen2.5-coder-1.5b")
    ap.add_argument("--draft", default="qwen2.5-coder-0.5b")
    ap.add_argument("--dataset", default="humaneval")
    ap.add_argument("--split", default="test")
    ap.add_argument("--offset", type=int, default=15)
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--draws", type=int, default=6)
    ap.add_argument("--plain-seeds", action="store_true",
                    help="seed every prompt's engine run with the plain seed, as bench.py did before: one random "
                         "stream shared by all prompts of a seed")
    ap.add_argument("--out-dir", type=Path, default=Path("runs/replay-given-engine"))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    sampling = SamplingConfig(temperature=1.0)
    bodies = load_prompts(args.dataset, args.split)[args.offset: args.offset + args.prompts]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / "records.jsonl"
    records = _read_records(path)
    done = {(r["prompt_id"], r["seed"], r["policy"]) for r in records}
    todo = [(args.offset + i, seed, name) for i in range(len(bodies)) for seed in args.seeds for name in args.policies
            if (args.offset + i, seed, name) not in done]
    pair = load_pair(args.target, args.draft, dtype="float32") if todo else None
    eos = {load_tokenizer(resolve(args.target)).eos_token_id}
    for pid, seed, name in tqdm(todo, desc="engine + replays given its output"):
        prompt = pair.encode(bodies[pid - args.offset])
        r = {"dataset": args.dataset, "prompt_id": pid, "seed": seed, "policy": name,
             **generate(pair, prompt, name, seed, sampling, args.max_new_tokens, args.draws, eos,
                         args.plain_seeds)}
        with path.open("a") as f:  # one whole line per generation: an interruption loses at most the current one
            f.write(json.dumps(r) + "\n")
        records.append(r)
    head = (f"# The T = 1 replay given the engine's output\n\n{args.target} drafted by {args.draft}, fp32, T = 1, "
            f"{args.max_new_tokens} tokens, {args.dataset}. Records: {path}, each with its prompt, seed and policy; a "
            "rerun of a command that made them rewrites this page from them without loading a model.\n")
    report(head + summarize(records, eos) + "\n", args.out)


if __name__ == "__main__":
    main()
