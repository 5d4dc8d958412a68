"""One sequence of speculative decoding, as both the engine (`decoding.py`) and the replay (`replay.py`) run it:
the only copy of the rules that decide what a round drafts, why it stops, what it commits, how it is booked, and
when the sequence ends.

Glossary:
- round: one target call, with the candidates drafted before it (none for target-only decoding);
- candidate length K: the tokens drafted this round, at most `k_max`;
- accepted: the leading candidates verification keeps (Y_i kept with probability min(1, p(Y_i) / q(Y_i)), up to the
  first rejection; in greedy mode while Y_i is the target's argmax);
- residual: norm(max(0, p - q)) at the first rejected position, the distribution the correction is drawn from;
- correction: the target's token that replaces the first rejected candidate (a draw from the residual);
- bonus: the target's token after a fully accepted round (a draw from p_{K+1});
- commit: a round appends its accepted candidates, then its correction or bonus (unless an accepted candidate was
  EOS): at least one token per round, at most K + 1;
- booked: what the statistics record of a round says it drafted;
- hindsight: the oracle's booking, as if drafting had stopped before the first rejection (no discarded tokens);
- wasted draft step (batched engine): a draft forward a row rides along in after it stopped drafting;
- charged seconds: a row's share of its batch's time (see `GenerationStats.charged_s`).
"""

from __future__ import annotations

from .policies import DraftToken, LengthPolicy
from .stats import GenerationStats, Round


class RoundState:
    """A sequence's current round: begun by its policy, fed drafted tokens, closed after verification."""

    def __init__(self, policy: LengthPolicy, generated: int, max_new_tokens: int):
        self.policy = policy
        # the round's target token must fit in the budget too, hence the - 1
        self.k_max = min(policy.begin_round(), max_new_tokens - generated - 1)
        self.candidates: list[int] = []
        self.stop = "limit"  # why drafting stopped: "policy", "limit" (round maximum or budget) or "eos"
        self.drafting = self.k_max > 0

    def add(self, token_id: int, token: DraftToken, eos: set[int]) -> bool:
        """Take drafted token Y_i; whether to draft Y_{i+1}."""
        self.candidates.append(token_id)
        if token_id in eos:
            self.stop, self.drafting = "eos", False
        elif not self.policy.keep_drafting(len(self.candidates), token) and len(self.candidates) < self.k_max:
            self.stop, self.drafting = "policy", False
        else:
            self.drafting = len(self.candidates) < self.k_max
        return self.drafting

    def close(self, stats: GenerationStats, n_accepted: int, next_token: int | None, eos: set[int]) -> list[int]:
        """Book the round, tell the policy, and return the tokens it commits: the accepted candidates, then the
        target's token (the correction or the bonus), unless an accepted candidate already ended the sequence.
        `next_token` may be None only in that case (a replay has no target token after an output's EOS)."""
        k = len(self.candidates)
        stats.rounds.append(Round(drafted=n_accepted if self.policy.hindsight else k, accepted=n_accepted,
                                  stop=self.stop))
        stats.target_calls += 1
        self.policy.end_round(k, n_accepted)
        accepted = self.candidates[:n_accepted]
        if accepted and accepted[-1] in eos:
            return accepted
        if next_token is None:
            raise ValueError("a round that did not end in an accepted EOS needs the target's token")
        return accepted + [next_token]


class Sequence:
    """One prompt's generation: its tokens, its policy, its statistics, its current round, and whether it ended.

    The decode loop (engine or replay) calls `begin_round`, `draft` per drafted token while `round.drafting`, then
    `commit` with verification's outcome, until `done`; `finish` books the new tokens."""

    def __init__(self, prompt: list[int], policy: LengthPolicy, max_new_tokens: int, eos: set[int]):
        self.tokens = list(prompt)  # committed: the prompt, then every round's commit
        self.n_prompt = len(prompt)
        self.policy, self.max_new_tokens, self.eos = policy, max_new_tokens, eos
        self.stats = GenerationStats(prompt_tokens=len(prompt), hindsight=policy.hindsight)
        self.round: RoundState | None = None
        self.done = False
        policy.reset()

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.n_prompt

    @property
    def candidates(self) -> list[int]:
        return self.round.candidates if self.round is not None else []

    def begin_round(self) -> RoundState:
        self.round = RoundState(self.policy, self.generated, self.max_new_tokens)
        return self.round

    def draft(self, token_id: int, token: DraftToken) -> bool:
        """A drafted token (one draft forward); whether to draft another."""
        self.stats.draft_calls += 1
        return self.round.add(token_id, token, self.eos)

    def commit(self, n_accepted: int, next_token: int | None) -> list[int]:
        """Close the round with verification's outcome; append and return what it commits."""
        new = self.round.close(self.stats, n_accepted, next_token, self.eos)
        self.tokens += new
        self.done = new[-1] in self.eos or self.generated >= self.max_new_tokens
        return new

    def finish(self) -> GenerationStats:
        self.stats.new_tokens = self.generated
        return self.stats
