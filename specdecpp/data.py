"""Training data for the acceptance head (docs/design.md section 2).

Preparation, once per (models, prompts, sampling, lengths, seed):
  1. the target samples a response X_1..X_L to each chat-wrapped prompt (batched, left padding);
  2. one teacher-forced pass of each model over prompt + X gives, at every response position i, a draft
     sample Y_i ~ q(. | prompt, X_<i) and its label p_acc_i = min(1, p(Y_i | .) / q(Y_i | .)), with the same
     warping as decoding.
Results go to safetensors shards, one per batch of prompts, each with a sha256 sidecar written after it:
an interrupted run resumes at the first missing shard, and a damaged shard is detected and rebuilt.
Every shard is seeded by its index, so a resumed run gives the same records as an uninterrupted one.
With `features`, the shards also keep what a statistics head reads at each Y_i, from the same draft pass: the
draft's final hidden state that proposed Y_i and the statistics q(Y_i), entropy and top-2 margin of q_i. A
statistics head then trains on those (`FeatureDataset`) without running the draft at all.

At batch time, `MixedDataset` puts the target token X_i at position i with probability r (else Y_i),
re-drawn every epoch from (seed, epoch, index); the loss covers exactly the draft-token positions.
`FeatureDataset` has no mixing: every prefix is the target's X_<i, which is what an accepted prefix is under
greedy decoding (and close to it at T = 1, where accepted tokens follow min(p, q) rather than p).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import lightning as L
import torch
from filelock import FileLock
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from . import atomic
from .fetch import cache_dir
from .lowp import fp32_linears
from .models import ModelPair, draft_ref, load_pair
from .passes import pad_token_id, sample_responses
from .prompts import TEST_ONLY, load_prompts
from .sampling import SamplingConfig, acceptance_prob, draft_stats, expected_acceptance, probs, sample

log = logging.getLogger(__name__)
FORMAT_VERSION = 4  # 2: shards hold prompts bucketed by length; 3: fp32 products for low-precision drafts (lowp.py);
# 4: greedy labels read off the target's output, no second target pass


@dataclass(frozen=True)
class PrepareConfig:
    """Everything that changes the prepared records (and so the cache key), besides the models and prompts."""

    max_new_tokens: int = 64
    batch_size: int = 16
    seed: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_prompt_tokens: int = 512  # longer prompts are skipped and counted
    features: bool = False  # also keep the draft's hidden state and statistics at each Y_i

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_k, self.top_p)


@dataclass
class Record:
    prompt: torch.Tensor  # [P] chat-wrapped prompt ids
    target: torch.Tensor  # [L] X: the target's response
    draft: torch.Tensor  # [L] Y: Y_i ~ q(. | prompt, X_<i)
    p_acc: torch.Tensor  # [L] min(1, p(Y_i) / q(Y_i))
    log_p: torch.Tensor  # [L] log p(Y_i)
    log_q: torch.Tensor  # [L] log q(Y_i)
    hidden: torch.Tensor | None = None  # [L, H] the draft's final hidden state that proposed Y_i (features only)
    stats: torch.Tensor | None = None  # [L, 3] q(Y_i), entropy and top-2 margin of q_i, raw logits (features only)
    index: int | None = None  # the prompt's position in the prepared prompt list
    p_exp: torch.Tensor | None = None  # [L] expected acceptance sum_y min(p, q) = 1 - TV(p_i, q_i) (newer shards)


def cache_key(names: dict, prompts: list[str], cfg: PrepareConfig) -> str:
    blob = json.dumps({"models": names, "prompts": hashlib.sha256("\x00".join(prompts).encode()).hexdigest(),
                       "cfg": asdict(cfg), "format": FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@torch.inference_mode()
def label_responses(pair: ModelPair, prompts: list[list[int]], responses: list[list[int]], cfg: SamplingConfig,
                    generator: torch.Generator, features: bool = False) -> list[Record]:
    """One teacher-forced pass of each model: Y_i ~ q(. | prompt, X_<i) and p_acc_i = min(1, p(Y_i) / q(Y_i)).

    Logits are computed only from the shortest prompt's last position on (responses follow their prompts; the
    LM heads are a third of these passes); a low-precision draft runs its products in fp32 on a CPU (lowp.py).
    Greedy labels need no target pass: X is the target's greedy output, so Y_i is accepted iff Y_i == X_i (the
    label the engine applies to the target's argmax; a second pass would only re-derive X in another shape).
    """
    seqs = [p + r for p, r in zip(prompts, responses)]
    width, first = max(map(len, seqs)), min(map(len, prompts)) - 1  # logits at position t predict token t + 1
    ids = torch.full((len(seqs), width), pad_token_id(pair.tokenizer), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, s in enumerate(seqs):  # right padding: real positions never attend to what follows them
        ids[row, : len(s)], mask[row, : len(s)] = torch.tensor(s), 1
    ids, mask = ids.to(pair.device), mask.to(pair.device)
    logits_p = None if cfg.greedy else \
        pair.target(input_ids=ids, attention_mask=mask, logits_to_keep=width - first).logits.to(pair.device)
    with fp32_linears(pair.draft):
        hidden = pair.draft.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state[:, first:]
        logits_q = pair.draft.get_output_embeddings()(hidden).to(pair.device)
    records = []
    for row, (p_ids, x) in enumerate(zip(prompts, responses)):
        at = slice(len(p_ids) - 1 - first, len(p_ids) + len(x) - 1 - first)
        if cfg.greedy:  # q one-hot at Y_i, p one-hot at X_i: q(Y_i) = 1; p(Y_i), min(1, p/q), 1 - TV are [Y_i == X_i]
            y = logits_q[row, at].argmax(-1)
            q_y = torch.ones(len(y), device=y.device)
            p_y = p_exp = (y == torch.tensor(x, device=y.device)).float()
        else:
            q = probs(logits_q[row, at], cfg)  # [L, V]
            y = sample(q, generator)
            q_y = q.gather(-1, y[:, None])[:, 0]
            p = probs(logits_p[row, at], cfg)
            p_y, p_exp = p.gather(-1, y[:, None])[:, 0], expected_acceptance(p, q)
        rec = Record(torch.tensor(p_ids), torch.tensor(x), y.cpu(), acceptance_prob(p_y, q_y).cpu(), p_y.log().cpu(),
                     q_y.log().cpu(), p_exp=p_exp.cpu())
        if features:
            rec.hidden = hidden[row, at].cpu()
            rec.stats = torch.stack(draft_stats(logits_q[row, at], y), -1).cpu()
        records.append(rec)
    return records


FIELDS, FEATURES = ("prompt", "target", "draft", "p_acc", "log_p", "log_q"), ("hidden", "stats")
OPTIONAL = ("p_exp",)  # absent from shards prepared before it existed


def _save_shard(path: Path, records: list[Record], index: list[int], skipped: int) -> None:
    def flat(name):
        return torch.cat([getattr(r, name) for r in records]) if records else torch.zeros(0)
    names = FIELDS + (FEATURES if records and records[0].hidden is not None else ()) + OPTIONAL
    tensors = {name: flat(name).contiguous() for name in names}
    tensors["prompt_len"] = torch.tensor([len(r.prompt) for r in records], dtype=torch.long)
    tensors["target_len"] = torch.tensor([len(r.target) for r in records], dtype=torch.long)
    tensors["index"] = torch.tensor(index, dtype=torch.long)
    with atomic.writing(path) as tmp:
        save_file(tensors, tmp, metadata={"skipped": str(skipped)})
    atomic.write_text(path.with_suffix(".sha256"), _sha256(path))  # written last: its presence marks the shard complete


def _shard_complete(path: Path) -> bool:
    """Written to the end (its sidecar exists) and undamaged (the checksum matches)."""
    sidecar = path.with_suffix(".sha256")
    if not (path.is_file() and sidecar.is_file()):
        return False
    if _sha256(path) != sidecar.read_text().strip():
        log.warning("%s is damaged (checksum mismatch)", path)
        return False
    return True


def _load_shard(path: Path) -> tuple[list[Record], int] | None:
    """The shard's records, or None if it is missing, incomplete or damaged."""
    if not _shard_complete(path):
        return None
    try:
        t = {k: v.clone() for k, v in load_file(path).items()}  # own the memory: never a view of a file we may rewrite
        with safe_open(path, "pt") as f:
            skipped = int(f.metadata()["skipped"])
    except (SafetensorError, KeyError, ValueError) as e:
        log.warning("%s is unreadable (%s)", path, e)
        return None
    cuts = {k: [0, *t[f"{k}_len"].cumsum(0).tolist()] for k in ("prompt", "target")}
    records = []
    for i in range(len(t["index"])):
        p, x = slice(cuts["prompt"][i], cuts["prompt"][i + 1]), slice(cuts["target"][i], cuts["target"][i + 1])
        records.append(Record(t["prompt"][p], *(t[k][x] for k in FIELDS[1:]),
                              *(t[k][x] if k in t else None for k in FEATURES), index=int(t["index"][i]),
                              p_exp=t["p_exp"][x] if "p_exp" in t else None))
    return records, skipped


