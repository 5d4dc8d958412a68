"""One draft/verify loop over Hugging Face causal LMs and their KV caches, for a batch of prompts.

Each round, for every row b: the draft proposes Y_1..Y_Kb one token at a time while row b's policy says go on;
the target scores every row's candidates in one forward (p_1..p_{K+1}); Y_i is kept with probability
min(1, p_i(Y_i)/q_i(Y_i)) up to the first rejection, which is replaced by a draw from norm(max(0, p - q)); a fully
accepted round earns a bonus token from p_{K+1}. Greedy decoding is the same loop with one-hot p and q.

Rows run in lockstep: each has its own policy, candidate length, acceptance, EOS and token budget; a row that has
stopped drafting rides along masked while others draft (counted as its `wasted_draft_steps`), and a finished row
leaves the batch. The caches (`_RowCache`) share columns between rows: prompts are left-padded, row b's tokens sit
in columns of its own, rejected tokens leave masked holes, and every forward gets the validity mask and each row's
own position ids. A batch of one is the same loop with no padding, no holes and no mask.
Token positions live on the host as Python ints. What a round drafts, why it stops, what it commits and how it is
booked, and when a sequence ends is `rounds.Sequence`, shared with the replay (its docstring has the glossary).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .lowp import has_slow_linears, rows_products
from .policies import DraftToken, LengthPolicy
from .rounds import Sequence
from .sampling import SamplingConfig, acceptance_prob, draft_stats, probs, residual, sample
from .sampling import n_accepted as n_accepted_prefix
from .stats import GenerationStats

FILLER = 0  # the token id fed in masked slots: never attended to, its logits never read


@dataclass
class Generation:
    tokens: list[int]  # the new tokens only (EOS included when the model produced it)
    stats: GenerationStats
    text: str | None = None  # filled in by ModelPair.generate
    policy: LengthPolicy | None = None  # the policy object that decoded this row, with its end state


class _RowCache:
    """A model, its KV cache, and for each row the cache columns that hold the row's tokens, in order."""

    def __init__(self, model: torch.nn.Module, rows: int):
        self.model = model
        self.cache = DynamicCache(config=model.config)
        self.cols: list[list[int]] = [[] for _ in range(rows)]
        self.valid = torch.zeros(rows, 0, dtype=torch.bool, device=model.device)  # [B, columns]
        self.calls = 0
        self.slow = has_slow_linears(model)  # a bf16/fp16 model on a CPU: many-row forwards in fp32 (lowp.py)

    def seen(self, row: int) -> int:
        return len(self.cols[row])

    @property
    def dense(self) -> bool:
        """No masked column anywhere (always so at batch 1): the forward needs no attention mask."""
        return sum(map(len, self.cols)) == self.valid.numel()

    def __call__(self, tokens: list[list[int]], keep: int = 1, hidden: bool = False):
        """Append each row's `tokens` (left-padded into one block) and run the model on them. The last `keep`
        columns' logits come back: a row's last token is always in the last column."""
        width = self.valid.shape[1]  # columns so far
        new_cols = max(map(len, tokens))  # columns this call appends
        pad = [new_cols - len(t) for t in tokens]
        ids = [[FILLER] * p + t for p, t in zip(pad, tokens)]
        pos = [[0] * p + list(range(len(c), len(c) + new_cols - p)) for p, c in zip(pad, self.cols)]
        for p, c in zip(pad, self.cols):
            c.extend(range(width + p, width + new_cols))
        dev = self.model.device
        appended = torch.tensor([[False] * p + [True] * (new_cols - p) for p in pad], device=dev)
        self.valid = torch.cat([self.valid, appended], 1)
        # the last `keep` columns by index, not by slice: HF's LM head on a strided slice of the hidden states takes a
        # batched product that copies the vocabulary matrix (bf16 Qwen2.5-0.5B on a CPU: 477 ms for 2 rows, keep 1,
        # against 47 ms by index; experiments/lm_head_rows.py)
        last = torch.arange(max(new_cols - keep, 0), new_cols, device=dev)
        with rows_products(self.model, len(ids) * new_cols, self.slow):
            out = self.model(input_ids=torch.tensor(ids, device=dev), position_ids=torch.tensor(pos, device=dev),
                             attention_mask=None if self.dense else self.valid, cache=self.cache, use_cache=True,
                             logits_to_keep=last, output_hidden_states=hidden)
        self.calls += 1
        return out

    def rollback(self, lengths: list[int]) -> None:
        """Keep the first lengths[b] tokens of each row (a row holding fewer keeps all it has)."""
        for b, n in enumerate(lengths):
            if len(self.cols[b]) > n:
                self.valid[b, self.cols[b][n:]] = False
                del self.cols[b][n:]
        self._trim()

    def keep_rows(self, rows: list[int]) -> None:
        """Drop every row not in `rows` (finished sequences leave the batch)."""
        self.cache.batch_select_indices(torch.tensor(rows, dtype=torch.long))
        self.valid = self.valid[rows]
        self.cols = [self.cols[b] for b in rows]
        self._trim()

    def _trim(self) -> None:
        """Free the trailing columns no row uses any more: the rejected tokens of every row, at batch 1."""
        end = max((c[-1] + 1 for c in self.cols if c), default=0)
        width = self.valid.shape[1]
        if end < width:
            self.cache.crop(end - width)  # a negative count removes that many columns
            self.valid = self.valid[:, :end]


