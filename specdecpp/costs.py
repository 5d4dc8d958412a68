"""Cost models of speculative decoding: what a round costs, measured or fitted, and what-if predictions.

In units of one target call on one token: a draft step costs c, and a target call that scores k >= 1 drafted
tokens (plus its own) costs 1 + r + v k: r is the step from a one-token forward to a multi-token one (on this
CPU the fp32 target's 2-token forward costs about 1.4 one-token ones, and longer ones little more each), v each
further token (on a GPU r and v are near 0; on a CPU the target is compute-bound and they are not).
A generation with R target calls, V of them verifying drafts, and D drafted tokens costs  T = R + r V + (c + v) D,
and target-only decoding of N tokens costs N. The paper's two-term model T = t_draft N_draft + t_target N_target
is the same with r = 0, t_target = 1 and t_draft = c + v; its threshold theorem stops drafting once P(>= 1
rejection) exceeds (c2 + Delta) / (c1 + c2 + Delta), c1 = cost of a discarded token, c2 = cost of a verification
beyond a drafted token (here 1 + r - c - v).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache


@dataclass(frozen=True)
class CostModel:
    target_s: float  # seconds of one target call on one token
    draft: float  # c: one draft step, in target calls
    verify: float  # v: each extra token a target call scores, in target calls
    round_cost: float = 0.0  # r: what a call that scores drafted tokens costs beyond a one-token call, before v

    def seconds(self, target_calls: int, drafted: int, verified_rounds: int = 0) -> float:
        return self.target_s * (target_calls + self.round_cost * verified_rounds + (self.draft + self.verify) * drafted)

    def round_units(self, drafted: int) -> float:
        """A round's cost in target calls: 1 for a one-token call, 1 + r + (c + v) K for one that drafted K > 0."""
        return 1.0 + (self.round_cost + (self.draft + self.verify) * drafted if drafted > 0 else 0.0)

    def threshold(self) -> float:
        """Theorem 3.1's threshold with Delta = 0 (not in the paper, which tunes h because Delta is unknown)."""
        return suggest_threshold(self.draft + self.verify, 1.0 + self.round_cost)


def suggest_threshold(t_draft: float, t_target: float) -> float:
    """SpecDec++'s stopping threshold with the unknown constant Delta set to 0: stop once
    P(>= 1 rejection) > c2 / (c1 + c2), where c1 = t_draft (the cost of a discarded token) and
    c2 = t_target - t_draft (the cost of a verification beyond a drafted token)."""
    c1, c2 = t_draft, max(t_target - t_draft, 0.0)
    return c2 / (c1 + c2) if c1 + c2 > 0 else 0.5


def worth_drafting(accept: list[float], drafted: int, costs: CostModel, tokens_before: float = 0.0,
                   cost_before: float = 0.0) -> bool:
    """Threshold-free stopping: whether drafting one more token raises the expected tokens per unit cost.

    `accept` holds the calibrated P(Y_j accepted | Y_<j accepted) of the tokens drafted so far (`drafted` of them;
    a lagged head has one fewer). With A_j = P_1 ... P_j, a round that stops now commits E = 1 + sum_j A_j tokens in
    expectation and costs C = 1 + r + (c + v) K. One more token adds A_K P_{K+1} expected tokens for c + v. Over a
    generation the rate to maximise is tokens / cost, so (renewal-reward; Dinkelbach) the token is worth drafting
    iff A_K P_{K+1} > rho (c + v), with rho the generation's expected rate so far, (tokens_before + E) /
    (cost_before + C). P_{K+1} is not known before drafting Y_{K+1}; the last P_K stands in for it.
    With P_{K+1} = 1 this is SpecDec++'s rule with h = 1 - rho (c + v): a threshold the costs set, round by round.
    """
    if not accept:
        return True  # nothing predicted yet (a lagged head's first token)
    a = expected = 1.0
    for p in accept:
        a *= p
        expected += a
    rate = (tokens_before + expected) / (cost_before + costs.round_units(drafted))
    return a * accept[-1] > rate * (costs.draft + costs.verify)


@torch.inference_mode()
def measure_costs(target: torch.nn.Module, draft: torch.nn.Module, context: int = 128,
                  scored: tuple[int, ...] = (2, 5, 9, 17), repeats: int = 7) -> CostModel:
    """Time, interleaved and best of `repeats`, a cached draft step, a one-token target call and target calls
    scoring k tokens after a `context`-token prefix; fit t(k) = a + b (k - 1) over the k-token calls by least
    squares: c = draft step / t(1), v = b / t(1), r = a / t(1) - 1 (r and v clipped at 0)."""
    ids = (torch.arange(100, 100 + context, device=target.device) % target.config.vocab_size)[None]

    def prefilled(model):
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        return cache

    def timed(model, cache, k):
        t0 = time.perf_counter()
        model(input_ids=ids[:, :k], cache=cache, use_cache=True, logits_to_keep=k)
        dt = time.perf_counter() - t0
        cache.crop(-k)
        return dt

    t_cache, d_cache = prefilled(target), prefilled(draft)
    sizes = sorted({1, *scored})
    best = {k: float("inf") for k in sizes}
    best_draft = float("inf")
    for _ in range(repeats + 1):  # the first pass warms up and is dropped by min() only if slower
        best_draft = min(best_draft, timed(draft, d_cache, 1))
        for k in sizes:
            best[k] = min(best[k], timed(target, t_cache, k))
    many = [k for k in sizes if k > 1]
    x = torch.tensor([[1.0, k - 1.0] for k in many], dtype=torch.float64)
    y = torch.tensor([[best[k]] for k in many], dtype=torch.float64)
    a, b = torch.linalg.lstsq(x, y).solution[:, 0].tolist() if len(many) > 1 else (best[many[0]], 0.0)
    one = best[1]
    return CostModel(target_s=one, draft=best_draft / one, verify=max(b, 0.0) / one,
                     round_cost=max(a / one - 1.0, 0.0))


