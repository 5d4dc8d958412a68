"""Candidate-length policies: each decides, round by round, how many draft tokens to submit.

The engine (and the greedy replay) asks a policy three things, like transformers' candidate generators:
`begin_round()` gives the most tokens it may draft this round (0 = no speculation), then after every drafted
token Y_i `keep_drafting(i, token)` says whether to draft Y_{i+1} (the engine also stops at the round maximum
and at EOS), and after verification `end_round(drafted, accepted)` reports the outcome.

`token` is a `DraftToken`: what the draft knows of Y_i. Its statistics come from the softmax of the draft's raw
logits in every sampling mode (in greedy mode the decoding distribution is one-hot, which says nothing).
`hidden` is the draft's final hidden state in the forward that proposed Y_i, i.e. at Y_{i-1}'s position: the
paper's head reads it as the state *at* Y_{i-1} and scores Y_{i-1} with it (SpecDec++'s one-token lag: the
prediction comes free with the forward that proposes Y_i); a head that also reads the statistics scores Y_i.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .costs import worth_drafting


@dataclass
class DraftToken:
    """What a policy may read of drafted token Y_i (statistics are NaN unless the policy `needs_stats`)."""

    prob: float = math.nan  # q_i(Y_i) under the raw softmax
    entropy: float = math.nan  # H(q_i) in nats
    margin: float = math.nan  # top-1 minus top-2 probability of q_i
    hidden: torch.Tensor | None = None  # [H], the forward that proposed Y_i (needs_hidden only)
    accept: float = math.nan  # replay of a sampled trace only: the true min(1, p(Y_i) / q(Y_i)) (`Ceiling` reads it)


class LengthPolicy:
    """Base class; subclasses override what they need. `name` and `params` label benchmark records."""

    name = "policy"
    needs_stats = False  # the engine computes DraftToken statistics only for policies that read them
    needs_hidden = False  # ... and asks the draft for hidden states only when a policy reads them
    hindsight = False  # oracle only: the engine books the round as if it had stopped before the rejection

    def reset(self) -> None:
        """Called at the start of every generation."""

    def begin_round(self) -> int:
        raise NotImplementedError

    def keep_drafting(self, i: int, token: DraftToken) -> bool:
        return True

    def end_round(self, drafted: int, accepted: int) -> None:
        pass

    def check_draft(self, draft: torch.nn.Module) -> None:
        """Raise if this policy cannot work with `draft` (a head trained for another draft); called before decoding."""

    def fresh(self) -> LengthPolicy:
        """A copy with state of its own, for another row of a batch; the modules it holds (a head) are shared."""
        shared = {id(v): v for v in vars(self).values() if isinstance(v, torch.nn.Module)}
        return copy.deepcopy(self, shared)

    @property
    def params(self) -> dict:
        return {}

    @property
    def most_per_round(self) -> int:
        """The most tokens it may draft in one round (what a replay must hold after a mismatch)."""
        return getattr(self, "k_max", 0)

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
        self.k = _check_count("constant K", k)

    def begin_round(self) -> int:
        return self.k

    @property
    def most_per_round(self) -> int:
        return self.k

    @property
    def params(self) -> dict:
        return {"k": self.k}


class Heuristic(LengthPolicy):
    """transformers' schedule: K += 2 after a fully accepted round, else K = max(1, K - 1)."""

    name = "heuristic"

    def __init__(self, k: int = 5, k_max: int = 64):
        if not 1 <= _check_count("heuristic k", k) <= _check_count("heuristic k_max", k_max):
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


AUTO = "auto"  # a rejection rule's threshold chosen by the cost model, round by round (costs.worth_drafting)


def _check_threshold(h: float) -> float:
    if isinstance(h, bool) or not isinstance(h, (int, float)) or not 0.0 <= h <= 1.0:
        raise ValueError(f"threshold must be in [0, 1] (a number; a rejection rule also takes 'auto'), got {h!r}")
    return h


