"""The defects a hostile new user found (issue 19), each reproduced: nothing lost, nothing silent."""

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import noisy_draft, run_script, tiny_llama, word_tokenizer

from specdecpp import ConstantK, SamplingConfig, SpecDecPP, speculative_generate
from specdecpp.bench import Benchmark, load_config, run_benchmark
from specdecpp.bench.callbacks import Callback, JsonlWriter
from specdecpp.data import AcceptanceDataModule, load_prepared
from specdecpp.head import AcceptanceHead, draft_fingerprint, draft_fingerprints
from specdecpp.models import ModelPair, draft_ref
from specdecpp.policies import Heuristic, Oracle, make_policy
from specdecpp.prompts import load_prompts
from specdecpp.replay import load_trace, make_traces, save_trace, teacher_forced

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the a cat dog sat ran on under mat tree big small red blue".split()


@pytest.fixture(scope="module")
def pair():
    tok = word_tokenizer(WORDS)
    target = tiny_llama(0, vocab=len(tok), sharpness=3.0, eos=0)
    return ModelPair(target, noisy_draft(target, 0.5), tok, {"target": "tiny", "draft": "tiny-noisy"})


# --- 1. a failed re-run keeps the earlier run --------------------------------------------------------------------


class DiesAfter(Callback):
    def __init__(self, n: int):
        self.n = n

    def on_record(self, bench, record):
        self.n -= 1
        if self.n == 0:
            raise RuntimeError("killed mid-run")


def test_a_failed_rerun_keeps_the_earlier_runs_records(tmp_path):
    run = tmp_path / "run"
    cfg = [f"out_dir={run}", "prompts_per_dataset=1", "max_new_tokens=4", "datasets=[alpaca]"]
    run_benchmark(load_config(ROOT / "configs/bench/tiny.yaml", cfg), callbacks=[JsonlWriter()])
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert before["records.jsonl"].count(b"\n") == 6
    with pytest.raises(FileExistsError, match="holds an earlier run"):  # refused before any model loads
        Benchmark(load_config(ROOT / "configs/bench/tiny.yaml", cfg))
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):  # the reproduction
        Benchmark(load_config(ROOT / "configs/bench/tiny.yaml", [*cfg, "overwrite=true", "max_new_tokens=0"]))
    with pytest.raises(RuntimeError, match="killed mid-run"):  # asked to overwrite, then fails part-way
        run_benchmark(load_config(ROOT / "configs/bench/tiny.yaml", [*cfg, "overwrite=true"]),
                      callbacks=[JsonlWriter(), DiesAfter(3)])
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    assert (tmp_path / "run.running" / "records.jsonl").read_text().count("\n") == 3  # the failed run's own records
    run_benchmark(load_config(ROOT / "configs/bench/tiny.yaml", [*cfg, "overwrite=true", "max_new_tokens=3"]),
                  callbacks=[JsonlWriter()])
    assert json.loads((run / "config.yaml").read_text().split("max_new_tokens:")[1].split()[0]) == 3
    assert not (tmp_path / "run.running").exists()


def test_bench_batch_size_zero_is_refused_before_models_load(tmp_path):
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        Benchmark(load_config(ROOT / "configs/bench/tiny.yaml", [f"out_dir={tmp_path}/r", "batch_size=0"]))


# --- 2. a damaged shard of a completed preparation is rebuilt ------------------------------------------------------


