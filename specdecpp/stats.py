"""The statistics record of one generation, and the paper's rates derived from it in one place.

Names follow vLLM's spec-decode metrics where one exists (mean acceptance length, draft acceptance rate,
per-position acceptance); verification and discard rates are the SpecDec++ paper's Pareto axes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class Round:
    drafted: int  # candidate length K of this round
    accepted: int  # leading candidates kept
    stop: str  # why drafting stopped: "policy", "limit" (round maximum or token budget) or "eos"


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    target_calls: int = 0  # target forwards; the first one also prefills the prompt
    draft_calls: int = 0  # draft forwards
    rounds: list[Round] = field(default_factory=list)
    draft_s: float = 0.0
    head_s: float = 0.0  # time inside the policy's keep_drafting (the acceptance head for SpecDec++)
    verify_s: float = 0.0
    prefill_s: float = 0.0  # the two calls that consumed the prompt (within draft_s and verify_s): policy-independent
    total_s: float = 0.0
    hindsight: bool = False  # oracle: rounds are booked as if drafting stopped before the rejection
    wasted_draft_steps: int = 0  # batched: draft forwards this row rode along in after it had stopped drafting
    batch_size: int = 1  # rows decoded together with this one (itself included)
    batch_s: float = 0.0  # wall time of the whole batch (total_s is this row's time to finish)
    priced_s: float | None = None  # seconds a cost model gives these counts (replay; engine with `priced`)

    @property
    def drafted(self) -> int:
        return sum(r.drafted for r in self.rounds)

    @property
    def accepted(self) -> int:
        return sum(r.accepted for r in self.rounds)

    @property
    def verified_rounds(self) -> int:
        """Target calls that scored drafted tokens (the rest decode one token, as target-only decoding does)."""
        return sum(1 for r in self.rounds if r.drafted > 0)

    @property
    def discarded(self) -> int:
        return self.drafted - self.accepted

    @property
    def charged_s(self) -> float:
        """The seconds this generation's tokens cost: the cost model's price of its counts when it was priced;
        otherwise its own time alone, or its share of the batch's wall time in a batch (the shares of a batch sum
        to its wall time, so tokens / charged seconds is throughput)."""
        if self.priced_s is not None:
            return self.priced_s
        return self.total_s if self.batch_size == 1 else self.batch_s / self.batch_size

    @property
    def overhead_s(self) -> float:
        return self.total_s - self.draft_s - self.head_s - self.verify_s

    @property
    def verification_rate(self) -> float:
        """N_target / N: target calls per generated token."""
        return self.target_calls / max(self.new_tokens, 1)

    @property
    def discard_rate(self) -> float:
        """N_discarded / N: drafted-then-discarded tokens per generated token."""
        return self.discarded / max(self.new_tokens, 1)

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens per target call (vLLM: 1 + accepted / rounds when every round ends in a target token)."""
        return self.new_tokens / max(self.target_calls, 1)

    @property
    def draft_acceptance_rate(self) -> float:
        return self.accepted / max(self.drafted, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.total_s if self.total_s > 0 else 0.0

    def per_position_acceptance(self) -> list[float]:
        """Share of rounds that drafted position i whose token i was accepted, for i = 1, 2, ..."""
        longest = max((r.drafted for r in self.rounds), default=0)
        out = []
        for i in range(1, longest + 1):
            reached = [r for r in self.rounds if r.drafted >= i]
            out.append(sum(r.accepted >= i for r in reached) / len(reached))
        return out

    def summary(self) -> dict:
        """A flat dict of counts, times and derived rates (what a benchmark row holds)."""
        row = {k: v for k, v in asdict(self).items() if k != "rounds"}
        row.update(
            rounds=len(self.rounds), verified_rounds=self.verified_rounds, drafted=self.drafted,
            accepted=self.accepted, discarded=self.discarded,
            charged_s=self.charged_s, overhead_s=self.overhead_s, verification_rate=self.verification_rate,
            discard_rate=self.discard_rate,
            mean_acceptance_length=self.mean_acceptance_length, draft_acceptance_rate=self.draft_acceptance_rate,
            tokens_per_s=self.tokens_per_s,
        )
        return row

    def to_dict(self) -> dict:
        """Everything, per-round detail included (for JSONL records)."""
        return {**self.summary(), "round_detail": [asdict(r) for r in self.rounds],
                "per_position_acceptance": self.per_position_acceptance()}


def bootstrap_interval(columns: list[list[float]], statistic: Callable[..., torch.Tensor], n_boot: int = 2000,
                       level: float = 0.95, seed: int = 0, groups: list | None = None) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic(*column_sums)` over items (prompts): each resample draws the
    same items for every column, so paired quantities (a setting and its baseline on the same prompts) stay
    paired. `statistic` takes and returns tensors of resampled sums, e.g. lambda n, t: n / t. With `groups` (one
    label per item, e.g. the prompt of each (prompt, seed) record) whole groups are resampled: repeats of one
    prompt are not independent draws."""
    x = torch.tensor(columns, dtype=torch.float64)  # [C, n]
    if groups is not None:  # statistics read column sums only, so summing within groups first is exact
        labels = {g: i for i, g in enumerate(dict.fromkeys(groups))}
        index = torch.tensor([labels[g] for g in groups])
        x = torch.zeros(x.shape[0], len(labels), dtype=x.dtype).index_add_(1, index, x)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(x.shape[1], (n_boot, x.shape[1]), generator=g)
    values = statistic(*x[:, idx].sum(-1))  # [n_boot]
    lo, hi = torch.quantile(values, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    return lo, hi