def _check_count(name: str, value, low: int = 1) -> int:
    """A whole number of tokens >= low; refuses 2.5 and True (bool is an int subclass)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number >= {low}, got {value!r} ({type(value).__name__})")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def _check_bounds(k_min: int, k_max: int) -> None:
    if not 1 <= _check_count("K_min", k_min) <= _check_count("K_max", k_max):
        raise ValueError(f"bounds must satisfy 1 <= K_min <= K_max, got K_min={k_min}, K_max={k_max}")


class TokenRule(LengthPolicy):
    """A per-token stop rule within bounds: draft at least `k_min`, at most `k_max` tokens; in between, go on
    while `go_on(token)`. The token that trips the rule is still submitted (transformers and SVIP do the same)."""

    needs_stats = True

    def __init__(self, k_min: int = 1, k_max: int = 20):
        _check_bounds(k_min, k_max)
        self.k_min, self.k_max = k_min, k_max

    def begin_round(self) -> int:
        return self.k_max

    def keep_drafting(self, i: int, token: DraftToken) -> bool:
        return self.go_on(token) or i < self.k_min

    def go_on(self, token: DraftToken) -> bool:
        raise NotImplementedError

    @property
    def params(self) -> dict:
        return {"k_min": self.k_min, "k_max": self.k_max}


class Cutoff(TokenRule):
    """Go on while one statistic of the drafted token (`stat`, a DraftToken field) is at least `threshold`."""

    stat = "prob"

    def __init__(self, threshold: float, k_min: int = 1, k_max: int = 20):
        super().__init__(k_min, k_max)
        self.threshold = _check_threshold(threshold)

    def go_on(self, token: DraftToken) -> bool:
        return getattr(token, self.stat) >= self.threshold

    @property
    def params(self) -> dict:
        return {"threshold": self.threshold, **super().params}


class Confidence(Cutoff):
    """Stop once the draft's probability of its own token falls below h (transformers'
    `assistant_confidence_threshold` with a fixed threshold, a DISCO-style rule)."""

    name, stat = "confidence", "prob"


class Margin(Cutoff):
    """Stop once the draft's top-1 minus top-2 probability falls below m: a near-tie is where a draft that is a
    close copy of the target (another precision, say) disagrees with it."""

    name, stat = "margin", "margin"


def fit_confidence_threshold(probs: torch.Tensor, accepted: torch.Tensor, fn_weight: float = 3.0) -> float:
    """transformers' ROC re-fit: the threshold t minimising FPR + fn_weight * FNR for the rule "go on while
    prob >= t" (positive = accepted), over t in {+inf} and the observed probabilities. Ties go to the highest t,
    as argmin over sklearn's descending `roc_curve` thresholds does."""
    order = probs.double().argsort(descending=True)
    p, y = probs.double()[order], accepted.bool()[order]
    tp, fp = y.cumsum(0).double(), (~y).cumsum(0).double()
    last_of_tie = torch.cat([p[1:] != p[:-1], torch.tensor([True])])  # "prob >= t" admits a whole tie
    thresholds = torch.cat([torch.tensor([math.inf], dtype=torch.float64), p[last_of_tie]])
    tpr = torch.cat([torch.zeros(1, dtype=torch.float64), tp[last_of_tie]]) / max(int(y.sum()), 1)
    fpr = torch.cat([torch.zeros(1, dtype=torch.float64), fp[last_of_tie]]) / max(int((~y).sum()), 1)
    return float(thresholds[int(torch.argmin(fpr + fn_weight * (1 - tpr)))])


class AdaptiveConfidence(Confidence):
    """transformers' adaptive confidence (5.24): the confidence rule, its threshold re-fitted after every round
    from this generation's (draft probability, accepted) pairs by minimising FPR + 3 FNR (`fit_confidence_threshold`).
    Labels as transformers books them: the accepted tokens are positives, the first rejected one the only negative,
    later tokens are dropped; a re-fit needs more than 5 pairs of both classes. Starts at `threshold` (HF: 0.4)
    every generation, and the re-fitted value applies from the next round."""

    name = "adaptive_confidence"

    def __init__(self, threshold: float = 0.4, k_min: int = 1, k_max: int = 20, fn_weight: float = 3.0):
        super().__init__(threshold, k_min, k_max)
        self.fn_weight = fn_weight
        self.reset()

    def reset(self) -> None:
        self.current, self.probs, self.labels, self.round_probs = self.threshold, [], [], []

    def begin_round(self) -> int:
        self.round_probs = []
        return self.k_max

    def go_on(self, token: DraftToken) -> bool:
        self.round_probs.append(token.prob)
        return token.prob >= self.current

    def end_round(self, drafted: int, accepted: int) -> None:
        seen = self.round_probs[: accepted + (accepted < drafted)]
        self.probs += seen
        self.labels += [1] * min(accepted, len(seen)) + [0] * (len(seen) - min(accepted, len(seen)))
        if len(self.probs) > 5 and 0 < sum(self.labels) < len(self.labels):
            self.current = fit_confidence_threshold(torch.tensor(self.probs), torch.tensor(self.labels), self.fn_weight)


