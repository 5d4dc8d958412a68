"""Exact replay of greedy speculative decoding: every length policy simulated from one pass of each model.

In greedy mode the output is the target's greedy output X whatever the policy, and a round that starts after
t committed tokens drafts the draft's greedy run from prompt + X_<t. While that run matches X, its prefix *is*
X's prefix, so one teacher-forced draft pass over prompt + X gives every run up to its first mismatch, with all
a policy reads (`DraftToken`: statistics of the raw draft distribution, hidden state). A run leaves X only at a
mismatch position m (the draft's greedy token D_m != X_m), and what it drafts after D_m depends on m alone:
a short incremental *branch* from the cached pass, computed once per m, on first use.

`replay_generation` then drives the real policy objects over a `Trace` exactly as `speculative_generate` does,
with no model call, and returns the same `GenerationStats` (counts and rounds; no times).

Where exactness holds: the replay is the engine's arithmetic up to the draft's floating-point path. The
teacher-forced pass and the engine's cached incremental forwards compute the same logits in different shapes. With
fp32 models that changes nothing the policies see (tests/test_replay.py: every round equal). With a bf16 draft it
does: a near-tie flips the draft's argmax and the statistics move, and near-ties are exactly where a bf16 copy is
rejected, so replayed rounds differ from the engine's (`experiments/replay_check.py` measures how often).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import DynamicCache

from .data import sample_responses
from .head import draft_fingerprint
from .policies import DraftToken, LengthPolicy
from .rounds import RoundState
from .sampling import SamplingConfig, draft_stats
from .stats import GenerationStats

GREEDY = SamplingConfig(temperature=0)
log = logging.getLogger(__name__)


def _draft_tokens(logits: torch.Tensor, hidden: torch.Tensor) -> list[tuple[int, DraftToken]]:
    """[N, V] draft logits and [N, H] final hidden states -> each row's greedy token and what a policy reads of it."""
    y = logits.argmax(-1)
    stats = torch.stack(draft_stats(logits, y), -1).tolist()
    return [(t, DraftToken(*st, h)) for t, st, h in zip(y.tolist(), stats, hidden.float().cpu())]


@dataclass
class _Branch:
    cache: DynamicCache | None  # the draft's cache up to (not including) `feed`
    feed: int  # the next token to feed
    steps: list[tuple[int, DraftToken]] = field(default_factory=list)


@dataclass
class Trace:
    """One prompt: the target's greedy output X and what the draft does at every position of it."""

    prompt: list[int]
    target: list[int]  # X_0..X_{N-1} (EOS included when the target produced it)
    draft: list[int]  # D_j: the draft's greedy token given prompt + X_<j
    tokens: list[DraftToken]  # what a policy reads of D_j
    eos: set[int] = field(default_factory=set)
    model: torch.nn.Module | None = None  # the draft, for branches
    cache: DynamicCache | None = None  # the draft's cache after prompt + X
    branches: dict[int, _Branch] = field(default_factory=dict)

    @property
    def mismatches(self) -> list[int]:
        return [j for j, (d, x) in enumerate(zip(self.draft, self.target)) if d != x]

    def run_token(self, t: int, i: int, first_mismatch: int) -> tuple[int, DraftToken]:
        """The i-th token (1-based) of the draft's greedy run from prompt + X_<t, whose first mismatch is at
        `first_mismatch` (>= t)."""
        j = t + i - 1
        if j <= first_mismatch:
            return self.draft[j], self.tokens[j]
        return self.branch(first_mismatch, j - first_mismatch)

    @torch.inference_mode()
    def branch(self, m: int, s: int) -> tuple[int, DraftToken]:
        """Token s (1-based) after D_m of the draft's greedy run from prompt + X_<m + D_m."""
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
            b.steps += _draft_tokens(out.logits[:, -1], out.hidden_states[-1][:, -1])
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
        done = torch.zeros(len(todo), dtype=torch.bool, device=device)
        for s in range(length - 1):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            out = self.model(input_ids=feed[:, None], attention_mask=mask, position_ids=(start + s)[:, None],
                             cache=cache, use_cache=True, logits_to_keep=1, output_hidden_states=True)
            drafted = _draft_tokens(out.logits[:, -1], out.hidden_states[-1][:, -1])
            for row in (~done).nonzero()[:, 0].tolist():
                steps[row].append(drafted[row])
            feed = torch.tensor([y for y, _ in drafted], device=device)
            done |= torch.isin(feed, eos)
            if done.all():
                break
        for m, run in zip(todo, steps):
            self.branches[m] = _Branch(None, run[-1][0], run)  # no cache: a longer branch cannot be drawn from it

    def release(self) -> None:
        """Drop the caches and the model (what was computed stays usable; new branches cannot be made)."""
        self.cache, self.model = None, None
        for b in self.branches.values():
            b.cache = None


