"""Replay of speculative decoding: every length policy simulated from one pass of each model per prompt, at any
temperature, exact for greedy decoding and exact in distribution when sampling.

The coupling. A round that starts after t committed tokens drafts Y_t ~ q_t, keeps it with probability
min(1, p_t(Y_t) / q_t(Y_t)), and on a rejection commits a correction drawn from norm(max(0, p_t - q_t)). Whatever the
policy, the committed tokens X are distributed as the target's own output. Conditioned on the committed token
X_j = x at a position j that is drafted:
- P(the drafted token was x and was accepted) = min(p(x), q(x)) / p(x) = min(1, q(x) / p(x));
- after a rejection, the rejected draft token and x are independent: it is drawn from norm(max(0, q - p)).
So a trace samples X ~ p once per prompt and seed, and draws once per position j a uniform u_j and a token
R_j ~ norm(max(0, q_j - p_j)) (teacher-forced p_j, q_j along X). The token drafted at j (if a round drafts j) is
D_j = X_j when u_j < min(1, q_j(X_j) / p_j(X_j)), else R_j, and what the draft drafts after a rejected R_j is a
short *branch*: the draft's own sampled run from prompt + X_<j + R_j, drawn once per j on first use. A position is
drafted in at most one round of a generation, so these draws serve every policy at once (common random numbers:
each policy's distribution is unchanged, paired differences are tighter).

In greedy mode p and q are one-hot: X is the target's greedy output, D_j the draft's greedy token given
prompt + X_<j, the branch its greedy run from prompt + X_<m + D_m, and the replay is exact round for round.

`replay_generation` then drives the real policy objects over a `Trace` exactly as `speculative_generate` does
(the same `rounds.Sequence`), with no model call, and returns the same `GenerationStats` (counts and rounds; no
times).

Where exactness holds: the replay is the engine's arithmetic up to the draft's floating-point path. The
teacher-forced pass and the engine's cached incremental forwards compute the same logits in different shapes. With
fp32 models that changes nothing the policies see (tests/test_replay.py: every round equal). With a bf16 draft it
does: a near-tie flips the draft's argmax and the statistics move, and near-ties are exactly where a bf16 copy is
rejected, so replayed rounds differ from the engine's (docs/replay-check.md measured how often). When
sampling, the promise is equality in distribution (tests/test_replay.py: chi-square against the engine).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import DynamicCache

from . import atomic
from .head import draft_fingerprint
from .passes import sample_responses
from .policies import DraftToken, LengthPolicy
from .rounds import Sequence
from .sampling import SamplingConfig, acceptance_prob, derived_seed, draft_stats, probs, residual, sample
from .stats import GenerationStats

GREEDY = SamplingConfig(temperature=0)
log = logging.getLogger(__name__)


def _draft_tokens(logits: torch.Tensor, hidden: torch.Tensor, sampling: SamplingConfig,
                  generator: torch.Generator | None) -> tuple[list[tuple[int, DraftToken]], list[float]]:
    """[N, V] draft logits and [N, H] final hidden states -> each row's drafted token (argmax, or a draw from the
    warped distribution) and what a policy reads of it; and each drafted token's warped q (for its true acceptance
    probability, once the target has scored it)."""
    q = probs(logits, sampling)
    y = q.argmax(-1) if sampling.greedy else sample(q, generator)
    stats = torch.stack(draft_stats(logits, y), -1).tolist()
    q_y = q.gather(-1, y[:, None])[:, 0].tolist()
    return [(t, DraftToken(*st, h)) for t, st, h in zip(y.tolist(), stats, hidden.float().cpu())], q_y


@dataclass
class _Branch:
    cache: DynamicCache | None  # the draft's cache up to (not including) `feed`
    feed: int  # the next token to feed
    steps: list[tuple[int, DraftToken]] = field(default_factory=list)
    q: list[float] = field(default_factory=list)  # the warped q of each step's token (sampled traces: to score)


@dataclass
class Trace:
    """One prompt (and seed): the target's output X and what the draft drafts at every position of it."""

    prompt: list[int]
    target: list[int]  # X_0..X_{N-1} (EOS included when the target produced it)
    draft: list[int]  # D_j: the token a round drafts at j given prompt + X_<j (X_j when accepted, else R_j)
    tokens: list[DraftToken]  # what a policy reads of D_j
    eos: set[int] = field(default_factory=set)
    model: torch.nn.Module | None = None  # the draft, for branches
    cache: DynamicCache | None = None  # the draft's cache after prompt + X
    branches: dict[int, _Branch] = field(default_factory=dict)
    sampling: SamplingConfig = GREEDY  # how the branches draw (the run's sampling)
    generator: torch.Generator | None = None  # the branches' draws (sampling only)
    target_model: torch.nn.Module | None = None  # sampling: the target, to score branch tokens (score_branches)
    target_cache: DynamicCache | None = None  # sampling: the target's cache after prompt + X

    @property
    def mismatches(self) -> list[int]:
        """The positions where a drafted token is rejected (D_j != X_j; a rejected R_j never equals X_j)."""
        return [j for j, (d, x) in enumerate(zip(self.draft, self.target)) if d != x]

    def run_token(self, t: int, i: int, first_mismatch: int) -> tuple[int, DraftToken]:
        """The i-th token (1-based) a round that starts at t drafts, given the first mismatch at or after t."""
        j = t + i - 1
        if j <= first_mismatch:
            return self.draft[j], self.tokens[j]
        return self.branch(first_mismatch, j - first_mismatch)

    @torch.inference_mode()
    def branch(self, m: int, s: int) -> tuple[int, DraftToken]:
        """Token s (1-based) after D_m of the draft's run from prompt + X_<m + D_m."""
        b = self.branches.get(m)
        if b is not None and len(b.steps) >= s:
            return b.steps[s - 1]
        if self.model is None or (b is not None and b.cache is None):  # a saved trace, or branches drawn batched
            raise ValueError(f"this trace holds {len(b.steps) if b else 0} branch tokens after position {m} and "
                             f"nothing to draft more from (complete_branches drew them to a fixed length: replay "
                             f"again with a longer branch_length)")
        if b is None:
            cache = copy.deepcopy(self.cache)
            cache.crop(len(self.prompt) + m - cache.get_seq_length())  # negative: tokens to remove
            b = self.branches[m] = _Branch(cache, self.draft[m])
        while len(b.steps) < s:
            out = self.model(input_ids=torch.tensor([[b.feed]], device=self.model.device), cache=b.cache,
                             use_cache=True, logits_to_keep=1, output_hidden_states=True)
            steps, q_y = _draft_tokens(out.logits[:, -1], out.hidden_states[-1][:, -1], self.sampling, self.generator)
            b.steps += steps
            b.q += q_y
            b.feed = b.steps[-1][0]
        return b.steps[s - 1]

    @torch.inference_mode()
    def complete_branches(self, length: int) -> None:
        """Every mismatch's branch up to `length` - 1 tokens after D_m (or to EOS), as the rows of one batch.

        Row m reuses the teacher-forced cache with the positions from prompt + X_<m on masked out, and feeds D_m at
        its own position: the same attention as `branch`'s cropped copy, one batched draft call per step instead of
        one call per step per mismatch (in fp32 the tokens are the same; tests/test_replay.py).
        """
        for m, b in self.branches.items():  # begun one token at a time: finished that way
            while b.cache is not None and len(b.steps) < length - 1 and not (b.steps and b.steps[-1][0] in self.eos):
                self.branch(m, len(b.steps) + 1)
        todo = [m for m in self.mismatches if self.draft[m] not in self.eos and m not in self.branches]
        if not todo or length < 2:
            self.score_branches()
            return
        if self.model is None:
            raise ValueError("this trace holds no model to draft branches with")
        device = self.model.device
        start = torch.tensor([len(self.prompt) + m for m in todo], device=device)  # where each row feeds D_m
        cache = copy.deepcopy(self.cache)
        cache.crop(int(start.max()) - cache.get_seq_length())  # no row attends past its own start
        cache.batch_repeat_interleave(len(todo))
        mask = (torch.arange(int(start.max()), device=device)[None] < start[:, None]).long()
        feed = torch.tensor([self.draft[m] for m in todo], device=device)
        eos = torch.tensor(sorted(self.eos) or [-1], device=device)
        steps: list[list[tuple[int, DraftToken]]] = [[] for _ in todo]
        q_steps: list[list[float]] = [[] for _ in todo]
        done = torch.zeros(len(todo), dtype=torch.bool, device=device)
        for s in range(length - 1):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            out = self.model(input_ids=feed[:, None], attention_mask=mask, position_ids=(start + s)[:, None],
                             cache=cache, use_cache=True, logits_to_keep=1, output_hidden_states=True)
            drafted, q_y = _draft_tokens(out.logits[:, -1], out.hidden_states[-1][:, -1], self.sampling,
                                         self.generator)
            for row in (~done).nonzero()[:, 0].tolist():
                steps[row].append(drafted[row])
                q_steps[row].append(q_y[row])
            feed = torch.tensor([y for y, _ in drafted], device=device)
            done |= torch.isin(feed, eos)
            if done.all():
                break
        for m, run, q_run in zip(todo, steps, q_steps):
            self.branches[m] = _Branch(None, run[-1][0], run, q_run)  # no cache: a longer one cannot be drawn
        self.score_branches()

    @torch.inference_mode()
    def score_branches(self) -> None:
        """Sampled traces: every branch token's true acceptance probability min(1, p(Y) / q(Y)) in `token.accept`,
        p from one target forward over all branches as the rows of one batch (each row D_m and its branch but the
        last token, after the target's cache of prompt + X_<m). What the predictor ceiling reads; nothing else."""
        todo = {m: b for m, b in self.branches.items() if len(b.q) == len(b.steps) > 0
                and any(math.isnan(t.accept) for _, t in b.steps)}
        if not todo or self.target_model is None:
            return
        device = self.target_model.device
        rows = [[self.draft[m]] + [y for y, _ in b.steps[:-1]] for m, b in todo.items()]
        start = torch.tensor([len(self.prompt) + m for m in todo], device=device)
        width = max(map(len, rows))
        cache = copy.deepcopy(self.target_cache)
        cache.crop(int(start.max()) - cache.get_seq_length())
        cache.batch_repeat_interleave(len(rows))
        mask = torch.cat([(torch.arange(int(start.max()), device=device)[None] < start[:, None]).long(),
                          torch.ones(len(rows), width, dtype=torch.long, device=device)], 1)  # right padding: unseen
        ids = torch.tensor([r + [r[-1]] * (width - len(r)) for r in rows], device=device)
        logits = self.target_model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True,
                                   position_ids=start[:, None] + torch.arange(width, device=device)).logits
        p = probs(logits, self.sampling)  # [rows, width, V]: column i scores the branch's token i + 1
        for row, b in enumerate(todo.values()):
            ys = torch.tensor([y for y, _ in b.steps], device=device)
            p_y = p[row, torch.arange(len(ys), device=device), ys]
            for (_, token), a in zip(b.steps, acceptance_prob(p_y, torch.tensor(b.q, device=device)).tolist()):
                token.accept = a

    def release(self) -> None:
        """Drop the caches and the model (what was computed stays usable; new branches cannot be made)."""
        self.cache, self.model, self.target_cache, self.target_model = None, None, None, None
        for b in self.branches.values():
            b.cache = None


