"""The T = 1 replay against the engine on the real pair, in distribution: the same prompts, seeds, settings and
cost model, each side with its own random draws. Per setting: the speedup over target-only from each side's
records (ratio of summed priced times) and tokens per target call, and the replay-minus-engine difference with a
95% bootstrap interval over prompts (both seeds of a prompt resampled together). An exact replay leaves every
difference's interval around zero, up to the 1-in-20 misses of 95% intervals.

    python experiments/engine_replay_t1.py --engine docs/records/qwen-t1-test docs/records/qwen-t1-test-seed1 \
        docs/records/qwen-t1-test-humaneval --replay docs/records/qwen-t1-engine-check{,-gsm8k,-humaneval} \
        --out docs/qwen-t1-engine-check.md

One table per set and one over all sets, each with both sides' rankings of the settings.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _report import report

from specdecpp.bench.summary import read_run_records
from specdecpp.stats import bootstrap_interval


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", type=Path, nargs="+", required=True)
    ap.add_argument("--replay", type=Path, nargs="+", required=True)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    replay = [r for run in args.replay for r in read_run_records(run)]
    engine = [r for run in args.engine for r in read_run_records(run)]
    key = lambda r: (r["dataset"], r["prompt_id"], r["seed"], r["setting"])  # noqa: E731
    both = {key(r) for r in replay} & {key(r) for r in engine}
    replay = {key(r): r for r in replay if key(r) in both}
    engine = {key(r): r for r in engine if key(r) in both}
    runs = lambda paths: " ".join(map(str, paths))  # noqa: E731
    lines = [f"# The T = 1 replay against the engine\n\nEngine: {runs(args.engine)}; replay: {runs(args.replay)}. "
             "Priced at each run's (equal) cost model; 95% bootstrap intervals over prompts (a prompt's seeds "
             "resampled together). The two sides draw their own samples.\n\n"
             f"`python experiments/engine_replay_t1.py --engine {runs(args.engine)} --replay {runs(args.replay)}`\n"]
    datasets = sorted({k[0] for k in both})
    for dataset in datasets + (["all sets"] if len(datasets) > 1 else []):
        units = sorted({k[:3] for k in both if dataset in (k[0], "all sets")})
        lines += _table(dataset, units, sorted({k[3] for k in both} - {"target"}), engine, replay)
    report("\n".join(lines) + "\n", args.out)


def _table(dataset: str, units: list[tuple], settings: list[str], engine: dict, replay: dict) -> list[str]:
    """Per setting: each side's speedup per token and tokens per target call, and replay - engine with intervals;
    then both sides' rankings of the settings by speedup."""
    prompts = [u[:2] for u in units]
    lines = [f"\n## {dataset}: {len(set(prompts))} prompts x {len({u[2] for u in units})} seeds\n",
             "| setting | engine speedup per token | replay speedup per token | replay - engine | engine tokens/call "
             "| replay tokens/call | replay - engine |", "|---|---|---|---|---|---|---|"]

    def speedup(t, n, ts, ns, calls):  # target-only seconds per token over the setting's
        return (t / n) / (ts / ns)

    ranked = ([], [])
    for s in settings:
        cols = []
        for side in (engine, replay):
            for setting, field in (("target", "priced_s"), ("target", "new_tokens"), (s, "priced_s"),
                                   (s, "new_tokens"), (s, "target_calls")):
                cols.append([side[u + (setting,)][field] for u in units])
        speed = [speedup(*map(sum, cols[i:i + 5])) for i in (0, 5)]
        per_call = [sum(cols[i + 3]) / sum(cols[i + 4]) for i in (0, 5)]
        d_speed = bootstrap_interval(cols, lambda *c: speedup(*c[5:]) - speedup(*c[:5]), groups=prompts)
        d_call = bootstrap_interval(cols, lambda *c: c[8] / c[9] - c[3] / c[4], groups=prompts)
        lines.append(f"| {s} | {speed[0]:.3f} | {speed[1]:.3f} | {speed[1] - speed[0]:+.3f} [{d_speed[0]:+.3f}, "
                     f"{d_speed[1]:+.3f}] | {per_call[0]:.3f} | {per_call[1]:.3f} | {per_call[1] - per_call[0]:+.3f} "
                     f"[{d_call[0]:+.3f}, {d_call[1]:+.3f}] |")
        for side, v in zip(ranked, speed):
            side.append((v, s))
    for name, side in zip(("engine", "replay"), ranked):
        lines.append(f"\n{name} ranking, fastest first: " + " > ".join(s for _, s in sorted(side, reverse=True)))
    return lines


if __name__ == "__main__":
    main()
