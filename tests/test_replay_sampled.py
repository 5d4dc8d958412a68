"""The replay at temperature > 0 (top-k and top-p too) against the engine, in distribution: chi-square tests on a
one-layer pair over 8 tokens, with a negative control that shows the test catches the classic coupling mistake."""

import pytest
import torch
from conftest import ALPHA, VOCAB, chi_square_p_value

from specdecpp import speculative_generate
from specdecpp.passes import sample_responses
from specdecpp.policies import Confidence, ConstantK, OnlineConfidence, SpecDecPP
from specdecpp.replay import load_trace, make_traces, replay_generation, save_trace, teacher_forced

PROMPT, NEW, N = [1, 2], 6, 1500


def two_sample_p_value(a: dict, b: dict) -> float:
    """Chi-square test that two samples of equal size come from one distribution: each side's expected count in a
    cell is half the cell's total (cells with expected count < 5 pooled)."""
    n_a, n_b = sum(a.values()), sum(b.values())
    assert n_a == n_b
    pooled = {k: (a.get(k, 0) + b.get(k, 0)) / (2 * n_a) for k in a.keys() | b.keys()}
    # two goodness-of-fit tests against the pooled estimate, combined: Pearson's homogeneity statistic
    stat, cells, small_a, small_b, small_e = 0.0, 0, 0, 0, 0.0
    for k, p in pooled.items():
        e = p * n_a
        if e < 5:
            small_a, small_b, small_e = small_a + a.get(k, 0), small_b + b.get(k, 0), small_e + e
            continue
        stat, cells = stat + ((a.get(k, 0) - e) ** 2 + (b.get(k, 0) - e) ** 2) / e, cells + 1
    if small_e > 0:
        stat, cells = stat + ((small_a - small_e) ** 2 + (small_b - small_e) ** 2) / small_e, cells + 1
    return float(torch.special.gammaincc(torch.tensor((cells - 1) / 2), torch.tensor(stat / 2)))


def first_rounds(stats) -> tuple:
    """What the test compares: the first two rounds' (drafted, accepted), and the target calls of the generation."""
    head = [(r.drafted, r.accepted) for r in stats.rounds[:2]]
    return (*head, stats.target_calls)


def policies(hidden: int):
    torch.manual_seed(0)
    return [ConstantK(3), Confidence(0.5, k_max=5), OnlineConfidence(0.5, lr=0.5, k_max=5),
            SpecDecPP(torch.nn.Linear(hidden, 1), threshold=0.5, k_min=1, k_max=5)]


def coupled_traces(target, draft, cfg, n: int = N, seed: int = 0):
    """n traces of one prompt: n outputs sampled in one batch, each with its own draw of the coupling."""
    g = torch.Generator().manual_seed(seed)
    outputs = sample_responses(target, [PROMPT] * n, cfg, NEW, set(), 0, g)
    return [teacher_forced(draft, PROMPT, x, set(), cfg, target, g) for x in outputs]


@pytest.fixture(scope="module")
def sampled_traces(sampling_setup):
    target, draft, cfg, _ = sampling_setup
    return coupled_traces(target, draft, cfg)


def engine_counts(target, draft, policy, cfg) -> dict:
    """N engine generations of PROMPT, in batches of 500 rows (each row its own policy copy and draws; a batch row
    follows the target's distribution as a lone prompt does: tests/test_batched.py)."""
    counts = {}
    g = torch.Generator().manual_seed(10_000)
    for lo in range(0, N, 500):
        for gen in speculative_generate(target, draft, [PROMPT] * min(500, N - lo), policy, cfg, NEW, generator=g):
            key = first_rounds(gen.stats)
            counts[key] = counts.get(key, 0) + 1
    return counts


@pytest.fixture(scope="module")
def engine_runs(sampling_setup):
    target, draft, cfg, _ = sampling_setup
    return {i: engine_counts(target, draft, p, cfg) for i, p in enumerate(policies(target.config.hidden_size))}


def replay_counts(traces, policy) -> dict:
    counts = {}
    for trace in traces:
        key = first_rounds(replay_generation(trace, policy, NEW))
        counts[key] = counts.get(key, 0) + 1
    return counts