@dataclass
class Scored:
    """One teacher-forced pass of the draft (and, when sampling, of the target) over prompt + X: what every draw of
    a trace along X starts from. Draws share it (a branch copies the caches it starts from)."""

    prompt: list[int]
    target: list[int]  # X
    eos: set[int]
    sampling: SamplingConfig
    draft_model: torch.nn.Module
    cache: DynamicCache  # the draft's, after prompt + X
    logits_q: torch.Tensor  # [N, V]: the draft's logits at each position of X
    hidden: torch.Tensor  # [N, H]: its final hidden state there
    q: torch.Tensor | None = None  # sampling: [N, V] warped draft probabilities
    p: torch.Tensor | None = None  # sampling: [N, V] warped target probabilities
    target_model: torch.nn.Module | None = None
    target_cache: DynamicCache | None = None

    @property
    def accept_x(self) -> torch.Tensor:
        """[N] min(1, q_j(X_j) / p_j(X_j)): the chance that position j, when drafted, was accepted given output X."""
        x = torch.tensor(self.target, device=self.q.device)[:, None]
        return acceptance_prob(self.q.gather(-1, x)[:, 0], self.p.gather(-1, x)[:, 0])


@torch.inference_mode()
def score_along(draft: torch.nn.Module, prompt: list[int], target: list[int], eos: set[int],
                sampling: SamplingConfig = GREEDY, target_model: torch.nn.Module | None = None) -> Scored:
    """One pass of the draft over prompt + X (and, when sampling, one of `target_model` for p)."""
    cache = DynamicCache(config=draft.config)
    ids = torch.tensor([prompt + target], device=draft.device)
    out = draft(input_ids=ids, cache=cache, use_cache=True, output_hidden_states=True)
    at = slice(len(prompt) - 1, len(prompt) + len(target) - 1)  # position t predicts token t + 1
    scored = Scored(prompt, target, eos, sampling, draft, cache, out.logits[0, at], out.hidden_states[-1][0, at])
    if sampling.greedy:
        return scored
    if target_model is None:
        raise ValueError("a sampled trace needs the target model: its p_j decide which drafts are accepted")
    target_cache = DynamicCache(config=target_model.config)
    logits_p = target_model(input_ids=ids.to(target_model.device), cache=target_cache, use_cache=True,
                            logits_to_keep=len(target) + 1).logits
    scored.p = probs(logits_p[0, :-1], sampling).to(scored.logits_q.device)
    scored.q = probs(scored.logits_q, sampling)
    scored.target_model, scored.target_cache = target_model, target_cache
    return scored


