"""What observes a benchmark run: progress bar, JSONL and CSV files, plots, TensorBoard, stop calibration,
the cost what-if and the console table. Each sees `on_start`, `on_record` (after each generation) and `on_end`
(with the summary), like Lightning callbacks."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

from omegaconf import OmegaConf

from ..atomic import write_text
from .summary import format_summary, verdict


class Callback:
    """Hooks a `Benchmark` calls with itself as `bench`."""

    def on_start(self, bench) -> None: ...
    def on_record(self, bench, record: dict) -> None: ...
    def on_trace(self, bench, dataset: str, prompt_id: int, trace) -> None: ...  # replay mode, per prompt
    def on_end(self, bench, summary: list[dict]) -> None: ...


class ProgressBar(Callback):
    def on_start(self, bench):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=bench.total, initial=len(bench.records), desc="bench", unit="gen")

    def on_record(self, bench, record):
        self.bar.set_postfix_str(f"{record['dataset']} {record['setting']} {record['tokens_per_s']:.1f} tok/s")
        self.bar.update()

    def on_end(self, bench, summary):
        self.bar.close()


class JsonlWriter(Callback):
    """config.yaml and records.jsonl as the run goes (nothing lost if it is interrupted: `resume=true` continues it),
    costs.json (what prices the run) from its start; then summary.json and summary.csv."""

    def on_start(self, bench):
        (bench.out_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(bench.cfg)))
        self._write_costs(bench)
        self._write_records(bench)  # a resumed run's records (or none), then each new one as it comes
        self.file = (bench.out_dir / "records.jsonl").open("a")

    def on_record(self, bench, record):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def on_end(self, bench, summary):
        self.file.close()
        self._write_records(bench)  # the records the summary saw: none that a resumed run decoded again
        (bench.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self._write_costs(bench)
        cols = [k for k in summary[0] if k not in ("params", "per_prompt_tokens_per_s")]
        with (bench.out_dir / "summary.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, cols, extrasaction="ignore")
            w.writeheader()
            w.writerows(summary)

    @staticmethod
    def _write_records(bench):
        write_text(bench.out_dir / "records.jsonl", "".join(json.dumps(r) + "\n" for r in bench.records))

    @staticmethod
    def _write_costs(bench):
        if bench.costs is not None:  # what priced the run, what was measured at its start (and end), and the
            # engine's own costs that priced a timed run's auto stops, per dataset
            costs = {"used": bench.costs, **bench.measured_costs,
                     **{f"engine {dataset}": c for dataset, c in bench.stop_costs.items()}}
            write_text(bench.out_dir / "costs.json", json.dumps({k: asdict(v) for k, v in costs.items()}, indent=2))


class PerSetFigure(Callback):
    """<name>_<dataset>.png: one figure per dataset of its summary rows, drawn by `draw`."""

    name = ""

    def draw(self, rows: list[dict], title: str): ...

    def on_end(self, bench, summary):
        from ..plots import save

        for dataset in bench.prompts:
            fig = self.draw([r for r in summary if r["dataset"] == dataset], title=dataset)
            save(fig, bench.out_dir / f"{self.name}_{Path(dataset).stem}.png")


class ParetoPlot(PerSetFigure):
    """pareto_<dataset>.png: discard rate against verification rate (lower left is better), one marker per policy."""

    name = "pareto"

    def draw(self, rows, title):
        from ..plots import pareto_figure

        return pareto_figure(rows, title=title)


class SpeedupPlot(PerSetFigure):
    """speedup_<dataset>.png: every setting's speedup over target-only with its 95% interval over prompts."""

    name = "speedup"

    def draw(self, rows, title):
        from ..plots import speedup_figure

        return speedup_figure(rows, title=title)


class TensorBoardLogger(Callback):
    """Scalars per setting (tokens/s, speedup, verification and discard rates) and the Pareto figures."""

    def on_end(self, bench, summary):
        from torch.utils.tensorboard import SummaryWriter

        from ..plots import pareto_figure

        with SummaryWriter(str(bench.out_dir / "tensorboard")) as tb:
            for row in summary:
                for key in ("tokens_per_s", "speedup", "verification_rate", "discard_rate", "mean_acceptance_length"):
                    tb.add_scalar(f"{row['dataset']}/{row['setting']}/{key}", row[key], 0)
            for dataset in bench.prompts:
                tb.add_figure(f"{dataset}/pareto", pareto_figure([r for r in summary if r["dataset"] == dataset],
                                                                 title=dataset), 0)


class StopCalibration(Callback):
    """Rounds of the rejection rules (SpecDec++, online confidence): the predicted P(>= 1 rejection) among the tokens
    drafted when the round ended against whether verification rejected one, per dataset and setting:
    stop_calibration.json, stop_calibration_<set>.png."""

    def on_end(self, bench, summary):
        from ..plots import save, stop_calibration_figure
        from .summary import stop_calibration

        rows = stop_calibration(bench.records)
        if not rows:
            return
        (bench.out_dir / "stop_calibration.json").write_text(json.dumps(rows, indent=2))
        for dataset in dict.fromkeys(r["dataset"] for r in rows):
            tables = {r["setting"]: r["bins"] for r in rows if r["dataset"] == dataset}
            figure = stop_calibration_figure(tables, title=dataset)
            save(figure, bench.out_dir / f"stop_calibration_{Path(dataset).stem}.png")


