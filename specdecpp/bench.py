"""Benchmark sweeps of adaptive speculative decoding: one module generates, callbacks observe.

`Benchmark.run()` walks datasets x seeds x prompts and, for each prompt, every policy setting in turn
(the target-only baseline first), so every speedup is a ratio measured side by side in one process.
Callbacks see `on_start`, `on_record` (after each generation) and `on_end` (with the summary), like
Lightning callbacks. Config: an omegaconf dataclass schema (`BenchConfig`), YAML plus `key=value` overrides.
"""

from __future__ import annotations

import csv
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from .costs import CostModel, fit_cost_model, measure_costs, suggest_threshold
from .policies import POLICY_NAMES, LengthPolicy, make_policy
from .prompts import load_prompts
from .sampling import SamplingConfig
from .stats import bootstrap_interval


@dataclass
class PolicySpec:
    """One policy with fixed `params` and a `grid` of values to sweep (every combination is one setting)."""

    name: str = "target"
    params: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)


@dataclass
class BenchConfig:
    target: str = "default"
    draft: Any = None  # a model reference, or an int: a self-draft of the target's first k layers
    head: str | None = None  # an exported acceptance head directory for `specdecpp` policies (or their params.head)
    datasets: list[str] = field(default_factory=lambda: ["alpaca"])
    split: str = "test"  # Alpaca split; HumanEval and GSM8K are test sets
    data_dir: str | None = None
    prompts_per_dataset: int = 4
    seeds: list[int] = field(default_factory=lambda: [0])
    policies: list[PolicySpec] = field(default_factory=lambda: [PolicySpec("target")])
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    dtype: str = "float32"
    device: str = "cpu"
    warmup: bool = True
    out_dir: str = "runs/bench"
    # "engine": decode every setting and time it; "replay": greedy only, simulate every setting from one pass of
    # each model per prompt (specdecpp/replay.py) and price it with a cost model (measured here unless given)
    mode: str = "engine"
    batch_size: int = 16  # replay: prompts per batched target generation
    draft_cost: float | None = None  # replay: c, a draft step in target calls (None: measured in this run)
    verify_cost: float | None = None  # replay: v, each extra scored token in target calls (None: measured)
    bootstrap: int = 2000  # resamples of prompts for the 95% intervals


@dataclass
class Setting:
    name: str
    params: dict

    @property
    def label(self) -> str:
        return self.name + "".join(f" {k}={Path(v).name if k == 'head' else v}" for k, v in self.params.items()
                                   if k not in ("k_min", "k_max"))

    def head_path(self, default: str | None) -> str | None:
        return self.params.get("head", default) if self.name == "specdecpp" else None

    @property
    def policy_params(self) -> dict:
        return {k: v for k, v in self.params.items() if k != "head"}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> BenchConfig:
    """Schema defaults, then the YAML file, then `key=value` overrides; unknown keys and bad types raise."""
    cfg = OmegaConf.structured(BenchConfig)
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"benchmark config not found: {path}")
        cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    return OmegaConf.to_object(cfg)