@torch.inference_mode()
def draw_trace(scored: Scored, generator: torch.Generator | None = None) -> Trace:
    """The token drafted at every position of X and what a policy reads of it: greedy, the draft's argmax D_j;
    sampling, X_j with probability min(1, q_j(X_j) / p_j(X_j)), else R_j ~ norm(max(0, q_j - p_j)), drawn from
    `generator` (which the trace's branches then go on drawing from)."""
    s = scored
    if s.sampling.greedy:
        drafted = s.logits_q.argmax(-1)
    else:
        x = torch.tensor(s.target, device=s.q.device)
        u = torch.rand(len(s.target), generator=generator, device=s.q.device)
        rejected = sample(residual(s.q, s.p), generator)  # norm(max(0, q - p)); drawn everywhere, used where u >= keep
        drafted = torch.where(u < s.accept_x, x, rejected)
        accept = acceptance_prob(s.p.gather(-1, drafted[:, None])[:, 0], s.q.gather(-1, drafted[:, None])[:, 0])
    stats = torch.stack(draft_stats(s.logits_q, drafted), -1).tolist()
    tokens = [DraftToken(*st, h) for st, h in zip(stats, s.hidden.float().cpu())]
    if s.sampling.greedy:
        return Trace(s.prompt, s.target, drafted.tolist(), tokens, s.eos, s.draft_model, s.cache)
    for token, a in zip(tokens, accept.tolist()):  # the true acceptance probability: the predictor ceiling's input
        token.accept = a
    return Trace(s.prompt, s.target, drafted.tolist(), tokens, s.eos, s.draft_model, s.cache, sampling=s.sampling,
                 generator=generator, target_model=s.target_model, target_cache=s.target_cache)


