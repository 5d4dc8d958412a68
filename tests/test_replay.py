import pytest
import torch
from conftest import all_policies, target_greedy

from specdecpp import SamplingConfig, speculative_generate
from specdecpp.replay import make_traces, replay_generation

GREEDY = SamplingConfig(temperature=0)
PROMPTS = [[3, 4, 5], [10], [7, 1, 2, 8, 9, 30, 31], [12, 13]]


def rounds(stats):
    return [(r.drafted, r.accepted, r.stop) for r in stats.rounds]


@pytest.fixture(scope="module", params=[None, "eos"], ids=["no-eos", "eos-inside-runs"])
def traces(request, tiny_pair):
    """Traces of every prompt; with "eos", a token that the target emits mid-output ends generation."""
    target, draft = tiny_pair
    eos = {target_greedy(target, PROMPTS[0], 30)[9]} if request.param else set()
    got = dict(make_traces(target, draft, PROMPTS, max_new_tokens=23, eos=eos, batch_size=3))
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
    assert [trace.branch(m, s)[0] for s in (1, 2, 3)] == expected
    assert torch.isfinite(torch.tensor([trace.branch(m, 1)[1].margin]))