class SVIP(TokenRule):
    """SVIP's entropy cut-off (arXiv 2411.18462, authors' code): stop once sqrt(factor * H) > threshold, i.e.
    H > threshold^2 / factor nats (0.6 with the defaults 0.3 / 0.15); the round cap defaults to their 40."""

    name = "svip"

    def __init__(self, threshold: float = 0.3, factor: float = 0.15, k_min: int = 1, k_max: int = 40):
        super().__init__(k_min, k_max)
        if threshold < 0 or factor <= 0:
            raise ValueError(f"svip needs threshold >= 0 and factor > 0, got {threshold}, {factor}")
        self.threshold, self.factor = threshold, factor

    def go_on(self, token: DraftToken) -> bool:
        return math.sqrt(self.factor * token.entropy) <= self.threshold

    @property
    def params(self) -> dict:
        return {"threshold": self.threshold, "factor": self.factor, **super().params}


class AdaEDL(TokenRule):
    """AdaEDL (arXiv 2410.18351): stop once the entropy bound 1 - sqrt(gamma * H) on the token's acceptance
    falls below lambda; lambda adapts across rounds to the observed acceptance.

    No official code exists; this follows the public re-implementation that cites the paper's LaTeX source:
    after a round, AR <- b1 AR + (1 - b1) accepted/drafted; lambda' = lambda + eps if AR < alpha,
    lambda - eps if the round did not accept k_max tokens, else lambda; lambda <- b2 lambda + (1 - b2) lambda'.
    Choices where sources differ: the check runs after the token is drafted (like SVIP, so no draft pass is
    wasted), AR starts at alpha and lambda at `lam` every generation, lambda is clamped to [0, 1].
    """

    name = "adaedl"

    def __init__(self, lam: float = 0.7, gamma: float = 0.2, beta1: float = 0.5, beta2: float = 0.9,
                 eps: float = 0.01, alpha: float = 0.9, k_min: int = 1, k_max: int = 20):
        super().__init__(k_min, k_max)
        self.lam0, self.gamma = _check_threshold(lam), gamma
        self.beta1, self.beta2, self.eps, self.alpha = beta1, beta2, eps, alpha
        self.reset()

    def reset(self) -> None:
        self.lam, self.ar = self.lam0, self.alpha

    def go_on(self, token: DraftToken) -> bool:
        return 1.0 - math.sqrt(self.gamma * token.entropy) >= self.lam

    def end_round(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        self.ar = self.beta1 * self.ar + (1 - self.beta1) * accepted / drafted
        if self.ar < self.alpha:
            target = self.lam + self.eps
        elif accepted != self.k_max:
            target = self.lam - self.eps
        else:
            target = self.lam
        self.lam = min(max(self.beta2 * self.lam + (1 - self.beta2) * target, 0.0), 1.0)

    @property
    def params(self) -> dict:
        return {"lam": self.lam0, "gamma": self.gamma, **super().params}


class OnlineCalibration:
    """Platt scaling P^ = sigmoid(a z + b) of an acceptance logit z, fitted online by one SGD step on the log loss per
    observed outcome (vLLM's adaptive-verification estimator calibrates logit(max q) this way from the run's own
    accepts and rejects). A round that drafted m tokens and had n accepted labels Y_1..Y_n 1 and Y_{n+1} 0 (when
    n < m); the tokens after the first rejection were never judged and teach nothing."""

    def __init__(self, lr: float = 0.05):
        if not lr > 0:
            raise ValueError(f"the online calibration's learning rate must be > 0, got {lr}")
        self.lr, self.a, self.b = lr, 1.0, 0.0

    def restart(self) -> OnlineCalibration:
        return OnlineCalibration(self.lr)

    def prob(self, z: float, i: int = 1) -> float:
        return sigmoid(self.a * z + self.b)

    def update(self, logits: list[float], accepted: int) -> None:
        """`logits` of Y_1..Y_m in drafting order; the first `accepted` of them were accepted."""
        for z, y in zip(logits, _labels(len(logits), accepted)):
            g = self.prob(z) - y  # d(log loss)/d(a z + b)
            self.a -= self.lr * g * z
            self.b -= self.lr * g


def sigmoid(x: float) -> float:
    """1 / (1 + e^-x) without overflow for any float (a fitted slope times a confident logit can pass 700)."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _labels(drafted: int, accepted: int) -> list[float]:
    """Y_1..Y_n accepted (1), Y_{n+1} rejected (0) when n < drafted; later tokens were never judged."""
    return [1.0] * min(accepted, drafted) + ([0.0] if accepted < drafted else [])


class PositionCalibration:
    """vLLM 0.32's OnlineAcceptanceEstimator: P^ = sigmoid(a z + b_i), one slope shared by every position and an
    intercept per position i in the round (positions past `positions` share the last), refitted every
    `refit_every` rounds by Newton-IRLS on every outcome seen so far. A ridge penalty `l2` pulls (a, b) towards the
    identity map (1, 0), where it starts, so a refit on few outcomes stays near it."""

    def __init__(self, refit_every: int = 8, positions: int = 8, l2: float = 1.0, iterations: int = 5):
        if not (refit_every >= 1 and positions >= 1 and l2 > 0 and iterations >= 1):
            raise ValueError(f"per-position calibration needs refit_every >= 1, positions >= 1, l2 > 0 and "
                             f"iterations >= 1, got {refit_every}, {positions}, {l2}, {iterations}")
        self.refit_every, self.positions, self.l2, self.iterations = refit_every, positions, l2, iterations
        self.theta = torch.zeros(1 + positions, dtype=torch.float64)
        self.theta[0] = 1.0
        self.rows: list[tuple[float, int, float]] = []  # (z, position, label)
        self.rounds = 0

    def restart(self) -> PositionCalibration:
        return PositionCalibration(self.refit_every, self.positions, self.l2, self.iterations)

    def prob(self, z: float, i: int = 1) -> float:
        return sigmoid(float(self.theta[0]) * z + float(self.theta[min(i, self.positions)]))

    def update(self, logits: list[float], accepted: int) -> None:
        self.rows += [(z, i, y) for i, (z, y) in enumerate(zip(logits, _labels(len(logits), accepted)), 1)]
        self.rounds += 1
        if self.rounds % self.refit_every == 0:
            self.theta = irls_fit(self.rows, self.positions, self.l2, self.iterations, self.theta)


def irls_fit(rows: list[tuple[float, int, float]], positions: int, l2: float, iterations: int,
             start: torch.Tensor) -> torch.Tensor:
    """Newton-IRLS with a backtracking line search for the logistic model sigmoid(a z + b_i) on (z, i, label) rows,
    with a ridge penalty l2 / 2 |theta - (1, 0, ..., 0)|^2; returns theta = (a, b_1..b_positions)."""
    prior = torch.zeros(1 + positions, dtype=torch.float64)
    prior[0] = 1.0
    theta = start.clone()
    if not rows:
        return theta
    data = torch.tensor(rows, dtype=torch.float64)
    x = torch.zeros(len(rows), 1 + positions, dtype=torch.float64)
    x[:, 0] = data[:, 0]
    x[torch.arange(len(rows)), data[:, 1].long().clamp(max=positions)] = 1.0
    y = data[:, 2]
    def loss(t: torch.Tensor) -> float:  # the penalized negative log-likelihood
        s = x @ t
        return float((torch.nn.functional.softplus(s) - y * s).sum() + l2 / 2 * ((t - prior) ** 2).sum())

    current = loss(theta)
    for _ in range(iterations):
        p = torch.sigmoid(x @ theta)
        grad = x.T @ (p - y) + l2 * (theta - prior)
        hess = x.T @ (x * (p * (1 - p))[:, None]) + l2 * torch.eye(1 + positions, dtype=torch.float64)
        step, size = torch.linalg.solve(hess, grad), 1.0
        # a full Newton step can overshoot far from the optimum (acceptance is not monotone in logit q at T = 1:
        # a very unlikely drafted token is accepted when p >= q), and undamped refits diverged; halve it until the
        # loss falls enough (Armijo), so each refit moves towards the penalized maximum likelihood
        while (new := loss(theta - size * step)) > current - 1e-4 * size * float(grad @ step) and size > 1e-6:
            size /= 2
        theta, current = theta - size * step, new
    return theta


class RejectionRule(TokenRule):
    """Stop once the predicted P(>= 1 rejection) = 1 - prod_j P^_j of the round's drafted tokens exceeds h (SpecDec++'s
    rule; Theorem 3.1 sets h from the costs). Subclasses say how a token's acceptance logit z_j and P^_j are made
    (`estimate`). With an OnlineCalibration (`self.online`), P^_j = its Platt map of z_j, fitted from this
    generation's accepts and rejects; each generation starts afresh (`reset`), so a policy decodes a prompt the
    same way whatever ran before it (and the replay equals the engine). `stop_log` keeps, per round, (the predicted
    P(>= 1 rejection) when the round ended, whether verification rejected one of the tokens it covers, K): the
    benchmark's stop calibration."""

    def __init__(self, threshold: float | str, k_min: int, k_max: int,
                 online: OnlineCalibration | PositionCalibration | None, persist: bool = False):
        super().__init__(k_min, k_max)
        self.threshold = threshold if threshold == AUTO else _check_threshold(threshold)
        self.online, self.persist = online, persist
        self.costs = None  # threshold "auto": the CostModel its stops are priced by (the benchmark sets it)
        self.spent = (0.0, 0.0)  # threshold "auto": this generation's (tokens committed, cost) so far
        self.p_all_accepted = 1.0
        self.predictions: list[float] = []  # P^_j of the current round, for inspection
        self.logits: list[float] = []  # z_j of the current round, for the online update
        self.stop_log: list[tuple[float, int, int]] = []

    def estimate(self, i: int, token: DraftToken) -> tuple[float, float] | None:
        """(P^, z) for the i-th drafted token, or None when this token gets no prediction."""
        raise NotImplementedError

    def reset(self) -> None:
        self.stop_log, self.spent = [], (0.0, 0.0)
        if self.online is not None and not self.persist:
            self.online = self.online.restart()

    def begin_round(self) -> int:
        self.p_all_accepted = 1.0
        self.predictions, self.logits = [], []
        return self.k_max

    def keep_drafting(self, i: int, token: DraftToken) -> bool:
        estimate = self.estimate(i, token)
        if estimate is not None:
            p_hat, z = estimate
            self.predictions.append(p_hat)
            self.logits.append(z)
            self.p_all_accepted *= p_hat
        if i < self.k_min:
            return True
        if self.threshold != AUTO:
            return 1.0 - self.p_all_accepted <= self.threshold
        if self.costs is None:
            raise ValueError(f"{self.name} with threshold 'auto' needs a cost model to price its stops: set its "
                             f"`costs` (specdecpp.costs.measure_costs, or the benchmark does it)")
        return worth_drafting(self.predictions, i, self.costs, *self.spent)

    def end_round(self, drafted: int, accepted: int) -> None:
        if self.costs is not None:
            tokens, cost = self.spent
            self.spent = (tokens + accepted + 1, cost + self.costs.round_units(drafted))
        if self.predictions:  # the predictions cover Y_1..Y_n (n = drafted, or drafted - 1 for a lagged head)
            self.stop_log.append((1.0 - self.p_all_accepted, int(accepted < len(self.predictions)), drafted))
        if self.online is not None:  # logits[j] scores Y_{j+1}, lagged head or not
            self.online.update(self.logits, accepted)