def verified_positions(rounds: list[tuple[int, int]], x: list[int], eos: set[int]) -> list[tuple[int, int, int]]:
    """(position j in X, offset in its round from 1, accepted 0/1) for each drafted position up to and including its
    round's first rejection, from a generation's rounds (drafted, accepted) and output X: the positions whose
    acceptance verification decided. Given X, position j was accepted with probability `Scored.accept_x[j]`,
    independently of the others (the coupling), whatever the policy."""
    out, t = [], 0
    for d, n in rounds:
        out += [(t + i, i + 1, int(i < n)) for i in range(min(n + 1, d))]
        t += n + (0 if n and x[t + n - 1] in eos else 1)
    if t != len(x):
        raise ValueError(f"the rounds commit {t} tokens, the output holds {len(x)}")
    return out


def teacher_forced(draft: torch.nn.Module, prompt: list[int], target: list[int], eos: set[int],
                   sampling: SamplingConfig = GREEDY, target_model: torch.nn.Module | None = None,
                   generator: torch.Generator | None = None) -> Trace:
    """A trace along X: `score_along` then `draw_trace`."""
    return draw_trace(score_along(draft, prompt, target, eos, sampling, target_model), generator)


def _seeded(device: torch.device, *parts) -> torch.Generator:
    """A generator seeded from `parts`, so a trace's draws depend on its key alone, not on what ran before."""
    return torch.Generator(device=device).manual_seed(derived_seed(*parts))


