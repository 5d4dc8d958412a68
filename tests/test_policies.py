import math

import pytest
import torch

from specdecpp.policies import (
    SVIP,
    AdaEDL,
    AdaptiveConfidence,
    Confidence,
    ConstantK,
    DraftToken,
    Heuristic,
    Margin,
    Oracle,
    SpecDecPP,
    TargetOnly,
    fit_confidence_threshold,
    make_policy,
)

H = torch.zeros(4)


def test_heuristic_follows_the_transformers_rule():
    h = Heuristic(k=5)
    assert h.begin_round() == 5
    h.end_round(5, 5)  # all accepted: +2
    assert h.begin_round() == 7
    h.end_round(7, 3)  # a rejection: -1
    assert h.begin_round() == 6
    for _ in range(10):
        h.end_round(6, 0)
    assert h.begin_round() == 1  # never below 1
    h.reset()
    assert h.begin_round() == 5


def test_confidence_stops_below_threshold_but_respects_k_min():
    c = Confidence(0.4, k_min=2, k_max=10)
    assert c.begin_round() == 10
    assert c.keep_drafting(1, DraftToken(prob=0.1))  # below K_min: go on regardless
    assert c.keep_drafting(2, DraftToken(prob=0.5))
    assert not c.keep_drafting(3, DraftToken(prob=0.39))


def test_specdecpp_stops_when_predicted_rejection_passes_threshold():
    # a constant head: P^ = sigmoid(logit(0.8)) = 0.8 for every token
    head = lambda h: torch.logit(torch.tensor(0.8))  # noqa: E731
    pol = SpecDecPP(head, threshold=0.5, k_min=2, k_max=20)
    pol.begin_round()
    decisions = [pol.keep_drafting(i, DraftToken(hidden=H)) for i in range(1, 8)]
    # after Y_i the rule has P^_1..P^_{i-1}: 1 - 0.8**(i-1) > 0.5 first holds at i = 5 (0.8**4 = 0.41)
    assert decisions == [True, True, True, True, False, False, False]
    assert pol.predictions == pytest.approx([0.8] * 6)
    pol.begin_round()  # a new round forgets the product
    assert pol.keep_drafting(2, DraftToken(hidden=H))


def test_make_policy_builds_each_policy_by_name():
    assert isinstance(make_policy("target"), TargetOnly)
    assert make_policy("constant", k=3).begin_round() == 3
    assert make_policy("oracle", lookahead=7).begin_round() == 7
    assert isinstance(make_policy("specdecpp", head=torch.nn.Linear(4, 1), threshold=0.3), SpecDecPP)
    assert repr(ConstantK(4)) == "constant(k=4)"