class _Row(Sequence):
    """One sequence of the batch (`rounds.Sequence`), and what its caches have been fed."""

    def pending(self, model: _RowCache, b: int) -> list[int]:
        """The row's tokens (committed, then this round's candidates) that `model` has not been fed yet."""
        seen = model.seen(b)
        return self.tokens[seen:] + self.candidates[max(seen - len(self.tokens), 0):]


@dataclass
class Drafts:
    """What one round drafted, for every row of the batch (K = the longest row's candidate length)."""

    tokens: torch.Tensor  # [B, K] Y_1..Y_K of each row (filler past a row's own length)
    q_tokens: torch.Tensor  # [B, K] q_j(Y_j), the draft's (warped) probability of each drafted token
    dists: list[torch.Tensor]  # K x [B, V] q_1..q_K (kept for the residual at a rejection; not stacked)
    lengths: list[int]  # [B] K_b, each row's candidate length


@contextmanager
def _timed(rows: list[_Row], field: str, prefill: bool = False):
    """Add the seconds spent inside to each row's `stats.<field>` (and to prefill_s for the prompt's call)."""
    t0 = time.perf_counter()
    yield
    dt = time.perf_counter() - t0
    for r in rows:
        setattr(r.stats, field, getattr(r.stats, field) + dt)
        r.stats.prefill_s += dt if prefill else 0.0