@pytest.mark.parametrize("index", range(4), ids=["constant", "confidence", "online_confidence", "specdecpp"])
def test_sampled_replay_books_the_engines_rounds_in_distribution(sampling_setup, sampled_traces, engine_runs, index):
    """The joint distribution of the first two rounds' (drafted, accepted) and the target calls per generation,
    replay against engine (1,500 each, T = 1 with top-k 6 and top-p 0.95). Fails by chance with probability
    ALPHA = 0.001 per policy (seeded, so reproducible)."""
    target, _, _, _ = sampling_setup
    policy = policies(target.config.hidden_size)[index]
    replayed, engine = replay_counts(sampled_traces, policy), engine_runs[index]
    assert len(engine) > 5  # the rounds vary: the test compares something
    assert two_sample_p_value(replayed, engine) > ALPHA


def test_negative_control_the_mirrored_acceptance_is_caught(sampling_setup, engine_runs, monkeypatch):
    """Accepting X_j with probability min(1, p/q) (the engine's formula applied to the output instead of
    min(1, q/p)) is the classic mistake of a coupling; the same test must reject it."""
    import specdecpp.replay as replay

    target, draft, cfg, _ = sampling_setup
    monkeypatch.setattr(replay, "acceptance_prob", lambda q_x, p_x: torch.clamp(p_x / q_x.clamp_min(1e-12), max=1.0))
    wrong = coupled_traces(target, draft, cfg, seed=1)
    assert two_sample_p_value(replay_counts(wrong, ConstantK(3)), engine_runs[0]) < ALPHA