@pytest.mark.parametrize("build, match", [
    (lambda: SpecDecPP(torch.nn.Linear(4, 1), k_min=5, k_max=3), "K_min <= K_max"),
    (lambda: SpecDecPP(torch.nn.Linear(4, 1), threshold=1.2), r"threshold must be in \[0, 1\]"),
    (lambda: Confidence(-0.1), r"threshold must be in \[0, 1\]"),
    (lambda: ConstantK(0), "K must be >= 1"),
    (lambda: Oracle(0), "lookahead"),
    (lambda: make_policy("fastest"), "unknown policy 'fastest'"),
    (lambda: make_policy("specdecpp"), "needs a head"),
    (lambda: Margin(0.1, k_min=0), "K_min"),
    (lambda: SVIP(factor=0), "factor > 0"),
    (lambda: AdaEDL(lam=2), r"threshold must be in \[0, 1\]"),
])
def test_bad_policy_arguments_are_refused_by_name(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_specdecpp_with_a_statistics_head_scores_the_newest_token():
    class StatsHead(torch.nn.Module):  # reads the statistics: P^ = q(Y), so the product is prod of q(Y_j)
        n_stats = 3

        def forward(self, hidden, stats):
            return torch.logit(stats[0].exp())  # stats[0] = log q(Y)

    pol = SpecDecPP(StatsHead(), threshold=0.5, k_min=1, k_max=20)
    pol.begin_round()
    # no lag: Y_1 is scored at i = 1; 1 - 0.9 * 0.7 = 0.37 <= 0.5 goes on, 1 - 0.9 * 0.7 * 0.6 = 0.622 stops
    decisions = [pol.keep_drafting(i, DraftToken(p, 1.0, 0.5, H)) for i, p in enumerate([0.9, 0.7, 0.6], 1)]
    assert decisions == [True, True, False]
    assert pol.predictions == pytest.approx([0.9, 0.7, 0.6], abs=1e-5)
    pol.end_round(3, 1)  # predictions cover Y_1..Y_3; Y_2 was rejected
    assert pol.stop_log == [(pytest.approx(0.622, abs=1e-5), 1, 3)]


def test_svip_stops_above_its_entropy_cut_off():
    pol = SVIP()  # sqrt(0.15 H) > 0.3  <=>  H > 0.6 nats
    assert pol.begin_round() == 40
    assert pol.keep_drafting(1, DraftToken(entropy=0.59))
    assert not pol.keep_drafting(2, DraftToken(entropy=0.61))


def test_margin_stops_at_a_near_tie():
    pol = Margin(0.05, k_min=2, k_max=8)
    assert pol.keep_drafting(1, DraftToken(margin=0.01))  # below K_min
    assert pol.keep_drafting(2, DraftToken(margin=0.05))
    assert not pol.keep_drafting(3, DraftToken(margin=0.049))


def test_adaedl_rule_and_lambda_updates_match_a_hand_computation():
    pol = AdaEDL(lam=0.7, gamma=0.2, k_max=10)  # go on while 1 - sqrt(0.2 H) >= lambda
    assert pol.keep_drafting(1, DraftToken(entropy=0.44))  # 1 - sqrt(0.088) = 0.703
    assert not pol.keep_drafting(2, DraftToken(entropy=0.46))  # 0.697
    pol.end_round(4, 1)  # AR = 0.5 * 0.9 + 0.5 * 0.25 = 0.575 < 0.9: lambda' = 0.71; lambda = 0.9*0.7 + 0.1*0.71
    assert pol.ar == pytest.approx(0.575) and pol.lam == pytest.approx(0.701)
    pol.ar = 0.95
    pol.end_round(5, 5)  # AR = 0.975 >= 0.9 and 5 != k_max: lambda' = lambda - 0.01
    assert pol.lam == pytest.approx(0.701 - 0.001)
    pol.end_round(10, 10)  # all k_max accepted: lambda stays
    assert pol.lam == pytest.approx(0.700)
    pol.reset()
    assert (pol.lam, pol.ar) == (0.7, 0.9)


def test_confidence_threshold_fit_minimises_fpr_plus_three_fnr():
    probs = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.3, 0.2])
    accepted = torch.tensor([1, 1, 0, 1, 1, 0, 0])
    # "go on while prob >= t": t = 0.5 keeps all 4 positives and 1 of 3 negatives: cost 1/3; t = 0.8: 2/3 + 3 * 2/4
    assert fit_confidence_threshold(probs, accepted) == pytest.approx(0.5)
    # misses cheap (0.1): t = 0.8 costs 0.1 * 2/4 = 0.05, less than t = 0.9 (0.075) or t = 0.5 (1/3)
    assert fit_confidence_threshold(probs, accepted, fn_weight=0.1) == pytest.approx(0.8)
    # the most confident token rejected and misses cheap: "always stop" (t = +inf) is best
    assert fit_confidence_threshold(torch.tensor([0.9, 0.5]), torch.tensor([0, 1]), fn_weight=0.5) == math.inf


def test_adaptive_confidence_books_labels_like_transformers_and_refits():
    pol = AdaptiveConfidence(threshold=0.4, k_max=10)
    for probs, accepted in [([0.9, 0.8, 0.3, 0.2], 2), ([0.95, 0.7, 0.6], 3), ([0.85, 0.5], 1)]:
        pol.begin_round()
        for i, p in enumerate(probs, 1):
            pol.keep_drafting(i, DraftToken(prob=p))
        pol.end_round(len(probs), accepted)
    # positives: the accepted tokens; one negative per rejected round; later tokens dropped
    assert pol.probs == [0.9, 0.8, 0.3, 0.95, 0.7, 0.6, 0.85, 0.5]
    assert pol.labels == [1, 1, 0, 1, 1, 1, 1, 0]
    assert pol.current == pytest.approx(0.6)  # keeps all 6 positives and excludes both negatives
    pol.reset()
    assert pol.current == 0.4 and pol.probs == []


