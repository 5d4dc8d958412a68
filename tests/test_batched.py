"""Batched speculative decoding: every row of a batch decodes exactly as it would alone (CPU float32).

Exactness is promised, and tested, in float32 on the CPU; in bf16 the batch's padded shapes round differently and
near-ties may flip (see the README)."""

import pytest
import torch
from conftest import (
    ALPHA,
    LENGTH,
    all_policies,
    chi_square_p_value,
    exact_continuation_probs,
    noisy_draft,
    target_greedy,
    tiny_llama,
)

from specdecpp import ConstantK, Margin, SamplingConfig, SpecDecPP, TargetOnly, speculative_generate
from specdecpp.head import AcceptanceHead

GREEDY = SamplingConfig(temperature=0)
PROMPTS = [[3, 4, 5], [10], [7, 1, 2, 8, 9, 30, 31, 40, 41, 2, 3], [12, 13]]  # lengths 3, 1, 11, 2


class ScriptedDraft(torch.nn.Module):
    """The target itself, except that wherever the next token's position is in `wrong` its distribution is rolled
    by one token: in greedy decoding a drafted token is accepted iff its position is not in `wrong`. Reads the
    engine's per-row position ids, so each row's acceptance is fixed in advance whatever the batch around it."""

    def __init__(self, target: torch.nn.Module, wrong: set[int]):
        super().__init__()
        self.inner, self.wrong, self.config = target, wrong, target.config

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def forward(self, input_ids, position_ids, logits_to_keep=1, **kwargs):
        out = self.inner(input_ids=input_ids, position_ids=position_ids, logits_to_keep=logits_to_keep, **kwargs)
        predicted = (position_ids[:, -out.logits.shape[1]:] + 1).tolist()  # the position each column predicts
        hit = torch.tensor([[p in self.wrong for p in row] for row in predicted])
        out.logits = torch.where(hit[..., None], out.logits.roll(1, dims=-1), out.logits)
        return out


def scripted_rounds(prompt_len: int, k: int, wrong: set[int], n: int) -> list[tuple[int, int]]:
    """(drafted, accepted) per round of constant-K decoding when exactly the tokens at positions in `wrong` are
    rejected: worked out by hand, without any model."""
    rounds, pos, end = [], prompt_len, prompt_len + n  # pos: the position of the next token to emit
    while pos < end:
        drafted = min(k, end - pos - 1)
        accepted = next((i for i in range(drafted) if pos + i in wrong), drafted)
        rounds.append((drafted, accepted))
        pos += accepted + 1
    return rounds


@pytest.fixture(scope="module")
def pair():
    target = tiny_llama(seed=0, layers=2, sharpness=4.0)
    return target, noisy_draft(target, scale=0.6)


@pytest.mark.parametrize("policy", all_policies(), ids=repr)
def test_every_row_equals_its_unbatched_and_transformers_greedy_output(pair, policy):
    target, draft = pair
    rows = speculative_generate(target, draft, PROMPTS, policy, GREEDY, max_new_tokens=30)
    assert len(rows) == len(PROMPTS)
    for prompt, row in zip(PROMPTS, rows):
        alone = speculative_generate(target, draft, prompt, policy.fresh(), GREEDY, max_new_tokens=30)
        assert row.tokens == alone.tokens == target_greedy(target, prompt, 30)
        assert row.stats.new_tokens == 30 and row.stats.batch_size == len(PROMPTS)
        assert row.stats.new_tokens == row.stats.accepted + len(row.stats.rounds)
    if policy.name not in ("target", "constant", "oracle"):  # adaptive: rows pick different lengths in a round
        assert len({tuple(r.drafted for r in row.stats.rounds) for row in rows}) > 1


@pytest.mark.parametrize("wrong", [set(), set(range(100)), {5, 6, 9, 14, 15, 16, 22, 30, 31, 37},
                                   set(range(0, 100, 3))], ids=["all-accepted", "none-accepted", "mixed", "every-3rd"])
@pytest.mark.parametrize("k", [1, 4])
def test_scripted_acceptance_gives_each_row_its_own_rounds(wrong, k):
    target = tiny_llama(seed=2, sharpness=4.0)
    draft = ScriptedDraft(target, wrong)
    rows = speculative_generate(target, draft, PROMPTS, ConstantK(k), GREEDY, max_new_tokens=24)
    for prompt, row in zip(PROMPTS, rows):
        assert row.tokens == target_greedy(target, prompt, 24)
        assert [(r.drafted, r.accepted) for r in row.stats.rounds] == scripted_rounds(len(prompt), k, wrong, 24)


