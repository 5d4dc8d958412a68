"""Cost models of speculative decoding: what a round costs, measured or fitted, and what-if predictions.

In units of one target call on one token: a draft step costs c, and a target call that scores k drafted tokens
(plus its own) costs 1 + v k (on a GPU v is near 0; on a CPU the target is compute-bound and v is not).
A generation with R target calls and D drafted tokens then costs  T = R + (c + v) D,  and target-only decoding of
N tokens costs N. The paper's two-term model T = t_draft N_draft + t_target N_target is the same with
t_target = 1 and t_draft = c + v; its threshold theorem stops drafting once P(>= 1 rejection) exceeds
(c2 + Delta) / (c1 + c2 + Delta), c1 = cost of a discarded token, c2 = cost of a verification beyond a drafted token.
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

    def seconds(self, target_calls: int, drafted: int) -> float:
        return self.target_s * (target_calls + (self.draft + self.verify) * drafted)

    def threshold(self) -> float:
        """Theorem 3.1's threshold with Delta = 0 (not in the paper, which tunes h because Delta is unknown)."""
        return suggest_threshold(self.draft + self.verify, 1.0)


def suggest_threshold(t_draft: float, t_target: float) -> float:
    """SpecDec++'s stopping threshold with the unknown constant Delta set to 0: stop once
    P(>= 1 rejection) > c2 / (c1 + c2), where c1 = t_draft (the cost of a discarded token) and
    c2 = t_target - t_draft (the cost of a verification beyond a drafted token)."""
    c1, c2 = t_draft, max(t_target - t_draft, 0.0)
    return c2 / (c1 + c2) if c1 + c2 > 0 else 0.5


@torch.inference_mode()
def measure_costs(target: torch.nn.Module, draft: torch.nn.Module, context: int = 128,
                  scored: tuple[int, ...] = (1, 5, 9, 17), repeats: int = 7) -> CostModel:
    """Time, interleaved and best of `repeats`, a cached draft step and target calls scoring k tokens after a
    `context`-token prefix; fit t(k) = a + b (k - 1) by least squares: c = draft step / a, v = b / a."""
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
    best = {k: float("inf") for k in scored}
    best_draft = float("inf")
    for _ in range(repeats + 1):  # the first pass warms up and is dropped by min() only if slower
        best_draft = min(best_draft, timed(draft, d_cache, 1))
        for k in scored:
            best[k] = min(best[k], timed(target, t_cache, k))
    x = torch.tensor([[1.0, k - 1.0] for k in scored], dtype=torch.float64)
    y = torch.tensor([[best[k]] for k in scored], dtype=torch.float64)
    a, b = torch.linalg.lstsq(x, y).solution[:, 0].tolist()
    return CostModel(target_s=a, draft=best_draft / a, verify=max(b, 0.0) / a)


def fit_cost_model(records: list[dict], summary: list[dict]) -> dict[str, tuple[float, float]]:
    """Per dataset, the paper's T = t_draft * N_draft + t_target * N_target, fitted by least squares to each
    generation's decoding time (total minus the prompt prefill, which no policy changes); then each setting's
    time per token predicted from its counts alone plus its measured prefill. Oracle rows are left out of the
    fit: their timing includes a lookahead they do not book. t_draft prices one drafted token: its draft step
    and its share of the verification (not free when the target is compute-bound, as on a CPU)."""
    fits = {}
    for dataset in {r["dataset"] for r in records}:
        rs = [r for r in records if r["dataset"] == dataset and r["policy"] != "oracle"]
        x = torch.tensor([[r["drafted"], r["target_calls"]] for r in rs], dtype=torch.float64)
        y = torch.tensor([[r["total_s"] - r["prefill_s"]] for r in rs], dtype=torch.float64)
        t_draft, t_target = torch.linalg.lstsq(x, y).solution[:, 0].tolist()
        fits[dataset] = (t_draft, t_target)
        for row in summary:
            if row["dataset"] == dataset:
                predicted = (t_draft * row["drafted"] + t_target * row["target_calls"] + row["prefill_s"]) \
                    / row["new_tokens"]
                measured = row["seconds"] / row["new_tokens"]
                row.update(t_draft=t_draft, t_target=t_target, predicted_s_per_token=predicted,
                           measured_s_per_token=measured, cost_model_error=predicted / measured - 1)
    return fits


def whatif(rows: list[dict], draft_costs: list[float], verify: float) -> dict[str, list[float]]:
    """Predicted speedup over target-only of each summary row (one dataset) at every draft cost c, from its
    counts alone: N / (R + (c + v) D). Keyed by setting label."""
    return {r["setting"]: [r["new_tokens"] / (r["target_calls"] + (c + verify) * r["drafted"]) for c in draft_costs]
            for r in rows}


def best_per_policy(curves: dict[str, list[float]], rows: list[dict]) -> dict[str, list[float]]:
    """For each policy, the best of its settings at each draft cost (the envelope a sweep would pick)."""
    policy_of = {r["setting"]: r["policy"] for r in rows}
    best: dict[str, list[float]] = {}
    for setting, ys in curves.items():
        p = policy_of[setting]
        best[p] = [max(a, b) for a, b in zip(best[p], ys)] if p in best else list(ys)
    return best


def gap_closed(best: dict[str, list[float]], i: int, policy: str = "specdecpp") -> float:
    """(best `policy` - best constant K) / (oracle - best constant K) at draft-cost index i: the share of the room
    above constant K that `policy` takes (negative when it loses to constant K)."""
    const, oracle = best["constant"][i], best["oracle"][i]
    return (best[policy][i] - const) / (oracle - const) if oracle > const else float("nan")