def test_online_calibration_steps_match_a_hand_computation():
    from specdecpp.policies import OnlineCalibration

    cal = OnlineCalibration(lr=0.5)
    cal.update([0.0, 2.0, 5.0], accepted=1)  # Y_1 accepted, Y_2 rejected, Y_3 never judged
    # Y_1: p = sigmoid(0) = 0.5, g = -0.5: a -= 0.5 * -0.5 * 0 (unchanged), b -= 0.5 * -0.5 -> 0.25
    # Y_2: p = sigmoid(1 * 2 + 0.25) = 0.904651, g = 0.904651: a = 1 - 0.5 * g * 2, b = 0.25 - 0.5 * g
    g = 1 / (1 + math.exp(-2.25))
    assert cal.a == pytest.approx(1 - g) and cal.b == pytest.approx(0.25 - 0.5 * g)
    before = (cal.a, cal.b)
    cal.update([1.0, 1.0], accepted=2)  # all accepted: two positive steps, no negative one
    p1 = 1 / (1 + math.exp(-(before[0] + before[1])))
    a1, b1 = before[0] + 0.5 * (1 - p1), before[1] + 0.5 * (1 - p1)
    p2 = 1 / (1 + math.exp(-(a1 + b1)))
    assert (cal.a, cal.b) == (pytest.approx(a1 + 0.5 * (1 - p2)), pytest.approx(b1 + 0.5 * (1 - p2)))
    with pytest.raises(ValueError, match="learning rate must be > 0"):
        OnlineCalibration(lr=0)


def test_online_confidence_learns_to_stop_earlier_after_rejections():
    from specdecpp.policies import OnlineConfidence

    policy = OnlineConfidence(threshold=0.5, lr=1.0, k_max=10)
    token = DraftToken(prob=0.9, entropy=0.1, margin=0.8)  # logit 2.197: P^ = 0.9 before any outcome

    def round_length():
        policy.begin_round()
        i = 1
        while policy.keep_drafting(i, token) and i < 10:
            i += 1
        return i

    first = round_length()
    assert first == 7  # 1 - 0.9^i > 0.5 first at i = 7
    for _ in range(5):  # every round rejected at its first token: the calibration learns this token fails
        policy.end_round(round_length(), 0)
    assert round_length() < first and policy.params == {"threshold": 0.5, "lr": 1.0, "k_min": 1, "k_max": 10}
    # its stop log, like SpecDec++'s: P(>= 1 rejection) when each round ended, whether one happened, K
    assert policy.stop_log[0] == (pytest.approx(1 - 0.9 ** 7), 1, 7) and len(policy.stop_log) == 5
    policy.reset()
    assert policy.stop_log == [] and (policy.online.a, policy.online.b) == (1.0, 0.0)


def test_specdecpp_online_recalibrates_its_heads_logit():
    head = lambda hidden, stats=None: torch.tensor(3.0)  # noqa: E731 - a head sure of every token
    head.n_stats = 3
    fixed, online = SpecDecPP(head, 0.5, 1, 10), SpecDecPP(head, 0.5, 1, 10, online_lr=1.0)
    token = DraftToken(prob=0.9, entropy=0.1, margin=0.8, hidden=torch.zeros(4))
    lengths = {}
    for name, policy in (("fixed", fixed), ("online", online)):
        for _ in range(6):
            policy.begin_round()
            i = 1
            while policy.keep_drafting(i, token) and i < 10:
                i += 1
            policy.end_round(i, 0)  # the head is wrong every time
            lengths.setdefault(name, []).append(i)
    assert lengths["fixed"] == [lengths["fixed"][0]] * 6  # a fixed head never learns
    assert lengths["online"][-1] < lengths["online"][0]
    assert online.params["online_lr"] == 1.0 and "online_lr" not in fixed.params


