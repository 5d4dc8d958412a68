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
            try:
                records = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
            if not isinstance(records, list):
                raise ValueError(f"{path}: a .json prompt file must hold a list of records")
            return records
        records = []
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {n}: not valid JSON ({e.msg}, column {e.colno}); a .jsonl "
                                     f"file holds one JSON record per line") from None
        return records


def alpaca_body(r: dict) -> str:
    return r["instruction"].strip() + (f"\nInput: {r['input'].strip()}" if r.get("input", "").strip() else "")


TEST_ONLY = ("humaneval", "gsm8k", "openai/openai_humaneval", "openai/gsm8k")  # sets that are a test split only
HUB = {"tatsu-lab/alpaca": ("alpaca", None, "train"), "openai/openai_humaneval": ("humaneval", None, "test"),
       "openai/gsm8k": ("gsm8k", "main", "test")}  # hub id -> (our format, its config, the split holding our records)


def load_hub_records(name: str, split: str, config: str | None = None) -> list[dict]:
    """Records of a Hugging Face hub dataset (or a local dataset folder) through the `datasets` library."""
    try:
        import datasets

        return datasets.load_dataset(name, config, split=split).to_list()
    except Exception as e:  # offline, unknown id, bad split: say what was tried
        raise ValueError(f"could not load dataset {name!r} (config {config!r}, split {split!r}) with the datasets "
                         f"library: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Named sets are "
                         f"{DATASETS} (bundled); a prompt file is .json/.jsonl(.gz); a hub id needs the network or "
                         f"the datasets cache") from None


def format_bodies(dataset: str, records: list[dict], split: str) -> list[str]:
    """Prompt bodies of one of our named sets from its records (Alpaca: our seeded train/dev/test split)."""
    if dataset == "alpaca":
        if split not in ALPACA_SPLIT:
            raise ValueError(f"alpaca split must be one of {list(ALPACA_SPLIT)}, got {split!r}")
        order = list(range(len(records)))
        random.Random(ALPACA_SPLIT_SEED).shuffle(order)
        lo, hi = ALPACA_SPLIT[split]
        return [alpaca_body(records[i]) for i in order[lo:hi]]
    if split != "test":
        raise ValueError(f"{dataset} is a test set; ask for split 'test', not {split!r}")
    template, key = (HUMANEVAL_TEMPLATE, "prompt") if dataset == "humaneval" else (GSM8K_TEMPLATE, "question")
    return [template.format(**{key: r[key].strip() if key == "question" else r[key]}) for r in records]


def field_bodies(records: list[dict], field: str, where: str) -> list[str]:
    for i, r in enumerate(records):
        if not isinstance(r, dict) or field not in r:
            raise ValueError(f"{where}: record {i} has no {field!r} field (set the prompt field name)")
        if not isinstance(r[field], str):
            raise ValueError(f"{where}: record {i}'s {field!r} is {type(r[field]).__name__} {r[field]!r}, not text")
    return [r[field] for r in records]


def load_prompts(dataset: str, split: str = "test", limit: int | None = None,
                 data_dir: str | Path | None = None, field: str = "prompt") -> list[str]:
    """Prompt bodies of a named dataset split, a JSON/JSONL(.gz) file, or a hub dataset id / local dataset folder.

    Named sets ("alpaca", "humaneval", "gsm8k") come from `data_dir` (default: $SPECDECPP_DATA_DIR, else the copies
    bundled with the package). Alpaca has train/dev/test splits (40,000 / 10,000 / 2,000, shuffled with a fixed
    seed); HumanEval and GSM8K are test sets. Their hub ids (tatsu-lab/alpaca, openai/openai_humaneval,
    openai/gsm8k) give the same bodies through the `datasets` library; any other id or folder is read through it
    too, split `split`, prompt `field`. A file's `field` key is used as is. `limit` takes the first prompts.
    """
    path = Path(dataset).expanduser()
    if dataset in DATASETS:
        root = Path(data_dir) if data_dir else default_data_dir()
        path = next((root / f for f in FILES[dataset] if (root / f).is_file()), root / FILES[dataset][0])
        if not path.is_file():
            raise FileNotFoundError(f"{dataset} file not found at {path}: set data_dir (or $SPECDECPP_DATA_DIR) "
                                    "to a folder that holds alpaca/, gsm8k/ and humaneval/ (or unset both to use "
                                    "the bundled copies)")
        bodies = format_bodies(dataset, read_records(path), split)
    elif path.suffix in (".json", ".jsonl", ".gz"):
        if not path.is_file():
            raise FileNotFoundError(f"prompt file not found: {path}")
        bodies = field_bodies(read_records(path), field, str(path))
    elif dataset in HUB:
        ours, config, hub_split = HUB[dataset]
        bodies = format_bodies(ours, load_hub_records(dataset, hub_split, config), split)
    elif "/" in dataset or path.is_dir():
        bodies = field_bodies(load_hub_records(dataset, split), field, dataset)
    else:
        raise ValueError(f"unknown dataset {dataset!r}: use one of {DATASETS}, a .json/.jsonl(.gz) file, or a hub "
                         f"dataset id / local dataset folder (owner/name)")
    bodies = bodies[:limit] if limit is not None else bodies
    if not bodies:
        raise ValueError(f"no prompts in {dataset!r} split {split!r} (limit={limit})")
    return bodies