class OnlineConfidence(RejectionRule):
    """The rejection rule on the draft's own confidence: z_j = logit q(Y_j), calibrated online from the outcomes
    (vLLM's adaptive verification); it starts from the identity map, P^_j = q(Y_j). By default one slope and one
    intercept by SGD (`lr`); `per_position` fits vLLM 0.32's estimator instead (a shared slope, an intercept per
    position in the round, Newton-IRLS every `refit_every` rounds: `PositionCalibration`). Each generation starts
    afresh unless `persist`, when the fit carries over the generations this policy object decodes, in their order
    (a benchmark then keeps one object per setting)."""

    name = "online_confidence"

    def __init__(self, threshold: float | str = 0.5, lr: float = 0.05, k_min: int = 1, k_max: int = 20,
                 per_position: bool = False, refit_every: int = 8, persist: bool = False):
        online = PositionCalibration(refit_every) if per_position else OnlineCalibration(lr)
        super().__init__(threshold, k_min, k_max, online, persist)

    def estimate(self, i: int, token: DraftToken) -> tuple[float, float]:
        q = min(max(token.prob, 1e-6), 1 - 1e-6)
        z = math.log(q / (1 - q))
        return self.online.prob(z, i), z

    @property
    def params(self) -> dict:
        fit = {"per_position": True, "refit_every": self.online.refit_every} \
            if isinstance(self.online, PositionCalibration) else {"lr": self.online.lr}
        return {"threshold": self.threshold, **fit, **({"persist": True} if self.persist else {}), **super().params}


