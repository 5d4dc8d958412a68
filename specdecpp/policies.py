"""Candidate-length policies: each decides, round by round, how many draft tokens to submit.

The engine asks a policy three things (like transformers' candidate generators, one job each):
`begin_round()` gives the most tokens it may draft this round (0 = no speculation), then after every
drafted token Y_i `keep_drafting(i, q_i, hidden)` says whether to draft Y_{i+1}, and after verification
`end_round(drafted, accepted)` reports the outcome. `hidden` is the draft's final hidden state at the
last position it consumed: for i >= 2 that position holds Y_{i-1}, so a head scores Y_{i-1} with it
(SpecDec++'s one-token lag: the prediction comes free with the forward that proposes Y_i).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class LengthPolicy:
    """Base class; subclasses override what they need. `name` and `params` label benchmark records."""

    name = "policy"
    needs_hidden = False  # the engine asks the draft for hidden states only when a policy reads them
    hindsight = False  # oracle only: the engine books the round as if it had stopped before the rejection

    def reset(self) -> None:
        """Called at the start of every generation."""

    def begin_round(self) -> int:
        raise NotImplementedError

    def keep_drafting(self, i: int, q_i: float, hidden: torch.Tensor | None) -> bool:
        return True

    def end_round(self, drafted: int, accepted: int) -> None:
        pass

    @property
    def params(self) -> dict:
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.name}({args})"


class TargetOnly(LengthPolicy):
    """No speculation: every round is one target step. The baseline, run by the same engine."""

    name = "target"

    def begin_round(self) -> int:
        return 0


class ConstantK(LengthPolicy):
    """SpecDec: always draft K tokens."""

    name = "constant"

    def __init__(self, k: int):
        if k < 1:
            raise ValueError(f"constant K must be >= 1, got {k}")
        self.k = k

    def begin_round(self) -> int:
        return self.k

    @property
    def params(self) -> dict:
        return {"k": self.k}


class Heuristic(LengthPolicy):
    """transformers' schedule: K += 2 after a fully accepted round, else K = max(1, K - 1)."""

    name = "heuristic"

    def __init__(self, k: int = 5, k_max: int = 64):
        if not 1 <= k <= k_max:
            raise ValueError(f"heuristic needs 1 <= k <= k_max, got k={k}, k_max={k_max}")
        self.k0, self.k, self.k_max = k, k, k_max

    def reset(self) -> None:
        self.k = self.k0

    def begin_round(self) -> int:
        return self.k

    def end_round(self, drafted: int, accepted: int) -> None:
        self.k = min(self.k + 2, self.k_max) if accepted == drafted else max(1, self.k - 1)

    @property
    def params(self) -> dict:
        return {"k": self.k0}


def _check_threshold(h: float) -> float:
    if not 0.0 <= h <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {h}")
    return h


def _check_bounds(k_min: int, k_max: int) -> None:
    if not 1 <= k_min <= k_max:
        raise ValueError(f"bounds must satisfy 1 <= K_min <= K_max, got K_min={k_min}, K_max={k_max}")


class Confidence(LengthPolicy):
    """Stop once the draft's probability of its own token falls below h (transformers'
    `assistant_confidence_threshold`, a DISCO-style rule). The low-confidence token is still submitted."""

    name = "confidence"

    def __init__(self, threshold: float, k_min: int = 1, k_max: int = 20):
        self.threshold = _check_threshold(threshold)
        _check_bounds(k_min, k_max)
        self.k_min, self.k_max = k_min, k_max

    def begin_round(self) -> int:
        return self.k_max

    def keep_drafting(self, i: int, q_i: float, hidden: torch.Tensor | None) -> bool:
        return i < self.k_min or q_i >= self.threshold

    @property
    def params(self) -> dict:
        return {"threshold": self.threshold, "k_min": self.k_min, "k_max": self.k_max}


class SpecDecPP(LengthPolicy):
    """SpecDec++: stop once the predicted P(at least one rejection) = 1 - prod_j P^_j exceeds h.

    `head` maps a draft hidden state [H] to an acceptance logit (any callable; the trained
    `AcceptanceHead` is one). P^_j = sigmoid(head(e_j)) predicts P(Y_j accepted | Y_<j accepted).
    """

    name = "specdecpp"
    needs_hidden = True

    def __init__(self, head: Callable[[torch.Tensor], torch.Tensor], threshold: float = 0.7,
                 k_min: int = 2, k_max: int = 20):
        self.head = head
        self.threshold = _check_threshold(threshold)
        _check_bounds(k_min, k_max)
        self.k_min, self.k_max = k_min, k_max
        self.p_all_accepted = 1.0
        self.predictions: list[float] = []  # P^_j of the current round, for inspection
        # per round: (predicted P(>= 1 rejection) when drafting stopped, whether one happened among the tokens
        # that prediction covers (Y_1..Y_{K-1}: the last token has no prediction yet), K); read by the benchmark
        self.stop_log: list[tuple[float, int, int]] = []

    def reset(self) -> None:
        self.stop_log = []

    def end_round(self, drafted: int, accepted: int) -> None:
        if drafted >= 2:  # a one-token round made no prediction
            self.stop_log.append((1.0 - self.p_all_accepted, int(accepted < drafted - 1), drafted))

    def begin_round(self) -> int:
        self.p_all_accepted = 1.0
        self.predictions = []
        return self.k_max

    @torch.no_grad()
    def keep_drafting(self, i: int, q_i: float, hidden: torch.Tensor | None) -> bool:
        if i >= 2:  # hidden scores Y_{i-1}; at i = 1 it sits on an already verified token
            p_hat = float(torch.sigmoid(self.head(hidden).float()).reshape(()))
            self.predictions.append(p_hat)
            self.p_all_accepted *= p_hat
        return i < self.k_min or 1.0 - self.p_all_accepted <= self.threshold

    @property
    def params(self) -> dict:
        return {"threshold": self.threshold, "k_min": self.k_min, "k_max": self.k_max}


class Oracle(LengthPolicy):
    """Hindsight bound: stops exactly before the first token verification rejects.

    It drafts `lookahead` tokens and lets verification find the first rejection; the engine then books
    the round as if drafting had stopped there (no discarded tokens). Its timings are not a speed.
    The output is exactly the target's: the tokens are those of speculative decoding with K = lookahead.
    """

    name = "oracle"
    hindsight = True

    def __init__(self, lookahead: int = 20):
        if lookahead < 1:
            raise ValueError(f"oracle lookahead must be >= 1, got {lookahead}")
        self.lookahead = lookahead

    def begin_round(self) -> int:
        return self.lookahead

    @property
    def params(self) -> dict:
        return {"lookahead": self.lookahead}


def make_policy(name: str, head: Callable | None = None, **params) -> LengthPolicy:
    """Build a policy by name, e.g. make_policy("constant", k=4) or make_policy("specdecpp", head, threshold=0.7)."""
    if name == "specdecpp":
        if head is None:
            raise ValueError("policy 'specdecpp' needs a head (a trained AcceptanceHead or any callable)")
        return SpecDecPP(head, **params)
    classes = {c.name: c for c in (TargetOnly, ConstantK, Heuristic, Confidence, Oracle)}
    if name not in classes:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted([*classes, 'specdecpp'])}")
    return classes[name](**params)


POLICY_NAMES = ("target", "constant", "heuristic", "confidence", "specdecpp", "oracle")
