"""From per-generation records to per-setting rows: ratios of sums, speedups against the same run's baseline,
bootstrap intervals over prompts; and the console table."""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path

from ..costs import CostModel, share_of_room, suggest_threshold, verified_rounds
from ..stats import bootstrap_interval


def read_run_records(run_dir: str | Path) -> list[dict]:
    """A run's records.jsonl (finished, or a `.running` one still going or interrupted: up to the first line that
    was cut short), or records.jsonl.gz where a committed run keeps them compressed."""
    path = Path(run_dir) / "records.jsonl"
    text = path.read_text() if path.is_file() or not path.with_suffix(".jsonl.gz").is_file() else \
        gzip.decompress(path.with_suffix(".jsonl.gz").read_bytes()).decode()
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def pool_runs(runs: list[list[dict]]) -> tuple[list[dict], int]:
    """Several runs' records as one list, each generation (dataset, setting, prompt, seed) counted once: the
    first-listed run's. Two runs of the same prompts share their target-only rows, so a run of one new setting
    (an oracle, say) pools with an earlier run's baselines. Returns the records and how many repeats were dropped."""
    seen, pooled = set(), []
    for records in runs:
        keys = [(r["dataset"], r["setting"], r["prompt_id"], r["seed"]) for r in records]
        pooled += [r for r, key in zip(records, keys) if key not in seen]
        seen.update(keys)
    return pooled, sum(map(len, runs)) - len(pooled)


def repriced(records: list[dict], costs: CostModel) -> list[dict]:
    """The records charged at another cost model from their counts (target calls, verifying calls, drafted
    tokens): the same decoding under another machine's costs."""
    return [{**r, "charged_s": costs.seconds(r["target_calls"], r["drafted"], verified_rounds(r))} for r in records]


def in_target_calls(runs: list[list[dict]], models: list[CostModel]) -> list[list[dict]]:
    """Priced runs' records recharged in target calls of each run's cost model (the one it was priced by). A priced
    run charges its counts in seconds of the target call it measured at its start, so the seconds of two runs are in
    different units and a speedup across them would be off by their ratio; in target calls they agree.
    ValueError for runs priced at different c, v or r: their charges are not comparable at all."""
    if len({(m.draft, m.verify, m.round_cost) for m in models}) > 1:
        raise ValueError("these runs were priced at different cost models")
    return [repriced(rs, dataclasses.replace(m, target_s=1.0)) for rs, m in zip(runs, models)]


def at_wall_time(records: list[dict]) -> list[dict]:
    """The records charged their wall time (a priced run's too); batch 1 only: a batched row's is its batch's."""
    if any(r.get("batch_size", 1) != 1 for r in records):
        raise ValueError("wall times compare only batch-1 records: a batched row's wall time is its batch's")
    return [{**r, "charged_s": r["total_s"]} for r in records]


def _ratio(a, b):
    return a / b


