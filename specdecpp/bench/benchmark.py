"""The benchmark module: `Benchmark.run()` walks datasets x seeds x prompts and, for each prompt, every policy
setting in turn (the target-only baseline first), so every speedup is a ratio measured side by side in one process.
In engine mode every setting is decoded and timed (or, with `priced`, priced by a cost model measured at the start:
free of machine noise and of batching); in replay mode every setting is simulated from one pass of
each model per prompt and seed (`specdecpp.replay`) and priced by that cost model."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import shutil
import time
from pathlib import Path

from filelock import FileLock, Timeout
from omegaconf import OmegaConf

from ..atomic import replace_dir, write_text
from ..costs import CostModel, fit_cost_model, measure_costs, refreshed
from ..lowp import dtype_name
from ..policies import AUTO, LengthPolicy, make_policy
from ..prompts import TEST_ONLY, load_prompts
from ..sampling import SamplingConfig, derived_seed
from .callbacks import Callback, default_callbacks
from .config import GROWS, BenchConfig, Setting, check_budget, check_heads_match_draft, comparable, expand_settings
from .summary import read_run_records, summarize


class Benchmark:
    def __init__(self, cfg: BenchConfig, callbacks: list[Callback] | None = None, pair=None):
        self.cfg = cfg
        self.settings = expand_settings(cfg)
        check_heads_match_draft(cfg, self.settings)
        check_budget(cfg)
        first, n = cfg.prompt_offset, cfg.prompts_per_dataset  # prompt ids in records count from the split's start
        self.prompts = {d: load_prompts(d, "test" if d in TEST_ONLY else cfg.split, first + n, cfg.data_dir)[first:]
                        for d in cfg.datasets}
        for d, prompts in self.prompts.items():
            if not prompts:
                raise ValueError(f"{d}: no prompts after prompt_offset {first}")
        self.callbacks = callbacks or []
        # files are written to a sibling folder, moved to run_dir only once the run finished: a run that fails
        # leaves an earlier run in run_dir as it was
        self.run_dir = Path(cfg.out_dir)
        self.out_dir = self.run_dir.with_name(self.run_dir.name + ".running")
        extendable = cfg.resume and _is_run(self.run_dir)  # a finished run that resume=true extends in place
        if self.run_dir.is_dir() and any(self.run_dir.iterdir()) and not (cfg.overwrite or extendable):
            raise FileExistsError(f"out_dir {self.run_dir} holds an earlier run: give a new out_dir, overwrite=true "
                                  f"(the earlier run is replaced only once this one has finished), or resume=true "
                                  f"to extend a finished run (more prompts or seeds)")
        self.sampling = SamplingConfig(cfg.temperature, cfg.top_k, cfg.top_p)
        self.pair, self.heads = pair, {}
        self.costs: CostModel | None = None  # replay or priced: the cost model that prices the counts
        # replay or priced: the same measurement at the start and again at the end (the drift of a shared machine)
        self.measured_costs: dict[str, CostModel] = {}
        # a timed engine run's auto stops: each dataset's costs refit from its timed generations (costs.refreshed)
        self.stop_costs: dict[str, CostModel] = {}
        self.records: list[dict] = []
        self._persistent: dict[tuple[str, str | None], LengthPolicy] = {}
        self._copied = False  # resume copied a finished run into out_dir: removed again if the resume is refused

    @property
    def total(self) -> int:
        return sum(map(len, self.prompts.values())) * len(self.cfg.seeds) * len(self.settings)

    def _setup(self) -> None:
        from ..models import load_pair

        if self.pair is None:
            self.pair = load_pair(self.cfg.target, self.cfg.draft, self.cfg.dtype, self.cfg.device)
        from ..head import AcceptanceHead

        for head_dir in {s.head_path(self.cfg.head) for s in self.settings} - {None}:
            self.heads[head_dir] = AcceptanceHead.from_pretrained(head_dir).to(self.pair.device).eval()
            self.heads[head_dir].check_draft(self.pair.draft)

    def policy(self, setting: Setting, dataset: str | None = None) -> LengthPolicy:
        """The setting's policy: a new object per generation unless it persists (its fit carries over the dataset's
        generations, in the order the run decodes them: each set is its own workload), priced, when its threshold is
        auto, by the run's cost model: in a timed engine run, the one refit from the dataset's timed generations so
        far."""
        policy = self._persistent.get((setting.label, dataset))
        if policy is None:
            policy = make_policy(setting.name, head=self.heads.get(setting.head_path(self.cfg.head)),
                                 **setting.policy_params)
            if getattr(policy, "persist", False) and dataset is not None:  # not a warm-up's, nor a look at it
                self._persistent[setting.label, dataset] = policy
        if hasattr(policy, "costs"):
            policy.costs = self.stop_costs.get(dataset, self.costs)
        return policy

    def run(self) -> list[dict]:
        """Run the sweep, holding out_dir against other runs (a lock a killed process does not leave behind)."""
        lock = FileLock(self.run_dir.with_name(f".{self.run_dir.name}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise RuntimeError(f"out_dir {self.run_dir} is in use by another benchmark run (its lock "
                               f"{lock.lock_file} is held): wait for it to finish, or give another out_dir") from None
        try:
            return self._run()
        finally:
            lock.release()

    def _run(self) -> list[dict]:
        # before the models load: a bad resume, or a forgotten one, fails fast
        self.records = self._resumed() if self.cfg.resume else self._nothing_to_lose()
        self._setup()
        if not self.records:
            shutil.rmtree(self.out_dir, ignore_errors=True)  # an empty attempt, or one overwrite=true gives up
            self.out_dir.mkdir(parents=True)
        self._same_pair()
        if (self.prices or self._auto) and self.costs is None:
            self.costs = self._cost_model()
        for dataset in self.prompts:  # a resumed run's auto stops start from the timings it kept
            self._refresh(dataset)
        done = {_key(r) for r in self.records}
        for cb in self.callbacks:
            cb.on_start(self)
        if self.cfg.warmup and self.cfg.mode == "engine":  # first calls pay for allocation and kernel selection
            first = next(iter(self.prompts.values()))[: self.cfg.batch_size]
            for s in self.settings:
                self.pair.generate(first, self.policy(s), self.sampling, max_new_tokens=4)
        # the datasets take turns, batch by batch, so a run cut short has about as many prompts of each; a replay
        # takes them in the engine's order (at batch size 1), so a fit that persists across generations sees the
        # same sequence in both (a replay holds one batch of traces per dataset for it)
        units = _round_robin(*[self._units(d, prompts) for d, prompts in self.prompts.items()])
        for dataset, seed, pids, generate in units:
            for s in self.settings:  # interleaved per prompt (batch): machine noise hits every setting alike
                keys = {(dataset, self.cfg.prompt_offset + pid, seed, s.label) for pid in pids}
                if keys <= done:  # decoded before the run was interrupted
                    continue
                self.records = [r for r in self.records if _key(r) not in keys]  # a batch cut short: again
                for pid, (stats, policy) in zip(pids, generate(self.policy(s, dataset))):
                    record = {"dataset": dataset, "prompt_id": self.cfg.prompt_offset + pid, "seed": seed,
                              "policy": s.name, "params": s.params, "setting": s.label, "mode": self.cfg.mode,
                              **stats.to_dict(), "stop_log": getattr(policy, "stop_log", None)}
                    if getattr(policy, "threshold", None) == AUTO:  # what its stops were priced by
                        record["stop_costs"] = dataclasses.asdict(policy.costs)
                    self.records.append(record)
                    for cb in self.callbacks:
                        cb.on_record(self, record)
                self._refresh(dataset)
        if self.costs is not None:
            self.measured_costs["end"] = measure_costs(self.pair.target, self.pair.draft)
        summary = summarize(self.records, self.cfg.bootstrap)
        if self._timed_singly:  # fit to wall times
            fit_cost_model(self.records, summary)
        for cb in self.callbacks:
            cb.on_end(self, summary)
        self.out_dir = replace_dir(self.out_dir, self.run_dir)
        return summary

    def _same_pair(self) -> None:
        """pair.json: the models as loaded (names, and the dtypes `auto` chose on this machine). A resumed run whose
        models load otherwise (another CPU picked another dtype) is refused: its records would mix two pairs."""
        dtypes = {role: dtype_name(model.dtype) for role, model in
                  (("target", self.pair.target), ("draft", self.pair.draft))}
        loaded = {**self.pair.names, "dtypes": dtypes}
        facts = self.out_dir / "pair.json"
        if self.records and facts.is_file() and (kept := json.loads(facts.read_text())) != loaded:
            if self._copied:  # a finished run's copy: not left behind (an interrupted run's records are kept)
                shutil.rmtree(self.out_dir)
            raise ValueError(f"resume: the run's records were decoded with {kept}, and this run loaded {loaded}: "
                             f"give the dtype the run used (dtype=..., a draft copy:<dtype>), or start afresh")
        write_text(facts, json.dumps(loaded, indent=2))

    def _nothing_to_lose(self) -> list[dict]:
        """A fresh start: refused while an interrupted run's records wait in out_dir.running, unless overwrite."""
        kept = read_run_records(self.out_dir) if (self.out_dir / "records.jsonl").is_file() else []
        if kept and not self.cfg.overwrite:
            raise FileExistsError(f"{self.out_dir} holds {len(kept)} records of an interrupted run: resume=true "
                                  f"continues it (same config), overwrite=true discards them and starts afresh")
        return []

    def _resumed(self) -> list[dict]:
        """The interrupted run's records in out_dir (and the cost model that priced them), if it ran this config; or
        the finished run's in run_dir, which this one extends to more prompts or seeds (priced alike)."""
        source = self.out_dir if _is_run(self.out_dir) else self.run_dir if _is_run(self.run_dir) else None
        if source is None:
            print(f"resume: nothing to resume in {self.out_dir}; starting afresh")
            return []
        mine, theirs = comparable(OmegaConf.structured(self.cfg)), comparable(OmegaConf.load(source / "config.yaml"))
        differ = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k) and k not in GROWS)
        if differ:
            raise ValueError(f"resume: {source} holds a run of another config (it differs in {differ}): "
                             f"resume with that run's config, or drop resume=true to start afresh")
        n, seeds = mine["prompts_per_dataset"], set(mine["seeds"])
        if n < theirs["prompts_per_dataset"] or not set(theirs["seeds"]) <= seeds:
            raise ValueError(f"resume: a run may grow, not shrink: it has prompts_per_dataset="
                             f"{theirs['prompts_per_dataset']} and seeds={theirs['seeds']}, asked for "
                             f"{mine['prompts_per_dataset']} and {mine['seeds']}")
        if source == self.run_dir:  # checked first, copied second: a refused resume leaves no .running folder behind
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._copied = True
            for name in ("records.jsonl", "config.yaml", "costs.json", "pair.json"):
                if (source / name).is_file():
                    shutil.copy2(source / name, self.out_dir / name)
        kept = read_run_records(self.out_dir)
        costs = self.out_dir / "costs.json"
        if kept and costs.is_file():  # price the rest as the first part was priced
            saved = {k: CostModel(**v) for k, v in json.loads(costs.read_text()).items()}
            self.costs, self.measured_costs["start"] = saved["used"], saved["start"]
        elif kept and self.prices:
            raise ValueError(f"resume: {costs} is missing, so the rest could not be priced as the first part was")
        print(f"resume: {len(kept)} records kept from {self.out_dir}" + ("" if self.costs or not kept else
              " (wall times from two processes: machine noise may differ between the parts)"))
        return kept

    def _units(self, dataset: str, prompts: list[str]):
        """(dataset, seed, prompt ids, run a policy on them) for each batch of one dataset."""
        runs = self._replayed(dataset, prompts) if self.cfg.mode == "replay" else self._decoded(prompts)
        for seed, pids, generate in runs:
            yield dataset, seed, pids, generate

    def _decoded(self, prompts: list[str]):
        """Engine mode: (seed, prompt ids, decode-and-time a batch of prompts under a policy) per batch and seed."""
        size = self.cfg.batch_size
        for seed, lo in itertools.product(self.cfg.seeds, range(0, len(prompts), size)):
            ids = [self.pair.encode(p) for p in prompts[lo: lo + size]]

            def generate(policy, ids=ids, seed=seed):  # every setting the same draws; each prompt its own
                gens = self.pair.generate(ids, policy, self.sampling, self.cfg.max_new_tokens,
                                          seed=derived_seed("engine", seed, ids))
                return [(self._priced(g.stats) if self.cfg.priced else g.stats, g.policy) for g in gens]
            yield seed, list(range(lo, lo + len(ids))), generate

    def _replayed(self, dataset: str, prompts: list[str]):
        """Replay mode: (seed, [prompt id], simulate under a policy), priced by the cost model, per prompt and seed
        (greedy: one trace per prompt serves every seed)."""
        from ..fetch import cache_dir
        from ..passes import pad_token_id
        from ..replay import make_traces, replay_generation

        tok = self.pair.tokenizer
        eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        longest = max(self.policy(s).most_per_round for s in self.settings)
        encoded = [self.pair.encode(p) for p in prompts]
        for seed in self.cfg.seeds[:1] if self.sampling.greedy else self.cfg.seeds:
            traces = make_traces(self.pair.target, self.pair.draft, encoded, self.cfg.max_new_tokens, eos,
                                 pad_token_id(tok), self.cfg.trace_batch_size,
                                 cache_dir=cache_dir() / "traces" if self.cfg.trace_cache else None,
                                 branch_length=longest, key=self._trace_key, sampling=self.sampling, seed=seed)
            for pid, trace in traces:
                trace.complete_branches(longest)  # every branch drawn (and, sampled, scored) before any setting
                def simulate(policy, trace=trace):
                    stats = self._priced(replay_generation(trace, policy, self.cfg.max_new_tokens))
                    stats.total_s = stats.priced_s  # a replay has no wall time of its own
                    return [(stats, policy)]
                yield seed, [pid], simulate
                for cb in self.callbacks:  # after every setting ran on it: its branches are there
                    cb.on_trace(self, dataset, self.cfg.prompt_offset + pid, trace)
                trace.release()

    @property
    def prices(self) -> bool:
        """Whether the records are charged by the cost model (a replay, or a priced engine run), not timed."""
        return self.cfg.mode == "replay" or self.cfg.priced

    @property
    def _auto(self) -> bool:
        """A setting stops by the cost model (threshold auto): even a timed run measures one at the start."""
        return any(s.params.get("threshold") == AUTO for s in self.settings)

    @property
    def _timed_singly(self) -> bool:
        """A timed engine run at batch 1: each record's wall time is its own generation's."""
        return not self.prices and self.cfg.batch_size == 1

    def _refresh(self, dataset: str) -> None:
        """Auto stops in a timed run at batch 1 are priced by the engine's own timings of the dataset as they come
        in (costs.json keeps the last as "engine <dataset>"), starting from the probe's bare forwards."""
        if self._auto and self._timed_singly:
            self.stop_costs[dataset] = refreshed(self.costs, [r for r in self.records if r["dataset"] == dataset])

    @functools.cached_property
    def _trace_key(self) -> dict:
        """What saved traces are keyed by besides each prompt: the models, by name and by a weights fingerprint."""
        from ..replay import weights_fingerprint

        return {**self.pair.names, "weights": weights_fingerprint(self.pair)}

    def _priced(self, stats):
        stats.priced_s = self.costs.seconds(stats.target_calls, stats.drafted, stats.verified_rounds)
        return stats

    def _cost_model(self) -> CostModel:
        measured = self.measured_costs["start"] = measure_costs(self.pair.target, self.pair.draft)
        given = {"draft": self.cfg.draft_cost, "verify": self.cfg.verify_cost, "round_cost": self.cfg.round_cost}
        return dataclasses.replace(measured, **{k: v for k, v in given.items() if v is not None})


def _round_robin(*iterables):
    """One item of each iterable in turn, until all are spent."""
    iterators = [iter(it) for it in iterables]
    while iterators:
        for it in list(iterators):
            try:
                yield next(it)
            except StopIteration:
                iterators.remove(it)


def _is_run(folder: Path) -> bool:
    """A benchmark run's folder (finished, or interrupted with records): its config and records are there."""
    return (folder / "records.jsonl").is_file() and (folder / "config.yaml").is_file()


def _key(record: dict) -> tuple:
    return record["dataset"], record["prompt_id"], record["seed"], record["setting"]


def run_benchmark(cfg: BenchConfig, callbacks: list[Callback] | None = None) -> list[dict]:
    t = time.perf_counter()
    summary = Benchmark(cfg, default_callbacks() if callbacks is None else callbacks).run()
    print(f"benchmark took {time.perf_counter() - t:.0f} s")
    return summary
