"""Statistics heads against constant K, the margin cut-off and the oracle on the replay sweep's saved traces.

Runs configs/bench/replay.yaml (50 Alpaca dev prompts, then the 300 test prompts) keeping only the constant K,
margin and oracle grids and one SpecDec++ grid per head given, then the dev/test table (settings chosen on dev):

    python experiments/replay_results_head_stats.py   # -> runs/replay-v2-dev, runs/replay-v2,
                                                      #    docs/replay-results-head-stats.md
    python experiments/replay_results_head_stats.py --head runs/bf16-greedy/head-stats \
        --head runs/bf16-greedy/head-stats-50k --tag 50k --draft-cost 0.518 --verify-cost 0.075
        # (costs fixed: the main replay table's measured ones)

With --draft-cost/--verify-cost/--round-cost the speeds are priced at those costs instead of costs timed in this
run (so the run may share the machine, and its table compares with a run measured at those costs). Runs before
the round cost r existed priced r = 0: add --round-cost 0 to reproduce them.
"""

import argparse
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from specdecpp.bench import load_config, run_benchmark

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--head", action="append", help="an exported statistics head (repeat for several)")
    ap.add_argument("--tag", default="v2", help="runs/replay-<tag>[-dev], docs/replay-results-head-stats[-<tag>].md")
    ap.add_argument("--draft-cost", type=float)
    ap.add_argument("--verify-cost", type=float)
    ap.add_argument("--round-cost", type=float)
    args = ap.parse_args()
    heads = args.head or ["runs/bf16-greedy/head-stats"]
    costs = [f"{k}={v}" for k, v in (("draft_cost", args.draft_cost), ("verify_cost", args.verify_cost),
                                     ("round_cost", args.round_cost)) if v is not None]
    out = {"dev": f"runs/replay-{args.tag}-dev", "test": f"runs/replay-{args.tag}"}
    for split, overrides in (("dev", ["datasets=[alpaca]", "split=dev", "prompts_per_dataset=50"]), ("test", [])):
        cfg = load_config(ROOT / "configs/bench/replay.yaml",
                          [*overrides, *costs, f"out_dir={out[split]}", "overwrite=true"])
        template = next(p for p in cfg.policies if p.params.get("head"))  # the statistics head's grid
        cfg.policies = [p for p in cfg.policies if p.name in ("constant", "margin", "oracle")]
        cfg.policies[-1:-1] = [replace(template, params={**template.params, "head": h}) for h in heads]
        run_benchmark(cfg)
    doc = "docs/replay-results-head-stats" + ("" if args.tag == "v2" else f"-{args.tag}") + ".md"
    subprocess.run([sys.executable, str(ROOT / "experiments/dev_test_table.py"), "--dev", out["dev"], "--test",
                    out["test"], "--out", doc], check=True)


if __name__ == "__main__":
    main()