def make_traces(target: torch.nn.Module, draft: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int,
                eos: set[int], pad_id: int = 0, batch_size: int = 16, progress=None, cache_dir: Path | None = None,
                branch_length: int = 32, key: dict | None = None, sampling: SamplingConfig = GREEDY, seed: int = 0):
    """Traces of `prompts`: the target's outputs (greedy, or sampled under `sampling` with `seed`) in
    length-bucketed batches (left padding, real masks), then one teacher-forced pass per prompt. Yields (index into
    `prompts`, Trace), shortest prompts first.

    With `cache_dir`, each trace is completed (every mismatch's branch up to `branch_length` tokens) and saved under
    a key of `key` (the models' names), the prompt, the length, the sampling, the seed and the branch length; saved
    traces are loaded instead of recomputed, so an interrupted replay resumes and a later one (new heads, new
    settings) is cheap. A damaged saved trace is computed again.
    """
    mode = None if sampling.greedy else {"sampling": [sampling.temperature, sampling.top_k, sampling.top_p],
                                         "seed": seed}  # greedy keys stay as they were

    def blob(i: int) -> str:
        return json.dumps({"key": key, "prompt": prompts[i], "max_new_tokens": max_new_tokens, "eos": sorted(eos),
                           "branch_length": branch_length, "format": TRACE_FORMAT, **({"mode": mode} if mode else {})},
                          sort_keys=True)

    def path(i: int) -> Path | None:
        if cache_dir is None:
            return None
        return Path(cache_dir) / f"{hashlib.sha256(blob(i).encode()).hexdigest()[:24]}.safetensors"

    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    paths = {i: path(i) for i in order}
    todo = [i for i in order if paths[i] is None or not paths[i].is_file()]
    for i in sorted(set(order) - set(todo)):
        try:
            trace = load_trace(paths[i], prompts[i])
        except ValueError as e:  # damaged (truncated by a crash, edited): computed again below
            log.warning("%s; computing it again", e)
            todo.append(i)
            continue
        yield i, trace
        if progress is not None:
            progress.update()
    todo.sort(key=lambda i: (len(prompts[i]), i))
    for lo in range(0, len(todo), batch_size):
        batch = todo[lo: lo + batch_size]
        generator = _seeded(target.device, "outputs", seed, [prompts[i] for i in batch]) if mode else None
        outputs = sample_responses(target, [prompts[i] for i in batch], sampling, max_new_tokens, eos, pad_id,
                                   generator)
        for i, x in zip(batch, outputs):
            draws = _seeded(draft.device, "draws", blob(i)) if mode else None
            trace = teacher_forced(draft, prompts[i], x, eos, sampling, target, draws)
            if cache_dir is not None:
                save_trace(trace, paths[i], branch_length)
            yield i, trace
            if progress is not None:
                progress.update()


TRACE_FORMAT = 2  # 2: safetensors with JSON metadata (1 was a pickle); sampled traces add a "mode" to their key


def weights_fingerprint(pair) -> list[float]:
    """Both models' weight fingerprints, for trace keys: the same names with other weights must not reuse traces."""
    return [round(x, 6) for model in (pair.target, pair.draft) for x in draft_fingerprint(model)]


