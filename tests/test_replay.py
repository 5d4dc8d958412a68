import pytest
import torch
from conftest import all_policies, target_greedy

from specdecpp import SamplingConfig, speculative_generate
from specdecpp.replay import make_traces, replay_generation

GREEDY = SamplingConfig(temperature=0)
PROMPTS = [[3, 4, 5], [10], [7, 1, 2, 8, 9, 30, 31], [12, 13]]


def rounds(stats):
    return [(r.drafted, r.accepted, r.stop) for r in stats.rounds]


@pytest.fixture(scope="module", params=[(False, False), (True, False), (True, True)],
                ids=lambda p: ("eos-inside-runs" if p[0] else "no-eos") + ("-batched-branches" if p[1] else ""))
def traces(request, tiny_pair):
    """Traces of every prompt; with eos, a token that the target emits mid-output ends generation; with batched
    branches, every branch is drawn up front in one batch (as saved traces are) instead of one call at a time."""
    target, draft = tiny_pair
    with_eos, batched = request.param
    eos = {target_greedy(target, PROMPTS[0], 30)[9]} if with_eos else set()
    got = dict(make_traces(target, draft, PROMPTS, max_new_tokens=23, eos=eos, batch_size=3))
    if batched:
        for trace in got.values():
            trace.complete_branches(24)  # longer than any round of 23 tokens
            trace.release()  # so nothing can be drawn one call at a time behind the test's back
    return eos, [got[i] for i in range(len(PROMPTS))]


@pytest.mark.parametrize("policy", all_policies(), ids=repr)
def test_replay_books_the_engines_rounds_for_every_policy(tiny_pair, traces, policy):
    """Per-round candidate length, accepted count and stop reason equal the engine's, at the max_new_tokens edge
    (23 is not a multiple of any K) and with EOS inside draft runs."""
    target, draft = tiny_pair
    eos, prompt_traces = traces
    for prompt, trace in zip(PROMPTS, prompt_traces):
        engine = speculative_generate(target, draft, prompt, policy, GREEDY, max_new_tokens=23,
                                      eos_token_id=list(eos)).stats
        replayed = replay_generation(trace, policy, max_new_tokens=23)
        assert rounds(replayed) == rounds(engine)
        assert (replayed.new_tokens, replayed.target_calls, replayed.draft_calls) == \
            (engine.new_tokens, engine.target_calls, engine.draft_calls)


def test_traces_hold_the_target_output_and_branch_where_the_draft_leaves_it(tiny_pair, traces):
    target, draft = tiny_pair
    eos, prompt_traces = traces
    trace = prompt_traces[2]
    assert trace.target == target_greedy(target, PROMPTS[2], 23)[: len(trace.target)]
    m = trace.mismatches[0]
    # the branch after D_m is the draft's own greedy continuation of prompt + X_<m + D_m
    prefix = PROMPTS[2] + trace.target[:m] + [trace.draft[m]]
    expected = target_greedy(draft, prefix, 3)
    n = next((s for s, y in enumerate(expected, 1) if y in eos), 3)  # a branch ends at EOS
    assert [trace.branch(m, s)[0] for s in range(1, n + 1)] == expected[:n]
    assert torch.isfinite(torch.tensor([trace.branch(m, 1)[1].margin]))


def test_saved_traces_reload_and_replay_the_same_rounds(tiny_pair, tmp_path):
    target, draft = tiny_pair
    eos = {target_greedy(target, PROMPTS[0], 30)[9]}
    fresh = dict(make_traces(target, draft, PROMPTS, 23, eos, batch_size=4, cache_dir=tmp_path, branch_length=10))
    assert len(list(tmp_path.glob("*.safetensors"))) == len(PROMPTS)
    reloaded = dict(make_traces(None, None, PROMPTS, 23, eos, batch_size=4, cache_dir=tmp_path, branch_length=10))
    for policy in all_policies():
        if policy.most_per_round > 10:
            continue
        for i in range(len(PROMPTS)):
            assert rounds(replay_generation(reloaded[i], policy, 23)) == rounds(replay_generation(fresh[i], policy, 23))
    # a saved trace has no model: drafting past its branches is refused, not guessed
    m = next(m for t in reloaded.values() for m in t.mismatches)
    trace = next(t for t in reloaded.values() if m in t.mismatches)
    with pytest.raises(ValueError, match="longer branch_length"):
        trace.branch(m, 40)


def test_batched_branches_equal_branches_drawn_one_call_at_a_time(tiny_pair):
    target, draft = tiny_pair
    eos = {target_greedy(target, PROMPTS[0], 30)[9]}
    lazy = dict(make_traces(target, draft, PROMPTS, 23, eos, batch_size=4))
    batched = dict(make_traces(target, draft, PROMPTS, 23, eos, batch_size=4))
    compared = 0
    for i, trace in batched.items():
        trace.complete_branches(8)
        assert sorted(trace.branches) == [m for m in trace.mismatches if trace.draft[m] not in eos]
        for m, b in trace.branches.items():
            assert 1 <= len(b.steps) <= 7 and all(y not in eos for y, _ in b.steps[:-1])
            assert len(b.steps) == 7 or b.steps[-1][0] in eos  # full length, or ended at EOS
            for s, (y, token) in enumerate(b.steps, 1):
                y_lazy, token_lazy = lazy[i].branch(m, s)
                assert y == y_lazy
                assert [token.prob, token.entropy, token.margin] == pytest.approx(
                    [token_lazy.prob, token_lazy.entropy, token_lazy.margin], abs=1e-5)
                assert torch.allclose(token.hidden, token_lazy.hidden, atol=1e-4)
                compared += 1
    assert compared > 20