def expand_settings(cfg: BenchConfig) -> list[Setting]:
    """Every policy setting of the sweep, target-only first; refuses a bad sweep before any model loads."""
    settings = [Setting("target", {})]
    for spec in cfg.policies:
        if spec.name not in POLICY_NAMES:
            raise ValueError(f"unknown policy {spec.name!r}; choose from {list(POLICY_NAMES)}")
        if spec.name == "target":
            continue
        keys = list(spec.grid)
        for values in itertools.product(*(spec.grid[k] for k in keys)) if keys else [()]:
            settings.append(Setting(spec.name, {**spec.params, **dict(zip(keys, values))}))
    if len(settings) == 1:
        raise ValueError("the sweep is empty: list at least one speculative policy under `policies`")
    if not cfg.datasets or cfg.prompts_per_dataset < 1 or not cfg.seeds:
        raise ValueError("the sweep is empty: it needs datasets, prompts_per_dataset >= 1 and seeds")
    if cfg.mode not in ("engine", "replay"):
        raise ValueError(f"mode must be 'engine' or 'replay', got {cfg.mode!r}")
    if cfg.mode == "replay" and cfg.temperature != 0:
        raise ValueError(f"replay is exact for greedy decoding only (temperature 0), got temperature "
                         f"{cfg.temperature}: set temperature: 0, or mode: engine to decode and time every setting")
    if any(s.name == "specdecpp" and not s.head_path(cfg.head) for s in settings):
        raise ValueError("policy 'specdecpp' needs `head` (or params.head): the directory of an exported acceptance head")
    for s in settings:  # build each once with a stand-in head: bad parameters fail here, by name
        make_policy(s.name, head=(lambda h: h) if s.name == "specdecpp" else None, **s.policy_params)
    return settings


