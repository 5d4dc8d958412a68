"""The sweep's configuration: an omegaconf dataclass schema, YAML plus `key=value` overrides, expanded into
settings (one policy with fixed parameters each) and checked before any model loads."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ..policies import POLICY_NAMES, make_policy


@dataclass
class PolicySpec:
    """One policy with fixed `params` and a `grid` of values to sweep (every combination is one setting)."""

    name: str = "target"
    params: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)


@dataclass
class BenchConfig:
    target: str = "default"
    draft: Any = None  # a model reference, or an int: a self-draft of the target's first k layers
    head: str | None = None  # an exported acceptance head directory for `specdecpp` policies (or their params.head)
    datasets: list[str] = field(default_factory=lambda: ["alpaca"])
    split: str = "test"  # Alpaca split; HumanEval and GSM8K are test sets
    data_dir: str | None = None
    prompts_per_dataset: int = 4
    prompt_offset: int = 0  # skip the split's first prompts (a confirmatory run on prompts earlier runs never saw)
    seeds: list[int] = field(default_factory=lambda: [0])
    policies: list[PolicySpec] = field(default_factory=lambda: [PolicySpec("target")])
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    dtype: str = "float32"
    device: str = "cpu"
    warmup: bool = True
    out_dir: str = "runs/bench"
    overwrite: bool = False  # replace an earlier run in out_dir (only once this run has finished)
    # continue the run that was interrupted in `<out_dir>.running`: keep its records, decode only what they lack
    # (its config must match this one; a priced run keeps its cost model); nothing there: start afresh
    resume: bool = False
    # "engine": decode every setting and time it; "replay": simulate every setting from one pass of each model per
    # prompt and seed (specdecpp/replay.py: exact when greedy, exact in distribution when sampling) and price it
    # with a cost model (measured here unless given)
    mode: str = "engine"
    batch_size: int = 1  # engine: prompts decoded together (speeds are then throughput: see GenerationStats.charged_s)
    # engine: price every generation's counts by the cost model measured at the start (as replay does) instead of
    # timing it: what each prompt would cost decoded alone, free of machine noise, e.g. for a batched T = 1 run;
    # the wall times stay in the records
    priced: bool = False
    trace_batch_size: int = 16  # replay: prompts per batched target generation of the traces
    draft_cost: float | None = None  # replay, priced: c, a draft step in target calls (None: measured in this run)
    verify_cost: float | None = None  # replay, priced: v, each extra scored token in target calls (None: measured)
    round_cost: float | None = None  # replay, priced: r, a verifying call beyond a one-token call (None: measured)
    bootstrap: int = 2000  # resamples of prompts for the 95% intervals
    trace_cache: bool = True  # replay: keep each prompt's trace under $SPECDECPP_CACHE/traces (resumable, reusable)


@dataclass
class Setting:
    name: str
    params: dict

    @property
    def label(self) -> str:
        """The setting's name in records and tables (and what resuming a run matches on): a head by its path as the
        config gives it, since heads in runs/a/head-stats and runs/b/head-stats are two settings."""
        return self.name + "".join(f" {k}={v}" for k, v in self.params.items() if k not in ("k_min", "k_max"))

    def head_path(self, default: str | None) -> str | None:
        return self.params.get("head", default) if self.name == "specdecpp" else None

    @property
    def policy_params(self) -> dict:
        return {k: v for k, v in self.params.items() if k != "head"}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> BenchConfig:
    """Schema defaults, then the YAML file, then `key=value` overrides; unknown keys and bad types raise."""
    cfg = OmegaConf.structured(BenchConfig)
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"benchmark config not found: {path}")
        cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    return OmegaConf.to_object(cfg)


GROWS = ("prompts_per_dataset", "seeds")  # what a resumed run may add to: its records stay a subset of the new run's


def comparable(cfg) -> dict:
    """A config (structured, or as loaded from a run's config.yaml) as a plain dict on the current schema, without
    the keys that may change when a run is resumed."""
    full = OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(BenchConfig), cfg))
    return {k: v for k, v in full.items() if k not in ("resume", "overwrite")}


def expand_settings(cfg: BenchConfig) -> list[Setting]:
    """Every policy setting of the sweep, target-only first; refuses a bad sweep before any model loads."""
    settings = [Setting("target", {})]
    for spec in cfg.policies:
        if spec.name not in POLICY_NAMES:
            raise ValueError(f"unknown policy {spec.name!r}; choose from {list(POLICY_NAMES)}")
        if spec.name == "target":
            continue
        keys = list(spec.grid)
        for values in itertools.product(*(spec.grid[k] for k in keys)) if keys else [()]:
            settings.append(Setting(spec.name, {**spec.params, **dict(zip(keys, values))}))
    if len(settings) == 1:
        raise ValueError("the sweep is empty: list at least one speculative policy under `policies`")
    twice = sorted(label for label, n in Counter(s.label for s in settings).items() if n > 1)
    if twice:
        raise ValueError(f"the sweep lists a setting twice: {twice}; each setting is decoded, recorded and resumed "
                         f"by its name, so make them differ (a policy's params or grid) or remove one")
    if cfg.prompt_offset < 0:
        raise ValueError(f"prompt_offset must be >= 0, got {cfg.prompt_offset}")
    if not cfg.datasets or cfg.prompts_per_dataset < 1 or not cfg.seeds:
        raise ValueError("the sweep is empty: it needs datasets, prompts_per_dataset >= 1 and seeds")
    for name in ("max_new_tokens", "batch_size", "trace_batch_size", "bootstrap"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    bad_seeds = [s for s in cfg.seeds if not 0 <= s < 2**63]
    if bad_seeds:
        raise ValueError(f"seeds must be whole numbers in [0, 2**63), got {bad_seeds}")
    if cfg.mode not in ("engine", "replay"):
        raise ValueError(f"mode must be 'engine' or 'replay', got {cfg.mode!r}")
    if any(s.name == "ceiling" for s in settings) and (cfg.mode != "replay" or cfg.temperature == 0):
        raise ValueError("policy 'ceiling' reads the true acceptance probabilities that only a sampled replay knows: "
                         "use it with mode: replay and temperature > 0")
    given = [k for k in ("draft_cost", "verify_cost", "round_cost") if getattr(cfg, k) is not None]
    if given and cfg.mode == "engine" and not cfg.priced:
        raise ValueError(f"{', '.join(given)} price a run's counts, and this engine run is timed, not priced: set "
                         f"priced: true to charge its generations at that cost model, or remove them")
    if any(s.name == "specdecpp" and not s.head_path(cfg.head) for s in settings):
        raise ValueError("policy 'specdecpp' needs `head` (or params.head): the directory of an exported "
                         "acceptance head")
    for s in settings:  # build each once with a stand-in head: bad parameters fail here, by name
        make_policy(s.name, head=(lambda h: h) if s.name == "specdecpp" else None, **s.policy_params)
    return settings


def check_budget(cfg: BenchConfig) -> None:
    """Refuse a token budget that leaves no room for a prompt in the target's context, from its config alone."""
    from transformers import AutoConfig

    from ..models import resolve

    context = getattr(AutoConfig.from_pretrained(resolve(cfg.target)), "max_position_embeddings", None) or 10**9
    if cfg.max_new_tokens >= context:
        raise ValueError(f"max_new_tokens {cfg.max_new_tokens} leaves no room for a prompt in the target's context "
                         f"of {context} positions: lower it")


def check_heads_match_draft(cfg: BenchConfig, settings: list[Setting]) -> None:
    """Refuse a head trained for another draft, from config files alone (no weights loaded)."""
    from transformers import AutoConfig

    from ..models import default_draft, precision_draft_dtype, resolve

    for head_dir in sorted({s.head_path(cfg.head) for s in settings} - {None}):
        path = Path(head_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no acceptance head at {head_dir} (expected config.json and model.safetensors)")
        head = json.loads(path.read_text())
        draft = default_draft(cfg.target) if cfg.draft is None else cfg.draft
        of_target = isinstance(draft, int) or precision_draft_dtype(draft) is not None
        draft_cfg = AutoConfig.from_pretrained(resolve(cfg.target if of_target else draft))
        depth = draft if isinstance(draft, int) else draft_cfg.num_hidden_layers
        trained = head.get("draft") or {}
        if head["hidden_size"] != draft_cfg.hidden_size or trained.get("num_layers", depth) != depth:
            raise ValueError(f"acceptance head {head_dir} was trained on draft {trained.get('name', '?')!r} "
                             f"(hidden size {head['hidden_size']}, {trained.get('num_layers', '?')} layers), but the "
                             f"benchmark drafts with hidden size {draft_cfg.hidden_size} and {depth} layers")