def prepared_dir(names: dict, prompts: list[str], cfg: PrepareConfig, root: str | Path | None = None) -> Path:
    return Path(root or cache_dir() / "data") / cache_key(names, prompts, cfg)


def prepare(pair: ModelPair, prompts: list[str], cfg: PrepareConfig, out_dir: Path, desc: str = "prepare",
            rank: int = 0, world: int = 1) -> Path:
    """Build (or finish building) the records of `prompts` in `out_dir`; shards already complete are kept.

    With `world` > 1 processes, this one builds shards rank, rank + world, ... (each shard is seeded by its index,
    so the files equal a one-process run's) and the caller marks the directory complete once all ranks are done.
    Otherwise the directory is locked: another process preparing the same set waits, then finds every shard done.
    """
    with locked(out_dir) if world == 1 else contextlib.nullcontext():
        _prepare_shards(pair, prompts, cfg, out_dir, desc, rank, world)
    return out_dir


def _prepare_shards(pair: ModelPair, prompts: list[str], cfg: PrepareConfig, out_dir: Path, desc: str, rank: int,
                    world: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    n_shards = math.ceil(len(prompts) / cfg.batch_size)
    eos = {pair.tokenizer.eos_token_id} if pair.tokenizer.eos_token_id is not None else set()
    pad_id = pad_token_id(pair.tokenizer)
    if rank == 0:
        atomic.write_text(out_dir / "config.json", json.dumps({"models": pair.names, "n_prompts": len(prompts),
                                                               **asdict(cfg)}, indent=2))
    limit = min(cfg.max_prompt_tokens, getattr(pair.target.config, "max_position_embeddings", 10**9)
                - cfg.max_new_tokens)
    encoded = [pair.encode(p) for p in prompts]
    # length bucketing: a batch of similar prompt lengths wastes little on padding (shards stay deterministic)
    order = sorted(range(len(prompts)), key=lambda i: (len(encoded[i]), i))
    bar = tqdm(range(rank, n_shards, world), desc=desc if world == 1 else f"{desc} (rank {rank})", unit="batch")
    spent = {"generate": 0.0, "label": 0.0, "positions": 0}  # where preparation time goes, on the bar
    for shard in bar:
        path = out_dir / f"shard_{shard:05d}.safetensors"
        if _shard_complete(path):  # the checksum is enough here: records are parsed once, by load_prepared
            continue
        generator = torch.Generator(device=pair.device).manual_seed(cfg.seed * 1_000_003 + shard)
        batch = order[shard * cfg.batch_size: (shard + 1) * cfg.batch_size]
        kept = [(i, encoded[i]) for i in batch if len(encoded[i]) <= limit]
        records = []
        if kept:
            ids = [k[1] for k in kept]
            t0 = time.perf_counter()
            responses = sample_responses(pair.target, ids, cfg.sampling, cfg.max_new_tokens, eos, pad_id, generator)
            t1 = time.perf_counter()
            records = label_responses(pair, ids, responses, cfg.sampling, generator, cfg.features)
            spent["generate"] += t1 - t0
            spent["label"] += time.perf_counter() - t1
            spent["positions"] += sum(map(len, responses))
            bar.set_postfix_str(f"generate {spent['generate']:.0f} s, label {spent['label']:.0f} s, "
                                f"{spent['positions']} positions")
        _save_shard(path, records, [k[0] for k in kept], skipped=len(batch) - len(kept))
    if world == 1:
        mark_complete(out_dir, n_shards)


def verified(out_dir: Path) -> bool:
    """Marked complete and every shard present and undamaged (checked at every use: a marker alone can lie). A read
    only: preparation rebuilds what is bad and marks the directory again."""
    marker = out_dir / "complete"
    if not marker.is_file():
        return False
    bad = [i for i in range(int(marker.read_text())) if not _shard_complete(out_dir / f"shard_{i:05d}.safetensors")]
    if bad:
        log.warning("%s: shards %s are missing or damaged; they will be prepared again", out_dir, bad)
    return not bad


def locked(out_dir: Path) -> FileLock:
    """One process at a time prepares `out_dir`; the others wait, then find its shards done (a killed holder's
    lock is released with its process)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return FileLock(out_dir / ".lock")


def mark_complete(out_dir: Path, n_shards: int) -> None:
    missing = [i for i in range(n_shards) if not _shard_complete(out_dir / f"shard_{i:05d}.safetensors")]
    if missing:
        raise RuntimeError(f"{out_dir}: shards {missing} are missing or damaged; run preparation again")
    atomic.write_text(out_dir / "complete", str(n_shards))


def load_prepared(out_dir: Path, prompt_order: bool = False) -> tuple[list[Record], int]:
    """All records of a completely prepared directory and how many prompts were skipped as too long. Records come
    in preparation's (length-bucketed) order, or with `prompt_order` in the order of the prompt list; each
    carries its prompt's position in that list as `index`."""
    shards = sorted(out_dir.glob("shard_*.safetensors"))
    if not (out_dir / "complete").is_file() or len(shards) != int((out_dir / "complete").read_text()):
        raise FileNotFoundError(f"no complete prepared data in {out_dir}: run preparation (data.prepare: true)")
    records, skipped = [], 0
    for path in shards:
        loaded = _load_shard(path)
        if loaded is None:
            (out_dir / "complete").unlink(missing_ok=True)  # so the next preparation rebuilds it
            raise ValueError(f"{path} is damaged: run preparation again (train.py fit with data.prepare: true) to "
                             f"rebuild it")
        records += loaded[0]
        skipped += loaded[1]
    if prompt_order:
        records.sort(key=lambda r: r.index)
    return records, skipped


BLOCK_PROMPTS = 256  # prompts per prepared directory of a split: adding prompts prepares only the new blocks


def load_blocks(dirs: list[Path]) -> tuple[list[Record], int]:
    """The records of a split prepared in blocks (AcceptanceDataModule.dirs), in prompt order; each record's `index`
    is its prompt's position in the whole split."""
    records, skipped = [], 0
    for i, d in enumerate(dirs):
        block, n = load_prepared(d, prompt_order=True)
        for rec in block:
            rec.index += i * BLOCK_PROMPTS
        records += block
        skipped += n
    return records, skipped


def summarize(records: list[Record], skipped: int = 0) -> dict:
    p_acc = torch.cat([r.p_acc for r in records]) if records else torch.zeros(0)
    return {"prompts": len(records), "skipped_too_long": skipped, "positions": p_acc.numel(),
            "mean_p_acc": float(p_acc.mean()) if p_acc.numel() else float("nan"),
            "share_p_acc_above_0.9": float((p_acc > 0.9).float().mean()) if p_acc.numel() else float("nan"),
            "share_p_acc_below_0.1": float((p_acc < 0.1).float().mean()) if p_acc.numel() else float("nan")}


# --- batches ---------------------------------------------------------------------------------------------------------


class EpochSampler(DistributedSampler):
    """DistributedSampler yielding (index, epoch): the dataset draws each epoch's mixing from it.

    Being a DistributedSampler, Lightning neither replaces it nor forgets to call `set_epoch` on it, so every
    epoch re-draws both the order and the mixing, and each rank sees its own shard.
    """

    def __iter__(self):
        return iter([(i, self.epoch) for i in super().__iter__()])


LABELS = ("sampled", "expected")


def record_labels(rec: Record, label: str) -> torch.Tensor:
    """The head's training target at each position: "sampled", min(1, p(Y_i)/q(Y_i)) at the draft's sample (the
    paper's), or "expected", 1 - TV(p_i, q_i) (that label averaged over Y_i ~ q: less noise, DSpark's choice)."""
    if label == "sampled":
        return rec.p_acc
    if rec.p_exp is None:
        raise ValueError("these records hold no expected-acceptance labels (prepared before they existed): delete "
                         "the prepared directory to prepare it again, or use data.label: sampled")
    return rec.p_exp


class MixedDataset(Dataset):
    """Prompt + Z with Z_i = X_i (target token) with probability r, else Y_i (draft token).

    Items: input_ids = prompt ++ Z; labels = p_acc at Z's positions; loss_mask = True exactly where Z_i = Y_i.
    """

    def __init__(self, records: list[Record], mixing_ratio: float = 0.15, seed: int = 0, redraw: bool = True,
                 label: str = "sampled"):
        if not records:
            raise ValueError("the prepared dataset is empty: no prompts survived preparation")
        if not 0.0 <= mixing_ratio < 1.0:
            raise ValueError(f"mixing_ratio must be in [0, 1), got {mixing_ratio}")
        record_labels(records[0], label)
        self.records, self.r, self.seed, self.redraw, self.label = records, mixing_ratio, seed, redraw, label

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        epoch = epoch if self.redraw else 0  # validation keeps one mixing so epochs compare on the same inputs
        rec = self.records[index]
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1_000_033 + index)
        use_target = torch.rand(len(rec.target), generator=g) < self.r
        z = torch.where(use_target, rec.target, rec.draft)
        n_prompt = len(rec.prompt)
        return {
            "input_ids": torch.cat([rec.prompt, z]),
            "labels": torch.cat([torch.zeros(n_prompt), record_labels(rec, self.label)]),
            "loss_mask": torch.cat([torch.zeros(n_prompt, dtype=torch.bool), ~use_target]),
        }