def test_worth_drafting_matches_hand_computed_expected_rates():
    from specdecpp.costs import CostModel, worth_drafting

    costs = CostModel(target_s=1.0, draft=0.1, verify=0.05, round_cost=0.2)  # c + v = 0.15
    # two tokens at P = 0.9, 0.8: A = 0.9, 0.72; E = 2.62; C = 1 + 0.2 + 0.3 = 1.5; rate 1.7467
    # one more: gain A_2 * P_2 = 0.576 against rate * 0.15 = 0.262 -> draft on
    assert worth_drafting([0.9, 0.8], 2, costs)
    # P = 0.5, 0.3: A = 0.5, 0.15, E = 1.65, rate 1.1; gain 0.045 < 0.165 -> stop
    assert not worth_drafting([0.5, 0.3], 2, costs)
    # the same round after a good start of the generation: a higher rate to beat makes it stop sooner
    # P = 0.6, 0.6: gain 0.216 against (1.96 / 1.5) * 0.15 = 0.196 -> draft on ...
    assert worth_drafting([0.6, 0.6], 2, costs)
    # ... but after 40 tokens for 20 target calls this generation the rate to beat is (41.96 / 21.5) * 0.15 = 0.293
    assert not worth_drafting([0.6, 0.6], 2, costs, tokens_before=40, cost_before=20)
    # free drafts: always worth it; nothing predicted yet (a lagged head's first token): draft
    assert worth_drafting([0.01], 1, CostModel(1.0, 0.0, 0.0, 0.5)) and worth_drafting([], 1, costs)