def test_a_truncated_or_deleted_shard_of_a_completed_preparation_is_rebuilt(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": " ".join(WORDS[i: i + 3])}) + "\n" for i in range(8)))
    tok = word_tokenizer(WORDS)
    target = tiny_llama(0, vocab=len(tok), sharpness=3.0, eos=0)
    for name, model in {"t": target, "d": noisy_draft(target, 0.5)}.items():
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    kwargs = dict(target=str(tmp_path / "t"), draft=str(tmp_path / "d"), dataset=str(prompts), train_prompts=6,
                  val_prompts=2, max_new_tokens=5, prepare_batch_size=2, cache_dir=str(tmp_path / "c"))
    dm = AcceptanceDataModule(**kwargs)
    dm.prepare_data()
    (train_dir,) = dm.dirs()["train"]
    reference, _ = load_prepared(train_dir)
    shard = train_dir / "shard_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated, its sidecar and the `complete` marker still there
    (train_dir / "shard_00002.safetensors").unlink()
    assert (train_dir / "complete").is_file()
    again = AcceptanceDataModule(**kwargs)  # what the next `train.py fit` does: prepare_data, then setup
    again.prepare_data()
    again.setup("fit")
    rebuilt, _ = load_prepared(train_dir)
    assert [r.target.tolist() for r in rebuilt] == [r.target.tolist() for r in reference]


# --- 3. --data.draft 3 from the command line, and checkpoints ------------------------------------------------------


def test_a_draft_depth_given_as_text_is_a_self_draft():
    assert draft_ref("3") == 3 and draft_ref(3) == 3 and draft_ref("copy:bfloat16") == "copy:bfloat16"
    assert draft_ref(None) is None and draft_ref("org/model-3") == "org/model-3"


def test_train_cli_self_draft_depth_checkpoint_shape_and_damage(tmp_path, tiny_train_run):
    proc = run_script("train.py", "fit", "--config", "configs/train/tiny.yaml", "--data.draft", "3",
                      "--trainer.max_epochs", "1", "--data.train_prompts", "8", "--data.val_prompts", "4",
                      "--trainer.default_root_dir", str(tmp_path / "d3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    head = json.loads((tmp_path / "d3/lightning_logs/version_0/head/config.json").read_text())
    assert head["draft"]["num_layers"] == 3 and head["draft"]["name"] == "tiny-random:3"

    ckpt = tiny_train_run[0].parents[1] / "checkpoints" / "last.ckpt"  # a 2-layer head's (under the root folder)
    proc = run_script("train.py", "fit", "--config", "configs/train/tiny.yaml", "--model.num_layers", "3",
                      "--ckpt_path", str(ckpt), "--trainer.max_epochs", "3",
                      "--trainer.default_root_dir", str(tmp_path / "resume"))
    assert proc.returncode != 0 and "the checkpoint holds a head with {'num_layers': 2" in proc.stderr
    assert not list((tmp_path / "resume").rglob("head"))  # nothing exported

    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    proc = run_script("train.py", "fit", "--config", "configs/train/tiny.yaml", "--ckpt_path", str(truncated),
                      "--trainer.default_root_dir", str(tmp_path / "t"))
    assert proc.returncode != 0 and f"checkpoint {truncated} is damaged or truncated" in proc.stderr
    assert "Errno 22" not in proc.stderr


# --- 4. prompts longer than the context ----------------------------------------------------------------------------


def test_a_prompt_past_the_context_is_refused_or_cut_from_the_left_when_asked(pair):
    context = pair.target.config.max_position_embeddings  # 256
    long_ids = [(5 + i) % 14 + 2 for i in range(context)]
    with pytest.raises(ValueError, match=rf"has {context} tokens: with max_new_tokens 8 that is {context + 8} "
                                         rf"positions, past the models' context of {context}"):
        pair.generate(long_ids, ConstantK(2), SamplingConfig(0), max_new_tokens=8)
    with pytest.raises(ValueError, match="prompt 1 has"):
        pair.generate([[3, 4], long_ids], ConstantK(2), SamplingConfig(0), max_new_tokens=8)
    cut = pair.generate(long_ids, ConstantK(2), SamplingConfig(0), max_new_tokens=8, truncate=True)
    alone = pair.generate(long_ids[-(context - 8):], ConstantK(2), SamplingConfig(0), max_new_tokens=8)
    assert cut.tokens == alone.tokens and cut.stats.prompt_tokens == context - 8


# --- 5. traces are data, and a damaged one is computed again ------------------------------------------------------


def test_traces_round_trip_as_safetensors_and_a_truncated_one_is_recomputed(pair, tmp_path):
    prompts = [[3, 4, 5], [6, 7], [8, 9, 10, 11]]
    first = dict(make_traces(pair.target, pair.draft, prompts, 10, {0}, cache_dir=tmp_path, branch_length=4))
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) == 3 and not list(tmp_path.glob("*.pt"))
    trace = teacher_forced(pair.draft, prompts[0], first[0].target, {0})
    save_trace(trace, tmp_path / "one.safetensors", 4)
    loaded = load_trace(tmp_path / "one.safetensors")
    assert (loaded.prompt, loaded.target, loaded.draft, loaded.eos) == (trace.prompt, trace.target, trace.draft, {0})
    assert all(a.prob == b.prob and torch.equal(a.hidden, b.hidden) for a, b in zip(loaded.tokens, trace.tokens))
    assert {m: [y for y, _ in b.steps] for m, b in loaded.branches.items()} == \
        {m: [y for y, _ in b.steps] for m, b in trace.branches.items()}
    (tmp_path / "one.safetensors").unlink()
    damaged = files[1]
    damaged.write_bytes(damaged.read_bytes()[:200])
    with pytest.raises(ValueError, match="damaged replay trace"):
        load_trace(damaged)
    again = dict(make_traces(pair.target, pair.draft, prompts, 10, {0}, cache_dir=tmp_path, branch_length=4))
    assert sorted(again) == [0, 1, 2] and all(again[i].target == first[i].target for i in range(3))
    load_trace(damaged)  # rewritten whole


def test_no_pickle_is_loaded_anywhere_in_the_package():
    sources = "\n".join(p.read_text() for p in (ROOT / "specdecpp").rglob("*.py"))
    assert "weights_only=False" not in sources and "import pickle" not in sources


# --- 6. heads meet drafts ------------------------------------------------------------------------------------------


def test_a_head_is_checked_against_the_draft_wherever_it_meets_one(pair, tmp_path):
    hidden = pair.draft.config.hidden_size
    identity = {"name": "tiny-noisy", "hidden_size": hidden, "num_layers": 2, "vocab_size": len(WORDS) + 2,
                "fingerprint": draft_fingerprint(pair.draft)}
    AcceptanceHead(hidden, 1, identity).save_pretrained(tmp_path / "h")
    head = AcceptanceHead.from_pretrained(tmp_path / "h")
    pair.generate([3, 4, 5], SpecDecPP(head, 0.5, 1, 4), SamplingConfig(0), max_new_tokens=4)  # its own draft: fine
    wide = AcceptanceHead(hidden * 2, 1, {**identity, "hidden_size": hidden * 2})
    with pytest.raises(ValueError, match=rf"hidden_size {hidden * 2} \(trained\) vs {hidden} \(given\)"):
        pair.generate([3, 4, 5], SpecDecPP(wide, 0.5, 1, 4), SamplingConfig(0), max_new_tokens=4)
    other = noisy_draft(pair.target, 0.5, seed=7)  # same shape, other weights
    with pytest.raises(ValueError, match="fingerprint"):
        speculative_generate(pair.target, other, [3, 4, 5], SpecDecPP(head, 0.5, 1, 4), SamplingConfig(0), 4)
    deeper = AcceptanceHead(hidden, 1, {k: v for k, v in identity.items() if k != "fingerprint"} | {"num_layers": 3})
    with pytest.raises(ValueError, match=r"num_layers 3 \(trained\) vs 2 \(given\)"):
        speculative_generate(pair.target, pair.draft, [3, 4, 5], SpecDecPP(deeper, 0.5, 1, 4), SamplingConfig(0), 4)
    speculative_generate(pair.target, pair.draft, [3, 4], SpecDecPP(torch.nn.Linear(hidden, 1), 0.5), max_new_tokens=3)


def test_a_head_fits_its_drafts_low_precision_copies_and_no_others(pair):
    """A head records its draft's fingerprint per dtype: the draft cast to bf16 or fp16 fits, another draft's cast
    does not, and a head that recorded only its draft's own dtype refuses every cast."""
    hidden = pair.draft.config.hidden_size
    identity = {"name": "tiny-noisy", "hidden_size": hidden, "num_layers": 2, "vocab_size": len(WORDS) + 2}
    head = AcceptanceHead(hidden, 1, {**identity, "fingerprints": draft_fingerprints(pair.draft)})
    legacy = AcceptanceHead(hidden, 1, {**identity, "fingerprint": draft_fingerprint(pair.draft)})
    other = noisy_draft(pair.target, 0.5, seed=7)
    for dtype in (torch.bfloat16, torch.float16):
        head.check_draft(copy.deepcopy(pair.draft).to(dtype))
        with pytest.raises(ValueError, match="fingerprint"):
            head.check_draft(copy.deepcopy(other).to(dtype))
        with pytest.raises(ValueError, match="fingerprint"):
            legacy.check_draft(copy.deepcopy(pair.draft).to(dtype))
    head.check_draft(pair.draft)
    legacy.check_draft(pair.draft)


def test_an_interrupted_head_export_leaves_the_previous_head_whole(tmp_path, monkeypatch):
    import specdecpp.head as head_module

    old = AcceptanceHead(8, 1)
    with torch.no_grad():
        old.calibration.copy_(torch.tensor([2.0, -1.0]))
    old.save_pretrained(tmp_path / "h")
    new = AcceptanceHead(8, 1)

    def dies(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(head_module, "save_file", dies)  # killed after config.json, before the weights
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(tmp_path / "h")
    loaded = AcceptanceHead.from_pretrained(tmp_path / "h")
    assert loaded.calibration.tolist() == [2.0, -1.0]
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), old.state_dict().values()))
    monkeypatch.undo()
    new.save_pretrained(tmp_path / "h")
    assert AcceptanceHead.from_pretrained(tmp_path / "h").calibration.tolist() == [1.0, 0.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h"]


# --- 7. the smaller ones -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": math.nan}, "temperature must be a number"), ({"top_p": math.nan}, "top_p must be a number"),
    ({"temperature": math.inf}, "finite"), ({"top_k": 2.5}, "top_k must be a whole number"),
])
def test_nan_and_non_integer_sampling_values_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)


