"""Paired differences between every two speculative settings of engine runs, and the three-term cost fit.

    python experiments/runs_report.py runs/wallclock-confirm                      # one run
    python experiments/runs_report.py runs/wallclock-confirm runs/wallclock-confirm2   # pooled (same settings)
    python experiments/runs_report.py runs/qwen-greedy-replay --settings "constant k=2" "margin threshold=0.3"
    python experiments/runs_report.py runs/qwen-t1-test.running --wall   # a run still going; wall times, not priced
    python experiments/runs_report.py runs/qwen-t1-test --price 0.05 0 0   # its counts at GPU-like costs
    python experiments/runs_report.py runs/qwen-t1-test --plot docs/qwen-t1-test-speedup   # and a figure per set
    python experiments/runs_report.py docs/records/qwen-t1-test-humaneval --first-rounds   # shared random streams?

Reads each run's records.jsonl (several runs pooled, a generation two runs hold counted once, the first-listed
run's; priced runs are charged in target calls, each run's own measured call its unit; two settings are compared on
the prompts both decoded) and prints per dataset each setting's speedup (tokens/s, tokens per target call, discard
rate, a predictor's stop calibration), each pair's speedup difference (later-listed minus earlier) with its 95%
bootstrap interval over prompts, with an oracle each setting's share of the room between the best constant K and
the oracle, and the fit T = t_draft D + t_target R + t_round V in target calls per run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from contextlib import suppress
from pathlib import Path

from _report import report

from specdecpp.bench.summary import (
    at_wall_time,
    fastest,
    in_target_calls,
    paired_difference,
    paired_gap_closed,
    pool_runs,
    read_run_records,
    repriced,
    stop_calibration,
    summarize,
)
from specdecpp.costs import CostModel, fit_cost_model, suggest_threshold
from specdecpp.plots import save, speedup_figure


def pct(x: float) -> str:
    """A signed share in whole percent, with one decimal under 1% (-0.3%, not a bound that reads -0%)."""
    return f"{x:+.1%}" if abs(x) < 0.01 else f"{x:+.0%}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--settings", nargs="+", help="report only these settings (and the target-only baseline)")
    ap.add_argument("--prompt-ids", nargs=2, type=int, metavar=("FIRST", "LAST"),
                    help="report only the generations of prompts FIRST..LAST (ids as the records number them)")
    ap.add_argument("--out", type=Path, help="also write the report here (markdown: the command, then the report)")
    ap.add_argument("--plot", type=Path, metavar="PREFIX",
                    help="also draw each dataset's speedups with their intervals to PREFIX_<dataset>.png")
    ap.add_argument("--first-rounds", action="store_true",
                    help="also count, per setting, the generations whose first drafted token was rejected (prompts "
                         "that share a random stream show it: they all accept or all reject together)")
    how = ap.add_mutually_exclusive_group()
    how.add_argument("--wall", action="store_true", help="a priced batch-1 run: compare wall times, not priced ones")
    how.add_argument("--price", nargs=3, type=float, metavar=("C", "V", "R"),
                     help="charge every record's counts at this cost model, in target calls (e.g. 0.05 0 0: GPU-like)")
    args = ap.parse_args()
    runs = [read_run_records(run) for run in args.runs]
    priced = not (args.wall or args.price) and any(map(_priced, runs))
    if priced:  # a run's priced seconds are of the target call it measured: compare in target calls
        runs = _in_target_calls(args.runs, runs)
    records, repeats = pool_runs(runs)
    if args.wall:
        records = at_wall_time(records)
    elif args.price:
        records = repriced(records, CostModel(1.0, *args.price))
    if args.settings:
        records = [r for r in records if r["policy"] == "target" or r["setting"] in args.settings]
    if args.prompt_ids:
        first, last = args.prompt_ids
        records = [r for r in records if first <= r["prompt_id"] <= last]
    if args.price:  # what the seconds are, for the rate's unit and the figures' titles
        rate, basis = "tokens per target call's time", "priced at c {:g}, v {:g}, r {:g}".format(*args.price)
    elif priced:
        whose = "run's" if len(runs) == 1 else "runs'"
        rate, basis = "tokens per target call's time", f"priced by the {whose} cost model"
    else:
        rate, basis = "tokens/s", "wall time"
    summary = summarize(records)
    # wall times are fitted per run: pooled runs may come from different CPUs, whose costs do not mix
    fits = {run: fit_cost_model(recs, []) for run, recs in zip(args.runs, runs)}
    calibration = stop_calibration(records)
    lines = [f"(pooled runs: {repeats} generations held by more than one run are counted once, the first-listed "
             f"run's)"] if repeats else []
    for dataset in sorted({r["dataset"] for r in records}):
        settings = [r["setting"] for r in summary if r["dataset"] == dataset and r["policy"] != "target"]
        lines.append(f"== {dataset} ({', '.join(map(str, args.runs))})")
        for row in summary:
            if row["dataset"] == dataset:
                lines.append(f"  {row['setting']}: {row['speedup']:.3f}x [{row['speedup_ci'][0]:.3f}, "
                             f"{row['speedup_ci'][1]:.3f}] over {row['prompts']} generations; "
                             f"{row['tokens_per_s']:.2f} {rate}, {row['mean_acceptance_length']:.2f} tokens per "
                             f"target call, {row['discard_rate']:.2f} drafted tokens discarded per token")
                if args.first_rounds and row["policy"] != "target":
                    firsts = [r["round_detail"][0] for r in records if (r["dataset"], r["setting"]) ==
                              (dataset, row["setting"]) and r["round_detail"] and r["round_detail"][0]["drafted"]]
                    lines.append(f"    first drafted token rejected in {sum(f['accepted'] == 0 for f in firsts)} of "
                                 f"{len(firsts)} generations")
                for stop in calibration:  # a rejection rule's P(>= 1 rejection) when the round ended vs verification
                    if (stop["dataset"], stop["setting"]) == (dataset, row["setting"]):
                        lines.append(f"    {stop['rounds']} rounds scored by the predictor: predicted "
                                     f"P(>= 1 rejection) {stop['predicted']:.3f}, realised {stop['realised']:.3f}")
        lines.append("  paired differences: each setting minus every one listed before it (baselines come first)")
        for b, a in ((b, a) for j, b in enumerate(settings) for a in settings[:j]):
            with suppress(ValueError):  # pooled runs: a setting of one run only meets the others on its prompts
                d, (lo, hi), n = paired_difference(records, dataset, b, a)
                lines.append(f"  {b} - {a}: {d:+.3f} [{lo:+.3f}, {hi:+.3f}] over {n} prompts")
        rows = {r["setting"]: r for r in summary if r["dataset"] == dataset}
        constants = [s for s in settings if rows[s]["policy"] == "constant"]
        for oracle in (s for s in settings if rows[s]["policy"] == "oracle" and constants):
            try:  # the best K in hindsight on the oracle's prompts, which is where the shares are measured
                best = fastest(records, dataset, constants, on_prompts_of=(oracle,))
            except ValueError:  # the oracle decoded no prompt that every constant K decoded
                continue
            lines.append(f"  share of the room between the best constant K ({best}) and {oracle} taken by each setting")
            for s in (s for s in settings if rows[s]["policy"] not in ("constant", "oracle")):
                with suppress(ValueError):  # as above: only where the three share prompts
                    share, (lo, hi), n = paired_gap_closed(records, dataset, s, best, oracle)
                    lines.append(f"  {s}: {pct(share)} [{pct(lo)}, {pct(hi)}] over {n} prompts")
        for run, fit in fits.items():
            if dataset not in fit:
                continue
            t_d, t_t, t_r = fit[dataset]
            where = f" of {run}" if len(fits) > 1 else ""
            lines.append(f"  cost fit (wall times{where}): {t_d * 1e3:.1f} ms a drafted token, {t_t * 1e3:.1f} ms a "
                         f"target call, {t_r * 1e3:+.1f} ms a verifying call: c + v = {t_d / t_t:.3f}, r = "
                         f"{t_r / t_t:.3f} target calls; Theorem 3.1 at these costs: h = "
                         f"{suggest_threshold(t_d, t_t + t_r):.2f}")
        if args.plot:
            fig = speedup_figure([r for r in summary if r["dataset"] == dataset], title=f"{dataset}, {basis}")
            lines.append(f"  figure: {save(fig, Path(f'{args.plot}_{Path(dataset).stem}.png'))}")
    text = "\n".join(lines)
    if args.out:  # the page says which command made it
        text = f"`python {shlex.join(sys.argv)}`\n\n```\n{text}\n```"
    report(text, args.out)


def _priced(records: list[dict]) -> bool:
    return all(r.get("priced_s") is not None and r.get("priced_s") == r["charged_s"] for r in records)


def _in_target_calls(dirs: list[Path], runs: list[list[dict]]) -> list[list[dict]]:
    """Priced runs recharged in target calls of each one's cost model (its costs.json's "used")."""
    if not all(map(_priced, runs)):
        sys.exit("pooling priced runs with wall-time runs: compare them with --wall or --price C V R")
    try:
        return in_target_calls(runs, [CostModel(**json.loads((d / "costs.json").read_text())["used"]) for d in dirs])
    except ValueError as e:
        sys.exit(f"{e}: compare them with --price C V R")


if __name__ == "__main__":
    main()