def test_sampled_traces_output_the_target_distribution(sampling_setup):
    """The outputs X of N traces, 3 tokens each, against the target's exact continuation probabilities."""
    from conftest import LENGTH

    target, draft, cfg, expected = sampling_setup
    counts = {}
    for s in range(N // 10):  # 150 calls of 10 prompts: make_traces' own seeding, batching and draws
        for _, trace in make_traces(target, draft, [PROMPT] * 10, LENGTH, set(), sampling=cfg,
                                    seed=s):
            counts[tuple(trace.target)] = counts.get(tuple(trace.target), 0) + 1
    assert all(len(k) == LENGTH and max(k) < VOCAB for k in counts)
    assert chi_square_p_value(counts, expected, N) > ALPHA


def test_a_sampled_trace_is_reproducible_and_its_seed_matters(sampling_setup, tmp_path):
    target, draft, cfg, _ = sampling_setup
    a = next(make_traces(target, draft, [PROMPT], 20, set(), sampling=cfg, seed=3))[1]
    b = next(make_traces(target, draft, [PROMPT], 20, set(), sampling=cfg, seed=3))[1]
    assert (a.target, a.draft) == (b.target, b.draft)
    others = [next(make_traces(target, draft, [PROMPT], 20, set(), sampling=cfg, seed=s))[1] for s in range(4, 8)]
    assert any(o.target != a.target for o in others)
    # saved with its branches and reloaded: the same rounds for every policy
    save_trace(a, tmp_path / "t.safetensors", branch_length=6)
    c = load_trace(tmp_path / "t.safetensors")
    for policy in policies(target.config.hidden_size):
        assert [(r.drafted, r.accepted) for r in replay_generation(c, policy, 20).rounds] == \
            [(r.drafted, r.accepted) for r in replay_generation(a, policy, 20).rounds]


def test_sampled_traces_carry_each_drafted_tokens_true_acceptance_probability(sampling_setup):
    """On X (and the rejected R_j) from the teacher-forced passes; on branches from one batched target forward. Both
    against the same quantity computed here from plain full forwards."""
    from specdecpp.policies import Ceiling
    from specdecpp.sampling import probs

    target, draft, cfg, _ = sampling_setup

    def true_accept(prefix: list[int], y: int) -> float:
        ids = torch.tensor([prefix])
        p = probs(target(ids).logits[0, -1], cfg)[y]
        q = probs(draft(ids).logits[0, -1], cfg)[y]
        return float(torch.clamp(p / q, max=1.0))

    checked = 0
    for trace in coupled_traces(target, draft, cfg, n=8, seed=3):
        trace.complete_branches(4)
        for j, (d, token) in enumerate(zip(trace.draft, trace.tokens)):
            assert token.accept == pytest.approx(true_accept(PROMPT + trace.target[:j], d), abs=1e-4)
        for m, b in trace.branches.items():
            prefix = PROMPT + trace.target[:m] + [trace.draft[m]]
            for y, token in b.steps:
                assert token.accept == pytest.approx(true_accept(prefix, y), abs=1e-4)
                prefix = prefix + [y]
                checked += 1
        replay_generation(trace, Ceiling(0.5, k_max=4), NEW)  # reads them
    assert checked > 5
    with pytest.raises(ValueError, match="only a replay of a sampled trace has"):
        speculative_generate(target, draft, PROMPT, Ceiling(0.5), cfg, NEW, generator=torch.Generator())


def test_draws_from_one_scoring_share_it_and_accept_x_at_the_couplings_rate(sampling_setup):
    """`teacher_forced` is `score_along` then `draw_trace`: the same generator state gives the same trace. Many draws
    from one scoring (what experiments/replay_given_engine.py does) accept X_j at the rate accept_x says."""
    from specdecpp.replay import draw_trace, score_along

    target, draft, cfg, _ = sampling_setup
    x = sample_responses(target, [PROMPT], cfg, NEW, set(), 0, torch.Generator().manual_seed(4))[0]
    a = teacher_forced(draft, PROMPT, x, set(), cfg, target, torch.Generator().manual_seed(9))
    scored = score_along(draft, PROMPT, x, set(), cfg, target)
    b = draw_trace(scored, torch.Generator().manual_seed(9))
    assert (a.draft, [t.accept for t in a.tokens]) == (b.draft, [t.accept for t in b.tokens])
    n, g = 4000, torch.Generator().manual_seed(11)
    hits = torch.tensor([[d == t for d, t in zip(draw_trace(scored, g).draft, x)] for _ in range(n)]).float()
    rate, expected = hits.mean(0), scored.accept_x
    assert 0 < float(expected.min()) < 0.99  # some positions are rejected often: the rates test something
    z = (rate - expected) / (expected * (1 - expected) / n).clamp_min(1e-12).sqrt()
    assert float(z.abs().max()) < 4.0


def given_output_z(target, draft, cfg, policy, n: int, mirrored: bool = False) -> dict[str, float]:
    """z-scores per offset in the round ("1", "2", "3+") and in all of sum(accepted - a_j) over n engine generations,
    a_j = min(1, q_j(X_j) / p_j(X_j)) teacher-forced along each generation's own output X (`mirrored`: the wrong
    min(1, p/q), the negative control)."""
    from specdecpp.replay import score_along, verified_positions

    cells: dict[str, list[float]] = {}
    g = torch.Generator().manual_seed(20_000)
    for lo in range(0, n, 500):
        for gen in speculative_generate(target, draft, [PROMPT] * min(500, n - lo), policy, cfg, 12, generator=g):
            x = list(gen.tokens)
            scored = score_along(draft, PROMPT, x, set(), cfg, target)
            a = (scored.p / scored.q).gather(-1, torch.tensor(x)[:, None])[:, 0].clamp(max=1) if mirrored \
                else scored.accept_x
            for j, i, ok in verified_positions([(r.drafted, r.accepted) for r in gen.stats.rounds], x, set()):
                for key in ("3+" if i >= 3 else str(i), "all"):
                    c = cells.setdefault(key, [0.0, 0.0])
                    c[0] += ok - float(a[j])
                    c[1] += float(a[j] * (1 - a[j]))
    return {k: d / v ** 0.5 for k, (d, v) in cells.items()}


@pytest.mark.parametrize("index", [0, 2, 3], ids=["constant", "online_confidence", "specdecpp"])
def test_the_engine_accepts_each_position_as_the_coupling_says_given_its_output(sampling_setup, index):
    """What experiments/replay_given_engine.py tests on the real pair, here on the toy pair with 1,000 generations of
    12 tokens and long rounds (k_max 8): given the engine's output X, each verified position was accepted with
    probability min(1, q_j(X_j) / p_j(X_j)), at every offset in the round. Fails by chance with probability about
    1e-4 per cell; the mirrored min(1, p/q) fails it."""
    target, draft, cfg, _ = sampling_setup
    make = [lambda: ConstantK(6), None, lambda: OnlineConfidence(0.8, lr=0.5, k_max=8), lambda: SpecDecPP(
        torch.nn.Linear(target.config.hidden_size, 1), threshold=0.8, k_min=1, k_max=8)][index]
    torch.manual_seed(0)
    z = given_output_z(target, draft, cfg, make(), 1000)
    assert set(z) >= {"1", "2", "3+", "all"}
    assert max(abs(v) for v in z.values()) < 3.9, z
    if index == 0:
        torch.manual_seed(0)
        assert given_output_z(target, draft, cfg, make(), 200, mirrored=True)["all"] < -3.9  # about -38