class WhatIf(Callback):
    """Replay or priced runs: predicted speedup of the best setting of each policy as the draft cost c varies (the
    verify cost v as measured), whatif_<dataset>.png and whatif.json with the gap SpecDec++ closes between the best
    constant K and the oracle at the measured c and at c = 0.05 and 0.2."""

    COSTS = [0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]

    def on_end(self, bench, summary):
        if bench.costs is None:
            return
        from ..costs import best_per_policy, gap_closed, whatif
        from ..plots import save, whatif_figure

        c_measured = bench.costs.draft
        grid = sorted({*self.COSTS, round(c_measured, 4)})
        result = {"draft_cost_measured": c_measured, "verify_cost": bench.costs.verify,
                  "round_cost": bench.costs.round_cost, "draft_costs": grid,
                  "datasets": {}}
        for dataset in bench.prompts:
            rows = [r for r in summary if r["dataset"] == dataset]
            best = best_per_policy(whatif(rows, grid, bench.costs.verify, bench.costs.round_cost), rows)
            gaps = {}
            if {"specdecpp", "constant", "oracle"} <= set(best):
                gaps = {f"c={c:g}": gap_closed(best, grid.index(c)) for c in (round(c_measured, 4), 0.05, 0.2)}
            result["datasets"][dataset] = {"best_speedup": best, "gap_closed": gaps}
            figure = whatif_figure(grid, best, c_measured, title=dataset)
            save(figure, bench.out_dir / f"whatif_{Path(dataset).stem}.png")
        (bench.out_dir / "whatif.json").write_text(json.dumps(result, indent=2))
        self.result = result


class SignalReport(Callback):
    """Replay mode: how well the draft's statistics and each acceptance head predict acceptance of the token drafted
    at each position of the traces (greedy: the draft's argmax; sampling: the coupled draw): AUROC, ECE and
    stop-event calibration per dataset, in signals.json."""

    def on_start(self, bench):
        self.signals: dict[str, list] = {}

    def on_trace(self, bench, dataset, prompt_id, trace):
        from ..predictors import trace_signals

        heads = {f"head {p}": h for p, h in bench.heads.items()}  # the whole path: two heads, two rows
        self.signals.setdefault(dataset, []).append(trace_signals(trace, heads))

    def on_end(self, bench, summary):
        if not self.signals:
            return
        from ..predictors import signal_report

        heads = [f"head {p}" for p in bench.heads]
        self.result = {d: signal_report(s, heads) for d, s in self.signals.items()}
        (bench.out_dir / "signals.json").write_text(json.dumps(self.result, indent=2))
        for d, r in self.result.items():
            print(f"{d}: AUROC for acceptance of the drafted token ({r['positions']} positions, "
                  f"{r['rejections']} rejected): " + ", ".join(f"{k} {v:.3f}" for k, v in r["auroc"].items()))


class ConsoleSummary(Callback):
    """The table people read first, then the cost-model check, the threshold suggestion and where files are."""

    def on_end(self, bench, summary):
        # a timed run may hold a cost model for its 'auto' stops: its table still reports wall time
        print(format_summary(summary, bench.prompts, bench.costs if bench.prices else None))
        for dataset in bench.prompts:
            line = verdict(bench.records, summary, dataset)
            if line:
                print(line)
        if {"start", "end"} <= set(bench.measured_costs):
            print(cost_drift(bench.measured_costs["start"], bench.measured_costs["end"]))
        if bench.cfg.mode == "replay":
            engine_s = sum(r["total_s"] for r in bench.records)
            print(f"replay: {len(bench.records)} generations simulated; decoding them through the engine would take "
                  f"about {engine_s / 3600:.1f} h at the measured costs (prompt prefill not included)")
        print(f"\nrun directory: {bench.run_dir}  (records.jsonl, summary.csv/json, pareto_*.png, speedup_*.png, "
              f"tensorboard/: tensorboard --logdir {bench.run_dir / 'tensorboard'})")


def cost_drift(start, end) -> str:
    """One line: the cost model measured at a run's start against the same measurement at its end."""
    parts = [f"{name} {getattr(start, f):.3f} -> {getattr(end, f):.3f}"
             for name, f in (("c", "draft"), ("r", "round_cost"), ("v", "verify"))]
    return (f"cost model drift over the run (start -> end): a target call {start.target_s * 1e3:.0f} -> "
            f"{end.target_s * 1e3:.0f} ms, " + ", ".join(parts) + " (the run is priced by the start's, or as given)")


def default_callbacks() -> list[Callback]:
    return [ProgressBar(), JsonlWriter(), ParetoPlot(), SpeedupPlot(), TensorBoardLogger(), StopCalibration(), WhatIf(),
            SignalReport(), ConsoleSummary()]
