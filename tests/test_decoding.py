import copy
import math

import pytest
import torch
from conftest import (
    ALPHA,
    LENGTH,
    N_SAMPLES,
    all_policies,
    check_bookkeeping,
    chi_square_p_value,
    rolled_draft,
    target_greedy,
    tiny_llama,
)

from specdecpp import (
    SVIP,
    Confidence,
    ConstantK,
    Margin,
    Oracle,
    SamplingConfig,
    SpecDecPP,
    TargetOnly,
    speculative_generate,
)

GREEDY = SamplingConfig(temperature=0)
PROMPTS = [[3, 4, 5], [10], [7, 1, 2, 8, 9, 30, 31]]


@pytest.mark.parametrize("policy", all_policies(), ids=repr)
def test_greedy_speculative_output_equals_greedy_target_output(tiny_pair, policy):
    target, draft = tiny_pair
    for prompt in PROMPTS:
        out = speculative_generate(target, draft, prompt, policy, GREEDY, max_new_tokens=40)
        assert out.tokens == target_greedy(target, prompt, 40)
        assert len(out.tokens) == out.stats.new_tokens == 40


def test_never_accepted_rounds_discard_every_candidate():
    target = tiny_llama(seed=3, sharpness=4.0)
    draft = rolled_draft(target)  # its argmax is never the target's
    out = speculative_generate(target, draft, PROMPTS[0], ConstantK(3), GREEDY, max_new_tokens=20)
    assert out.tokens == target_greedy(target, PROMPTS[0], 20)
    assert all(r.accepted == 0 for r in out.stats.rounds)
    # K = 3 until the token budget caps the last rounds at what can still be emitted
    assert [r.drafted for r in out.stats.rounds] == [3] * 17 + [2, 1, 0]
    assert out.stats.target_calls == 20  # one token per target call, as without speculation
    check_bookkeeping(out.stats)


@pytest.mark.parametrize("sampling", [GREEDY, SamplingConfig(1.0)])
def test_always_accepted_rounds_keep_every_candidate_and_earn_a_bonus(sampling):
    target = tiny_llama(seed=4)
    g = torch.Generator().manual_seed(0)
    out = speculative_generate(target, target, PROMPTS[0], ConstantK(4), sampling, max_new_tokens=25, generator=g)
    assert [(r.drafted, r.accepted) for r in out.stats.rounds] == [(4, 4)] * 5
    assert out.stats.target_calls == 5 and len(out.tokens) == 25
    check_bookkeeping(out.stats)


def test_partly_accepted_rounds_are_booked_correctly(tiny_pair):
    target, draft = tiny_pair
    out = speculative_generate(target, draft, PROMPTS[2], ConstantK(5), GREEDY, max_new_tokens=60)
    assert any(0 < r.accepted < r.drafted for r in out.stats.rounds)
    check_bookkeeping(out.stats)
    per_pos = out.stats.per_position_acceptance()
    assert len(per_pos) == 5 and all(a >= b for a, b in zip(per_pos, per_pos[1:]))  # a run can only shrink


@pytest.mark.parametrize("policy", [Confidence(0.5, k_max=6), SVIP(threshold=0.3, k_max=6), Margin(0.3, k_max=6)],
                         ids=repr)
def test_greedy_token_rules_read_the_real_draft_distribution_and_stop(tiny_pair, policy):
    """In greedy mode the decoding distribution is one-hot (q(Y) = 1); the rules must see the draft's softmax."""
    target, draft = tiny_pair
    out = speculative_generate(target, draft, PROMPTS[0], policy, GREEDY, max_new_tokens=40)
    assert any(r.stop == "policy" for r in out.stats.rounds)
    assert out.tokens == target_greedy(target, PROMPTS[0], 40)


def test_oracle_books_no_discards_and_matches_hindsight(tiny_pair):
    target, draft = tiny_pair
    oracle = speculative_generate(target, draft, PROMPTS[0], Oracle(6), GREEDY, max_new_tokens=40).stats
    assert oracle.discarded == 0 and oracle.hindsight
    const = speculative_generate(target, draft, PROMPTS[0], ConstantK(6), GREEDY, max_new_tokens=40).stats
    assert oracle.verification_rate <= const.verification_rate


@pytest.mark.parametrize("policy", all_policies(), ids=repr)
def test_generation_stops_at_eos(tiny_pair, policy):
    target, draft = tiny_pair
    reference = target_greedy(target, PROMPTS[0], 30)
    eos = reference[12]
    expected = reference[: reference.index(eos) + 1]
    out = speculative_generate(target, draft, PROMPTS[0], policy, GREEDY, max_new_tokens=30, eos_token_id=eos)
    assert out.tokens == expected
    assert any(r.stop == "eos" for r in out.stats.rounds) or policy.begin_round() <= 1 or out.tokens[-1] == eos


def test_empty_prompt_and_bad_lengths_are_refused(tiny_pair):
    target, draft = tiny_pair
    with pytest.raises(ValueError, match="prompt is empty"):
        speculative_generate(target, draft, [], ConstantK(2))
    with pytest.raises(ValueError, match="max_new_tokens"):
        speculative_generate(target, draft, [1], ConstantK(2), max_new_tokens=0)
    with pytest.raises(ValueError, match="no draft model"):
        speculative_generate(target, None, [1], ConstantK(2))


