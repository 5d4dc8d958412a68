"""Prompt sources: Alpaca (split train/dev/test with a fixed seed), HumanEval, GSM8K, or a user's JSON/JSONL file.

Bodies follow the SpecDec++ evaluation: Alpaca is the instruction plus "\\nInput: ..." when there is one;
HumanEval and GSM8K use the WizardCoder and MetaMath instruction formats. The target tokenizer's chat
template is applied later, at tokenisation (`ModelPair.encode`).
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import random
from pathlib import Path

DATASETS = ("alpaca", "humaneval", "gsm8k")
ALPACA_SPLIT = {"train": (0, 40_000), "dev": (40_000, 50_000), "test": (50_000, 52_000)}  # paper sizes
ALPACA_SPLIT_SEED = 0
_PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
HUMANEVAL_TEMPLATE = (_PREAMBLE + "\n\n\n### Instruction:\nCreate a Python script for this problem:\n{prompt}"
                      "\n\n### Response:")
GSM8K_TEMPLATE = _PREAMBLE + "\n\n### Instruction:\n{question}\n\n### Response: Let's think step by step."
FILES = {"alpaca": ["alpaca/alpaca_data.jsonl.gz"], "humaneval": ["humaneval/HumanEval.jsonl.gz"],
         "gsm8k": ["gsm8k/test.jsonl.gz", "gsm8k/test.jsonl"]}  # the first that exists
BUNDLED = Path(__file__).resolve().parent / "datasets"  # shipped with the package: see its README for licences


def default_data_dir() -> Path:
    """$SPECDECPP_DATA_DIR, else the copies bundled with the package."""
    env = os.environ.get("SPECDECPP_DATA_DIR")
    return Path(env) if env else BUNDLED


def read_records(path: Path) -> list[dict]:
    """Records of a .json (a list), .jsonl or .jsonl.gz file. Callers must not mutate the result (it is cached)."""
    if not path.is_file():
        raise FileNotFoundError(path)
    return _read_records(path, path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=4)  # train and dev splits read the same file: parse it once (per version of it)
def _read_records(path: Path, mtime_ns: int) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        if path.name.endswith(".json"):
            records = json.load(f)
            if not isinstance(records, list):
                raise ValueError(f"{path}: a .json prompt file must hold a list of records")
            return records
        return [json.loads(line) for line in f if line.strip()]


def alpaca_body(r: dict) -> str:
    return r["instruction"].strip() + (f"\nInput: {r['input'].strip()}" if r.get("input", "").strip() else "")


def load_prompts(dataset: str, split: str = "test", limit: int | None = None,
                 data_dir: str | Path | None = None, field: str = "prompt") -> list[str]:
    """Prompt bodies of a named dataset split, or of a JSON/JSONL(.gz) file (its `field` key, used as is).

    Alpaca has train/dev/test splits (40,000 / 10,000 / 2,000, shuffled with a fixed seed); HumanEval and
    GSM8K are test sets. `limit` takes the first prompts of the split.
    """
    if dataset not in DATASETS:
        path = Path(dataset).expanduser()
        if not path.suffix:
            raise ValueError(f"unknown dataset {dataset!r}: use one of {DATASETS} or a .json/.jsonl(.gz) file")
        if not path.is_file():
            raise FileNotFoundError(f"prompt file not found: {path}")
        records = read_records(path)
        missing = [i for i, r in enumerate(records) if field not in r]
        if missing:
            raise ValueError(f"{path}: record {missing[0]} has no {field!r} field (set the prompt field name)")
        bodies = [str(r[field]) for r in records]
    else:
        root = Path(data_dir) if data_dir else default_data_dir()
        path = next((root / f for f in FILES[dataset] if (root / f).is_file()), root / FILES[dataset][0])
        if not path.is_file():
            raise FileNotFoundError(f"{dataset} file not found at {path}: set data_dir (or $SPECDECPP_DATA_DIR) "
                                    "to a folder that holds alpaca/, gsm8k/ and humaneval/ (or unset both to use "
                                    "the bundled copies)")
        records = read_records(path)
        if dataset == "alpaca":
            if split not in ALPACA_SPLIT:
                raise ValueError(f"alpaca split must be one of {list(ALPACA_SPLIT)}, got {split!r}")
            order = list(range(len(records)))
            random.Random(ALPACA_SPLIT_SEED).shuffle(order)
            lo, hi = ALPACA_SPLIT[split]
            bodies = [alpaca_body(records[i]) for i in order[lo:hi]]
        else:
            if split != "test":
                raise ValueError(f"{dataset} is a test set; ask for split 'test', not {split!r}")
            template, key = (HUMANEVAL_TEMPLATE, "prompt") if dataset == "humaneval" else (GSM8K_TEMPLATE, "question")
            bodies = [template.format(**{key: r[key].strip() if key == "question" else r[key]}) for r in records]
    bodies = bodies[:limit] if limit is not None else bodies
    if not bodies:
        raise ValueError(f"no prompts in {dataset!r} split {split!r} (limit={limit})")
    return bodies
