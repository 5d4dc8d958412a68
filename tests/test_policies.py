import pytest
import torch

from specdecpp import Confidence, ConstantK, Heuristic, Oracle, SpecDecPP, TargetOnly, make_policy


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
    assert c.keep_drafting(1, 0.1, None)  # below K_min: go on regardless
    assert c.keep_drafting(2, 0.5, None)
    assert not c.keep_drafting(3, 0.39, None)


def test_specdecpp_stops_when_predicted_rejection_passes_threshold():
    # a constant head: P^ = sigmoid(logit(0.8)) = 0.8 for every token
    head = lambda h: torch.logit(torch.tensor(0.8))  # noqa: E731
    pol = SpecDecPP(head, threshold=0.5, k_min=2, k_max=20)
    pol.begin_round()
    decisions = [pol.keep_drafting(i, 1.0, torch.zeros(4)) for i in range(1, 8)]
    # after Y_i the rule has P^_1..P^_{i-1}: 1 - 0.8**(i-1) > 0.5 first holds at i = 5 (0.8**4 = 0.41)
    assert decisions == [True, True, True, True, False, False, False]
    assert pol.predictions == pytest.approx([0.8] * 6)
    pol.begin_round()  # a new round forgets the product
    assert pol.keep_drafting(2, 1.0, torch.zeros(4))


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
])
def test_bad_policy_arguments_are_refused_by_name(build, match):
    with pytest.raises(ValueError, match=match):
        build()