@pytest.mark.parametrize("make", [lambda: ConstantK(2.5), lambda: ConstantK(True), lambda: Heuristic(k=1.5),
                                  lambda: Oracle(lookahead=3.0), lambda: make_policy("margin", threshold=0.1,
                                                                                     k_max=4.5)])
def test_non_integer_token_counts_are_refused(make):
    with pytest.raises(ValueError, match="must be a whole number"):
        make()


def test_prompts_of_the_wrong_type_or_empty_rows_are_named(pair):
    with pytest.raises(TypeError, match="a prompt is text .* got int 123"):
        pair.generate(123, ConstantK(2))
    with pytest.raises(TypeError, match="prompt 1 of the batch is int 123"):
        pair.generate(["the cat", 123], ConstantK(2))
    with pytest.raises(ValueError, match="prompt 1 of the batch: the prompt is empty"):
        pair.generate(["the cat", "  "], ConstantK(2))
    with pytest.raises(ValueError, match="prompt 2 of the batch is empty"):
        speculative_generate(pair.target, pair.draft, [[3], [4], []], ConstantK(2))


def test_prompt_files_name_themselves_in_their_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"prompt": "a"},')
    with pytest.raises(ValueError, match=rf"{bad} is not valid JSON \(line 1"):
        load_prompts(str(bad))
    lines = tmp_path / "bad.jsonl"
    lines.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=rf"{lines}, line 2: not valid JSON"):
        load_prompts(str(lines))
    null = tmp_path / "null.jsonl"
    null.write_text('{"prompt": "a"}\n{"prompt": null}\n')
    with pytest.raises(ValueError, match="record 1's 'prompt' is NoneType None, not text"):
        load_prompts(str(null))


