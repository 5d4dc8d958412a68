"""The cost model: what a round costs, measured on a clocked model and fitted to records."""

import time

import pytest
import torch
from conftest import tiny_llama

from specdecpp.costs import CostModel, fit_cost_model, gap_closed, measure_costs, refreshed, share_of_room, whatif
from specdecpp.stats import GenerationStats, Round


class Clocked(torch.nn.Module):
    """A tiny model whose every forward advances a fake clock by cost(number of input tokens)."""

    def __init__(self, cost, clock):
        super().__init__()
        self.model, self.cost, self.clock = tiny_llama(0, layers=1).eval(), cost, clock
        self.config = self.model.config

    @property
    def device(self):
        return self.model.device

    def forward(self, input_ids, **kw):
        self.clock[0] += self.cost(input_ids.shape[1])
        return self.model(input_ids=input_ids, **kw)


def test_measured_costs_separate_the_step_to_a_multi_token_call_from_each_further_token(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    target = Clocked(lambda k: 0.010 if k == 1 else 0.014 + 0.001 * (k - 1), clock)
    draft = Clocked(lambda k: 0.005, clock)
    costs = measure_costs(target, draft, context=32, repeats=2)
    assert costs.target_s == pytest.approx(0.010)
    assert (costs.draft, costs.round_cost, costs.verify) == pytest.approx((0.5, 0.4, 0.1))
    # a round of 8 drafted tokens: 1 + r + 8 v target calls for the verification, 8 c for the drafts
    assert costs.seconds(1, 8, 1) == pytest.approx(0.010 * (1 + 0.4 + 0.8 + 4.0))
    assert costs.seconds(5, 0, 0) == pytest.approx(0.050)  # target-only calls pay no round cost
    # Theorem 3.1 at Delta = 0: c1 = c + v = 0.6, c2 = 1 + r - c1 = 0.8
    assert costs.threshold() == pytest.approx(0.8 / 1.4)
    assert CostModel(0.01, 0.5, 0.1).threshold() == pytest.approx(0.4)  # r = 0: the two-term model


def test_verified_rounds_count_the_calls_that_scored_drafts():
    stats = GenerationStats(rounds=[Round(4, 4, "policy"), Round(0, 0, "limit"), Round(2, 0, "policy")])
    assert stats.verified_rounds == 2 and stats.summary()["verified_rounds"] == 2


def _record(setting, calls, verified, drafted, seconds, prefill=0.5):
    return {"dataset": "d", "policy": setting.split()[0], "setting": setting, "target_calls": calls,
            "verified_rounds": verified, "drafted": drafted, "total_s": seconds + prefill, "prefill_s": prefill,
            "new_tokens": 100}


def test_the_engine_fit_recovers_the_cost_of_a_verifying_call():
    t_d, t_t, t_r = 0.04, 0.07, 0.03
    shapes = [("target", 100, 0, 0), ("target", 60, 0, 0), ("constant k=8", 12, 12, 96), ("constant k=8", 14, 14, 90),
              ("margin x", 10, 10, 95), ("margin x", 20, 18, 70)]
    records = [_record(s, c, v, d, t_d * d + t_t * c + t_r * v) for s, c, v, d in shapes]
    summary = [{"dataset": "d", "setting": s, "drafted": d, "target_calls": c, "verified_rounds": v, "prefill_s": 0.5,
                "new_tokens": 100, "seconds": t_d * d + t_t * c + t_r * v + 0.5} for s, c, v, d in shapes[::2]]
    fits = fit_cost_model(records, summary)
    assert fits["d"] == pytest.approx((t_d, t_t, t_r))
    assert all(abs(row["cost_model_error"]) < 1e-9 for row in summary)


def test_auto_stops_are_priced_by_the_engine_timings_once_they_tell_the_costs_apart():
    probe = CostModel(target_s=0.1, draft=0.3, verify=0.02, round_cost=0.5)
    t_d, t_t = 0.044, 0.11
    shapes = [("target", 64, 0, 0), ("constant k=2", 22, 22, 44), ("specdecpp auto", 30, 29, 40),
              ("target", 64, 0, 0), ("constant k=2", 24, 24, 48), ("specdecpp auto", 25, 25, 50)]
    records = [_record(s, c, v, d, t_d * d + t_t * c - 0.01 * v) for s, c, v, d in shapes]  # r < 0: clipped
    engine = refreshed(probe, records)
    assert (engine.target_s, engine.draft, engine.verify, engine.round_cost) == pytest.approx((t_t, 0.4, 0.0, 0.0))
    assert engine.round_units(3) == pytest.approx(1 + 3 * 0.4)
    assert refreshed(probe, records[:5]) is probe  # too few generations yet
    assert refreshed(probe, [r for r in records if r["policy"] != "target"] * 2) is probe  # 1 + r and t cannot part
    same_shape = [_record(s, c, c, 2 * c, t_d * 2 * c + t_t * c) for s, c, _, _ in shapes if s != "target"]
    assert refreshed(probe, records[:1] + same_shape * 2) is probe  # every round drafts 2: rank 2


def test_whatif_prices_verifying_calls():
    rows = [{"setting": "a", "new_tokens": 100, "target_calls": 10, "verified_rounds": 10, "drafted": 90}]
    assert whatif(rows, [0.5], 0.1, 0.4)["a"] == [pytest.approx(100 / (10 + 4 + 0.6 * 90))]
    assert whatif(rows, [0.5], 0.1)["a"] == [pytest.approx(100 / (10 + 0.6 * 90))]


def test_the_share_of_the_room_above_constant_k_on_what_if_curves_and_on_resampled_speeds():
    best = {"constant": [1.2, 2.0], "oracle": [1.6, 2.0], "specdecpp": [1.3, 2.4], "margin": [1.1, 1.9]}
    assert gap_closed(best, 0) == pytest.approx(0.25)  # (1.3 - 1.2) / (1.6 - 1.2)
    assert gap_closed(best, 0, "margin") == pytest.approx(-0.25)  # losing to constant K reads negative
    assert gap_closed(best, 1) != gap_closed(best, 1)  # no room above K: nan, not a division by zero
    x = torch.tensor([1.3, 1.6, 1.2], dtype=torch.float64)  # one formula for both: element-wise on tensors
    assert share_of_room(x, 1.2, 1.6).tolist() == pytest.approx([0.25, 1.0, 0.0])


def test_a_dataset_where_only_the_oracle_drafted_is_not_fitted():
    rows = [{"dataset": "d", "policy": "target", "drafted": 0, "target_calls": 8, "verified_rounds": 0,
             "total_s": 2.1, "prefill_s": 0.1},
            {"dataset": "d", "policy": "oracle", "drafted": 12, "target_calls": 3, "verified_rounds": 3,
             "total_s": 1.9, "prefill_s": 0.1}]
    assert fit_cost_model(rows, []) == {}  # not a fit of zeros
    assert set(fit_cost_model(rows + [{**rows[1], "policy": "constant"}], [])) == {"d"}