def check_heads_match_draft(cfg: BenchConfig, settings: list[Setting]) -> None:
    """Refuse a head trained for another draft, from config files alone (no weights loaded)."""
    from transformers import AutoConfig

    from .models import default_draft, precision_draft_dtype, resolve

    for head_dir in sorted({s.head_path(cfg.head) for s in settings} - {None}):
        path = Path(head_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no acceptance head at {head_dir} (expected config.json and model.safetensors)")
        head = json.loads(path.read_text())
        draft = default_draft(cfg.target) if cfg.draft is None else cfg.draft
        of_target = isinstance(draft, int) or precision_draft_dtype(draft) is not None
        draft_cfg = AutoConfig.from_pretrained(resolve(cfg.target if of_target else draft))
        depth = draft if isinstance(draft, int) else draft_cfg.num_hidden_layers
        trained = head.get("draft") or {}
        if head["hidden_size"] != draft_cfg.hidden_size or trained.get("num_layers", depth) != depth:
            raise ValueError(f"acceptance head {head_dir} was trained on draft {trained.get('name', '?')!r} "
                             f"(hidden size {head['hidden_size']}, {trained.get('num_layers', '?')} layers), but the "
                             f"benchmark drafts with hidden size {draft_cfg.hidden_size} and {depth} layers")


class Callback:
    def on_start(self, bench: Benchmark) -> None: ...
    def on_record(self, bench: Benchmark, record: dict) -> None: ...
    def on_end(self, bench: Benchmark, summary: list[dict]) -> None: ...


class Benchmark:
    def __init__(self, cfg: BenchConfig, callbacks: list[Callback] | None = None, pair=None):
        self.cfg = cfg
        self.settings = expand_settings(cfg)
        check_heads_match_draft(cfg, self.settings)
        self.prompts = {d: load_prompts(d, cfg.split if d == "alpaca" or Path(d).suffix else "test",
                                        cfg.prompts_per_dataset, cfg.data_dir) for d in cfg.datasets}
        self.callbacks = callbacks or []
        self.out_dir = Path(cfg.out_dir)
        self.sampling = SamplingConfig(cfg.temperature, cfg.top_k, cfg.top_p)
        self.pair, self.heads = pair, {}
        self.costs: CostModel | None = None  # replay mode: the cost model that prices the counts
        self.records: list[dict] = []

    @property
    def total(self) -> int:
        return sum(map(len, self.prompts.values())) * len(self.cfg.seeds) * len(self.settings)

    def _setup(self) -> None:
        from .models import load_pair

        if self.pair is None:
            self.pair = load_pair(self.cfg.target, self.cfg.draft, self.cfg.dtype, self.cfg.device)
        from .head import AcceptanceHead

        for head_dir in {s.head_path(self.cfg.head) for s in self.settings} - {None}:
            self.heads[head_dir] = AcceptanceHead.from_pretrained(head_dir).to(self.pair.device).eval()
            self.heads[head_dir].check_draft(self.pair.draft.config)

    def policy(self, setting: Setting) -> LengthPolicy:
        return make_policy(setting.name, head=self.heads.get(setting.head_path(self.cfg.head)), **setting.policy_params)

    def run(self) -> list[dict]:
        self._setup()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.cfg.mode == "replay":
            self.costs = self._replay_costs()
        for cb in self.callbacks:
            cb.on_start(self)
        if self.cfg.warmup and self.cfg.mode == "engine":  # first calls pay for allocation and kernel selection
            first = next(iter(self.prompts.values()))[0]
            for s in self.settings:
                self.pair.generate(first, self.policy(s), self.sampling, max_new_tokens=4)
        for dataset, prompts in self.prompts.items():
            runs = self._replayed(prompts) if self.cfg.mode == "replay" else self._decoded(prompts)
            for seed, pid, generate in runs:
                for s in self.settings:  # interleaved per prompt: machine noise hits every setting alike
                    policy = self.policy(s)
                    stats = generate(policy)
                    record = {"dataset": dataset, "prompt_id": pid, "seed": seed, "policy": s.name,
                              "params": s.params, "setting": s.label, "mode": self.cfg.mode, **stats.to_dict(),
                              "stop_log": getattr(policy, "stop_log", None)}
                    self.records.append(record)
                    for cb in self.callbacks:
                        cb.on_record(self, record)
        summary = summarize(self.records, self.cfg.bootstrap)
        if self.cfg.mode == "engine":
            fit_cost_model(self.records, summary)
        for cb in self.callbacks:
            cb.on_end(self, summary)
        return summary

    def _decoded(self, prompts: list[str]):
        """Engine mode: (seed, prompt id, decode-and-time under a policy) per prompt and seed."""
        for seed, (pid, prompt) in itertools.product(self.cfg.seeds, enumerate(prompts)):
            ids = self.pair.encode(prompt)
            yield seed, pid, lambda policy, ids=ids, seed=seed: self.pair.generate(
                ids, policy, self.sampling, self.cfg.max_new_tokens, seed=seed).stats

    def _replayed(self, prompts: list[str]):
        """Replay mode: (seed, prompt id, simulate under a policy), priced by the cost model, per prompt."""
        from .data import pad_token_id
        from .replay import make_traces, replay_generation

        tok = self.pair.tokenizer
        eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        traces = make_traces(self.pair.target, self.pair.draft, [self.pair.encode(p) for p in prompts],
                             self.cfg.max_new_tokens, eos, pad_token_id(tok), self.cfg.batch_size)
        for pid, trace in traces:
            def simulate(policy, trace=trace):
                stats = replay_generation(trace, policy, self.cfg.max_new_tokens)
                stats.total_s = self.costs.seconds(stats.target_calls, stats.drafted)
                return stats
            yield self.cfg.seeds[0], pid, simulate
            trace.release()

    def _replay_costs(self) -> CostModel:
        measured = measure_costs(self.pair.target, self.pair.draft)
        return CostModel(measured.target_s, measured.draft if self.cfg.draft_cost is None else self.cfg.draft_cost,
                         measured.verify if self.cfg.verify_cost is None else self.cfg.verify_cost)


def summarize(records: list[dict], n_boot: int = 2000) -> list[dict]:
    """Per (dataset, setting): ratios of sums over prompts, speedup against the same run's target-only rows, and
    95% bootstrap intervals over prompts (speedups resampled paired with the baseline's same prompts)."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["dataset"], r["setting"]), []).append(r)
    rows = []
    for (dataset, setting), rs in groups.items():
        n = sum(r["new_tokens"] for r in rs)
        secs = sum(r["total_s"] for r in rs)
        prefill = sum(r["prefill_s"] for r in rs)
        calls, discarded = [r["target_calls"] for r in rs], [r["discarded"] for r in rs]
        tokens = [r["new_tokens"] for r in rs]
        rows.append({"dataset": dataset, "setting": setting, "policy": rs[0]["policy"], "params": rs[0]["params"],
                     "prompts": len(rs), "new_tokens": n, "seconds": secs, "prefill_s": prefill,
                     "tokens_per_s": n / secs,
                     "target_calls": sum(calls),
                     "draft_calls": sum(r["draft_calls"] for r in rs),
                     "drafted": sum(r["drafted"] for r in rs), "discarded": sum(discarded),
                     "verification_rate": sum(calls) / n,
                     "verification_rate_ci": bootstrap_interval([calls, tokens], lambda a, b: a / b, n_boot),
                     "discard_rate": sum(discarded) / n,
                     "discard_rate_ci": bootstrap_interval([discarded, tokens], lambda a, b: a / b, n_boot),
                     "mean_acceptance_length": n / sum(calls),
                     "per_prompt_tokens_per_s": [r["tokens_per_s"] for r in rs]})
    for row in rows:
        mine = groups[(row["dataset"], row["setting"])]
        base_row = next(b for b in rows if b["dataset"] == row["dataset"] and b["policy"] == "target")
        base = {(r["prompt_id"], r["seed"]): r for r in groups[(row["dataset"], base_row["setting"])]}
        paired = [(r, base[(r["prompt_id"], r["seed"])]) for r in mine]
        row["speedup"] = row["tokens_per_s"] / base_row["tokens_per_s"]
        row["speedup_ci"] = bootstrap_interval(
            [[r["new_tokens"] for r, _ in paired], [r["total_s"] for r, _ in paired],
             [b["new_tokens"] for _, b in paired], [b["total_s"] for _, b in paired]],
            lambda n, t, nb, tb: (n / t) / (nb / tb), n_boot)
        per = [(r["new_tokens"] / r["total_s"]) / (b["new_tokens"] / b["total_s"]) for r, b in paired]
        row["speedup_min"], row["speedup_max"] = min(per), max(per)
    return rows


def best_by_policy(summary: list[dict], dataset: str) -> dict[str, dict]:
    best: dict[str, dict] = {}
    for row in summary:
        if row["dataset"] == dataset and (row["policy"] not in best
                                          or row["tokens_per_s"] > best[row["policy"]]["tokens_per_s"]):
            best[row["policy"]] = row
    return best


# --- callbacks --------------------------------------------------------------------------------------------------------


class ProgressBar(Callback):
    def on_start(self, bench):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=bench.total, desc="bench", unit="gen")

    def on_record(self, bench, record):
        self.bar.set_postfix_str(f"{record['dataset']} {record['setting']} {record['tokens_per_s']:.1f} tok/s")
        self.bar.update()

    def on_end(self, bench, summary):
        self.bar.close()


class JsonlWriter(Callback):
    """records.jsonl as the run goes (nothing lost if it is interrupted), then summary.json and summary.csv."""

    def on_start(self, bench):
        self.file = (bench.out_dir / "records.jsonl").open("w")
        (bench.out_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(bench.cfg)))

    def on_record(self, bench, record):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def on_end(self, bench, summary):
        self.file.close()
        (bench.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        cols = [k for k in summary[0] if k not in ("params", "per_prompt_tokens_per_s")]
        with (bench.out_dir / "summary.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, cols, extrasaction="ignore")
            w.writeheader()
            w.writerows(summary)


class ParetoPlot(Callback):
    """pareto_<dataset>.png: discard rate against verification rate (lower left is better), one marker per policy."""

    def on_end(self, bench, summary):
        from .plots import pareto_figure

        self.figures = {}
        for dataset in bench.prompts:
            fig = pareto_figure([r for r in summary if r["dataset"] == dataset], title=f"{dataset}")
            fig.savefig(bench.out_dir / f"pareto_{Path(dataset).stem}.png", dpi=120)
            self.figures[dataset] = fig


class TensorBoardLogger(Callback):
    """Scalars per setting (tokens/s, speedup, verification and discard rates) and the Pareto figures."""

    def on_end(self, bench, summary):
        from torch.utils.tensorboard import SummaryWriter

        from .plots import pareto_figure

        with SummaryWriter(str(bench.out_dir / "tensorboard")) as tb:
            for row in summary:
                for key in ("tokens_per_s", "speedup", "verification_rate", "discard_rate", "mean_acceptance_length"):
                    tb.add_scalar(f"{row['dataset']}/{row['setting']}/{key}", row[key], 0)
            for dataset in bench.prompts:
                tb.add_figure(f"{dataset}/pareto", pareto_figure([r for r in summary if r["dataset"] == dataset],
                                                                 title=dataset), 0)


class StopCalibration(Callback):
    """SpecDec++ rows: predicted P(>= 1 rejection) when drafting stopped vs whether verification found one."""

    def on_end(self, bench, summary):
        from .plots import stop_calibration_figure

        rows = [(p, hit) for r in bench.records if r["policy"] == "specdecpp" for p, hit, _ in (r["stop_log"] or [])]
        if not rows:
            return
        pred = torch.tensor([p for p, _ in rows])
        hit = torch.tensor([h for _, h in rows], dtype=torch.float)
        bins = (pred * 10).long().clamp(0, 9)
        table = [{"bin": f"{b / 10:.1f}-{(b + 1) / 10:.1f}", "rounds": int((bins == b).sum()),
                  "predicted": float(pred[bins == b].mean()), "realised": float(hit[bins == b].mean())}
                 for b in range(10) if (bins == b).any()]
        result = {"rounds": len(rows), "mean_predicted": float(pred.mean()), "mean_realised": float(hit.mean()),
                  "bins": table}
        (bench.out_dir / "stop_calibration.json").write_text(json.dumps(result, indent=2))
        stop_calibration_figure(table).savefig(bench.out_dir / "stop_calibration.png", dpi=120)


class WhatIf(Callback):
    """Replay mode: predicted speedup of the best setting of each policy as the draft cost c varies (the verify
    cost v as measured), whatif_<dataset>.png and whatif.json with the gap SpecDec++ closes between the best
    constant K and the oracle at the measured c and at c = 0.05 and 0.2."""

    COSTS = [0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]

    def on_end(self, bench, summary):
        if bench.costs is None:
            return
        from .costs import best_per_policy, gap_closed, whatif
        from .plots import whatif_figure

        c_measured = bench.costs.draft
        grid = sorted({*self.COSTS, round(c_measured, 4)})
        result = {"draft_cost_measured": c_measured, "verify_cost": bench.costs.verify, "draft_costs": grid,
                  "datasets": {}}
        for dataset in bench.prompts:
            rows = [r for r in summary if r["dataset"] == dataset]
            best = best_per_policy(whatif(rows, grid, bench.costs.verify), rows)
            gaps = {}
            if {"specdecpp", "constant", "oracle"} <= set(best):
                gaps = {f"c={c:g}": gap_closed(best, grid.index(c)) for c in (round(c_measured, 4), 0.05, 0.2)}
            result["datasets"][dataset] = {"best_speedup": best, "gap_closed": gaps}
            whatif_figure(grid, best, c_measured, title=dataset).savefig(
                bench.out_dir / f"whatif_{Path(dataset).stem}.png", dpi=120)
        (bench.out_dir / "whatif.json").write_text(json.dumps(result, indent=2))
        self.result = result


class ConsoleSummary(Callback):
    """The table people read first, then the cost-model check, the threshold suggestion and where files are."""

    def on_end(self, bench, summary):
        print(format_summary(summary, bench.prompts, bench.costs))
        print(f"\nrun directory: {bench.out_dir}  (records.jsonl, summary.csv/json, pareto_*.png, "
              f"tensorboard/: tensorboard --logdir {bench.out_dir / 'tensorboard'})")


def best_setting(rows: list[dict]) -> dict | None:
    """The fastest speculative setting of one dataset's rows (the oracle is a bound, not a setting)."""
    rows = [r for r in rows if r["policy"] not in ("target", "oracle")]
    return max(rows, key=lambda r: r["speedup"]) if rows else None


def format_summary(summary: list[dict], datasets, costs: CostModel | None = None) -> str:
    """One table per dataset; "~" marks settings whose speedup interval overlaps the best setting's."""
    cols = [("setting", 34, "s"), ("tokens_per_s", 8, ".2f"), ("speedup", 7, ".3f"), ("ci", 15, "s"), ("mark", 1, "s"),
            ("verification_rate", 7, ".3f"), ("discard_rate", 7, ".3f"), ("mean_acceptance_length", 7, ".2f")]
    if costs is None:
        cols.append(("cost_model_error", 7, ".1%"))
    heads = {"tokens_per_s": "tok/s" if costs is None else "pred.t/s", "verification_rate": "verif",
             "discard_rate": "discard", "mean_acceptance_length": "acc.len", "cost_model_error": "model",
             "ci": "95% interval", "mark": "~"}
    out = []
    for dataset in datasets:
        rows = [r for r in summary if r["dataset"] == dataset]
        best = best_setting(rows)
        out.append(f"\n== {dataset} ({rows[0]['prompts']} generations per setting"
                   + (", replayed: speeds predicted from counts)" if costs else ")"))
        out.append("  ".join(f"{heads.get(c, c):<{w}}" if c == "setting" else f"{heads.get(c, c):>{w}}"
                             for c, w, _ in cols))
        for r in rows:
            lo, hi = r["speedup_ci"]
            overlaps = best is not None and r["policy"] not in ("target", "oracle") and lo <= best["speedup_ci"][1] \
                and hi >= best["speedup_ci"][0]
            cells = {**r, "ci": f"[{lo:.3f}, {hi:.3f}]", "mark": "~" if overlaps else ""}
            out.append("  ".join(f"{cells[c]:<{w}{f}}" if c == "setting" else f"{cells[c]:>{w}{f}}" for c, w, f in cols))
        by_policy = best_by_policy(summary, dataset)
        if costs is None:
            t_d, t_t = rows[0]["t_draft"], rows[0]["t_target"]
            errors = [abs(r["cost_model_error"]) for r in rows if r["policy"] != "oracle"]
            out.append(f"cost model: {t_d * 1e3:.1f} ms per drafted token, {t_t * 1e3:.1f} ms per target call (+ "
                       f"measured prefill); max |predicted/measured - 1| = {max(errors):.1%} (oracle excluded)")
            h = suggest_threshold(t_d, t_t)
        else:
            out.append(f"cost model (in target calls of {costs.target_s * 1e3:.1f} ms): draft step c = {costs.draft:.3f},"
                       f" each extra scored token v = {costs.verify:.3f}; prompt prefill not counted")
            h = costs.threshold()
        line = f"SpecDec++ threshold from Theorem 3.1 with Delta = 0 at this cost ratio: h = {h:.2f}"
        if "specdecpp" in by_policy:
            line += f"; swept best: {by_policy['specdecpp']['setting']} ({by_policy['specdecpp']['speedup']:.3f}x)"
        out.append(line)
    return "\n".join(out)


def default_callbacks() -> list[Callback]:
    return [ProgressBar(), JsonlWriter(), ParetoPlot(), TensorBoardLogger(), StopCalibration(), WhatIf(),
            ConsoleSummary()]


def run_benchmark(cfg: BenchConfig, callbacks: list[Callback] | None = None) -> list[dict]:
    t = time.perf_counter()
    summary = Benchmark(cfg, default_callbacks() if callbacks is None else callbacks).run()
    print(f"benchmark took {time.perf_counter() - t:.0f} s")
    return summary