def test_concurrent_preparation_of_one_set_does_the_work_once(tmp_path):
    """Two processes prepare the same data: one waits on the lock and then finds every shard done."""
    script = tmp_path / "prep.py"
    script.write_text(f"""
import sys, time
sys.path.insert(0, {str(ROOT / 'tests')!r})
import specdecpp.data as data
from conftest import noisy_draft, tiny_llama, word_tokenizer
from specdecpp.models import ModelPair
real = data.label_responses
def slow(*a, **k):
    time.sleep(0.5)
    print("labelled", flush=True)
    return real(*a, **k)
data.label_responses = slow
tok = word_tokenizer({WORDS!r})
target = tiny_llama(0, vocab=len(tok), sharpness=3.0, eos=0)
pair = ModelPair(target, noisy_draft(target, 0.5), tok, {{"target": "t", "draft": "d"}})
out = {str(tmp_path / 'prep')!r}
from pathlib import Path
data.prepare(pair, {[" ".join(WORDS[i: i + 2]) for i in range(6)]!r}, data.PrepareConfig(max_new_tokens=4,
             batch_size=2), Path(out))
""")
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(o.count("labelled") for o in outs) == [0, 3]  # 3 shards, built once
    assert len(load_prepared(tmp_path / "prep")[0]) == 6
    shutil.rmtree(tmp_path / "prep")


# --- issue 40: nothing lost under interruption and concurrency ----------------------------------------------------


def tiny_bench(tmp_path, *extra):
    return load_config(ROOT / "configs/bench/tiny.yaml", [f"out_dir={tmp_path / 'K'}", "prompts_per_dataset=1",
                                                          "max_new_tokens=4", "datasets=[alpaca]", *extra])


