"""One draft/verify loop over Hugging Face causal LMs and their KV caches (batch size 1).

Each round: the draft proposes Y_1..Y_K one token at a time while the policy says go on; the target
scores all of them in one forward (p_1..p_{K+1}); Y_i is kept with probability min(1, p_i(Y_i)/q_i(Y_i))
up to the first rejection, which is replaced by a draw from norm(max(0, p - q)); a fully accepted round
earns a bonus token from p_{K+1}. Greedy decoding is the same loop with one-hot p and q.
Token positions live on the host as Python ints; each model's cache holds every committed token but
the ones it has not been fed yet.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .policies import DraftToken, LengthPolicy
from .sampling import SamplingConfig, acceptance_prob, draft_stats, n_accepted, probs, residual, sample
from .stats import GenerationStats, Round


@dataclass
class Generation:
    tokens: list[int]  # the new tokens only (EOS included when the model produced it)
    stats: GenerationStats
    text: str | None = None  # filled in by ModelPair.generate


class _CachedLM:
    """A model with its KV cache and how many tokens of the sequence the cache holds."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.cache = DynamicCache(config=model.config)
        self.seen = 0
        self.calls = 0

    def __call__(self, tokens: list[int], keep: int = 1, hidden: bool = False):
        ids = torch.tensor([tokens], device=self.model.device)
        out = self.model(input_ids=ids, cache=self.cache, use_cache=True, logits_to_keep=keep,
                         output_hidden_states=hidden)
        self.seen += len(tokens)
        self.calls += 1
        return out

    def rollback(self, length: int) -> None:
        if self.seen > length:
            self.cache.crop(length - self.seen)  # a negative count removes that many tokens
            self.seen = length


def _draft_token(policy: LengthPolicy, logits: torch.Tensor, y: int, out) -> DraftToken:
    """What `policy` reads of the drafted token: statistics of the raw draft distribution, the hidden state."""
    token = DraftToken(hidden=out.hidden_states[-1][0, -1] if policy.needs_hidden else None)
    if policy.needs_stats:
        stats = draft_stats(logits, torch.tensor(y, device=logits.device))
        token.prob, token.entropy, token.margin = torch.stack(stats).tolist()  # one device sync, not three
    return token


def _draw(dist: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> int:
    return int(dist.argmax()) if cfg.greedy else int(sample(dist, generator))


@torch.inference_mode()
def speculative_generate(
    target: torch.nn.Module,
    draft: torch.nn.Module | None,
    prompt_ids: list[int] | torch.Tensor,
    policy: LengthPolicy,
    sampling: SamplingConfig = SamplingConfig(),
    max_new_tokens: int = 128,
    eos_token_id: int | list[int] | None = None,
    generator: torch.Generator | None = None,
) -> Generation:
    """Generate up to `max_new_tokens` after `prompt_ids` with the candidate length chosen by `policy`.

    The output distribution is exactly the target's under `sampling` (token for token in greedy mode),
    whatever the policy. `draft` may be None only for the target-only policy. `generator`, if given,
    must live on the models' device.
    """
    seq = [int(t) for t in (prompt_ids.reshape(-1).tolist() if torch.is_tensor(prompt_ids) else prompt_ids)]
    if not seq:
        raise ValueError("the prompt is empty: speculative decoding needs at least one prompt token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or [])
    tgt, drf = _CachedLM(target), (_CachedLM(draft) if draft is not None else None)
    stats = GenerationStats(prompt_tokens=len(seq), hindsight=policy.hindsight)
    policy.reset()
    start, n_prompt = time.perf_counter(), len(seq)

    while len(seq) - n_prompt < max_new_tokens:
        # 1. draft: Y_1..Y_K, each with its full distribution q_i [V]
        k_max = min(policy.begin_round(), max_new_tokens - (len(seq) - n_prompt) - 1)
        if k_max > 0 and drf is None:
            raise ValueError(f"policy {policy!r} drafts tokens but no draft model was given")
        cand, qs, stop = [], [], "limit"
        pending = seq[drf.seen:] if drf else []
        while len(cand) < k_max:
            t0 = time.perf_counter()
            out = drf(pending, hidden=policy.needs_hidden)
            logits = out.logits[0, -1]
            q = probs(logits, sampling)
            y = _draw(q, sampling, generator)
            cand.append(y)
            qs.append(q)
            pending = [y]
            t1 = time.perf_counter()
            stats.draft_s += t1 - t0
            stats.prefill_s += (t1 - t0) if drf.calls == 1 else 0.0
            if y in eos:
                stop = "eos"
                break
            go_on = policy.keep_drafting(len(cand), _draft_token(policy, logits, y, out))
            stats.head_s += time.perf_counter() - t1
            if not go_on and len(cand) < k_max:
                stop = "policy"
                break

        # 2. verify: one target forward over the unfed tokens and the candidates -> p_1..p_{K+1}
        t0 = time.perf_counter()
        k = len(cand)
        # [K+1, V] on the draft's device (a target spread over devices ends on its last one)
        p = probs(tgt(seq[tgt.seen:] + cand, keep=k + 1).logits[0], sampling).to(target.device)
        n = 0
        if k:
            y_idx, rows = torch.tensor(cand, device=p.device), torch.arange(k, device=p.device)
            q = torch.stack(qs)  # [K, V]
            p_acc = acceptance_prob(p[rows, y_idx], q[rows, y_idx])
            u = torch.rand(k, generator=generator, device=p.device) if not sampling.greedy else None
            n = n_accepted(p_acc >= 1 if u is None else u < p_acc)
        # 3. the round's last token: residual after a rejection, else the bonus from p_{K+1}
        last = _draw(residual(p[n], q[n]) if n < k else p[k], sampling, generator)
        dt = time.perf_counter() - t0
        stats.verify_s += dt
        stats.prefill_s += dt if tgt.calls == 1 else 0.0

        new = cand[:n] + ([] if n and cand[n - 1] in eos else [last])
        stats.rounds.append(Round(drafted=n if policy.hindsight else k, accepted=n, stop=stop))
        policy.end_round(k, n)
        # 4. commit; caches keep all committed tokens but the last one (the draft's may lag further)
        tgt.rollback(len(seq) + n)
        if drf:
            drf.rollback(len(seq) + n)
        seq += new
        if any(t in eos for t in new):
            break

    new_tokens = seq[n_prompt:]
    stats.new_tokens, stats.target_calls = len(new_tokens), tgt.calls
    stats.draft_calls = drf.calls if drf else 0
    stats.total_s = time.perf_counter() - start
    return Generation(tokens=new_tokens, stats=stats)
