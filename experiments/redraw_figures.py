"""Redraw a finished benchmark run's Pareto and what-if figures from its summary.json and whatif.json (after a change
to specdecpp/plots.py; no model runs), into --out (default: the run directory).

    python experiments/redraw_figures.py runs/qwen-greedy-replay --out docs --prefix qwen-greedy-
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from specdecpp.plots import pareto_figure, save, whatif_figure


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--prefix", default="", help="prefix of the written file names")
    args = ap.parse_args()
    out = args.out or args.run
    out.mkdir(parents=True, exist_ok=True)
    summary = json.loads((args.run / "summary.json").read_text())
    for dataset in dict.fromkeys(r["dataset"] for r in summary):
        print(save(pareto_figure([r for r in summary if r["dataset"] == dataset], title=dataset),
                   out / f"{args.prefix}pareto_{Path(dataset).stem}.png"))
    whatif = args.run / "whatif.json"
    if whatif.exists():
        result = json.loads(whatif.read_text())
        for dataset, v in result["datasets"].items():
            figure = whatif_figure(result["draft_costs"], v["best_speedup"], result["draft_cost_measured"],
                                   title=dataset)
            print(save(figure, out / f"{args.prefix}whatif_{Path(dataset).stem}.png"))


if __name__ == "__main__":
    main()