class SpecDecPP(RejectionRule):
    """SpecDec++: the rejection rule on a trained acceptance head.

    `head` maps a draft hidden state [H] (and, if it has `n_stats > 0`, the token's statistics) to an acceptance
    logit; any callable works (the trained `AcceptanceHead` is one). P^_j = sigmoid(head(.)) predicts
    P(Y_j accepted | Y_<j accepted). A hidden-state-only head (the paper's) scores Y_{i-1} when asked after Y_i
    (the one-token lag); a head with statistics scores Y_i itself. `online_lr` > 0 recalibrates the head's logit
    online (a trained head that keeps itself calibrated when the prompts shift away from its training data);
    with `persist` that fit carries over the generations this policy object decodes, as `OnlineConfidence`'s does.
    """

    name = "specdecpp"
    needs_hidden = True

    def __init__(self, head: Callable[..., torch.Tensor], threshold: float | str = 0.7, k_min: int = 2,
                 k_max: int = 20, online_lr: float = 0.0, persist: bool = False):
        if persist and not online_lr:
            raise ValueError("specdecpp: persist carries the online recalibration over generations, so it needs "
                             "online_lr > 0")
        super().__init__(threshold, k_min, k_max, OnlineCalibration(online_lr) if online_lr else None, persist)
        self.head = head
        self.needs_stats = getattr(head, "n_stats", 0) > 0

    def check_draft(self, draft: torch.nn.Module) -> None:
        check = getattr(self.head, "check_draft", None)  # a trained AcceptanceHead knows its draft; a callable not
        if check is not None:
            check(draft)

    @torch.no_grad()
    def estimate(self, i: int, token: DraftToken) -> tuple[float, float] | None:
        if not self.needs_stats and i < 2:  # a lagged head at i = 1 would score an already verified token
            return None
        hidden = token.hidden.float()  # a bf16 draft's state, for a head (or any callable) kept in float32
        if self.needs_stats:
            from .head import stat_features

            stats = stat_features(torch.tensor(token.prob), torch.tensor(token.entropy), torch.tensor(token.margin))
            logit = self.head(hidden, stats.to(hidden.device)).float()
        else:
            logit = self.head(hidden).float()
        z = float(logit.reshape(()))
        if self.online is None:
            return float(torch.sigmoid(logit).reshape(())), z
        return self.online.prob(z, i), z

    @property
    def params(self) -> dict:
        online = {"online_lr": self.online.lr} if self.online is not None else {}
        return {"threshold": self.threshold, **online, **({"persist": True} if self.persist else {}),
                **super().params}


