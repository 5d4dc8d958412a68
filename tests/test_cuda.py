"""Checks that need a CUDA device (skipped elsewhere): `bash scripts/gpu_check.sh` runs them on the GPU machine."""

import pytest
import torch
from conftest import tiny_llama

from specdecpp import ConstantK, Margin, SamplingConfig, TargetOnly, speculative_generate
from specdecpp.sampling import acceptance_prob, draft_stats, probs

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_bf16_acceptance_maths_on_the_gpu_match_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    p_logits, q_logits = torch.randn(64, 1000, generator=g) * 3, torch.randn(64, 1000, generator=g) * 3
    cfg = SamplingConfig(temperature=0.8, top_k=50, top_p=0.9)
    y = torch.randint(1000, (64,), generator=g)
    ref_p, ref_q = probs(p_logits.double(), cfg), probs(q_logits.double(), cfg)
    ref = acceptance_prob(ref_p.gather(-1, y[:, None])[:, 0], ref_q.gather(-1, y[:, None])[:, 0])
    p = probs(p_logits.cuda().bfloat16(), cfg)  # probs() works in float32 whatever the logits' dtype
    q = probs(q_logits.cuda().bfloat16(), cfg)
    got = acceptance_prob(p.gather(-1, y.cuda()[:, None])[:, 0], q.gather(-1, y.cuda()[:, None])[:, 0])
    assert torch.allclose(got.cpu().double(), ref, atol=0.05)  # bf16 logits: ~3 significant digits
    prob, entropy, margin = draft_stats(q_logits.cuda().bfloat16(), y.cuda())
    assert prob.device.type == "cuda" and torch.isfinite(entropy).all() and (margin >= 0).all()


def test_sampling_with_a_cuda_generator_is_reproducible_and_greedy_is_exact():
    target = tiny_llama(seed=0, sharpness=4.0).cuda()
    draft = tiny_llama(seed=0, sharpness=4.0).cuda().bfloat16()  # a bf16 copy as the draft
    cfg = SamplingConfig(temperature=1.0)
    a = speculative_generate(target, draft, [3, 4, 5], ConstantK(3), cfg, 24,
                             generator=torch.Generator(device="cuda").manual_seed(0))
    b = speculative_generate(target, draft, [3, 4, 5], ConstantK(3), cfg, 24,
                             generator=torch.Generator(device="cuda").manual_seed(0))
    assert a.tokens == b.tokens
    greedy = SamplingConfig(0)
    reference = speculative_generate(target, None, [3, 4, 5], TargetOnly(), greedy, 24).tokens
    assert speculative_generate(target, draft, [3, 4, 5], Margin(0.1, k_max=8), greedy, 24).tokens == reference


def test_batched_rows_equal_their_batch_one_greedy_output_in_float32_on_the_gpu():
    """The batched engine on CUDA in float32 with TF32 off (the exactness promise); a bf16 batch is only reported."""
    torch.backends.cuda.matmul.allow_tf32 = False
    target = tiny_llama(seed=0, sharpness=4.0).cuda()
    draft = tiny_llama(seed=1, sharpness=4.0).cuda()
    prompts = [[3, 4, 5], [10], [7, 1, 2, 8, 9, 30, 31, 40, 41, 2, 3]]
    greedy = SamplingConfig(0)
    rows = speculative_generate(target, draft, prompts, Margin(0.3, k_max=6), greedy, 24)
    for prompt, row in zip(prompts, rows):
        assert row.tokens == speculative_generate(target, None, prompt, TargetOnly(), greedy, 24).tokens
