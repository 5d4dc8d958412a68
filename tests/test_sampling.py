import pytest
import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from specdecpp.sampling import SamplingConfig, acceptance_prob, n_accepted, probs, residual, warp


def test_acceptance_prob_matches_hand_computed_values():
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    q = torch.tensor([0.25, 0.6, 0.15, 0.4])
    # min(1, p/q) computed by hand: 0.5/0.25 -> 1, 0.3/0.6 = 0.5, 0.2/0.15 -> 1, 0/0.4 = 0
    assert torch.allclose(acceptance_prob(p, q), torch.tensor([1.0, 0.5, 1.0, 0.0]))


def test_residual_matches_hand_computed_values():
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.6, 0.2])
    # max(0, p - q) = [0.3, 0, 0], normalised
    assert torch.allclose(residual(p, q), torch.tensor([1.0, 0.0, 0.0]))
    # p == q leaves nothing to correct: fall back to p rather than dividing by zero
    assert torch.allclose(residual(p, p), p)


@pytest.mark.parametrize("flags, expected", [
    ([True, True, False, True], 2), ([True] * 4, 4), ([False, True, True], 0), ([], 0),
])
def test_n_accepted_counts_the_leading_run(flags, expected):
    assert n_accepted(torch.tensor(flags, dtype=torch.bool)) == expected


@pytest.mark.parametrize("cfg", [SamplingConfig(0.7), SamplingConfig(1.0, top_k=5), SamplingConfig(1.3, top_p=0.8),
                                 SamplingConfig(0.6, top_k=50, top_p=0.9)])
def test_warp_matches_transformers_warpers(cfg):
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(0)) * 3
    expected = logits.clone()
    warpers = [TemperatureLogitsWarper(cfg.temperature)]
    if cfg.top_k:
        warpers.append(TopKLogitsWarper(cfg.top_k))
    if cfg.top_p < 1:
        warpers.append(TopPLogitsWarper(cfg.top_p))
    for w in warpers:
        expected = w(None, expected)
    assert torch.allclose(warp(logits, cfg).softmax(-1), expected.softmax(-1), atol=1e-6)


def test_greedy_probs_are_one_hot_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]])
    assert torch.equal(probs(logits, SamplingConfig(0)), torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))


@pytest.mark.parametrize("bad", [dict(temperature=-0.1), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling_config_is_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingConfig(**bad)


def test_one_step_of_speculative_sampling_yields_p():
    """Draw Y ~ q, keep it with min(1, p/q), else draw from the residual: the result must be distributed as p.

    This checks the rule with the library's functions against p computed directly, over 400k draws:
    the standard error per cell is below 0.0008, so the 0.005 tolerance fails with negligible probability.
    """
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.05, 0.4, 0.25, 0.3, 0.0])
    q = torch.tensor([0.3, 0.1, 0.3, 0.1, 0.2])
    n = 400_000
    y = torch.multinomial(q, n, replacement=True, generator=g)
    keep = torch.rand(n, generator=g) < acceptance_prob(p[y], q[y])
    fix = torch.multinomial(residual(p, q), n, replacement=True, generator=g)
    out = torch.where(keep, y, fix)
    assert torch.allclose(torch.bincount(out, minlength=5) / n, p, atol=0.005)