class FeatureDataset(Dataset):
    """Per record, what a statistics head reads at each Y_i (prepared with `features`): hidden [L, H], stats [L, 3],
    labels p_acc [L], loss_mask all True. No mixing: every prefix is the target's (module docstring)."""

    def __init__(self, records: list[Record], label: str = "sampled"):
        if not records:
            raise ValueError("the prepared dataset is empty: no prompts survived preparation")
        if records[0].hidden is None:
            raise ValueError("these records hold no draft features: prepare them with features: true")
        record_labels(records[0], label)
        self.records, self.label = records, label

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        rec = self.records[key[0] if isinstance(key, tuple) else key]
        return {"hidden": rec.hidden, "stats": rec.stats, "labels": record_labels(rec, self.label),
                "loss_mask": torch.ones(len(rec.p_acc), dtype=torch.bool)}


def collate(items: list[dict], pad_id: int = 0) -> dict:
    """Right-pad a batch; padding gets attention 0, label 0 and no loss (feature items: zero features)."""
    if "hidden" in items[0]:
        return {k: nn.utils.rnn.pad_sequence([it[k] for it in items], batch_first=True) for k in items[0]}
    width = max(len(it["input_ids"]) for it in items)
    out = {"input_ids": torch.full((len(items), width), pad_id, dtype=torch.long),
           "attention_mask": torch.zeros((len(items), width), dtype=torch.long),
           "labels": torch.zeros((len(items), width)), "loss_mask": torch.zeros((len(items), width), dtype=torch.bool)}
    for row, it in enumerate(items):
        n = len(it["input_ids"])
        out["input_ids"][row, :n], out["attention_mask"][row, :n] = it["input_ids"], 1
        out["labels"][row, :n], out["loss_mask"][row, :n] = it["labels"], it["loss_mask"]
    return out


