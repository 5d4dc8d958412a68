"""The GPU machine check (no network, no weights, no omegaconf/jsonargparse there): random-init models of real shapes.

    python scripts/gpu_check.py --out runs/gpu-check          # on a CUDA machine: 1B / 8B Llama shapes
    python scripts/gpu_check.py --dry-run --out /tmp/check    # anywhere: tiny shapes on the CPU, same steps

1. training: the acceptance head on a frozen random-init draft of Llama-3.2-1B shape, FSDP2 (`ModelParallelStrategy`
   + `fully_shard`) and bf16-mixed, 20 steps on synthetic mixed sequences; tokens/s and peak memory;
2. engine: greedy, random-init Llama-3.1-8B target with a random-init Llama-3.2-1B draft, our engine against
   transformers (constant K vs assisted generation, target-only vs `generate`), interleaved per prompt, outputs
   compared token for token; then one table (gpu_check.md).
Random weights accept almost nothing, so the engine rows compare the two implementations' cost per round, not a
speedup a trained pair would see.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from specdecpp import ConstantK, SamplingConfig, TargetOnly, speculative_generate
from specdecpp.atomic import write_text
from specdecpp.data import EpochSampler, MixedDataset, Record, collate
from specdecpp.training import AcceptanceHeadModule

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "llama-3.2-1b": (2048, 8192, 16, 32, 8, 128256),
    "llama-3.1-8b": (4096, 14336, 32, 32, 8, 128256),
    "tiny": (64, 128, 2, 4, 2, 512),
}


def random_llama(shape: str, device: str, dtype: torch.dtype, seed: int) -> LlamaForCausalLM:
    h, i, n, a, kv, v = SHAPES[shape]
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=n, num_attention_heads=a,
                      num_key_value_heads=kv, vocab_size=v, max_position_embeddings=4096, tie_word_embeddings=False)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval().requires_grad_(False)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def check_training(shape: str, device: str, steps: int, out_dir: Path) -> str:
    draft = random_llama(shape, device, torch.bfloat16 if device == "cuda" else torch.float32, 0)
    vocab = draft.config.vocab_size
    g = torch.Generator().manual_seed(0)
    records = []
    for _ in range(8 * steps):
        prompt, x = torch.randint(vocab, (32,), generator=g), torch.randint(vocab, (96,), generator=g)
        label = torch.rand(96, generator=g)
        records.append(Record(prompt, x, torch.randint(vocab, (96,), generator=g), label, label.log(), label.log()))
    ds = MixedDataset(records)
    loader = DataLoader(ds, batch_size=8, sampler=EpochSampler(ds, 1, 0, shuffle=True), collate_fn=collate)
    module = AcceptanceHeadModule(target="random", draft="random", num_layers=3, head_stats=True)
    module.draft = draft
    from lightning.pytorch.strategies import ModelParallelStrategy

    trainer = L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, max_steps=steps,
                        default_root_dir=out_dir,  # the head is exported under it, not into the working directory
                        strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1),
                        precision="bf16-mixed", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    trainer.fit(module, loader)
    sync(device)
    seconds = time.perf_counter() - t
    tokens = steps * 8 * 128
    sharded = any(hasattr(p, "placements") for p in module.head.parameters())
    peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device == "cuda" else "n/a (CPU)"
    return (f"| training: {shape} draft (frozen), statistics head, FSDP2 + bf16-mixed, {steps} steps of 8 x 128 "
            f"tokens | {tokens / seconds:.0f} tokens/s | head sharded: {sharded}, peak memory {peak} |")


def check_engine(target_shape: str, draft_shape: str, device: str, prompts: int, new_tokens: int, k: int) -> list[str]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    target, draft = random_llama(target_shape, device, dtype, 1), random_llama(draft_shape, device, dtype, 2)
    greedy = SamplingConfig(0)
    g = torch.Generator().manual_seed(1)
    encoded = [torch.randint(target.config.vocab_size, (48,), generator=g).tolist() for _ in range(prompts)]

    def hf(ids, assisted):
        extra = dict(assistant_model=draft, num_assistant_tokens=k, num_assistant_tokens_schedule="constant",
                     assistant_confidence_threshold=0.0) if assisted else {}
        out = target.generate(torch.tensor([ids], device=device), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, **extra)
        return out[0, len(ids):].tolist()

    methods = {
        f"ours constant K = {k}": lambda ids: speculative_generate(target, draft, ids, ConstantK(k), greedy,
                                                                     new_tokens).tokens,
        f"transformers assisted, K = {k}": lambda ids: hf(ids, True),
        "ours target-only": lambda ids: speculative_generate(target, None, ids, TargetOnly(), greedy,
                                                             new_tokens).tokens,
        "transformers generate": lambda ids: hf(ids, False),
    }
    for fn in methods.values():
        fn(encoded[0])  # warm-up
    tokens, seconds, differ = dict.fromkeys(methods, 0), dict.fromkeys(methods, 0.0), 0
    for ids in encoded:
        outs = {}
        for name, fn in methods.items():
            sync(device)
            t = time.perf_counter()
            outs[name] = fn(ids)
            sync(device)
            seconds[name] += time.perf_counter() - t
            tokens[name] += len(outs[name])
        differ += len({tuple(o) for o in outs.values()}) != 1
    rows = [f"| engine: {target_shape} target, {draft_shape} draft, {name} | {tokens[name] / seconds[name]:.1f} "
            f"tokens/s | {prompts} prompts x {new_tokens} tokens |" for name in methods]
    tps = [tokens[name] / seconds[name] for name in methods]
    rows.append(f"| ratios | ours / assisted {tps[0] / tps[1]:.2f}x, ours / generate {tps[2] / tps[3]:.2f}x | "
                f"prompts whose four outputs differ: {differ} |")
    for (name, policy), alone in zip(((f"constant K = {k}", ConstantK(k)), ("target-only", TargetOnly())), tps[::2]):
        sync(device)
        t = time.perf_counter()
        outs = speculative_generate(target, draft, encoded, policy, greedy, new_tokens)  # all prompts as one batch
        sync(device)
        batched = sum(len(o.tokens) for o in outs) / (time.perf_counter() - t)
        rows.append(f"| engine batched: {name}, batch {len(encoded)} | {batched:.1f} tokens/s | "
                    f"{batched / alone:.2f}x its batch-1 speed |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU")
    ap.add_argument("--out", type=Path, default=Path("runs/gpu-check"))
    args = ap.parse_args()
    if args.dry_run:
        device, draft_shape, target_shape, steps, prompts, new_tokens = "cpu", "tiny", "tiny", 2, 2, 8
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --dry-run for the CPU path")
        device, draft_shape, target_shape = "cuda", "llama-3.2-1b", "llama-3.1-8b"
        steps, prompts, new_tokens = 20, 4, 64
    lines = [f"GPU check ({torch.cuda.get_device_name() if device == 'cuda' else 'CPU dry run'}, torch "
             f"{torch.__version__}); random-init weights of real shapes.", "", "| check | result | detail |",
             "|---|---|---|", check_training(draft_shape, device, steps, args.out),
             *check_engine(target_shape, draft_shape, device, prompts, new_tokens, k=4)]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "gpu_check.md", text)


if __name__ == "__main__":
    main()