def _checksum(ids: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(ids.encode())
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_trace(trace: Trace, path: Path, branch_length: int) -> None:
    """Complete every mismatch's branch (to EOS or `branch_length` tokens), then write the trace atomically as
    safetensors: the token ids in its JSON metadata, statistics and hidden states as tensors (data only, no pickle),
    and a checksum of both."""
    trace.complete_branches(branch_length)
    tensors = {}

    def put(name: str, tokens: list[DraftToken]) -> None:
        if tokens:
            stats = [[t.prob, t.entropy, t.margin, t.accept] for t in tokens]
            tensors[f"{name}.stats"] = torch.tensor(stats, dtype=torch.float64)
            tensors[f"{name}.hidden"] = torch.stack([t.hidden for t in tokens]).contiguous()

    put("trace", trace.tokens)
    for m, b in trace.branches.items():
        put(f"branch.{m}", [t for _, t in b.steps])
    ids = json.dumps({"prompt": trace.prompt, "target": trace.target, "draft": trace.draft, "eos": sorted(trace.eos),
                      "branches": {str(m): [y for y, _ in b.steps] for m, b in trace.branches.items()}})
    with atomic.writing(path) as tmp:
        save_file(tensors, tmp, metadata={"trace": ids, "format": str(TRACE_FORMAT),
                                          "sha256": _checksum(ids, tensors)})


def load_trace(path: Path, prompt: list[int] | None = None) -> Trace:
    """A saved trace: complete to its branch length, with no model. Raises ValueError, naming the file and what is
    wrong, if it is damaged: unreadable, a key missing, a checksum that does not match, lengths that disagree, or
    another prompt than `prompt`."""
    def damaged(why: str) -> ValueError:
        return ValueError(f"damaged replay trace {path}: {why}")

    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        blob = meta["trace"]
        ids = json.loads(blob)
        fields = {k: ids[k] for k in ("prompt", "target", "draft", "eos", "branches")}
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as e:
        raise damaged(f"{type(e).__name__}: {e}") from None
    if meta.get("sha256") != _checksum(blob, tensors):
        raise damaged("its checksum does not match its content")
    n = len(fields["target"])

    def tokens(name: str, length: int) -> list[DraftToken]:
        if length == 0:
            return []
        stats, hidden = tensors.get(f"{name}.stats"), tensors.get(f"{name}.hidden")
        if stats is None or hidden is None or stats.shape not in ((length, 3), (length, 4)) or \
                hidden.shape[0] != length:
            raise damaged(f"{name} holds features for {None if stats is None else tuple(stats.shape)} tokens, "
                          f"its ids {length}")
        return [DraftToken(*map(float, s[:3]), h, *map(float, s[3:])) for s, h in zip(stats, hidden)]

    if len(fields["draft"]) != n:
        raise damaged(f"{len(fields['draft'])} drafted ids for {n} output tokens")
    if prompt is not None and fields["prompt"] != prompt:
        raise damaged("it holds another prompt than its key's")
    trace = Trace(fields["prompt"], fields["target"], fields["draft"], tokens("trace", n), set(fields["eos"]))
    for m, ys in fields["branches"].items():
        if not m.isdigit() or int(m) >= n or trace.draft[int(m)] == trace.target[int(m)]:
            raise damaged(f"a branch at {m}, which is no rejected position of its {n} tokens")
        m = int(m)
        trace.branches[m] = _Branch(None, ys[-1] if ys else trace.draft[m], list(zip(ys, tokens(f"branch.{m}",
                                                                                               len(ys)))))
    return trace


def replay_generation(trace: Trace, policy: LengthPolicy, max_new_tokens: int) -> GenerationStats:
    """Speculative decoding of `trace.prompt` under `policy`, simulated: the rounds, counts and stop reasons
    `speculative_generate` books (greedy: exactly; sampling: in distribution; see the module docstring)."""
    x, n_out = trace.target, len(trace.target)
    mismatch = [n_out] * (n_out + 1)  # first mismatch at or after j (n_out: none)
    for j in range(n_out - 1, -1, -1):
        mismatch[j] = j if trace.draft[j] != x[j] else mismatch[j + 1]
    seq = Sequence(trace.prompt, policy, max_new_tokens, trace.eos)
    while not seq.done and seq.generated < n_out:
        t = seq.generated
        round_ = seq.begin_round()
        while round_.drafting:
            seq.draft(*trace.run_token(t, len(round_.candidates) + 1, mismatch[t]))
        n = min(mismatch[t] - t, len(round_.candidates))  # accepted: the candidates before the first mismatch
        # the target's token at t + n; past the output's end only after an accepted EOS, which commits none
        seq.commit(n, x[t + n] if t + n < n_out else None)
    return seq.finish()