def summarize(records: list[dict], n_boot: int = 2000) -> list[dict]:
    """Per (dataset, setting): ratios of sums over prompts (seconds are each record's charged_s: a batched row's
    share of its batch's wall time), speedup against the same run's target-only rows, and
    95% bootstrap intervals over prompts (speedups resampled paired with the baseline's same prompts; a prompt's
    seeds are resampled together)."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["dataset"], r["setting"]), []).append(r)
    rows = []
    for (dataset, setting), rs in groups.items():
        n = sum(r["new_tokens"] for r in rs)
        secs = sum(r["charged_s"] for r in rs)
        prefill = sum(r["prefill_s"] for r in rs)
        calls, discarded = [r["target_calls"] for r in rs], [r["discarded"] for r in rs]
        tokens = [r["new_tokens"] for r in rs]
        prompts = [r["prompt_id"] for r in rs]  # the bootstrap's unit: a prompt with all its seeds
        rows.append({"dataset": dataset, "setting": setting, "policy": rs[0]["policy"], "params": rs[0]["params"],
                     "prompts": len(rs), "batch_size": rs[0].get("batch_size", 1), "new_tokens": n, "seconds": secs,
                     "prefill_s": prefill,
                     "tokens_per_s": n / secs,
                     "target_calls": sum(calls),
                     "draft_calls": sum(r["draft_calls"] for r in rs),
                     "drafted": sum(r["drafted"] for r in rs), "discarded": sum(discarded),
                     "verified_rounds": sum(map(verified_rounds, rs)),
                     "verification_rate": sum(calls) / n,
                     "verification_rate_ci": bootstrap_interval([calls, tokens], _ratio, n_boot, groups=prompts),
                     "discard_rate": sum(discarded) / n,
                     "discard_rate_ci": bootstrap_interval([discarded, tokens], _ratio, n_boot, groups=prompts),
                     "mean_acceptance_length": n / sum(calls),
                     "per_prompt_tokens_per_s": [r["tokens_per_s"] for r in rs]})
    for row in rows:
        mine = groups[(row["dataset"], row["setting"])]
        base_row = next(b for b in rows if b["dataset"] == row["dataset"] and b["policy"] == "target")
        base = {(r["prompt_id"], r["seed"]): r for r in groups[(row["dataset"], base_row["setting"])]}
        paired = [(r, base[(r["prompt_id"], r["seed"])]) for r in mine]
        # against the baseline on this setting's own prompts (pooled runs may hold a setting on some prompts only)
        base_tps = sum(b["new_tokens"] for _, b in paired) / sum(b["charged_s"] for _, b in paired)
        row["speedup"] = row["tokens_per_s"] / base_tps
        row["speedup_ci"] = bootstrap_interval(
            [[r["new_tokens"] for r, _ in paired], [r["charged_s"] for r, _ in paired],
             [b["new_tokens"] for _, b in paired], [b["charged_s"] for _, b in paired]],
            lambda n, t, nb, tb: (n / t) / (nb / tb), n_boot, groups=[r["prompt_id"] for r, _ in paired])
        per = [(r["new_tokens"] / r["charged_s"]) / (b["new_tokens"] / b["charged_s"]) for r, b in paired]
        row["speedup_min"], row["speedup_max"] = min(per), max(per)
    return rows


def _paired_columns(records: list[dict], dataset: str, settings: tuple[str, ...]) -> tuple[list, list[list]]:
    """The (prompt, seed) keys of `dataset` that every one of `settings` decoded, and per setting two columns over
    them: new tokens and charged seconds. ValueError when they share no prompt."""
    by = {(r["setting"], r["prompt_id"], r["seed"]): r for r in records if r["dataset"] == dataset}
    keys = sorted(set.intersection(*({(p, s) for (name, p, s) in by if name == n} for n in settings)))
    if not keys:
        raise ValueError(f"{', '.join(map(repr, settings))} share no prompt of {dataset!r}")
    return keys, [[by[(name, *k)][f] for k in keys] for name in settings for f in ("new_tokens", "charged_s")]


def paired_difference(records: list[dict], dataset: str, setting: str, other: str, n_boot: int = 2000,
                      ) -> tuple[float, tuple[float, float], int]:
    """speedup(setting) - speedup(other) over the prompts of `dataset` that both decoded (pooled runs may hold a
    setting on some prompts only), its 95% bootstrap interval (each resample draws the same prompts, with all
    their seeds, for both settings and the target-only baseline) and the number of prompts. ValueError when they
    share no prompt."""
    base = next(r["setting"] for r in records if r["dataset"] == dataset and r["policy"] == "target")
    keys, cols = _paired_columns(records, dataset, (setting, other, base))

    def diff(n, t, n_o, t_o, n_b, t_b):
        return (n / t - n_o / t_o) / (n_b / t_b)

    sums = [sum(c) for c in cols]
    return float(diff(*sums)), bootstrap_interval(cols, diff, n_boot, groups=[p for p, _ in keys]), len(
        {p for p, _ in keys})


def fastest(records: list[dict], dataset: str, settings: list[str], on_prompts_of: tuple[str, ...] = ()) -> str:
    """The one of `settings` with the most tokens per charged second on `dataset`, over the prompts that all of them
    and every setting in `on_prompts_of` decoded: the hindsight pick a paired comparison with those settings should
    use (pooled runs may hold a setting on some prompts only). ValueError when they share no prompt."""
    _, cols = _paired_columns(records, dataset, (*settings, *on_prompts_of))
    speed = {s: sum(cols[2 * i]) / sum(cols[2 * i + 1]) for i, s in enumerate(settings)}  # tokens, seconds
    return max(speed, key=speed.get)


def paired_gap_closed(records: list[dict], dataset: str, setting: str, constant: str, oracle: str,
                      n_boot: int = 2000) -> tuple[float, tuple[float, float], int]:
    """(speed(setting) - speed(constant)) / (speed(oracle) - speed(constant)) over the prompts of `dataset` that all
    three decoded: the share of the room between a constant K and the hindsight bound that `setting` takes
    (negative when it loses to K), its 95% bootstrap interval over prompts, and the number of prompts."""
    keys, cols = _paired_columns(records, dataset, (setting, constant, oracle))

    def share(n, t, n_k, t_k, n_o, t_o):
        return share_of_room(n / t, n_k / t_k, n_o / t_o)

    sums = [sum(c) for c in cols]
    lo, hi = bootstrap_interval(cols, share, n_boot, groups=[p for p, _ in keys])
    return float(share(*sums)), (lo, hi), len({p for p, _ in keys})


def stop_calibration(records: list[dict]) -> list[dict]:
    """Per (dataset, setting) whose records carry a stop_log (policies.RejectionRule): the rounds it scored, the mean
    predicted P(>= 1 rejection) among the drafted tokens when each ended, the share of those rounds where
    verification rejected one, the same in ten bins of the prediction (and their ECE: the rounds-weighted mean gap
    between prediction and outcome), and per candidate length K of the round."""
    groups: dict[tuple, list[tuple[float, int, int]]] = {}
    for r in records:
        for p, hit, k in r.get("stop_log") or []:
            groups.setdefault((r["dataset"], r["setting"]), []).append((p, hit, k))

    def cells(stops: dict[object, list[tuple[float, int, int]]], name: str, label) -> list[dict]:
        return [{name: label(key), "rounds": len(v), "predicted": sum(p for p, _, _ in v) / len(v),
                 "realised": sum(h for _, h, _ in v) / len(v)} for key, v in sorted(stops.items())]

    rows = []
    for (dataset, setting), stops in groups.items():
        bins: dict[int, list] = {}
        lengths: dict[int, list] = {}
        for stop in stops:
            bins.setdefault(min(int(stop[0] * 10), 9), []).append(stop)
            lengths.setdefault(stop[2], []).append(stop)
        binned = cells(bins, "bin", lambda b: f"{b / 10:.1f}-{(b + 1) / 10:.1f}")
        rows.append({"dataset": dataset, "setting": setting, "rounds": len(stops),
                     "predicted": sum(p for p, _, _ in stops) / len(stops),
                     "realised": sum(h for _, h, _ in stops) / len(stops),
                     "ece": sum(b["rounds"] * abs(b["predicted"] - b["realised"]) for b in binned) / len(stops),
                     "bins": binned, "by_length": cells(lengths, "k", int)})
    return rows


def verdict(records: list[dict], summary: list[dict], dataset: str) -> str | None:
    """One sentence: did the best SpecDec++ setting beat the best constant K on `dataset`, by how much (paired)."""
    best = best_by_policy(summary, dataset)
    if not {"specdecpp", "constant"} <= set(best):
        return None
    s, c = best["specdecpp"], best["constant"]
    d, (lo, hi), _ = paired_difference(records, dataset, s["setting"], c["setting"])
    outcome = "beat" if lo > 0 else "lost to" if hi < 0 else "did not separate from"
    return (f"{dataset}: SpecDec++ ({s['setting']}, {s['speedup']:.3f}x) {outcome} the best constant K "
            f"({c['setting']}, {c['speedup']:.3f}x): paired difference {d:+.3f}x, 95% interval [{lo:+.3f}, {hi:+.3f}] "
            f"over {s['prompts']} generations (both settings picked on these prompts)")


def best_by_policy(summary: list[dict], dataset: str) -> dict[str, dict]:
    best: dict[str, dict] = {}
    for row in summary:
        if row["dataset"] == dataset and (row["policy"] not in best
                                          or row["tokens_per_s"] > best[row["policy"]]["tokens_per_s"]):
            best[row["policy"]] = row
    return best


def best_setting(rows: list[dict]) -> dict | None:
    """The fastest speculative setting of one dataset's rows (the oracle is a bound, not a setting)."""
    rows = [r for r in rows if r["policy"] not in ("target", "oracle")]
    return max(rows, key=lambda r: r["speedup"]) if rows else None


