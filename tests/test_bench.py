import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf.errors import ConfigKeyError

import specdecpp.models
from specdecpp.bench import Benchmark, Callback, PolicySpec, default_callbacks, load_config, run_benchmark
from specdecpp.bench.config import expand_settings
from specdecpp.costs import CostModel, refreshed, suggest_threshold
from specdecpp.head import AcceptanceHead

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_head(tmp_path_factory):
    torch.manual_seed(0)
    draft = {"name": "tiny-random:2", "hidden_size": 64, "num_layers": 2, "vocab_size": 49152}
    return str(AcceptanceHead(64, 2, draft).save_pretrained(tmp_path_factory.mktemp("head")))


def tiny_cfg(tmp_path, head, **kw):
    overrides = [f"out_dir={tmp_path / 'run'}", "prompts_per_dataset=1", "max_new_tokens=8", f"head={head}",
                 *[f"{k}={v}" for k, v in kw.items()]]
    cfg = load_config(ROOT / "configs/bench/tiny.yaml", overrides)
    cfg.policies.append(PolicySpec("specdecpp", {"k_min": 1, "k_max": 6}, {"threshold": [0.3, 0.7]}))
    return cfg


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory, tiny_head):
    tmp_path = tmp_path_factory.mktemp("bench")
    return run_benchmark(tiny_cfg(tmp_path, tiny_head)), tmp_path / "run"


def test_tiny_sweep_writes_every_output_and_measures_speedup_side_by_side(tiny_sweep):
    summary, run = tiny_sweep
    for name in ["records.jsonl", "summary.csv", "summary.json", "config.yaml", "stop_calibration.json",
                 *[f"{kind}_{d}.png" for d in ("alpaca", "humaneval", "gsm8k")
                   for kind in ("pareto", "speedup", "stop_calibration")]]:
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    assert list((run / "tensorboard").glob("events.out.tfevents*"))
    records = [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]
    assert len(records) == 3 * 8  # 3 datasets x 1 prompt x (target + 7 settings)
    fields = {"dataset", "prompt_id", "seed", "policy", "params", "setting", "new_tokens", "target_calls",
              "drafted", "accepted", "discarded", "verification_rate", "discard_rate", "tokens_per_s", "draft_s",
              "verify_s", "head_s", "overhead_s", "total_s", "round_detail", "per_position_acceptance"}
    assert all(fields <= set(r) for r in records)
    for row in summary:  # speedup = this setting's tokens/s over the target-only rows of the same run and dataset
        mine = [r for r in records if r["dataset"] == row["dataset"] and r["setting"] == row["setting"]]
        base = [r for r in records if r["dataset"] == row["dataset"] and r["policy"] == "target"]
        tps = sum(r["new_tokens"] for r in mine) / sum(r["total_s"] for r in mine)
        base_tps = sum(r["new_tokens"] for r in base) / sum(r["total_s"] for r in base)
        assert row["speedup"] == pytest.approx(tps / base_tps)
    greedy = {}
    for r in records:  # greedy: every setting generated the same number of tokens for a prompt
        greedy.setdefault((r["dataset"], r["prompt_id"]), set()).add(r["new_tokens"])
    assert all(len(v) == 1 for v in greedy.values())


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the configuration was checked")
    monkeypatch.setattr(specdecpp.models, "load_pair", refuse)


def test_unknown_policy_is_refused_before_any_model_loads(tmp_path, tiny_head, no_model_loading):
    cfg = tiny_cfg(tmp_path, tiny_head)
    cfg.policies.append(PolicySpec("fastest"))
    with pytest.raises(ValueError, match="unknown policy 'fastest'"):
        Benchmark(cfg)


def test_empty_sweep_is_refused(tmp_path, tiny_head, no_model_loading):
    with pytest.raises(ValueError, match="sweep is empty"):
        Benchmark(load_config(ROOT / "configs/bench/tiny.yaml", ["policies=[]"]))
    with pytest.raises(ValueError, match="sweep is empty"):
        Benchmark(load_config(ROOT / "configs/bench/tiny.yaml", ["datasets=[]"]))


def test_head_from_another_draft_is_refused_before_any_model_loads(tmp_path, no_model_loading):
    other = AcceptanceHead(64, 2, {"name": "tiny-random:3", "hidden_size": 64, "num_layers": 3})
    path = other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="trained on draft 'tiny-random:3'"):
        Benchmark(tiny_cfg(tmp_path, path))
    wide = AcceptanceHead(32, 1).save_pretrained(tmp_path / "wide")
    with pytest.raises(ValueError, match="hidden size 32"):
        Benchmark(tiny_cfg(tmp_path, wide))
    cfg = tiny_cfg(tmp_path, tiny_head_missing := str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=tiny_head_missing):
        Benchmark(cfg)


def test_config_rejects_unknown_keys():
    with pytest.raises(ConfigKeyError):
        load_config(ROOT / "configs/bench/tiny.yaml", ["max_new_token=3"])


def test_suggested_threshold_follows_the_cost_ratio():
    assert suggest_threshold(0.0, 1.0) == pytest.approx(1.0)  # free drafts: keep drafting
    assert suggest_threshold(0.25, 1.0) == pytest.approx(0.75)
    assert suggest_threshold(1.0, 1.0) == pytest.approx(0.0)  # drafts as dear as the target: stop at once


