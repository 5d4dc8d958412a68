"""Model passes that training-data preparation (`data.py`) and the replay (`replay.py`) share: the target's
batched responses to prompts, and the padding id both use."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from .sampling import SamplingConfig, probs, sample


def pad_token_id(tokenizer) -> int:
    """The id padding uses: the tokenizer's pad token, else its EOS, else 0 (padding is always masked out)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    return 0


@torch.inference_mode()
def sample_responses(model, prompts: list[list[int]], cfg: SamplingConfig, max_new_tokens: int,
                     eos: set[int], pad_id: int, generator: torch.Generator) -> list[list[int]]:
    """Batched sampling with left padding and a real attention mask; each response ends at its first EOS."""
    batch, width = len(prompts), max(map(len, prompts))
    ids = torch.full((batch, width), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = torch.tensor(p), 1
    ids, mask = ids.to(model.device), mask.to(model.device)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, logits_to_keep=1)
    eos_t = torch.tensor(sorted(eos) or [-1], device=model.device)
    done = torch.zeros(batch, dtype=torch.bool, device=model.device)
    steps = []
    for _ in range(max_new_tokens):
        dist = probs(out.logits[:, -1], cfg).to(model.device)  # a model spread over devices ends on its last
        tok = dist.argmax(-1) if cfg.greedy else sample(dist, generator)
        tok = torch.where(done, pad_id, tok)
        steps.append(tok)
        done |= torch.isin(tok, eos_t)
        if done.all():
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos, cache=cache, logits_to_keep=1)
    responses = []
    for row in torch.stack(steps, 1).tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        responses.append(row[:end])
    return responses