def test_auto_threshold_drafts_by_the_cost_model_and_refuses_to_run_without_one():
    from specdecpp.costs import CostModel
    from specdecpp.policies import OnlineConfidence

    token = DraftToken(prob=0.9, entropy=0.1, margin=0.8)

    def round_length(policy):
        policy.begin_round()
        i = 1
        while policy.keep_drafting(i, token) and i < 20:
            i += 1
        return i

    policy = OnlineConfidence("auto", k_max=20)
    with pytest.raises(ValueError, match="needs a cost model"):
        round_length(policy)
    lengths = []
    for draft_cost in (0.02, 0.1, 0.4):  # dearer drafts: shorter rounds
        policy.costs = CostModel(1.0, draft_cost, 0.0, 0.1)
        lengths.append(round_length(policy))
    assert lengths[0] > lengths[1] > lengths[2] >= 1
    assert policy.params["threshold"] == "auto"
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\] \(a number"):
        OnlineConfidence("sometimes")


def test_per_position_calibration_recovers_a_known_model_and_persists_only_when_asked():
    from specdecpp.policies import OnlineConfidence, PositionCalibration, irls_fit

    g = torch.Generator().manual_seed(0)
    a, b = 0.6, [0.0, 1.0, -0.5, -1.0]  # true slope, intercepts of positions 1-4
    rows = []
    for _ in range(4000):
        z, i = float(torch.randn((), generator=g) * 2), int(torch.randint(1, 5, (), generator=g))
        y = float(torch.rand((), generator=g) < torch.sigmoid(torch.tensor(a * z + b[i - 1])))
        rows.append((z, i, y))
    theta = irls_fit(rows, 4, l2=1e-3, iterations=8, start=torch.tensor([1.0, 0, 0, 0, 0], dtype=torch.float64))
    assert theta[0] == pytest.approx(a, abs=0.08) and theta[1:].tolist() == pytest.approx(b, abs=0.2)

    cal = PositionCalibration(refit_every=2, positions=4)
    assert cal.prob(0.0, 3) == 0.5  # the identity map before any refit
    cal.update([2.0, 2.0, 2.0], accepted=0)
    assert cal.prob(2.0, 1) == pytest.approx(1 / (1 + math.exp(-2)))  # one round: no refit yet
    cal.update([2.0, 2.0], accepted=0)
    assert cal.prob(2.0, 1) < 1 / (1 + math.exp(-2))  # refitted after two rounds of rejections

    for persist in (False, True):
        policy = OnlineConfidence(0.5, per_position=True, refit_every=1, persist=persist)
        policy.begin_round()
        for i in range(1, 4):
            policy.keep_drafting(i, DraftToken(prob=0.9))
        policy.end_round(3, 0)
        fitted = policy.online.theta.clone()
        policy.reset()
        assert torch.equal(policy.online.theta, fitted) == persist
        assert policy.params["per_position"] and policy.params.get("persist", False) == persist


def test_specdecpp_online_recalibration_persists_only_when_asked():
    from specdecpp.costs import CostModel

    head = lambda hidden, stats=None: torch.tensor(3.0)  # noqa: E731 - a head sure of every token
    head.n_stats = 3
    token = DraftToken(prob=0.9, entropy=0.1, margin=0.8, hidden=torch.zeros(4))
    for persist in (False, True):
        policy = SpecDecPP(head, threshold="auto", k_min=1, online_lr=0.5, persist=persist)
        policy.costs = CostModel(1.0, 0.1, 0.0)
        policy.begin_round()
        for i in range(1, 4):
            policy.keep_drafting(i, token)
        policy.end_round(3, 0)  # the first drafted token rejected: the fit moves away from the identity map
        fitted = (policy.online.a, policy.online.b)
        assert fitted != (1.0, 0.0)
        policy.reset()
        assert ((policy.online.a, policy.online.b) == fitted) == persist
        assert policy.params.get("persist", False) == persist
    with pytest.raises(ValueError, match="persist .* needs online_lr > 0"):
        SpecDecPP(head, persist=True)


def test_per_position_refits_converge_where_acceptance_is_not_monotone_in_the_logit():
    """At T = 1 a drafted token the draft thought very unlikely (q = 1e-6) is accepted when p >= q, so acceptance is
    high at both ends of logit q: undamped Newton refits, warm-started round after round, diverged there (a slope of
    -9,000, every prediction near 0 or 1) and a persistent fit stopped every round at one token. With the line search
    every refit is the penalized maximum likelihood: each position's mean prediction is its observed rate."""
    from specdecpp.policies import irls_fit

    g = torch.Generator().manual_seed(1)
    rows, theta = [], torch.tensor([1.0] + [0.0] * 8, dtype=torch.float64)
    for r in range(1200):
        for i in range(1, int(torch.randint(1, 4, (), generator=g)) + 1):
            u = float(torch.rand((), generator=g))
            q = 1 - 1e-6 if u < 0.5 else 1e-6 if u < 0.6 else float(torch.rand((), generator=g)) * 0.98 + 0.01
            accept = 0.97 if q > 0.99 else 0.95 if q < 0.001 else 0.5 + 0.4 * q
            y = float(torch.rand((), generator=g) < accept)
            rows.append((math.log(q / (1 - q)), i, y))
            if not y:
                break
        if (r + 1) % 8 == 0:
            theta = irls_fit(rows, 8, 1.0, 5, theta)
            assert theta.abs().max() < 20
    z, pos, y = torch.tensor(rows, dtype=torch.float64).T
    p = torch.sigmoid(theta[0] * z + theta[pos.long()])
    for i in (1, 2, 3):
        at = pos == i
        assert float(p[at].mean()) == pytest.approx(float(y[at].mean()), abs=0.02)


def test_calibrated_probabilities_do_not_overflow_at_extreme_logits():
    """A refit on nearly separable outcomes can give a slope that puts a * z + b past 700 (a replay on the sibling
    pair died on it in math.exp): the probability saturates instead."""
    from specdecpp.policies import PositionCalibration, sigmoid

    assert sigmoid(-800.0) == 0.0 and sigmoid(800.0) == 1.0 and sigmoid(0.0) == 0.5
    cal = PositionCalibration(refit_every=1)
    cal.theta[0] = 80.0  # what a refit on separable rows can reach
    assert cal.prob(-13.8, 1) == pytest.approx(0.0) and cal.prob(13.8, 2) == pytest.approx(1.0)