class Ceiling(RejectionRule):
    """The predictor ceiling (replay of sampled traces only): SpecDec++'s stopping rule fed the true acceptance
    probability of each drafted token, min(1, p(Y_j) / q(Y_j)), which the replay knows from the target's scores.
    No head can predict better, so its gain over the best constant K bounds what any predictor could add at its
    threshold; the oracle, which knows the draws themselves, bounds every policy."""

    name = "ceiling"

    def __init__(self, threshold: float | str = 0.5, k_min: int = 1, k_max: int = 20):
        super().__init__(threshold, k_min, k_max, None)

    def estimate(self, i: int, token: DraftToken) -> tuple[float, float]:
        if math.isnan(token.accept):
            raise ValueError("the predictor ceiling reads true acceptance probabilities, which only a replay of a "
                             "sampled trace has (mode: replay, temperature > 0)")
        a = min(max(token.accept, 1e-6), 1 - 1e-6)
        return token.accept, math.log(a / (1 - a))

    @property
    def params(self) -> dict:
        return {"threshold": self.threshold, **super().params}


class Oracle(LengthPolicy):
    """Hindsight bound: stops exactly before the first token verification rejects.

    It drafts `lookahead` tokens and lets verification find the first rejection; the engine then books
    the round as if drafting had stopped there (no discarded tokens). Its timings are not a speed.
    The output is exactly the target's: the tokens are those of speculative decoding with K = lookahead.
    """

    name = "oracle"
    hindsight = True

    def __init__(self, lookahead: int = 20):
        self.lookahead = _check_count("oracle lookahead", lookahead)

    def begin_round(self) -> int:
        return self.lookahead

    @property
    def most_per_round(self) -> int:
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
    classes = {c.name: c for c in (TargetOnly, ConstantK, Heuristic, Confidence, AdaptiveConfidence, SVIP, AdaEDL,
                                   Margin, OnlineConfidence, Ceiling, Oracle)}
    if name not in classes:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted([*classes, 'specdecpp'])}")
    return classes[name](**params)


POLICY_NAMES = ("target", "constant", "heuristic", "confidence", "adaptive_confidence", "svip", "adaedl", "margin",
                "online_confidence", "specdecpp", "ceiling", "oracle")
