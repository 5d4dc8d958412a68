"""Shared fixtures: tiny in-process Llama models and tokenizers (no downloads), and the embedded pair."""

from __future__ import annotations

import copy
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from specdecpp.head import AcceptanceHead
from specdecpp.policies import (
    SVIP,
    AdaEDL,
    AdaptiveConfidence,
    Confidence,
    ConstantK,
    Heuristic,
    Margin,
    OnlineConfidence,
    Oracle,
    SpecDecPP,
    TargetOnly,
)
from specdecpp.sampling import SamplingConfig, probs

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach the hub


def tiny_llama(seed: int = 0, layers: int = 2, vocab: int = 64, hidden: int = 32, sharpness: float = 1.0,
               eos: int | None = None) -> LlamaForCausalLM:
    """A randomly initialised Llama small enough for thousands of forwards per test.

    `sharpness` scales the LM head so the next-token distributions are peaked rather than near-uniform.
    """
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=None, eos_token_id=eos, pad_token_id=None, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpness)
    return model.eval().requires_grad_(False)


def rolled_draft(target: LlamaForCausalLM, shift: int = 1) -> LlamaForCausalLM:
    """The target with its LM head rows rolled: its argmax is never the target's argmax."""
    draft = copy.deepcopy(target)
    with torch.no_grad():
        draft.lm_head.weight.copy_(target.lm_head.weight.roll(shift, dims=0))
    return draft


def noisy_draft(target: LlamaForCausalLM, scale: float, seed: int = 1) -> LlamaForCausalLM:
    """The target with Gaussian noise on every weight: partly agrees with it."""
    draft = copy.deepcopy(target)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std().clamp_min(1e-3))
    return draft


def all_policies(hidden: int = 32):
    """One of every policy (SpecDec++ with a stand-in head of each kind), small bounds so rounds vary."""
    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, 1)  # a stand-in for a trained acceptance head
    stats_head = AcceptanceHead(hidden, num_layers=1, n_stats=3)  # reads the draft's statistics too
    return [TargetOnly(), ConstantK(1), ConstantK(4), Heuristic(k=3), Confidence(0.5, k_max=6),
            AdaptiveConfidence(0.4, k_max=6), SVIP(k_max=6), AdaEDL(lam=0.5, k_max=6), Margin(0.3, k_max=6),
            SpecDecPP(head, threshold=0.5, k_min=1, k_max=6), SpecDecPP(head, threshold=0.9, k_min=2, k_max=10),
            SpecDecPP(stats_head, threshold=0.5, k_min=1, k_max=6), OnlineConfidence(0.5, lr=0.5, k_max=6),
            SpecDecPP(stats_head, threshold=0.5, k_min=1, k_max=6, online_lr=0.5), Oracle(lookahead=6),
            priced(OnlineConfidence("auto", k_max=6, per_position=True, refit_every=2)),
            priced(SpecDecPP(stats_head, threshold="auto", k_min=1, k_max=6))]


def priced(policy):
    """A rejection rule with threshold 'auto' and a CPU-like cost model to price its stops."""
    from specdecpp.costs import CostModel

    policy.costs = CostModel(target_s=1.0, draft=0.1, verify=0.05, round_cost=0.3)
    return policy


def target_greedy(target, prompt, n):
    out = target.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def check_bookkeeping(stats):
    """The counts and times of one generation agree with each other."""
    assert stats.target_calls == len(stats.rounds)
    assert stats.new_tokens == stats.accepted + len(stats.rounds)  # every round ends with one target token
    assert stats.discarded == stats.drafted - stats.accepted >= 0
    assert stats.verification_rate == pytest.approx(stats.target_calls / stats.new_tokens)
    assert stats.discard_rate == pytest.approx(stats.discarded / stats.new_tokens)
    assert 0 < stats.draft_s + stats.verify_s + stats.head_s <= stats.total_s
    assert 0 < stats.prefill_s <= stats.draft_s + stats.verify_s


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<eos>", "<unk>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


@pytest.fixture
def avx2_only(monkeypatch):
    """This CPU as one without native bf16/fp16 kernels (AVX2), so low-precision products take lowp's fp32 path
    whatever machine runs the tests."""
    import specdecpp.lowp

    monkeypatch.setattr(specdecpp.lowp, "cpu_flags", lambda: frozenset({"avx2"}))


@pytest.fixture(scope="session")
def tiny_pair():
    target = tiny_llama(seed=0, layers=2, sharpness=4.0)
    return target, noisy_draft(target, scale=0.6)


@pytest.fixture(scope="session")
def embedded_pair():
    """The real SmolLM2-135M-Instruct target with its default draft, its copy in the dtype `copy:auto` picks here."""
    from specdecpp import load_pair

    return load_pair("default")


def run_script(*args: str) -> subprocess.CompletedProcess:
    """Run a repository entry point (train.py, bench.py) in a fresh process, as a user would."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="session")
def tiny_train_run(tmp_path_factory):
    """`python train.py fit --config configs/train/tiny.yaml`, once per session: (log dir, completed process)."""
    root = tmp_path_factory.mktemp("train-tiny")
    proc = run_script("train.py", "fit", "--config", "configs/train/tiny.yaml", "--trainer.default_root_dir", str(root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "lightning_logs" / "version_0", proc


# --- the distribution test: exact continuation probabilities and a chi-square check --------------------------------

VOCAB, LENGTH, N_SAMPLES, ALPHA = 8, 3, 1200, 1e-3


def exact_continuation_probs(target, prompt, sampling):
    """P(x_1..x_L | prompt) for every continuation, from one batched target forward (no decoding code)."""
    seqs = torch.tensor(list(itertools.product(range(VOCAB), repeat=LENGTH)))
    ids = torch.cat([torch.tensor(prompt).expand(len(seqs), -1), seqs], 1)
    with torch.no_grad():
        logits = target(ids).logits[:, len(prompt) - 1: -1]  # the distributions of x_1..x_L
    p = probs(logits, sampling).gather(-1, seqs[..., None])[..., 0]
    return {tuple(s.tolist()): float(v) for s, v in zip(seqs, p.prod(-1))}


def chi_square_p_value(counts: dict, expected: dict, n: int) -> float:
    """Pearson's chi-square, cells with expected count < 5 pooled into one; p-value via the regularised gamma."""
    stat, pooled_obs, pooled_exp, cells = 0.0, 0, 0.0, 0
    for key, prob in expected.items():
        e = prob * n
        if e < 5:
            pooled_obs, pooled_exp = pooled_obs + counts.get(key, 0), pooled_exp + e
            continue
        stat, cells = stat + (counts.get(key, 0) - e) ** 2 / e, cells + 1
    if pooled_exp > 0:
        stat, cells = stat + (pooled_obs - pooled_exp) ** 2 / pooled_exp, cells + 1
    return float(torch.special.gammaincc(torch.tensor((cells - 1) / 2), torch.tensor(stat / 2)))


@pytest.fixture(scope="module")
def sampling_setup():
    """A one-layer target over 8 tokens, a noisy draft, a warped sampling config, and the exact distribution of
    3-token continuations of [1, 2]."""
    target = tiny_llama(seed=5, layers=1, vocab=VOCAB, sharpness=3.0)
    draft = noisy_draft(target, scale=1.0, seed=6)
    cfg = SamplingConfig(temperature=1.0, top_k=6, top_p=0.95)
    return target, draft, cfg, exact_continuation_probs(target, [1, 2], cfg)