def _draw(dist: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of `dist` [B, V]."""
    return dist.argmax(-1) if cfg.greedy else sample(dist, generator)


def _draft(draft_cache: _RowCache | None, rows: list[_Row], sampling: SamplingConfig,
           generator: torch.Generator | None) -> Drafts:
    """Draft in lockstep until every row's round stopped (its policy, its round maximum, EOS)."""
    for r in rows:
        r.begin_round()
    if draft_cache is None and any(r.round.drafting for r in rows):
        first = next(r.policy for r in rows if r.round.drafting)
        raise ValueError(f"policy {first!r} drafts tokens but no draft model was given")
    steps: list[torch.Tensor] = []  # per step: [B] drafted tokens
    dists: list[torch.Tensor] = []  # per step: [B, V] q
    while any(r.round.drafting for r in rows):
        live = [b for b, r in enumerate(rows) if r.round.drafting]
        with _timed(rows, "draft_s", prefill=draft_cache.calls == 0):
            out = draft_cache([r.pending(draft_cache, b) if r.round.drafting else [] for b, r in enumerate(rows)],
                              hidden=any(rows[b].policy.needs_hidden for b in live))
            logits = out.logits[:, -1]  # [B, V]
            q = probs(logits, sampling)
            next_tokens = q.argmax(-1) if sampling.greedy else torch.zeros(len(rows), dtype=torch.long,
                                                                          device=q.device)
            if not sampling.greedy:
                next_tokens[live] = sample(q[live], generator)
            stats = None
            if any(rows[b].policy.needs_stats for b in live):  # one device sync for all rows
                stats = torch.stack(draft_stats(logits[live], next_tokens[live]), 1).tolist()
            live_tokens = next_tokens[live].tolist()
        steps.append(next_tokens)
        dists.append(q)
        for b, r in enumerate(rows):
            r.stats.wasted_draft_steps += not r.round.drafting
        for j, b in enumerate(live):
            r = rows[b]
            token = DraftToken(hidden=out.hidden_states[-1][b, -1] if r.policy.needs_hidden else None)
            if stats is not None and r.policy.needs_stats:
                token.prob, token.entropy, token.margin = stats[j]
            with _timed([r], "head_s"):
                r.draft(live_tokens[j], token)
    if not steps:  # no row drafted: an empty [B, 0] record
        return Drafts(torch.zeros(len(rows), 0, dtype=torch.long), torch.zeros(len(rows), 0), [], [0] * len(rows))
    tokens = torch.stack(steps, 1)
    q_tokens = torch.stack([q.gather(-1, y[:, None])[:, 0] for q, y in zip(dists, steps)], 1)
    return Drafts(tokens, q_tokens, dists, [len(r.candidates) for r in rows])


def _verify(target_cache: _RowCache, rows: list[_Row], drafts: Drafts, device: torch.device,
            sampling: SamplingConfig, generator: torch.Generator | None) -> tuple[list[int], list[int]]:
    """One target forward over every row's unfed tokens and candidates; returns each row's accepted count n_b and
    its round's last token (the residual draw after a rejection, else the bonus from p_{K_b+1})."""
    lengths = drafts.lengths
    longest = drafts.tokens.shape[1]
    batch = len(rows)
    logits = target_cache([r.pending(target_cache, b) for b, r in enumerate(rows)], keep=longest + 1).logits
    # [B, K+1, V]: row b's p_1..p_{K_b+1} are its last K_b+1 columns, from column K - K_b on. On the draft's device:
    # a target spread over devices ends on its last one.
    p = probs(logits, sampling).to(device)
    row_index = torch.arange(batch, device=device)
    first = torch.tensor([longest - k for k in lengths], device=device)
    n_accepted = [0] * batch
    if longest:
        cols = (first[:, None] + torch.arange(longest, device=device)).clamp(max=longest)  # past K_b: never read
        p_acc = acceptance_prob(p[row_index[:, None], cols, drafts.tokens], drafts.q_tokens)  # [B, K]
        ok = p_acc >= 1 if sampling.greedy else torch.rand(batch, longest, generator=generator, device=device) < p_acc
        ok &= torch.arange(longest, device=device) < torch.tensor(lengths, device=device)[:, None]  # own candidates
        n_accepted = n_accepted_prefix(ok).tolist()
    # q at the first rejected position (zero where every candidate was accepted: the bonus is drawn from p alone)
    q_rejected = torch.stack([drafts.dists[n][b] if n < k else torch.zeros_like(p[b, 0])
                              for b, (n, k) in enumerate(zip(n_accepted, lengths))])
    p_next = p[row_index, first + torch.tensor(n_accepted, device=device)]  # [B, V]
    next_tokens = _draw(residual(p_next, q_rejected), sampling, generator).tolist()
    return n_accepted, next_tokens


@torch.inference_mode()
def speculative_generate(
    target: torch.nn.Module,
    draft: torch.nn.Module | None,
    prompt_ids: list[int] | torch.Tensor | list[list[int]],
    policy: LengthPolicy | list[LengthPolicy],
    sampling: SamplingConfig = SamplingConfig(),
    max_new_tokens: int = 128,
    eos_token_id: int | list[int] | None = None,
    generator: torch.Generator | None = None,
) -> Generation | list[Generation]:
    """Generate up to `max_new_tokens` after each prompt with the candidate length chosen by its policy.

    `prompt_ids` is one prompt (a list of ids or a 1-D tensor), which gives one `Generation`, or a batch (a list of
    prompts, lengths free), which gives one per prompt. `policy` is one policy (a batch gives each row its own
    `fresh()` copy) or one per prompt. The output distribution is exactly the target's under `sampling` (token for
    token in greedy mode), whatever the policy. `draft` may be None only for the target-only policy. `generator`,
    if given, must live on the models' device. In a batch every row's times are the batch's while the row was in
    it; `total_s` is the row's time to finish and `batch_s` the whole batch's.
    """
    prompts, single = _as_batch(prompt_ids)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}")
    vocab = min(m.config.vocab_size for m in (target, draft) if m is not None)
    for row, p in enumerate(prompts):
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"{'the prompt' if single else f'prompt {row}'} holds token id {bad[0]}, outside the "
                             f"models' vocabulary of {vocab} ids (0-{vocab - 1}): was it encoded by another tokenizer?")
    context = context_length(target, draft)
    for row, p in enumerate(prompts):
        if len(p) + max_new_tokens > context:
            raise ValueError(f"{'the prompt' if single else f'prompt {row}'} has {len(p)} tokens: with max_new_tokens "
                             f"{max_new_tokens} that is {len(p) + max_new_tokens} positions, past the models' context "
                             f"of {context}; shorten it, lower max_new_tokens, or cut it from the left "
                             f"(ModelPair.generate(..., truncate=True))")
    if isinstance(policy, LengthPolicy):
        policies = [policy] + [policy.fresh() for _ in prompts[1:]]
    elif len(policy) != len(prompts):
        raise ValueError(f"got {len(policy)} policies for {len(prompts)} prompts: give one, or one per prompt")
    else:
        policies = list(policy)
    if draft is not None:
        for pol in {id(p): p for p in policies}.values():
            pol.check_draft(draft)
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or [])
    rows = [_Row(p, pol, max_new_tokens, eos) for p, pol in zip(prompts, policies)]
    for r in rows:
        r.stats.batch_size = len(rows)
    target_cache = _RowCache(target, len(rows))
    draft_cache = _RowCache(draft, len(rows)) if draft is not None else None
    caches = [c for c in (target_cache, draft_cache) if c is not None]
    device = (draft if draft is not None else target).device
    active = list(rows)  # the caches hold exactly the active rows, in this order
    start = time.perf_counter()

    while active:
        # 1. draft: every row drafts until its policy, its round maximum or EOS stops it
        drafts = _draft(draft_cache, active, sampling, generator)
        # 2-3. verify every row's candidates in one target call; accept a prefix; draw the round's last token
        with _timed(active, "verify_s", prefill=target_cache.calls == 0):
            n_accepted, next_tokens = _verify(target_cache, active, drafts, device, sampling, generator)
        # 4. commit: book each round, tell its policy, append what it commits; roll both caches back to the
        # committed tokens (they hold all of them but the last, which the next round feeds)
        kept = []
        for r, n, token in zip(active, n_accepted, next_tokens):
            kept.append(len(r.tokens) + n)
            r.commit(n, token)
            r.stats.total_s = time.perf_counter() - start
        for cache in caches:
            cache.rollback(kept)
        # 5. drop the finished rows from the batch
        going = [b for b, r in enumerate(active) if not r.done]
        if going and len(going) < len(active):
            for cache in caches:
                cache.keep_rows(going)
        active = [active[b] for b in going]

    batch_s = time.perf_counter() - start
    gens = []
    for r in rows:
        r.finish().batch_s = batch_s
        gens.append(Generation(tokens=r.tokens[r.n_prompt:], stats=r.stats, policy=r.policy))
    return gens[0] if single else gens


def _as_batch(prompt_ids) -> tuple[list[list[int]], bool]:
    """(the prompts as lists of ids, whether one prompt was given rather than a batch)."""
    single = torch.is_tensor(prompt_ids) or not prompt_ids or not isinstance(prompt_ids[0], (list, tuple))
    if torch.is_tensor(prompt_ids):
        prompt_ids = prompt_ids.reshape(-1).tolist()
    prompts = [[int(t) for t in p] for p in ([prompt_ids] if single else prompt_ids)]
    empty = [row for row, p in enumerate(prompts) if not p]
    if empty:
        where = "the prompt is" if single else f"prompt {empty[0]} of the batch is"
        raise ValueError(f"{where} empty: speculative decoding needs at least one prompt token")
    return prompts, single


def context_length(*models: torch.nn.Module | None) -> int:
    """The most positions every given model was trained for (`max_position_embeddings`; unbounded if none says)."""
    return min((getattr(m.config, "max_position_embeddings", None) or 10**9 for m in models if m is not None),
               default=10**9)
