"""Sampling maths of speculative decoding, in the paper's notation.

p is always the target's (warped) distribution and q the draft's, as in Leviathan et al. (2023) and
transformers; Y_i is the i-th drafted token. The decoder (`decoding.py`) and the training labels
(`data.py`) both use these functions, so the label a head learns is the acceptance the decoder applies.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """How logits become a distribution; one config is applied to draft and target alike.

    temperature 0 means greedy decoding. top_k 0 and top_p 1.0 disable those filters.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise ValueError(f"top_k must be a whole number (0 = off), got {self.top_k!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def warp(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Temperature, then top-k, then top-p (the order transformers uses); filtered entries become -inf."""
    logits = logits.float()
    if cfg.greedy:
        return logits
    logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the mass before it already reaches top_p; the most likely token always stays
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= cfg.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """The distribution decoding samples from; greedy gives the one-hot argmax."""
    if cfg.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return warp(logits, cfg).softmax(-1)


def sample(dist: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of `dist` [..., V] -> [...]."""
    flat = dist.reshape(-1, dist.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(dist.shape[:-1])


def acceptance_prob(p_y: torch.Tensor, q_y: torch.Tensor) -> torch.Tensor:
    """P(Y accepted) = min(1, p(Y) / q(Y)); Y was drawn from q, so q(Y) > 0 wherever it matters."""
    return torch.where(q_y > 0, (p_y / q_y.clamp_min(torch.finfo(q_y.dtype).tiny)).clamp(max=1.0), 1.0)


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)): where a token is drawn after a rejection. Falls back to p if p == q."""
    r = (p - q).clamp_min(0)
    total = r.sum(-1, keepdim=True)
    return torch.where(total > 0, r / total.clamp_min(torch.finfo(r.dtype).tiny), p)


def n_accepted(accepted: torch.Tensor) -> torch.Tensor:
    """Length of the leading run of True along the last dim of a bool tensor [..., K] -> [...]: the tokens each
    row keeps before its first rejection."""
    return (~accepted).cumsum(-1).eq(0).sum(-1)


def draft_stats(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What length policies read of the draft's distribution at a drafted token Y, whatever the sampling mode.

    From the softmax of the raw logits [..., V] (temperature 1, no filters; transformers' confidence rule reads
    the same): q(Y), the entropy H in nats, and the top-1 minus top-2 probability margin. Each [...].
    """
    logp = logits.float().log_softmax(-1)
    q = logp.exp()
    prob = q.gather(-1, y[..., None].long())[..., 0]
    entropy = -(q * logp).nan_to_num().sum(-1)
    top2 = q.topk(2, dim=-1).values
    return prob, entropy, top2[..., 0] - top2[..., 1]


def expected_acceptance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [...] the probability that a token drawn from q is accepted, E_{Y~q} min(1, p(Y)/q(Y)) =
    sum_y min(p(y), q(y)) = 1 - TV(p, q): the label min(1, p/q) averaged over the draft's sample (DSpark's target)."""
    return torch.minimum(p, q).sum(-1)


def derived_seed(*parts) -> int:
    """A 63-bit seed from `parts` (JSON-serializable), so a generation's or a trace's draws depend on what it is
    (its prompt, its seed), not on what ran before it or beside it. Two prompts given the same plain seed would
    share one random stream: their first draws would be the same uniforms, and on prompts that start alike (every
    HumanEval answer opens with one of a few tokens) the same accept or reject, which makes prompts that should be
    independent samples move together."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