@torch.inference_mode()
def teacher_forced(draft: torch.nn.Module, prompt: list[int], target: list[int], eos: set[int]) -> Trace:
    """The draft's greedy token and features at every response position, from one pass over prompt + X."""
    cache = DynamicCache(config=draft.config)
    ids = torch.tensor([prompt + target], device=draft.device)
    out = draft(input_ids=ids, cache=cache, use_cache=True, output_hidden_states=True)
    at = slice(len(prompt) - 1, len(prompt) + len(target) - 1)  # position t predicts token t + 1
    drafted = _draft_tokens(out.logits[0, at], out.hidden_states[-1][0, at])
    return Trace(prompt, target, [y for y, _ in drafted], [t for _, t in drafted], eos, draft, cache)


def make_traces(target: torch.nn.Module, draft: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int,
                eos: set[int], pad_id: int = 0, batch_size: int = 16, progress=None, cache_dir: Path | None = None,
                branch_length: int = 32, key: dict | None = None):
    """Traces of `prompts`: the target's greedy outputs in length-bucketed batches (left padding, real masks),
    then one teacher-forced draft pass per prompt. Yields (index into `prompts`, Trace), shortest prompts first.

    With `cache_dir`, each trace is completed (every mismatch's branch up to `branch_length` tokens) and saved under
    a key of `key` (the models' names), the prompt, the length and the branch length; saved traces are loaded
    instead of recomputed, so an interrupted replay resumes and a later one (new heads, new settings) is cheap.
    """
    def path(i: int) -> Path | None:
        if cache_dir is None:
            return None
        blob = json.dumps({"key": key, "prompt": prompts[i], "max_new_tokens": max_new_tokens, "eos": sorted(eos),
                           "branch_length": branch_length, "format": TRACE_FORMAT}, sort_keys=True)
        return Path(cache_dir) / f"{hashlib.sha256(blob.encode()).hexdigest()[:24]}.safetensors"

    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    paths = {i: path(i) for i in order}
    todo = [i for i in order if paths[i] is None or not paths[i].is_file()]
    for i in sorted(set(order) - set(todo)):
        try:
            trace = load_trace(paths[i])
        except ValueError as e:  # damaged (e.g. truncated by a crash): computed again below
            log.warning("%s; computing it again", e)
            todo.append(i)
            continue
        yield i, trace
        if progress is not None:
            progress.update()
    todo.sort(key=lambda i: (len(prompts[i]), i))
    for lo in range(0, len(todo), batch_size):
        generator = torch.Generator(device=target.device).manual_seed(0)  # unused in greedy mode
        batch = todo[lo: lo + batch_size]
        outputs = sample_responses(target, [prompts[i] for i in batch], GREEDY, max_new_tokens, eos, pad_id, generator)
        for i, x in zip(batch, outputs):
            trace = teacher_forced(draft, prompts[i], x, eos)
            if cache_dir is not None:
                save_trace(trace, paths[i], branch_length)
            yield i, trace
            if progress is not None:
                progress.update()