class AcceptanceDataModule(L.LightningDataModule):
    """Mixed draft/target sequences with soft acceptance labels, prepared once per machine and cached.

    Args:
        target, draft: model references as in `load_pair` (draft may be a self-draft depth).
        dataset: "alpaca", "humaneval", "gsm8k" or a JSON/JSONL(.gz) prompt file (its `prompt_field` is used).
        data_dir: folder holding the dataset files (default $SPECDECPP_DATA_DIR, else the bundled copies).
        train_prompts, val_prompts: how many prompts of the train and dev splits (Alpaca: its train and dev splits;
            any other set or file: its first train_prompts prompts, then the next val_prompts, in order).
        prepare: run preparation in `prepare_data` if the cache is missing; False makes a missing cache an error.
        features: keep the draft's features at preparation and serve them instead of token sequences: a statistics
            head (model.head_stats) then trains without the draft (no mixing; see the module docstring).
        label: the head's target, "sampled" (min(1, p/q) at the draft's sample, the paper's) or "expected"
            (1 - TV(p, q), the same averaged over the draft's sample).
    """

    def __init__(self, target: str = "default", draft: str | int | None = None, dataset: str = "alpaca",
                 data_dir: str | None = None, prompt_field: str = "prompt", train_prompts: int = 256,
                 val_prompts: int = 64, max_new_tokens: int = 64, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, max_prompt_tokens: int = 512, prepare_batch_size: int = 16, seed: int = 0,
                 batch_size: int = 8, mixing_ratio: float = 0.15, num_workers: int = 0, prepare: bool = True,
                 cache_dir: str | None = None, dtype: str = "float32", device: str = "cpu", features: bool = False,
                 label: str = "sampled"):
        super().__init__()
        self.save_hyperparameters()
        self.hparams.draft = draft_ref(draft)  # "3" from a command line (LightningCLI passes text): a self-draft depth
        if not 0.0 <= mixing_ratio < 1.0:
            raise ValueError(f"mixing_ratio must be in [0, 1), got {mixing_ratio}")
        if label not in LABELS:
            raise ValueError(f"label must be one of {LABELS}, got {label!r}")
        self.prep = PrepareConfig(max_new_tokens, prepare_batch_size, seed, temperature, top_k, top_p,
                                  max_prompt_tokens, features)
        self.pad_id = 0
        self.datasets: dict[str, MixedDataset] = {}

    @property
    def names(self) -> dict:
        return {"target": str(self.hparams.target), "draft": str(self.hparams.draft)}

    @functools.cache  # one data module per run: split (and read) the prompt files once
    def split_prompts(self) -> dict[str, list[str]]:
        h = self.hparams
        if h.dataset in ("alpaca", "tatsu-lab/alpaca"):
            return {"train": load_prompts(h.dataset, "train", h.train_prompts, h.data_dir),
                    "val": load_prompts(h.dataset, "dev", h.val_prompts, h.data_dir)}
        split = "test" if h.dataset in TEST_ONLY else "train"  # files ignore it; other hub sets: their train split
        n = h.train_prompts + h.val_prompts
        bodies = load_prompts(h.dataset, split, n, h.data_dir, h.prompt_field)
        if len(bodies) < n or min(h.train_prompts, h.val_prompts) < 1:
            raise ValueError(f"{h.dataset}: train_prompts={h.train_prompts} and val_prompts={h.val_prompts} ask for "
                             f"{n} prompts (at least 1 each), and it has {len(bodies)}: lower them")
        return {"train": bodies[:h.train_prompts], "val": bodies[h.train_prompts:]}

    def dirs(self) -> dict[str, list[Path]]:
        """Each split's prepared directories, one per block of BLOCK_PROMPTS prompts in list order: a longer prompt
        list reuses every whole block it shares with a shorter one. Without `features`, a block prepared with them
        serves as well (a superset)."""
        out = {}
        for split, prompts in self.split_prompts().items():
            out[split] = []
            for lo in range(0, len(prompts), BLOCK_PROMPTS):
                block = prompts[lo: lo + BLOCK_PROMPTS]
                plain = prepared_dir(self.names, block, self.prep, self.hparams.cache_dir)
                richer = prepared_dir(self.names, block, replace(self.prep, features=True), self.hparams.cache_dir)
                use_richer = not (plain / "complete").is_file() and (richer / "complete").is_file()
                out[split].append(richer if use_richer else plain)
        return out

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def prepare_data(self) -> None:
        """One process: prepare here. Several: every rank prepares its share of the shards in `setup`."""
        if self._world()[1] == 1:
            self._prepare(0, 1)

    def _prepare(self, rank: int, world: int) -> None:
        dirs, prompts = self.dirs(), self.split_prompts()
        todo = {s: [i for i, d in enumerate(ds) if not verified(d)] for s, ds in dirs.items()}
        todo = {s: blocks for s, blocks in todo.items() if blocks}
        if not todo:
            return
        if not self.hparams.prepare:
            first = next(iter(todo))
            raise FileNotFoundError(f"no prepared data at {dirs[first][todo[first][0]]} and data.prepare is false: "
                                    "set data.prepare: true (or prepare it with the same settings first)")
        h = self.hparams
        pair = load_pair(h.target, h.draft, h.dtype, h.device)
        for split, blocks in todo.items():
            start = time.perf_counter()
            for i in blocks:
                block, out = prompts[split][i * BLOCK_PROMPTS: (i + 1) * BLOCK_PROMPTS], dirs[split][i]
                prepare(pair, block, self.prep, out, desc=f"prepare {split}", rank=rank, world=world)
                if world > 1:  # every rank's shards written: rank 0 checks them all and marks the block complete
                    self.trainer.strategy.barrier(f"prepare-{split}-{i}")
                    if rank == 0:
                        mark_complete(out, math.ceil(len(block) / self.prep.batch_size))
                    self.trainer.strategy.barrier(f"prepared-{split}-{i}")
            if rank == 0:
                summary = summarize(*load_blocks(dirs[split]))
                seconds = time.perf_counter() - start  # this run's share: blocks found complete cost nothing
                print(f"[{split}] {summary}; {seconds:.0f} s, {summary['positions'] / seconds:.1f} positions/s")

    def setup(self, stage: str | None = None) -> None:
        from .models import load_tokenizer

        rank, world = self._world()
        if world > 1:
            self._prepare(rank, world)
        tok = load_tokenizer(self.hparams.target)
        self.pad_id = pad_token_id(tok)
        for split, ds in self.dirs().items():
            records, _ = load_blocks(ds)
            self.datasets[split] = (FeatureDataset(records, self.hparams.label) if self.hparams.features else
                                    MixedDataset(records, self.hparams.mixing_ratio, self.hparams.seed,
                                                 redraw=split == "train", label=self.hparams.label))

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        rank, world = self._world()
        ds = self.datasets[split]
        return DataLoader(ds, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers,
                          sampler=EpochSampler(ds, world, rank, shuffle=shuffle, seed=self.hparams.seed),
                          collate_fn=partial(collate, pad_id=self.pad_id))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)