def test_eos_in_one_row_while_the_others_go_on(pair):
    target, draft = pair
    refs = [target_greedy(target, p, 30) for p in PROMPTS]
    # an EOS id that ends row 0 early and that some other row never produces
    eos = next(t for t in refs[0][3:20] if any(t not in ref for ref in refs[1:]))
    rows = speculative_generate(target, draft, PROMPTS, ConstantK(4), GREEDY, max_new_tokens=30, eos_token_id=eos)
    lengths = []
    for ref, row in zip(refs, rows):
        expected = ref[: ref.index(eos) + 1] if eos in ref else ref
        assert row.tokens == expected
        lengths.append(len(row.tokens))
    assert min(lengths) < 30 == max(lengths)
    finished_first = rows[lengths.index(min(lengths))].stats
    assert finished_first.total_s < finished_first.batch_s  # it left the batch before the end


def test_rows_with_their_own_policies_and_wasted_draft_steps(pair):
    target, draft = pair
    rows = speculative_generate(target, draft, PROMPTS[:3], [TargetOnly(), ConstantK(3), Margin(0.3, k_max=6)],
                                GREEDY, max_new_tokens=20)
    for prompt, row in zip(PROMPTS, rows):
        assert row.tokens == target_greedy(target, prompt, 20)
    only, const, margin = (r.stats for r in rows)
    assert only.drafted == only.draft_calls == 0
    assert only.wasted_draft_steps > 0  # it sat through the other rows' draft steps
    assert const.wasted_draft_steps <= margin.wasted_draft_steps or margin.wasted_draft_steps == 0
    assert any(r.stop == "policy" for r in margin.rounds)


def test_a_policy_is_copied_per_row_and_its_head_shared(pair):
    target, draft = pair
    head = AcceptanceHead(target.config.hidden_size, num_layers=1, n_stats=3)
    policy = SpecDecPP(head, threshold=0.5, k_min=1, k_max=6)
    rows = speculative_generate(target, draft, PROMPTS, policy, GREEDY, max_new_tokens=20)
    assert rows[0].policy is policy and len({id(r.policy) for r in rows}) == len(PROMPTS)
    assert all(r.policy.head is head for r in rows)
    assert [len(r.policy.stop_log) for r in rows] == [sum(x.drafted > 0 for x in r.stats.rounds) for r in rows]
    with pytest.raises(ValueError, match="2 policies for 4 prompts"):
        speculative_generate(target, draft, PROMPTS, [ConstantK(2), ConstantK(2)], GREEDY)
    with pytest.raises(ValueError, match="prompt 1 of the batch is empty"):
        speculative_generate(target, draft, [[1, 2], []], ConstantK(2), GREEDY)


def test_a_batch_of_one_is_the_single_prompt_call(pair):
    target, draft = pair
    (row,) = speculative_generate(target, draft, [PROMPTS[2]], ConstantK(4), GREEDY, max_new_tokens=30)
    alone = speculative_generate(target, draft, PROMPTS[2], ConstantK(4), GREEDY, max_new_tokens=30)
    assert row.tokens == alone.tokens and row.stats.rounds == alone.stats.rounds
    assert row.stats.wasted_draft_steps == 0


def test_negative_control_positions_from_columns_break_exactness(pair, monkeypatch):
    """Without per-row position ids (positions = cache columns, as HF's default) holes shift later positions: the
    exactness tests above must be able to see that."""
    target, _ = pair
    draft = ScriptedDraft(target, {5, 9, 14, 15, 22})
    forward = target.forward
    monkeypatch.setattr(target, "forward", lambda position_ids=None, **kw: forward(position_ids=None, **kw))
    rows = speculative_generate(target, draft, PROMPTS, ConstantK(4), GREEDY, max_new_tokens=24)
    monkeypatch.undo()
    assert any(row.tokens != target_greedy(target, p, 24) for p, row in zip(PROMPTS, rows))


# --- sampling: each row's output distribution is the target's ---------------------------------------------------

N_BATCHES = 1200


@pytest.mark.parametrize("policy", [ConstantK(2), Margin(0.5, k_max=3)], ids=repr)
def test_each_row_of_a_sampled_batch_follows_the_target_distribution(sampling_setup, policy):
    """Chi-square per row (prompts of different lengths in one batch), as in test_decoding; ALPHA = 0.001 each."""
    target, draft, cfg, _ = sampling_setup
    prompts = [[1, 2], [5, 3, 1, 2], [2]]
    expected = [exact_continuation_probs(target, p, cfg) for p in prompts]
    counts = [{} for _ in prompts]
    g = torch.Generator().manual_seed(21)
    for _ in range(N_BATCHES):
        for c, row in zip(counts, speculative_generate(target, draft, prompts, policy, cfg, LENGTH, generator=g)):
            c[tuple(row.tokens)] = c.get(tuple(row.tokens), 0) + 1
    for c, e in zip(counts, expected):
        assert chi_square_p_value(c, e, N_BATCHES) > ALPHA