def test_a_forgotten_resume_keeps_the_interrupted_runs_records(tmp_path):
    """kill -9 mid-run, then the same command without resume=true: refused by name, the records untouched; resume
    continues them, overwrite discards them."""
    with pytest.raises(RuntimeError, match="killed mid-run"):
        run_benchmark(tiny_bench(tmp_path), callbacks=[JsonlWriter(), DiesAfter(4)])
    records = tmp_path / "K.running" / "records.jsonl"
    kept = records.read_bytes()
    assert kept.count(b"\n") == 4
    with pytest.raises(FileExistsError, match=r"holds 4 records of an interrupted run: resume=true continues it"):
        run_benchmark(tiny_bench(tmp_path), callbacks=[JsonlWriter()])
    assert records.read_bytes() == kept
    run_benchmark(tiny_bench(tmp_path, "resume=true"), callbacks=[JsonlWriter()])
    assert (tmp_path / "K" / "records.jsonl").read_text().count("\n") == 6
    with pytest.raises(RuntimeError, match="killed mid-run"):
        run_benchmark(tiny_bench(tmp_path, "out_dir=" + str(tmp_path / "L")), callbacks=[JsonlWriter(), DiesAfter(2)])
    run_benchmark(tiny_bench(tmp_path, "out_dir=" + str(tmp_path / "L"), "overwrite=true"), callbacks=[JsonlWriter()])
    assert (tmp_path / "L" / "records.jsonl").read_text().count("\n") == 6


def test_one_out_dir_has_one_writer_and_a_killed_holder_leaves_no_stuck_lock(tmp_path):
    import subprocess
    import sys

    lock = tmp_path / ".K.lock"
    script = (f"from filelock import FileLock; import time; lock = FileLock({str(lock)!r}); lock.acquire(); "
              f"print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeError, match=r"out_dir .*K is in use by another benchmark run"):
            run_benchmark(tiny_bench(tmp_path), callbacks=[JsonlWriter()])
        assert not (tmp_path / "K.running").exists()  # refused before it wrote anything
    finally:
        holder.kill()  # kill -9: no clean release
        holder.wait()
    run_benchmark(tiny_bench(tmp_path), callbacks=[JsonlWriter()])
    assert (tmp_path / "K" / "records.jsonl").read_text().count("\n") == 6


def test_a_trace_with_sound_container_and_damaged_content_is_recomputed(pair, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    prompts = [[3, 4, 5], [6, 7]]
    first = dict(make_traces(pair.target, pair.draft, prompts, 12, {0}, cache_dir=tmp_path, branch_length=4))
    path = sorted(tmp_path.glob("*.safetensors"))[0]
    with safe_open(path, "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    ids = json.loads(meta["trace"])
    ids["draft"] = ids["draft"][:2]  # the reproduction: the drafted ids cut to 2 of 12
    save_file(tensors, path, metadata={**meta, "trace": json.dumps(ids)})
    with pytest.raises(ValueError, match="damaged replay trace .*checksum"):
        load_trace(path)
    renamed = {("trace_ids" if k == "trace" else k): v for k, v in meta.items()}  # a renamed key
    save_file(tensors, path, metadata=renamed)
    with pytest.raises(ValueError, match="damaged replay trace .*KeyError"):
        load_trace(path)
    again = dict(make_traces(pair.target, pair.draft, prompts, 12, {0}, cache_dir=tmp_path, branch_length=4))
    assert all(again[i].draft == first[i].draft for i in range(2))
    load_trace(path)  # rewritten whole


def test_token_ids_outside_the_vocabulary_and_budgets_that_fill_the_context_are_refused(pair):
    with pytest.raises(ValueError, match="token id 1000000000, outside the models' vocabulary of 16"):
        pair.generate([10**9, 5], ConstantK(2))
    with pytest.raises(ValueError, match="max_new_tokens must be a whole number >= 1, got 4.5"):
        pair.generate([3, 5], ConstantK(2), max_new_tokens=4.5)
    context = pair.target.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"max_new_tokens {context} alone fills the models' context"):
        pair.generate([3, 5], ConstantK(2), max_new_tokens=context, truncate=True)


def test_the_bench_refuses_an_oversized_budget_and_seed_before_decoding(tmp_path):
    with pytest.raises(ValueError, match="max_new_tokens 100000 leaves no room for a prompt"):
        Benchmark(tiny_bench(tmp_path, "max_new_tokens=100000"))
    with pytest.raises(ValueError, match=r"seeds must be whole numbers in \[0, 2\*\*63\)"):
        Benchmark(tiny_bench(tmp_path, f"seeds=[{2**70}]"))
    assert not (tmp_path / "K.running").exists()


def test_a_damaged_head_folder_names_its_file(tmp_path):
    head = AcceptanceHead(32, 1).save_pretrained(tmp_path / "head")
    weights = next(p for p in head.iterdir() if p.suffix == ".safetensors")
    weights.write_bytes(weights.read_bytes()[:100])  # truncated weights
    with pytest.raises(ValueError, match=f"acceptance head {head} is damaged or incomplete"):
        AcceptanceHead.from_pretrained(head)
    (head / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json is not a valid head config"):
        AcceptanceHead.from_pretrained(head)