# --- sampling mode: the output distribution is the target's --------------------------------------------------------

def sample_counts(target, draft, policy, cfg, seed):
    g = torch.Generator().manual_seed(seed)
    counts, rates = {}, []
    for _ in range(N_SAMPLES):
        out = speculative_generate(target, draft, [1, 2], policy, cfg, max_new_tokens=LENGTH, generator=g)
        counts[tuple(out.tokens)] = counts.get(tuple(out.tokens), 0) + 1
        rates.append(out.stats.draft_acceptance_rate)
    return counts, sum(rates) / len(rates)


@pytest.mark.parametrize("policy", [p for p in all_policies(hidden=32) if p.name != "constant" or p.k > 1], ids=repr)
def test_sampling_matches_the_target_distribution(sampling_setup, policy):
    """Chi-square goodness of fit of 1,200 sampled 3-token continuations against the exact target distribution.

    Each test fails by chance with probability ALPHA = 0.001 (seeded, so a given run is reproducible); over the
    12 policies the false-failure rate is about 1.2%. The negative control below shows the test has power.
    """
    target, draft, cfg, expected = sampling_setup
    if isinstance(policy, SpecDecPP) and not policy.needs_stats:
        policy.head = torch.nn.Linear(target.config.hidden_size, 1)
    counts, acceptance = sample_counts(target, draft, policy, cfg, seed=11)
    if policy.name != "target" and not policy.hindsight:  # the check means something only if rounds see both outcomes
        assert 0.1 < acceptance < 0.95
    assert chi_square_p_value(counts, expected, N_SAMPLES) > ALPHA


def test_distribution_check_rejects_the_draft_distribution(sampling_setup):
    """Negative control: the draft's own samples are not the target's, and the check must say so."""
    target, draft, cfg, expected = sampling_setup
    counts, _ = sample_counts(draft, None, TargetOnly(), cfg, seed=11)
    assert chi_square_p_value(counts, expected, N_SAMPLES) < ALPHA
    assert not math.isclose(sum(expected.values()), 0.0)


def test_sampling_with_a_precision_draft_matches_the_target_distribution(sampling_setup):
    """A bf16 copy of the target as draft (mixed dtypes in the acceptance maths): still the target's distribution."""
    target, _, cfg, expected = sampling_setup
    draft = copy.deepcopy(target).to(torch.bfloat16)
    counts, acceptance = sample_counts(target, draft, ConstantK(3), cfg, seed=12)
    assert acceptance > 0.9  # a close copy
    assert chi_square_p_value(counts, expected, N_SAMPLES) > ALPHA


@pytest.mark.parametrize("policy", [ConstantK(4), Margin(0.3, k_max=8)], ids=repr)
def test_a_bf16_draft_prefilled_with_fp32_products_keeps_the_output_exact(tiny_pair, policy, avx2_only):
    """A prompt of FP32_FROM_ROWS tokens or more reaches a bf16 draft through fp32 products (lowp.py), later
    one-token steps through its own kernels: the output is still the target's greedy output, also in a batch."""
    from specdecpp.lowp import FP32_FROM_ROWS

    target, _ = tiny_pair
    draft = copy.deepcopy(target).to(torch.bfloat16)
    prompt = list(range(3, 3 + FP32_FROM_ROWS + 4))
    out = speculative_generate(target, draft, prompt, policy, GREEDY, max_new_tokens=30)
    assert draft.__dict__.get("_fp32_copies")  # the prefill took the fp32 path
    assert not any("forward" in vars(m) for m in draft.modules())  # and the draft has its own kernels again
    assert out.tokens == target_greedy(target, prompt, 30)
    assert out.stats.accepted > 0
    batch = speculative_generate(target, draft, [prompt, PROMPTS[1]], [copy.deepcopy(policy) for _ in range(2)],
                                 GREEDY, max_new_tokens=30)
    assert batch[0].tokens == out.tokens and batch[1].tokens == target_greedy(target, PROMPTS[1], 30)


def test_a_row_cache_returns_the_last_rows_logits_of_several_rows_fed_at_once(tiny_pair):
    """The row cache asks for the last `keep` columns' logits by index (a strided slice is slow on CPUs in bf16): in
    bf16 and fp32 they are bit for bit what the model gives for `logits_to_keep=keep`, and the last rows of every
    column's logits up to the rounding of another product shape."""
    from specdecpp.decoding import _RowCache

    target, _ = tiny_pair
    for model in (target, copy.deepcopy(target).to(torch.bfloat16)):
        one, every = _RowCache(model, 1), _RowCache(model, 1)
        ids = [[5, 9, 2, 7]]
        last = one(ids, keep=1).logits
        full = every(ids, keep=4).logits
        assert last.shape == (1, 1, full.shape[-1])
        assert torch.equal(last, model(torch.tensor(ids), logits_to_keep=1).logits)
        assert torch.allclose(last[0, 0].float(), full[0, -1].float(), atol=1e-5)
        assert torch.equal(one([[3, 4]], keep=2).logits, every([[3, 4]], keep=2).logits)