def fit_times(records: list[dict], full_rank: bool = False) -> tuple[float, float, float] | None:
    """(t_draft, t_target, t_round) in seconds: T = t_draft N_draft + t_target N_target + t_round N_verify (the
    paper's two terms, plus what a target call that verifies drafts costs beyond a one-token call), fitted by least
    squares to each generation's decoding time (total minus the prompt prefill, which no policy changes). t_draft
    prices one drafted token: its draft step and its share of the verification (not free when the target is
    compute-bound, as on a CPU). Oracle rows are left out: their timing includes a lookahead they do not book.
    None when nothing but the oracle drafted (target-only rows alone cannot tell the three costs apart), or, with
    `full_rank`, when the counts cannot tell them apart (a least-squares split that is then arbitrary still
    predicts the records' times, which is all `fit_cost_model` asks of it)."""
    rs = [r for r in records if r["policy"] != "oracle"]
    if not any(r["drafted"] for r in rs):
        return None
    x = torch.tensor([[r["drafted"], r["target_calls"], verified_rounds(r)] for r in rs], dtype=torch.float64)
    if full_rank and torch.linalg.matrix_rank(x) < 3:
        return None
    y = torch.tensor([[r["total_s"] - r["prefill_s"]] for r in rs], dtype=torch.float64)
    t_draft, t_target, t_round = torch.linalg.lstsq(x, y).solution[:, 0].tolist()
    return t_draft, t_target, t_round


def fit_cost_model(records: list[dict], summary: list[dict]) -> dict[str, tuple[float, float, float]]:
    """`fit_times` per dataset; then each setting's time per token (in `summary`) predicted from its counts alone
    plus its measured prefill, beside the time measured. A dataset where nothing but the oracle drafted is not
    fitted."""
    fits = {}
    for dataset in {r["dataset"] for r in records}:
        fit = fit_times([r for r in records if r["dataset"] == dataset])
        if fit is None:
            continue
        t_draft, t_target, t_round = fits[dataset] = fit
        for row in summary:
            if row["dataset"] == dataset:
                predicted = (t_draft * row["drafted"] + t_target * row["target_calls"]
                             + t_round * row["verified_rounds"] + row["prefill_s"]) / row["new_tokens"]
                measured = row["seconds"] / row["new_tokens"]
                row.update(t_draft=t_draft, t_target=t_target, t_round=t_round, predicted_s_per_token=predicted,
                           measured_s_per_token=measured, cost_model_error=predicted / measured - 1)
    return fits


def refreshed(costs: CostModel, records: list[dict], min_records: int = 6) -> CostModel:
    """The engine's own prices, for stops that read a cost model (threshold auto): `fit_times` over the timed
    generations so far, in target calls, once they tell the three costs apart (at least `min_records`, target-only
    ones among them, and a full-rank fit with positive draft and target times); `costs` (the probe's, from bare
    forwards) until then. The fit prices a drafted token's step and its share of the verification together, so
    c + v lands in `draft` (verify 0), and r is clipped at 0. A bare forward misses what the engine adds (sampling
    over the vocabulary, the head, a draft step that feeds two tokens after a fully accepted round)."""
    rs = [r for r in records if r["policy"] != "oracle"]
    fit = fit_times(rs, full_rank=True) if len(rs) >= min_records and any(r["policy"] == "target" for r in rs) else None
    if fit is None or fit[0] <= 0 or fit[1] <= 0:
        return costs
    t_draft, t_target, t_round = fit
    return CostModel(target_s=t_target, draft=t_draft / t_target, verify=0.0, round_cost=max(t_round / t_target, 0.0))


def verified_rounds(record: dict) -> int:
    """Target calls of a record that scored drafted tokens (from its rounds, for records older than the field)."""
    if "verified_rounds" in record:
        return record["verified_rounds"]
    return sum(1 for r in record["round_detail"] if r["drafted"] > 0)


def whatif(rows: list[dict], draft_costs: list[float], verify: float, round_cost: float = 0.0,
           ) -> dict[str, list[float]]:
    """Predicted speedup over target-only of each summary row (one dataset) at every draft cost c, from its
    counts alone: N / (R + r V + (c + v) D). Keyed by setting label."""
    return {r["setting"]: [r["new_tokens"] / (r["target_calls"] + round_cost * r["verified_rounds"]
                                              + (c + verify) * r["drafted"]) for c in draft_costs] for r in rows}


def best_per_policy(curves: dict[str, list[float]], rows: list[dict]) -> dict[str, list[float]]:
    """For each policy, the best of its settings at each draft cost (the envelope a sweep would pick)."""
    policy_of = {r["setting"]: r["policy"] for r in rows}
    best: dict[str, list[float]] = {}
    for setting, ys in curves.items():
        p = policy_of[setting]
        best[p] = [max(a, b) for a, b in zip(best[p], ys)] if p in best else list(ys)
    return best


def share_of_room(x, base, top):
    """(x - base) / (top - base): the share of the room between a baseline and a bound (constant K and the oracle)
    that x takes, negative when x loses to the baseline. Floats or tensors (a bootstrap's resampled speeds)."""
    return (x - base) / (top - base)


def gap_closed(best: dict[str, list[float]], i: int, policy: str = "specdecpp") -> float:
    """share_of_room of the best `policy` between the best constant K and the oracle at draft-cost index i (nan
    when the oracle is no better than constant K)."""
    const, oracle = best["constant"][i], best["oracle"][i]
    return share_of_room(best[policy][i], const, oracle) if oracle > const else float("nan")