def format_summary(summary: list[dict], datasets, costs: CostModel | None = None) -> str:
    """One table per dataset; "~" marks settings whose speedup interval overlaps the best setting's."""
    cols = [("setting", 34, "s"), ("tokens_per_s", 8, ".2f"), ("speedup", 7, ".3f"), ("ci", 15, "s"), ("mark", 1, "s"),
            ("verification_rate", 7, ".3f"), ("discard_rate", 7, ".3f"), ("mean_acceptance_length", 7, ".2f")]
    fitted = costs is None and any("cost_model_error" in r for r in summary)  # engine mode at batch 1 fits one
    if fitted:
        cols.append(("cost_model_error", 7, ".1%"))
    heads = {"tokens_per_s": "tok/s" if costs is None else "pred.t/s", "verification_rate": "verif",
             "discard_rate": "discard", "mean_acceptance_length": "acc.len", "cost_model_error": "model",
             "ci": "95% interval", "mark": "~"}
    out = []
    for dataset in datasets:
        rows = [r for r in summary if r["dataset"] == dataset]
        best = best_setting(rows)
        out.append(f"\n== {dataset} ({rows[0]['prompts']} generations per setting"
                   + (", speeds priced from counts by the cost model)" if costs else ")"))
        out.append("  ".join(f"{heads.get(c, c):<{w}}" if c == "setting" else f"{heads.get(c, c):>{w}}"
                             for c, w, _ in cols))
        for r in rows:
            lo, hi = r["speedup_ci"]
            overlaps = best is not None and r["policy"] not in ("target", "oracle") and lo <= best["speedup_ci"][1] \
                and hi >= best["speedup_ci"][0]
            cells = {"cost_model_error": float("nan"), **r, "ci": f"[{lo:.3f}, {hi:.3f}]",
                     "mark": "~" if overlaps else ""}  # nan: a dataset whose costs could not be fitted
            out.append("  ".join(f"{cells[c]:<{w}{f}}" if c == "setting" else f"{cells[c]:>{w}{f}}"
                                 for c, w, f in cols))
        by_policy = best_by_policy(summary, dataset)
        if fitted and "t_draft" not in rows[0]:
            out.append("cost model: not fitted (no setting but the oracle drafted)")
            h = None
        elif fitted:
            t_d, t_t, t_r = rows[0]["t_draft"], rows[0]["t_target"], rows[0]["t_round"]
            errors = [abs(r["cost_model_error"]) for r in rows if r["policy"] != "oracle"]
            out.append(f"cost model: {t_d * 1e3:.1f} ms per drafted token, {t_t * 1e3:.1f} ms per target call, "
                       f"{t_r * 1e3:+.1f} ms more per call that verifies drafts (+ measured prefill); "
                       f"max |predicted/measured - 1| = {max(errors):.1%} (oracle excluded)")
            h = suggest_threshold(t_d, t_t + t_r)
        elif costs is None:
            out.append(f"speeds are throughput: batches of {rows[0].get('batch_size', '?')} prompts")
            h = None
        else:
            out.append(f"cost model (in target calls of {costs.target_s * 1e3:.1f} ms): draft step c = "
                       f"{costs.draft:.3f}, a verifying call r = {costs.round_cost:.3f} more, each extra scored token "
                       f"v = {costs.verify:.3f}; prompt prefill not counted")
            h = costs.threshold()
        parts = [] if h is None else [
            f"SpecDec++ threshold from Theorem 3.1 with Delta = 0 at this cost ratio: h = {h:.2f}"]
        if "specdecpp" in by_policy:
            parts.append(f"swept best: {by_policy['specdecpp']['setting']} ({by_policy['specdecpp']['speedup']:.3f}x)")
        out.append("; ".join(parts))
    return "\n".join(out)