def test_notebook_executes_on_the_tiny_runs(tiny_sweep, tiny_train_run, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("TRAIN_LOG", str(tiny_train_run[0]))
    monkeypatch.setenv("BENCH_RUN", str(tiny_sweep[1]))
    nb = nbformat.read(ROOT / "notebooks" / "analysis.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # shipped with outputs cleared
    NotebookClient(nb, timeout=300, resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3  # calibration, reliability, Pareto figures


def test_a_sampled_replay_runs_every_seed_and_keeps_each_seeds_traces(tmp_path, tiny_head, monkeypatch):
    """`mode=replay temperature=1.0`: one record per prompt, seed and setting; the seeds draw other outputs; a second
    run reads the cached traces (no model pass) and books the same rounds."""
    monkeypatch.setenv("SPECDECPP_CACHE", str(tmp_path / "cache"))
    cfg = tiny_cfg(tmp_path, tiny_head, mode="replay", temperature=1.0, top_k=50, datasets="[alpaca]",
                   prompts_per_dataset=2, seeds="[0,1]", max_new_tokens=10)
    run_benchmark(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "records.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 2 * 8 and {r["seed"] for r in records} == {0, 1}
    traces = sorted((tmp_path / "cache" / "traces").glob("*.safetensors"))
    assert len(traces) == 4  # 2 prompts x 2 seeds
    rounds = {(r["prompt_id"], r["seed"], r["setting"]): r["round_detail"] for r in records}
    assert any(rounds[(0, 0, s)] != rounds[(0, 1, s)] for s in ("constant k=3", "oracle lookahead=6"))

    import specdecpp.replay as replay

    monkeypatch.setattr(replay, "sample_responses", None)  # a cached run must not generate
    run_benchmark(tiny_cfg(tmp_path, tiny_head, mode="replay", temperature=1.0, top_k=50, datasets="[alpaca]",
                           prompts_per_dataset=2, seeds="[0,1]", max_new_tokens=10, out_dir=tmp_path / "again"))
    again = [json.loads(line) for line in (tmp_path / "again" / "records.jsonl").read_text().splitlines()]
    assert {(r["prompt_id"], r["seed"], r["setting"]): r["round_detail"] for r in again} == rounds


def test_a_sampled_engine_run_gives_each_prompt_its_own_draws_and_each_setting_the_same(tmp_path, tiny_head,
                                                                                         monkeypatch):
    """Prompts of one seed must not share a random stream (their first draws would coincide, and prompts that start
    alike would accept or reject together); the settings of one prompt share it (paired comparisons)."""
    seeds = []
    generate = specdecpp.models.ModelPair.generate

    def spy(self, prompt, policy, sampling, max_new_tokens, seed=0, **kw):
        seeds.append((tuple(map(tuple, prompt)), policy.name, seed))
        return generate(self, prompt, policy, sampling, max_new_tokens, seed=seed, **kw)

    monkeypatch.setattr(specdecpp.models.ModelPair, "generate", spy)
    cfg = tiny_cfg(tmp_path, tiny_head, temperature=1.0, datasets="[alpaca]", prompts_per_dataset=2,
                   seeds="[0,1]", max_new_tokens=4, warmup=False)
    cfg.policies = [PolicySpec("constant", {}, {"k": [2]})]
    run_benchmark(cfg)
    units = {}
    for prompt, policy, seed in seeds:
        units.setdefault((prompt, seed), set()).add(policy)
    assert len(units) == 2 * 2  # 2 prompts x 2 seeds: four streams, no two prompts or seeds share one
    assert len({seed for _, seed in units}) == 4 and len({prompt for prompt, _ in units}) == 2
    assert all(policies == {"target", "constant"} for policies in units.values())  # one stream for both settings


def test_a_timed_engine_run_with_auto_stops_reports_wall_time_not_priced_speeds(tmp_path, tiny_head, capsys):
    """An 'auto' stop needs a cost model, so a timed run measures one; its table still reports wall time."""
    cfg = tiny_cfg(tmp_path, tiny_head, datasets="[alpaca]", prompts_per_dataset=2, max_new_tokens=4)
    cfg.policies = [PolicySpec("specdecpp", {"k_min": 1, "k_max": 4}, {"threshold": ["auto"]})]
    run_benchmark(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "records.jsonl").read_text().splitlines()]
    assert (tmp_path / "run" / "costs.json").is_file() and all(r["priced_s"] is None for r in records)
    out = capsys.readouterr().out
    assert "tok/s" in out and "pred.t/s" not in out and "priced from counts" not in out


def test_a_timed_run_prices_auto_stops_by_its_own_timings_as_they_come_in(tmp_path, tiny_head):
    cfg = tiny_cfg(tmp_path, tiny_head, datasets="[alpaca]", prompts_per_dataset=4, max_new_tokens=6)
    cfg.policies = [PolicySpec("constant", {}, {"k": [2]}),
                    PolicySpec("specdecpp", {"k_min": 1, "k_max": 4}, {"threshold": ["auto"]})]
    run_benchmark(cfg)
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]
    costs = {k: CostModel(**v) for k, v in json.loads((run / "costs.json").read_text()).items()}
    auto = [i for i, r in enumerate(records) if r["params"].get("threshold") == "auto"]
    assert len(auto) == 4 and all("stop_costs" not in r for r in records if r["policy"] != "specdecpp")
    for i in auto:  # each generation priced by the fit to the generations before it (the probe's until it can)
        assert CostModel(**records[i]["stop_costs"]) == refreshed(costs["start"], records[:i])
    assert CostModel(**records[auto[0]]["stop_costs"]) == costs["start"]
    assert costs["engine alpaca"] == refreshed(costs["start"], records)


def test_costs_given_to_a_timed_engine_run_are_refused_not_ignored(tmp_path, tiny_head, no_model_loading):
    with pytest.raises(ValueError, match="draft_cost, round_cost price a run's counts"):
        Benchmark(tiny_cfg(tmp_path, tiny_head, draft_cost=0.1, round_cost=0.5))
    assert expand_settings(tiny_cfg(tmp_path, tiny_head, draft_cost=0.1, round_cost=0.5, priced=True))  # used


def test_heads_in_directories_of_one_name_are_two_settings_and_a_repeated_setting_is_refused(tmp_path, tiny_head):
    cfg = tiny_cfg(tmp_path, tiny_head)
    cfg.policies = [PolicySpec("specdecpp", {"head": f"runs/{run}/head-stats"}, {"threshold": [0.5]})
                    for run in ("a", "b")]
    assert [s.label for s in expand_settings(cfg)[1:]] == ["specdecpp head=runs/a/head-stats threshold=0.5",
                                                           "specdecpp head=runs/b/head-stats threshold=0.5"]
    cfg.policies.append(PolicySpec("specdecpp", {"head": "runs/a/head-stats"}, {"threshold": [0.5, 0.7]}))
    with pytest.raises(ValueError, match=r"twice: \['specdecpp head=runs/a/head-stats threshold=0.5'\]"):
        expand_settings(cfg)


def test_replay_signals_keep_heads_whose_directories_share_a_name_apart(tmp_path, tiny_head):
    heads = [shutil.copytree(tiny_head, tmp_path / run / "head-stats") for run in ("a", "b")]
    cfg = tiny_cfg(tmp_path, tiny_head, mode="replay", datasets="[alpaca]")
    cfg.policies = [PolicySpec("specdecpp", {"k_min": 1, "k_max": 6, "head": str(h)}, {"threshold": [0.5]})
                    for h in heads]
    run_benchmark(cfg)
    signals = json.loads((tmp_path / "run" / "signals.json").read_text())["alpaca"]
    assert sorted(k for k in signals["auroc"] if k.startswith("head ")) == [f"head {h}" for h in heads]


def test_replay_sweep_counts_equal_the_engine_sweep_and_carry_intervals(tmp_path, tiny_head, tiny_sweep):
    engine_summary, _ = tiny_sweep
    summary = run_benchmark(tiny_cfg(tmp_path, tiny_head, mode="replay", trace_batch_size=2))
    run = tmp_path / "run"
    assert (run / "whatif.json").is_file() and (run / "whatif_alpaca.png").is_file()
    engine = {(r["dataset"], r["setting"]): r for r in engine_summary}
    for row in summary:  # tiny fp32 models: the replay books exactly what the engine decoded
        e = engine[(row["dataset"], row["setting"])]
        assert (row["new_tokens"], row["target_calls"], row["drafted"], row["discarded"]) == \
            (e["new_tokens"], e["target_calls"], e["drafted"], e["discarded"])
        lo, hi = row["speedup_ci"]
        assert lo <= row["speedup"] <= hi
    whatif = json.loads((run / "whatif.json").read_text())
    assert whatif["draft_cost_measured"] > 0 and set(whatif["datasets"]) == {"alpaca", "humaneval", "gsm8k"}
    signals = json.loads((run / "signals.json").read_text())["alpaca"]
    head = f"head {tiny_head}"
    assert {"draft prob", "-entropy", "top-2 margin", head} <= set(signals["auroc"])
    assert 0 < signals["positions"] <= row_tokens(summary, "alpaca") - 1  # one prompt: at most all but the last
    assert set(signals["stop_events"][head]) >= {"k=1", "k=2"}


def test_paired_difference_is_the_difference_of_speedups_with_an_interval_around_it(tiny_sweep):
    from specdecpp.bench.summary import paired_difference

    summary, run = tiny_sweep
    records = [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]
    rows = {r["setting"]: r for r in summary if r["dataset"] == "alpaca"}
    d, (lo, hi), n = paired_difference(records, "alpaca", "constant k=3", "constant k=1")
    assert d == pytest.approx(rows["constant k=3"]["speedup"] - rows["constant k=1"]["speedup"])
    assert lo <= d <= hi and n == rows["constant k=3"]["prompts"]
    assert paired_difference(records, "alpaca", "constant k=3", "constant k=3") == (0.0, (0.0, 0.0), n)


def row_tokens(summary, dataset):
    return next(r["new_tokens"] for r in summary if r["dataset"] == dataset and r["policy"] == "target")


def test_batched_engine_sweep_keeps_one_record_per_prompt_with_the_same_tokens(tmp_path, tiny_head):
    def records(batch_size):
        out = tmp_path / f"b{batch_size}"
        run_benchmark(tiny_cfg(out, tiny_head, prompts_per_dataset=2, batch_size=batch_size))
        return [json.loads(line) for line in (out / "run" / "records.jsonl").read_text().splitlines()]

    alone = {(r["dataset"], r["setting"], r["prompt_id"]): r for r in records(1)}
    batched = records(2)
    assert len(batched) == len(alone)
    for r in batched:  # tiny fp32 models: each row decodes as it did alone
        a = alone[(r["dataset"], r["setting"], r["prompt_id"])]
        assert r["batch_size"] == 2 and a["batch_size"] == 1
        assert (r["new_tokens"], r["target_calls"], r["drafted"]) == (a["new_tokens"], a["target_calls"], a["drafted"])
        assert r["charged_s"] == pytest.approx(r["batch_s"] / 2) and r["total_s"] <= r["batch_s"]


def test_priced_engine_sweep_charges_each_row_its_counts_at_the_cost_model(tmp_path, tiny_head):
    """A batched T = 1 sweep with `priced`: every record is charged what its own counts cost at the run's cost model
    (the given c, v, r; one target call measured), not its share of the batch's wall time, which stays recorded."""
    c, v, r = 0.5, 0.1, 0.25
    summary = run_benchmark(tiny_cfg(tmp_path, tiny_head, prompts_per_dataset=2, batch_size=2, temperature=1.0,
                                     priced=True, draft_cost=c, verify_cost=v, round_cost=r))
    records = [json.loads(line) for line in (tmp_path / "run" / "records.jsonl").read_text().splitlines()]
    units = [x["target_calls"] + r * x["verified_rounds"] + (c + v) * x["drafted"] for x in records]
    per_call = [x["charged_s"] / u for x, u in zip(records, units)]
    assert min(per_call) > 0 and max(per_call) == pytest.approx(min(per_call))  # one measured target call
    assert all(x["batch_size"] == 2 and x["batch_s"] > 0 and x["charged_s"] == x["priced_s"] for x in records)
    assert any(x["drafted"] > x["accepted"] for x in records)  # T = 1 on random models: rejections priced too
    for row in summary:
        mine = [x for x in records if x["dataset"] == row["dataset"] and x["setting"] == row["setting"]]
        base = [x for x in records if x["dataset"] == row["dataset"] and x["policy"] == "target"]
        tokens_per_unit = sum(x["new_tokens"] for x in mine) / sum(
            x["target_calls"] + r * x["verified_rounds"] + (c + v) * x["drafted"] for x in mine)
        base_per_unit = sum(x["new_tokens"] for x in base) / sum(x["target_calls"] for x in base)
        assert row["speedup"] == pytest.approx(tokens_per_unit / base_per_unit)
    assert (tmp_path / "run" / "whatif.json").is_file()
    costs = json.loads((tmp_path / "run" / "costs.json").read_text())  # what priced it; measured at start and end
    assert set(costs) == {"used", "start", "end"}
    assert (costs["used"]["draft"], costs["used"]["verify"], costs["used"]["round_cost"]) == (c, v, r)
    assert costs["used"]["target_s"] == costs["start"]["target_s"] == pytest.approx(per_call[0])
    assert costs["end"]["target_s"] > 0


def _records(seed, rng):
    """Synthetic engine records: 12 prompts x (target, constant k=1, constant k=3), random lengths and times."""
    out = []
    for pid in range(12):
        n = int(rng.integers(8, 64))
        for name, k, per_token in (("target", None, 0.07), ("constant", 1, 0.06), ("constant", 3, 0.05)):
            secs = n * per_token * float(rng.uniform(0.7, 1.3))
            calls = n if k is None else n // k + 1
            out.append({"dataset": "alpaca", "prompt_id": pid, "seed": seed, "policy": name,
                        "params": {} if k is None else {"k": k}, "setting": name if k is None else f"{name} k={k}",
                        "new_tokens": n, "charged_s": secs, "prefill_s": 0.0, "target_calls": calls,
                        "verified_rounds": 0 if k is None else calls,
                        "draft_calls": 0, "drafted": n - calls, "discarded": int(rng.integers(0, 3)),
                        "tokens_per_s": n / secs, "batch_size": 1})
    return out


def test_pooled_runs_compare_two_settings_on_the_prompts_both_decoded():
    import numpy as np

    from specdecpp.bench.summary import paired_difference, summarize

    records = _records(0, np.random.default_rng(0))
    late = [{**r, "setting": "constant k=5"} for r in records if r["setting"] == "constant k=3" and r["prompt_id"] >= 6]
    shared = [r for r in records if r["prompt_id"] >= 6]
    d, ci, n = paired_difference(records + late, "alpaca", "constant k=5", "constant k=1")
    d_shared, ci_shared, _ = paired_difference(shared, "alpaca", "constant k=3", "constant k=1")
    assert (d, *ci) == pytest.approx((d_shared, *ci_shared))  # = prompts 6-11 alone, where k=5 copies k=3
    assert n == 6
    assert paired_difference(records + late, "alpaca", "constant k=1", "constant k=5")[0] == pytest.approx(-d)
    pooled = {r["setting"]: r for r in summarize(records + late)}  # its speedup: over the baseline's same prompts
    assert pooled["constant k=5"]["speedup"] == pytest.approx(
        {r["setting"]: r for r in summarize(shared)}["constant k=3"]["speedup"])
    early = [{**r, "setting": "constant k=7"} for r in records if r["setting"] == "constant k=3" and r["prompt_id"] < 6]
    with pytest.raises(ValueError, match="share no prompt"):
        paired_difference(records + late + early, "alpaca", "constant k=5", "constant k=7")


def test_pooled_runs_count_a_generation_two_runs_hold_once_the_first_runs():
    import numpy as np

    from specdecpp.bench.summary import paired_difference, pool_runs, summarize

    first = _records(0, np.random.default_rng(0))
    rerun = _records(0, np.random.default_rng(1))  # the same prompts and seed, other lengths and times
    oracle = [{**r, "policy": "oracle", "setting": "oracle"} for r in rerun if r["setting"] == "constant k=3"]
    pooled, repeats = pool_runs([first, [r for r in rerun if r["setting"] == "target"] + oracle])
    assert repeats == 12 and len(pooled) == len(first) + 12
    assert [r for r in pooled if r["setting"] != "oracle"] == first  # every baseline row is the first run's
    rows = {r["setting"]: r for r in summarize(pooled)}
    base_per_s = sum(r["new_tokens"] for r in first if r["policy"] == "target") / sum(
        r["charged_s"] for r in first if r["policy"] == "target")
    assert rows["oracle"]["speedup"] == pytest.approx(rows["oracle"]["tokens_per_s"] / base_per_s)
    assert rows["target"]["prompts"] == 12
    d, _, _ = paired_difference(pooled, "alpaca", "oracle", "constant k=1")
    assert d == pytest.approx(rows["oracle"]["speedup"] - rows["constant k=1"]["speedup"])
    assert pool_runs([first, first[:5]]) == (first, 5)


def test_priced_runs_pool_in_target_calls_whatever_target_call_each_measured():
    import numpy as np

    from specdecpp.bench.summary import in_target_calls, pool_runs, repriced, summarize
    from specdecpp.costs import CostModel

    records = _records(0, np.random.default_rng(0))
    fast, slow = CostModel(0.25, 0.4, 0.1, 1.5), CostModel(0.30, 0.4, 0.1, 1.5)  # one cost model, two target calls
    first = repriced(records, fast)
    second = [r for r in repriced(records, slow) if r["setting"] == "constant k=3"]  # a rerun of one setting
    rest = [r for r in first if r["setting"] != "constant k=3"]

    def speedup(runs):
        return {r["setting"]: r["speedup"] for r in summarize(pool_runs(runs)[0])}["constant k=3"]

    truth = speedup([first])
    assert speedup([rest, second]) == pytest.approx(truth * 0.25 / 0.30)  # seconds of two units: off by their ratio
    assert speedup(in_target_calls([rest, second], [fast, slow])) == pytest.approx(truth)
    with pytest.raises(ValueError, match="different cost models"):
        in_target_calls([first, second], [fast, CostModel(0.25, 0.2, 0.1, 1.5)])


def test_gap_closed_is_the_share_of_the_room_between_constant_k_and_the_oracle():
    import numpy as np

    from specdecpp.bench.summary import paired_gap_closed

    records = _records(0, np.random.default_rng(0))
    oracle = [{**r, "policy": "oracle", "setting": "oracle", "charged_s": r["charged_s"] / 2}
              for r in records if r["setting"] == "constant k=3" and r["prompt_id"] < 9]

    def speed(setting):  # tokens per second over prompts 0-8, the ones all three decoded
        rs = [r for r in records + oracle if r["setting"] == setting and r["prompt_id"] < 9]
        return sum(r["new_tokens"] for r in rs) / sum(r["charged_s"] for r in rs)

    share, (lo, hi), n = paired_gap_closed(records + oracle, "alpaca", "constant k=3", "constant k=1", "oracle")
    assert n == 9 and share == pytest.approx((speed("constant k=3") - speed("constant k=1"))
                                             / (speed("oracle") - speed("constant k=1")))
    assert lo <= share <= hi
    assert paired_gap_closed(records + oracle, "alpaca", "oracle", "constant k=1", "oracle")[:2] == (
        pytest.approx(1.0), pytest.approx((1.0, 1.0)))
    assert paired_gap_closed(records + oracle, "alpaca", "constant k=1", "constant k=1", "oracle")[0] == 0.0
    with pytest.raises(ValueError, match="share no prompt"):
        paired_gap_closed(records + oracle, "ghosts", "constant k=3", "constant k=1", "oracle")


def test_fastest_picks_on_the_prompts_every_named_setting_shares():
    from specdecpp.bench.summary import fastest

    def rec(setting, prompt, tokens, secs):
        return {"dataset": "d", "setting": setting, "policy": "constant", "prompt_id": prompt, "seed": 0,
                "new_tokens": tokens, "charged_s": secs}

    # k=1 is faster over all four prompts, k=2 over prompts 0-1, the only ones the oracle decoded
    records = [rec("k=1", 0, 10, 2.0), rec("k=1", 1, 10, 2.0), rec("k=1", 2, 10, 0.5), rec("k=1", 3, 10, 0.5),
               rec("k=2", 0, 10, 1.0), rec("k=2", 1, 10, 1.0), rec("k=2", 2, 10, 2.0), rec("k=2", 3, 10, 2.0),
               rec("oracle", 0, 10, 0.5), rec("oracle", 1, 10, 0.5)]
    assert fastest(records, "d", ["k=1", "k=2"]) == "k=1"
    assert fastest(records, "d", ["k=1", "k=2"], on_prompts_of=("oracle",)) == "k=2"
    with pytest.raises(ValueError, match="share no prompt"):
        fastest(records, "other", ["k=1", "k=2"])


def test_records_repriced_at_another_cost_model_charge_their_counts_or_their_wall_time():
    import numpy as np

    from specdecpp.bench.summary import at_wall_time, repriced, summarize
    from specdecpp.costs import CostModel

    records = [{**r, "total_s": r["charged_s"] * 2} for r in _records(0, np.random.default_rng(0))]
    per_call = {r["setting"]: r for r in summarize(repriced(records, CostModel(1.0, 0.0, 0.0, 0.0)))}
    for setting in ("constant k=1", "constant k=3"):  # free drafts: speedup = tokens per target call (target: 1)
        rs = [r for r in records if r["setting"] == setting]
        assert per_call[setting]["speedup"] == pytest.approx(
            sum(r["new_tokens"] for r in rs) / sum(r["target_calls"] for r in rs))
    c, v, rc = 0.3, 0.1, 0.5
    x = repriced(records, CostModel(2.0, c, v, rc))[5]
    calls = x["target_calls"] + rc * x["verified_rounds"] + (c + v) * x["drafted"]
    assert x["charged_s"] == pytest.approx(2.0 * calls)
    assert [r["charged_s"] for r in at_wall_time(records)] == [r["total_s"] for r in records]
    with pytest.raises(ValueError, match="batch-1"):
        at_wall_time([{**records[0], "batch_size": 4}])


def test_stop_calibration_is_kept_apart_per_dataset_and_setting():
    from specdecpp.bench.summary import stop_calibration

    def record(dataset, setting, stops):
        return {"dataset": dataset, "setting": setting, "stop_log": stops}

    records = [record("alpaca", "h=0.5", [(0.55, 1, 3), (0.95, 1, 1)]), record("alpaca", "h=0.5", [(0.6, 0, 4)]),
               record("gsm8k", "h=0.5", [(0.2, 0, 8)]), record("alpaca", "h=0.9", [(0.91, 0, 5)]),
               record("alpaca", "target", None)]
    rows = {(r["dataset"], r["setting"]): r for r in stop_calibration(records)}
    assert set(rows) == {("alpaca", "h=0.5"), ("gsm8k", "h=0.5"), ("alpaca", "h=0.9")}
    alpaca = rows[("alpaca", "h=0.5")]
    assert alpaca["rounds"] == 3
    assert alpaca["predicted"] == pytest.approx((0.55 + 0.95 + 0.6) / 3)
    assert alpaca["realised"] == pytest.approx(2 / 3)
    assert [(b["bin"], b["rounds"], b["realised"]) for b in alpaca["bins"]] == [
        ("0.5-0.6", 1, 1.0), ("0.6-0.7", 1, 0.0), ("0.9-1.0", 1, 1.0)]
    # ECE: each bin's |predicted - realised| weighted by its rounds: (0.45 + 0.6 + 0.05) / 3
    assert alpaca["ece"] == pytest.approx((0.45 + 0.6 + 0.05) / 3)
    assert [(b["k"], b["rounds"], b["realised"]) for b in alpaca["by_length"]] == [(1, 1, 1.0), (3, 1, 1.0),
                                                                                   (4, 1, 0.0)]
    assert rows[("gsm8k", "h=0.5")]["realised"] == 0.0


def test_intervals_resample_prompts_not_seeds():
    """A second seed that repeats every record exactly adds no evidence: the intervals must not narrow."""
    import numpy as np

    from specdecpp.bench.summary import paired_difference, summarize
    from specdecpp.stats import bootstrap_interval

    records = _records(0, np.random.default_rng(0))
    twice = records + [{**r, "seed": 1} for r in records]
    d, ci, n = paired_difference(records, "alpaca", "constant k=3", "constant k=1")
    assert ci[0] < d < ci[1]
    d2, ci2, n2 = paired_difference(twice, "alpaca", "constant k=3", "constant k=1")
    assert (d2, *ci2) == pytest.approx((d, *ci))
    assert n == n2 == 12  # prompts, not (prompt, seed) pairs
    once = {r["setting"]: r for r in summarize(records)}
    for row in summarize(twice):
        assert row["prompts"] == 2 * once[row["setting"]]["prompts"]
        for key in ("speedup_ci", "verification_rate_ci", "discard_rate_ci"):
            assert row[key] == pytest.approx(once[row["setting"]][key])
    # the same duplicates taken as independent items narrow the interval: the grouping is what holds it
    secs = [r["charged_s"] for r in records if r["setting"] == "constant k=3"]
    tokens = [float(r["new_tokens"]) for r in records if r["setting"] == "constant k=3"]
    lo, hi = bootstrap_interval([tokens, secs], lambda a, b: a / b)
    lo2, hi2 = bootstrap_interval([tokens * 2, secs * 2], lambda a, b: a / b)
    assert hi2 - lo2 < 0.9 * (hi - lo)


def test_prompt_offset_takes_later_prompts_keeps_their_ids_and_the_datasets_take_turns(tmp_path, tiny_head):
    from specdecpp.bench.benchmark import Benchmark
    from specdecpp.prompts import load_prompts

    cfg = tiny_cfg(tmp_path, tiny_head, prompt_offset=3, prompts_per_dataset=2, datasets="[alpaca,gsm8k]")
    bench = Benchmark(cfg, callbacks=[])
    assert bench.prompts["alpaca"] == load_prompts("alpaca", "test", 5)[3:]
    bench.run()
    order = list(dict.fromkeys((r["dataset"], r["prompt_id"]) for r in bench.records))
    assert order == [("alpaca", 3), ("gsm8k", 3), ("alpaca", 4), ("gsm8k", 4)]  # a run cut short has both sets
    replay = Benchmark(tiny_cfg(tmp_path / "replay", tiny_head, prompt_offset=3, prompts_per_dataset=2,
                                datasets="[alpaca,gsm8k]", mode="replay", trace_batch_size=2), callbacks=[])
    replay.run()  # the engine's order: a fit that persists across generations sees the same sequence in both
    assert list(dict.fromkeys((r["dataset"], r["prompt_id"]) for r in replay.records)) == order
    with pytest.raises(ValueError, match="prompt_offset must be >= 0"):
        Benchmark(tiny_cfg(tmp_path, tiny_head, prompt_offset=-1))
    with pytest.raises(ValueError, match="humaneval: no prompts after prompt_offset 1000"):
        Benchmark(tiny_cfg(tmp_path, tiny_head, prompt_offset=1000, datasets="[humaneval]"))



def test_a_persistent_fit_carries_over_its_sets_generations_alike_in_engine_and_replay(tmp_path, tiny_head):
    """A fit that persists sees each set's generations in the engine's order: the replay then books exactly what the
    engine decoded (tiny fp32 models, greedy), and a set's fit never sees another set's outcomes."""
    from specdecpp.bench.benchmark import _key

    persistent = [PolicySpec("online_confidence", {"k_max": 6, "lr": 0.5, "persist": True}, {"threshold": [0.5]}),
                  PolicySpec("specdecpp", {"k_min": 1, "k_max": 6, "online_lr": 0.5, "persist": True},
                             {"threshold": [0.5]})]
    runs = {}
    for mode in ("engine", "replay"):
        cfg = tiny_cfg(tmp_path / mode, tiny_head, prompts_per_dataset=3, max_new_tokens=12, mode=mode,
                       datasets="[alpaca,gsm8k]", trace_batch_size=3)
        cfg.policies = persistent
        runs[mode] = bench = Benchmark(cfg, callbacks=[])
        bench.run()
        labels = [s.label for s in bench.settings if s.name != "target"]
        assert sorted(bench._persistent) == sorted((label, d) for label in labels for d in ("alpaca", "gsm8k"))
        for policy in bench._persistent.values():
            assert (policy.online.a, policy.online.b) != (1.0, 0.0)  # each set's fit moved, and on its own
    booked = {mode: {_key(r): (r["new_tokens"], r["target_calls"], r["drafted"], r["discarded"])
                     for r in bench.records} for mode, bench in runs.items()}
    assert booked["engine"] == booked["replay"] and len(booked["engine"]) == 2 * 3 * 3


def test_pareto_figure_draws_every_policy_in_the_rows_each_in_its_own_colour():
    from specdecpp.plots import pareto_figure

    rows = [{"policy": p, "setting": p, "verification_rate": 0.2 + i / 10, "discard_rate": 0.3}
            for i, p in enumerate(["constant", "online_confidence", "specdecpp", "a_new_rule"])]
    ax = pareto_figure(rows).axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["constant", "specdecpp", "online_confidence", "a_new_rule"]
    colours = [line.get_color() for line in ax.get_lines() if line.get_label() in labels]
    assert len(set(colours)) == 4


def test_speedup_figure_draws_each_setting_with_its_interval_and_leaves_out_target_only():
    from specdecpp.plots import speedup_figure

    rows = [{"policy": "target", "setting": "target", "speedup": 1.0, "speedup_ci": (1.0, 1.0)},
            {"policy": "constant", "setting": "constant k=3", "speedup": 0.8, "speedup_ci": (0.7, 0.9)},
            {"policy": "specdecpp", "setting": "specdecpp threshold=0.5", "speedup": 1.2, "speedup_ci": (1.1, 1.4)}]
    ax = speedup_figure(rows).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["constant k=3", "specdecpp threshold=0.5"]
    bars = [c for c in ax.collections if len(c.get_segments()) == 1]  # each errorbar's horizontal segment
    spans = sorted(tuple(sorted(float(x) for x in c.get_segments()[0][:, 0])) for c in bars)
    assert spans == [pytest.approx((0.7, 0.9)), pytest.approx((1.1, 1.4))]


def test_pareto_figure_draws_each_head_of_a_policy_as_its_own_hollow_series():
    from specdecpp.plots import pareto_figure

    rows = [{"policy": "specdecpp", "setting": f"specdecpp threshold={h}", "params": {"threshold": h},
             "verification_rate": 0.2 + h, "discard_rate": 0.3} for h in (0.3, 0.5)]
    rows += [{"policy": "specdecpp", "setting": f"specdecpp head=runs/x/head-hidden threshold={h}",
              "params": {"head": "runs/x/head-hidden", "threshold": h}, "verification_rate": 0.1 + h,
              "discard_rate": 0.4} for h in (0.3, 0.5)]
    ax = pareto_figure(rows).axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["specdecpp", "specdecpp (runs/x/head-hidden)"]
    assert len(lines["specdecpp"].get_xdata()) == len(lines["specdecpp (runs/x/head-hidden)"].get_xdata()) == 2
    assert lines["specdecpp (runs/x/head-hidden)"].get_markerfacecolor() == "none"
    assert lines["specdecpp"].get_markerfacecolor() != "none"


def test_variant_tells_apart_heads_whose_directories_share_a_name():
    from specdecpp.plots import variant

    rows = [{"policy": "specdecpp", "params": {"head": f"runs/{run}/head-stats"}} for run in ("a", "b")]
    assert [variant(r) for r in rows] == ["specdecpp (runs/a/head-stats)", "specdecpp (runs/b/head-stats)"]
    assert variant({"policy": "specdecpp", "params": {"threshold": 0.5}}) == "specdecpp"


def test_an_interrupted_sweep_resumes_where_it_stopped_and_prices_the_rest_alike(tmp_path, tiny_head):
    """`resume=true` keeps an interrupted run's records, decodes only what they lack (a batch cut short again, the
    line the interruption cut dropped), prices the rest by the same cost model, and refuses another config."""
    from specdecpp.bench.callbacks import JsonlWriter

    class Interrupt(Exception):
        pass

    class InterruptAfter(Callback):
        def __init__(self, n=None):
            self.n, self.seen = n, []

        def on_record(self, bench, record):
            self.seen.append(record)
            if len(self.seen) == self.n:
                raise Interrupt

    c, v, r = 0.5, 0.1, 0.25
    kw = dict(prompts_per_dataset=2, batch_size=2, temperature=1.0, priced=True, draft_cost=c, verify_cost=v,
              round_cost=r)
    with pytest.raises(Interrupt):  # 5 records: the first row of a batch of two is written, its second is not
        run_benchmark(tiny_cfg(tmp_path, tiny_head, **kw), [JsonlWriter(), InterruptAfter(5)])
    running = tmp_path / "run.running"
    with (running / "records.jsonl").open("a") as f:
        f.write('{"dataset": "alp')
    with pytest.raises(ValueError, match=r"differs in \['max_new_tokens'\]"):
        run_benchmark(tiny_cfg(tmp_path, tiny_head, resume=True, **{**kw, "max_new_tokens": 9}), [])
    assert len((running / "records.jsonl").read_text().splitlines()) == 6  # a refused resume changes nothing

    resumed = InterruptAfter()
    total = Benchmark(tiny_cfg(tmp_path, tiny_head, **kw)).total
    run_benchmark(tiny_cfg(tmp_path, tiny_head, resume=True, **kw), [*default_callbacks(), resumed])
    assert len(resumed.seen) == total - 4  # the 4 records of whole batches kept, the cut batch decoded again
    records = [json.loads(line) for line in (tmp_path / "run" / "records.jsonl").read_text().splitlines()]
    keys = [(x["dataset"], x["prompt_id"], x["seed"], x["setting"]) for x in records]
    assert len(records) == total and len(set(keys)) == total and not running.exists()
    per_call = [x["priced_s"] / (x["target_calls"] + r * x["verified_rounds"] + (c + v) * x["drafted"])
                for x in records]
    assert max(per_call) == pytest.approx(min(per_call))  # both parts priced by the first part's target call

    fresh = tmp_path / "fresh"  # seeded per batch: the same counts as a run never interrupted
    run_benchmark(tiny_cfg(fresh, tiny_head, **kw), [JsonlWriter()])
    counts = lambda x: (x["new_tokens"], x["target_calls"], x["drafted"], x["accepted"])  # noqa: E731
    alone = {(x["dataset"], x["prompt_id"], x["seed"], x["setting"]): counts(x)
             for x in map(json.loads, (fresh / "run" / "records.jsonl").read_text().splitlines())}
    assert {k: counts(x) for k, x in zip(keys, records)} == alone


def test_resume_extends_a_finished_run_to_more_prompts_and_seeds_and_refuses_to_shrink_it(tmp_path, tiny_head):
    """A finished run resumed with more prompts and seeds decodes only the new ones, priced by the first part's cost
    model, and ends with the records a run of the larger config makes; asking for fewer is refused."""
    from specdecpp.bench.callbacks import JsonlWriter

    class Seen(Callback):
        def __init__(self):
            self.keys = []

        def on_record(self, bench, record):
            self.keys.append((record["dataset"], record["prompt_id"], record["seed"]))

    kw = dict(temperature=1.0, priced=True, draft_cost=0.5, verify_cost=0.1, round_cost=0.25)
    run_benchmark(tiny_cfg(tmp_path, tiny_head, **kw), [JsonlWriter()])
    first = (tmp_path / "run" / "records.jsonl").read_text().splitlines()
    grown = {**kw, "prompts_per_dataset": 2, "seeds": "[0,1]"}
    seen = Seen()
    run_benchmark(tiny_cfg(tmp_path, tiny_head, resume=True, **grown), [JsonlWriter(), seen])
    settings = len(Benchmark(tiny_cfg(tmp_path / "count", tiny_head, **kw)).settings)
    assert len(seen.keys) == 3 * (2 * 2 - 1) * settings  # each set: 4 (prompt, seed) pairs, one kept
    assert not any(pid == 0 and seed == 0 for _, pid, seed in seen.keys)
    records = (tmp_path / "run" / "records.jsonl").read_text().splitlines()
    assert records[: len(first)] == first and len(records) == 3 * 4 * settings

    fresh = tmp_path / "fresh"
    run_benchmark(tiny_cfg(fresh, tiny_head, **grown), [JsonlWriter()])
    counts = lambda x: (x["dataset"], x["prompt_id"], x["seed"], x["setting"], x["new_tokens"],  # noqa: E731
                        x["target_calls"], x["drafted"], x["accepted"])
    alone = sorted(counts(json.loads(x)) for x in (fresh / "run" / "records.jsonl").read_text().splitlines())
    assert sorted(counts(json.loads(x)) for x in records) == alone
    per_call = [x["priced_s"] / (x["target_calls"] + 0.25 * x["verified_rounds"] + 0.6 * x["drafted"])
                for x in map(json.loads, records)]
    assert max(per_call) == pytest.approx(min(per_call))  # both parts priced by the first part's target call
    with pytest.raises(ValueError, match="may grow, not shrink"):
        run_benchmark(tiny_cfg(tmp_path, tiny_head, resume=True, **kw), [])
    with pytest.raises(ValueError, match=r"differs in \['max_new_tokens'\]"):
        run_benchmark(tiny_cfg(tmp_path, tiny_head, resume=True, **{**grown, "max_new_tokens": 9}), [])
    assert not (tmp_path / "run.running").exists()  # refused before anything was copied
    assert (tmp_path / "run" / "records.jsonl").read_text().splitlines() == records  # the finished run untouched

    pair = json.loads((tmp_path / "run" / "pair.json").read_text())
    assert pair["dtypes"] == {"target": "float32", "draft": "float32"}
    (tmp_path / "run" / "pair.json").write_text(json.dumps({**pair, "dtypes": {"target": "bfloat16",
                                                                                "draft": "bfloat16"}}))
    with pytest.raises(ValueError, match="records were decoded with"):  # another CPU's dtype auto chose bf16
        run_benchmark(tiny_cfg(tmp_path, tiny_head, resume=True, **{**grown, "prompts_per_dataset": 3}), [])
    assert not (tmp_path / "run.running").exists()
    assert (tmp_path / "run" / "records.jsonl").read_text().splitlines() == records
    shutil.copytree(tmp_path / "run", tmp_path / "run.running")  # an extension interrupted beside the finished run
    with pytest.raises(ValueError, match="records were decoded with"):
        run_benchmark(tiny_cfg(tmp_path, tiny_head, resume=True, **{**grown, "prompts_per_dataset": 3}), [])
    assert (tmp_path / "run.running" / "records.jsonl").read_text().splitlines() == records  # its records kept
    shutil.rmtree(tmp_path / "run.running")

    other = tmp_path / "other" / "run"  # a folder that is not a run: resume=true does not make it replaceable
    other.mkdir(parents=True)
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds an earlier run"):
        run_benchmark(tiny_cfg(tmp_path / "other", tiny_head, resume=True, **kw), [])
    assert (other / "notes.txt").read_text() == "mine"


def test_committed_records_read_the_same_compressed(tmp_path):
    import gzip

    from specdecpp.bench.summary import read_run_records

    lines = [json.dumps({"dataset": "alpaca", "prompt_id": i, "setting": "target"}) for i in range(3)]
    (tmp_path / "records.jsonl").write_text("\n".join(lines) + "\n")
    plain = read_run_records(tmp_path)
    (tmp_path / "records.jsonl.gz").write_bytes(gzip.compress((tmp_path / "records.jsonl").read_bytes()))
    (tmp_path / "records.jsonl").unlink()
    assert read_run_records(tmp_path) == plain and len(plain) == 3


def test_figures_draw_an_interval_that_leaves_out_its_own_estimate():
    """A percentile interval of a ratio of sums over few prompts can miss its estimate; the figures must still draw
    (a run once died at its very end on this, in SpeedupPlot)."""
    from specdecpp.plots import pareto_figure, speedup_figure

    row = {"policy": "constant", "setting": "constant k=2", "speedup": 1.2, "speedup_ci": [1.25, 1.4],
           "verification_rate": 0.5, "discard_rate": 0.2, "verification_rate_ci": [0.55, 0.6],
           "discard_rate_ci": [0.1, 0.15], "params": {"k": 2}}
    assert speedup_figure([row]) is not None and pareto_figure([row]) is not None
