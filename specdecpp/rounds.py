"""One round of speculative decoding for one sequence, as both the engine (`decoding.py`) and the greedy replay
(`replay.py`) run it: the only copy of the rules that decide what a round drafts, why it stops, what it commits and
how it is booked.

Glossary:
- round: one target call, with the candidates drafted before it (none for target-only decoding);
- candidate length K: the tokens drafted this round, at most `k_max`;
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

    def close(self, stats: GenerationStats, n_accepted: int, next_token: int, eos: set[int]) -> list[int]:
        """Book the round, tell the policy, and return the tokens it commits: the accepted candidates, then the
        target's token (the residual draw or the bonus), unless an accepted candidate already ended the sequence."""
        k = len(self.candidates)
        stats.rounds.append(Round(drafted=n_accepted if self.policy.hindsight else k, accepted=n_accepted,
                                  stop=self.stop))
        stats.target_calls += 1
        self.policy.end_round(k, n_accepted)
        accepted = self.candidates[:n_accepted]
        return accepted + ([] if accepted and accepted[-1] in eos else [next_token])