TRACE_FORMAT = 2  # 2: safetensors with JSON metadata (1 was a pickle)


def weights_fingerprint(pair) -> list[float]:
    """Both models' weight fingerprints, for trace keys: the same names with other weights must not reuse traces."""
    return [round(x, 6) for model in (pair.target, pair.draft) for x in draft_fingerprint(model)]


def save_trace(trace: Trace, path: Path, branch_length: int) -> None:
    """Complete every mismatch's branch (to EOS or `branch_length` tokens), then write the trace atomically as
    safetensors: the token ids in its JSON metadata, statistics and hidden states as tensors (data only, no pickle)."""
    trace.complete_branches(branch_length)
    tensors = {}

    def put(name: str, tokens: list[DraftToken]) -> None:
        if tokens:
            stats = [[t.prob, t.entropy, t.margin] for t in tokens]
            tensors[f"{name}.stats"] = torch.tensor(stats, dtype=torch.float64)
            tensors[f"{name}.hidden"] = torch.stack([t.hidden for t in tokens]).contiguous()

    put("trace", trace.tokens)
    for m, b in trace.branches.items():
        put(f"branch.{m}", [t for _, t in b.steps])
    ids = {"prompt": trace.prompt, "target": trace.target, "draft": trace.draft, "eos": sorted(trace.eos),
           "branches": {str(m): [y for y, _ in b.steps] for m, b in trace.branches.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, tmp, metadata={"trace": json.dumps(ids), "format": str(TRACE_FORMAT)})
    tmp.replace(path)


def load_trace(path: Path) -> Trace:
    """A saved trace: complete to its branch length, with no model. Raises ValueError if the file is damaged."""
    try:
        with safe_open(path, "pt") as f:
            ids = json.loads(f.metadata()["trace"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise ValueError(f"damaged replay trace {path}: {type(e).__name__}: {e}") from None

    def tokens(name: str) -> list[DraftToken]:
        if f"{name}.stats" not in tensors:
            return []
        return [DraftToken(*map(float, s), h) for s, h in zip(tensors[f"{name}.stats"], tensors[f"{name}.hidden"])]

    trace = Trace(ids["prompt"], ids["target"], ids["draft"], tokens("trace"), set(ids["eos"]))
    for m, ys in ids["branches"].items():
        m = int(m)
        trace.branches[m] = _Branch(None, ys[-1] if ys else ids["draft"][m], list(zip(ys, tokens(f"branch.{m}"))))
    return trace


def replay_generation(trace: Trace, policy: LengthPolicy, max_new_tokens: int) -> GenerationStats:
    """Greedy speculative decoding of `trace.prompt` under `policy`, simulated: the rounds, counts and stop reasons
    `speculative_generate` would book (see the module docstring for where this is exact)."""
    x, eos, n_out = trace.target, trace.eos, len(trace.target)
    mismatch = [n_out] * (n_out + 1)  # first mismatch at or after j (n_out: none)
    for j in range(n_out - 1, -1, -1):
        mismatch[j] = j if trace.draft[j] != x[j] else mismatch[j + 1]
    stats = GenerationStats(prompt_tokens=len(trace.prompt), hindsight=policy.hindsight)
    policy.reset()
    t = 0  # tokens committed
    while t < n_out:
        round_ = RoundState(policy, t, max_new_tokens)
        while round_.drafting:
            y, token = trace.run_token(t, len(round_.candidates) + 1, mismatch[t])
            round_.add(y, token, eos)
        cand = round_.candidates
        stats.draft_calls += len(cand)
        n = next((i for i in range(len(cand)) if cand[i] != x[t + i]), len(cand))
        new = round_.close(stats, n, x[t + n] if t + n < n_out else -1, eos)
        t += len(new)
        if new[-1] in eos:
            break
    stats.new_tokens = t
    return stats
