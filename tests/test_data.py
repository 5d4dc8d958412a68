import json

import pytest
import torch
from conftest import noisy_draft, tiny_llama, word_tokenizer
from transformers import TemperatureLogitsWarper, TopKLogitsWarper

import specdecpp.data as data
from specdecpp.data import (
    AcceptanceDataModule,
    EpochSampler,
    FeatureDataset,
    MixedDataset,
    PrepareConfig,
    collate,
    load_prepared,
    prepare,
    sample_responses,
    summarize,
)
from specdecpp.models import ModelPair
from specdecpp.prompts import load_prompts
from specdecpp.sampling import SamplingConfig, draft_stats
from specdecpp.training import AcceptanceHeadModule

WORDS = "the a cat dog sat ran on under mat tree big small red blue fast slow".split()
PROMPTS = ["the cat sat on the mat", "a dog ran", "big red tree", "the small blue cat ran fast",
           "a slow dog", "under the tree", "the cat", "red"]


@pytest.fixture(scope="module")
def pair():
    tok = word_tokenizer(WORDS)
    target = tiny_llama(0, vocab=len(tok), sharpness=3.0, eos=0)
    return ModelPair(target, noisy_draft(target, 0.5), tok, {"target": "tiny", "draft": "tiny-noisy"})


CFG = PrepareConfig(max_new_tokens=12, batch_size=3, seed=1, temperature=0.9, top_k=10)


def same_records(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.prompt, y.prompt) and torch.equal(x.target, y.target) and torch.equal(x.draft, y.draft)
        assert torch.allclose(x.p_acc, y.p_acc, atol=1e-6)
    return True


def test_labels_match_an_independent_computation(pair, tmp_path):
    records, _ = load_prepared(prepare(pair, PROMPTS, CFG, tmp_path))
    warpers = [TemperatureLogitsWarper(CFG.temperature), TopKLogitsWarper(CFG.top_k)]
    for rec in records:
        ids = torch.cat([rec.prompt, rec.target])[None]
        with torch.no_grad():  # unbatched, unpadded, transformers' own warpers
            lp, lq = pair.target(ids).logits[0], pair.draft(ids).logits[0]
        for i in range(len(rec.target)):
            pos = len(rec.prompt) - 1 + i  # the logits at pos predict the token at pos + 1 = response token i
            wp, wq = lp[pos][None], lq[pos][None]
            for w in warpers:
                wp, wq = w(None, wp), w(None, wq)
            p, q = wp.softmax(-1)[0], wq.softmax(-1)[0]
            y = rec.draft[i]
            assert q[y] > 0  # Y_i was drawn from q
            assert rec.p_acc[i] == pytest.approx(min(1.0, float(p[y] / q[y])), abs=1e-5)
            assert rec.log_q[i] == pytest.approx(float(q[y].log()), abs=1e-4)
            # the soft label: min(1, p/q) averaged over every token the draft could have sampled, weighted by q
            expected = sum(float(q[v]) * min(1.0, float(p[v] / q[v])) for v in range(len(q)) if q[v] > 0)
            assert rec.p_exp[i] == pytest.approx(expected, abs=1e-5)
            assert rec.p_exp[i] == pytest.approx(1 - 0.5 * float((p - q).abs().sum()), abs=1e-5)  # 1 - TV
    assert sum(len(r.target) for r in records) > 40


def test_greedy_labels_are_the_targets_argmax_without_a_second_target_pass(pair, tmp_path):
    cfg = PrepareConfig(max_new_tokens=12, batch_size=3, seed=1, temperature=0)
    widths = []
    hook = pair.target.register_forward_pre_hook(lambda m, a, k: widths.append(k["input_ids"].shape[1]),
                                                 with_kwargs=True)
    try:
        records, _ = load_prepared(prepare(pair, PROMPTS, cfg, tmp_path))
    finally:
        hook.remove()
    # the target's calls were prompt prefills and one-token steps: no pass over prompt + response
    assert widths and max(widths) <= max(len(r.prompt) for r in records)
    rejected = 0
    for rec in records:
        ids = torch.cat([rec.prompt, rec.target])[None]
        with torch.no_grad():  # unbatched, unpadded teacher-forced passes of both models
            lp, lq = pair.target(ids).logits[0], pair.draft(ids).logits[0]
        at = slice(len(rec.prompt) - 1, len(rec.prompt) - 1 + len(rec.target))
        assert torch.equal(rec.target, lp[at].argmax(-1))  # X is the target's greedy output
        assert torch.equal(rec.draft, lq[at].argmax(-1))
        accepted = (rec.draft == lp[at].argmax(-1)).float()
        assert torch.equal(rec.p_acc, accepted) and torch.equal(rec.p_exp, accepted)
        assert torch.equal(rec.log_q, torch.zeros_like(rec.log_q))
        rejected += int((accepted == 0).sum())
    assert rejected > 0 and sum(len(r.target) for r in records) > 40  # both labels occur


def test_records_carry_their_prompt_index_and_come_back_in_prompt_order(pair, tmp_path):
    out = prepare(pair, PROMPTS, CFG, tmp_path)
    bucketed, _ = load_prepared(out)
    assert [r.index for r in bucketed] != list(range(len(PROMPTS)))  # length buckets reorder them
    ordered, _ = load_prepared(out, prompt_order=True)
    assert [r.index for r in ordered] == list(range(len(PROMPTS)))
    assert all(r.prompt.tolist() == pair.encode(PROMPTS[r.index]) for r in ordered)


def test_the_expected_acceptance_label_feeds_the_batches_when_asked(pair, tmp_path):
    records, _ = load_prepared(prepare(pair, PROMPTS, CFG, tmp_path))
    item = MixedDataset(records, 0.0, label="expected")[0]
    assert torch.equal(item["labels"][len(records[0].prompt):], records[0].p_exp)
    records[0].p_exp = None  # as in a shard prepared before the label existed
    with pytest.raises(ValueError, match="no expected-acceptance labels"):
        MixedDataset(records, 0.0, label="expected")
    with pytest.raises(ValueError, match="label must be one of"):
        AcceptanceDataModule(label="soft")


def test_features_are_the_draft_state_and_statistics_that_proposed_each_draft_token(pair, tmp_path):
    cfg = PrepareConfig(max_new_tokens=12, batch_size=3, seed=1, temperature=0.9, top_k=10, features=True)
    records, _ = load_prepared(prepare(pair, PROMPTS, cfg, tmp_path))  # through the shards and back
    plain, _ = load_prepared(prepare(pair, PROMPTS, CFG, tmp_path / "plain"))
    same_records(records, plain)  # features change nothing else
    assert plain[0].hidden is None
    for rec in records:
        ids = torch.cat([rec.prompt, rec.target])[None]
        with torch.no_grad():  # unbatched, unpadded
            hidden = pair.draft.get_decoder()(ids).last_hidden_state[0]
            logits = pair.draft(ids).logits[0]
        at = slice(len(rec.prompt) - 1, len(rec.prompt) + len(rec.target) - 1)  # position t proposes token t + 1
        assert rec.hidden.shape == (len(rec.target), 32) and rec.stats.shape == (len(rec.target), 3)
        assert torch.allclose(rec.hidden, hidden[at], atol=1e-5)
        expected = torch.stack(draft_stats(logits[at], rec.draft), -1)
        assert torch.allclose(rec.stats, expected, atol=1e-5)
    ds = FeatureDataset(records)
    batch = collate([ds[i] for i in range(3)])
    n = [len(r.target) for r in records[:3]]
    assert batch["hidden"].shape == (3, max(n), 32) and batch["loss_mask"].sum() == sum(n)
    with pytest.raises(ValueError, match="features: true"):
        FeatureDataset(plain)


def test_a_statistics_head_scores_feature_batches_as_it_scores_token_batches(pair, tmp_path):
    """The same logit for Y_i from the prepared features and from running the draft over prompt + X_<i + Y_i."""
    cfg = PrepareConfig(max_new_tokens=12, batch_size=3, seed=1, temperature=0.9, top_k=10, features=True)
    records, _ = load_prepared(prepare(pair, PROMPTS[:3], cfg, tmp_path))
    module = AcceptanceHeadModule(target="tiny", draft="tiny-noisy", head_stats=True)
    module.draft = pair.draft
    module.configure_model()
    torch.nn.init.normal_(module.head.out.weight)  # the hidden-state path starts silent: give it a say
    batch = collate([FeatureDataset(records)[i] for i in range(3)])
    with torch.no_grad():
        from_features = module.batch_logits(batch)
        for row, rec in enumerate(records):
            for i in range(len(rec.target)):
                ids = torch.cat([rec.prompt, rec.target[:i], rec.draft[i:i + 1]])[None]
                logit = module(ids, torch.ones_like(ids))[0, -1]
                assert logit == pytest.approx(float(from_features[row, i]), abs=1e-4)
    paper = AcceptanceHeadModule(target="tiny", draft="tiny-noisy")
    paper.draft = pair.draft
    paper.configure_model()
    with pytest.raises(ValueError, match="head_stats"):
        paper.batch_logits(batch)


def test_batched_left_padded_sampling_equals_one_prompt_at_a_time(pair):
    encoded = [pair.encode(p) for p in PROMPTS[:5]]
    g = torch.Generator().manual_seed(0)
    batched = sample_responses(pair.target, encoded, SamplingConfig(0), 10, {0}, 0, g)
    for ids, resp in zip(encoded, batched):
        alone = pair.target.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=0,
                                     pad_token_id=0)[0, len(ids):].tolist()
        assert resp == alone[: len(resp)] and (len(resp) == 10 or resp[-1] == 0)


def test_mixing_masks_exactly_the_draft_positions_and_redraws_each_epoch(pair, tmp_path):
    records, _ = load_prepared(prepare(pair, PROMPTS, CFG, tmp_path))
    ds = MixedDataset(records * 40, mixing_ratio=0.3, seed=5)
    n_target = n_resp = 0
    for index in range(len(ds)):
        item, rec = ds[(index, 0)], ds.records[index]
        n_p = len(rec.prompt)
        assert not item["loss_mask"][:n_p].any()
        z, m = item["input_ids"][n_p:], item["loss_mask"][n_p:]
        assert torch.equal(z[m], rec.draft[m]) and torch.equal(z[~m], rec.target[~m])
        assert torch.equal(item["labels"][n_p:][m], rec.p_acc[m])
        n_target, n_resp = n_target + int((~m).sum()), n_resp + len(m)
    share, sd = n_target / n_resp, (0.3 * 0.7 / n_resp) ** 0.5
    assert abs(share - 0.3) < 5 * sd  # fails by chance with probability < 1e-6
    assert torch.equal(ds[(3, 0)]["loss_mask"], ds[(3, 0)]["loss_mask"])  # seeded
    assert any(not torch.equal(ds[(i, 0)]["loss_mask"], ds[(i, 1)]["loss_mask"]) for i in range(10))  # re-drawn
    fixed = MixedDataset(records, mixing_ratio=0.3, seed=5, redraw=False)  # validation: one mixing for all epochs
    assert all(torch.equal(fixed[(i, 0)]["loss_mask"], fixed[(i, 3)]["loss_mask"]) for i in range(len(records)))


def test_collate_right_pads_with_no_loss_on_padding(pair, tmp_path):
    records, _ = load_prepared(prepare(pair, PROMPTS, CFG, tmp_path))
    ds = MixedDataset(records)
    items = [ds[i] for i in range(4)]
    batch = collate(items, pad_id=0)
    for row, it in enumerate(items):
        n = len(it["input_ids"])
        assert batch["attention_mask"][row, :n].all() and not batch["attention_mask"][row, n:].any()
        assert not batch["loss_mask"][row, n:].any()


def test_interrupted_preparation_resumes_without_loss_or_duplicates(pair, tmp_path, monkeypatch):
    reference, _ = load_prepared(prepare(pair, PROMPTS, CFG, tmp_path / "whole"))
    calls = {"n": 0}
    real = data.label_responses

    def dies_on_third_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C in the middle of batch 3
        return real(*args, **kwargs)

    monkeypatch.setattr(data, "label_responses", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        prepare(pair, PROMPTS, CFG, tmp_path / "resumed")
    assert len(list((tmp_path / "resumed").glob("*.sha256"))) == 2
    with pytest.raises(FileNotFoundError, match="no complete prepared data"):
        load_prepared(tmp_path / "resumed")
    calls["n"] = 10  # from here on the wrapper just counts
    prepare(pair, PROMPTS, CFG, tmp_path / "resumed")
    assert calls["n"] == 11  # only the missing shard (3 prompts per shard, 8 prompts: shards 0, 1, 2) was built
    resumed, _ = load_prepared(tmp_path / "resumed")
    assert same_records(resumed, reference)


def test_damaged_shard_is_detected_and_rebuilt(pair, tmp_path):
    out = prepare(pair, PROMPTS, CFG, tmp_path)
    reference, _ = load_prepared(out)
    shard = out / "shard_00001.safetensors"
    blob = bytearray(shard.read_bytes())
    blob[-5] ^= 0xFF
    shard.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="damaged"):
        load_prepared(out)
    prepare(pair, PROMPTS, CFG, out)
    assert same_records(load_prepared(out)[0], reference)


def test_too_long_prompts_are_skipped_and_counted(pair, tmp_path):
    cfg = PrepareConfig(max_new_tokens=4, batch_size=4, max_prompt_tokens=3)
    records, skipped = load_prepared(prepare(pair, PROMPTS, cfg, tmp_path))
    assert skipped == sum(len(pair.encode(p)) > 3 for p in PROMPTS) > 0
    assert len(records) == len(PROMPTS) - skipped
    assert summarize(records, skipped)["skipped_too_long"] == skipped


def test_epoch_sampler_shards_across_ranks_and_reshuffles():
    ds = list(range(10))
    ranks = [list(EpochSampler(ds, 2, r, shuffle=True, seed=0)) for r in range(2)]
    assert sorted(i for r in ranks for i, _ in r) == list(range(10))
    s = EpochSampler(ds, 1, 0, shuffle=True, seed=0)
    first = [i for i, _ in s]
    s.set_epoch(1)
    assert [e for _, e in s] == [1] * 10 and [i for i, _ in s] != first


def test_prompt_sources_and_bad_input(tmp_path):
    assert load_prompts("gsm8k", limit=2)[0].endswith("### Response: Let's think step by step.")
    assert "Create a Python script for this problem:" in load_prompts("humaneval", limit=1)[0]
    train, dev = load_prompts("alpaca", "train", 50), load_prompts("alpaca", "dev", 50)
    assert not set(train) & set(dev) and train == load_prompts("alpaca", "train", 50)  # fixed-seed split
    with pytest.raises(FileNotFoundError, match="set data_dir"):
        load_prompts("alpaca", "train", 5, data_dir=tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(str(empty))
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps([{"text": "hello"}]))
    assert load_prompts(str(mine), field="text") == ["hello"]
    with pytest.raises(ValueError, match="has no 'prompt' field"):
        load_prompts(str(mine))
    with pytest.raises(ValueError, match="is empty"):
        MixedDataset([])


def saved_pair_and_prompts(tmp_path):
    """A tiny target "t" and its noisy draft "d" saved under tmp_path, and a JSONL file of PROMPTS; returns its path."""
    tok = word_tokenizer(WORDS)
    target = tiny_llama(0, vocab=len(tok), sharpness=3.0, eos=0)
    for name, model in {"t": target, "d": noisy_draft(target, 0.5)}.items():
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return prompts


def test_datamodule_prepares_once_and_serves_mixed_batches(tmp_path):
    prompts = saved_pair_and_prompts(tmp_path)
    kwargs = dict(target=str(tmp_path / "t"), draft=str(tmp_path / "d"), dataset=str(prompts), train_prompts=6,
                  val_prompts=2, max_new_tokens=6, prepare_batch_size=4, batch_size=3, cache_dir=str(tmp_path / "c"))
    with pytest.raises(FileNotFoundError, match="data.prepare: true"):
        AcceptanceDataModule(**kwargs, prepare=False).prepare_data()
    dm = AcceptanceDataModule(**kwargs)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 3 and batch["loss_mask"].any()
    assert len(dm.datasets["train"]) == 6 and len(dm.datasets["val"]) == 2
    AcceptanceDataModule(**kwargs, prepare=False).prepare_data()  # now cached: no error, no work
    feats = AcceptanceDataModule(**kwargs, features=True)
    assert feats.dirs() != dm.dirs()  # features: their own preparation
    feats.prepare_data()
    feats.setup("fit")
    batch = next(iter(feats.train_dataloader()))
    assert set(batch) == {"hidden", "stats", "labels", "loss_mask"}
    assert batch["hidden"].shape[:2] == batch["labels"].shape
    kwargs["seed"] = 3  # a setting prepared only with features: token batches come from the feature records
    AcceptanceDataModule(**kwargs, features=True).prepare_data()
    tokens = AcceptanceDataModule(**kwargs, prepare=False)
    assert tokens.dirs() == AcceptanceDataModule(**kwargs, features=True).dirs()
    tokens.setup("fit")
    assert "input_ids" in next(iter(tokens.train_dataloader()))


def test_a_file_or_test_set_splits_in_order_into_exactly_the_asked_counts(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    dm = AcceptanceDataModule(dataset=str(prompts), train_prompts=2, val_prompts=5)  # more val than train
    assert dm.split_prompts() == {"train": PROMPTS[:2], "val": PROMPTS[2:7]}
    probe = AcceptanceDataModule(dataset="humaneval", train_prompts=15, val_prompts=40)
    assert probe.split_prompts()["val"] == load_prompts("humaneval", "test", 55)[15:]
    for train, val in [(6, 3), (8, 0)]:  # 9 of 8 prompts; an empty dev split
        with pytest.raises(ValueError, match=f"train_prompts={train} and val_prompts={val} .* has 8"):
            AcceptanceDataModule(dataset=str(prompts), train_prompts=train, val_prompts=val).split_prompts()


def test_bundled_prompt_sets_load_without_any_data_folder(monkeypatch):
    """A fresh clone anywhere: with no $SPECDECPP_DATA_DIR the copies shipped in the package are used."""
    monkeypatch.delenv("SPECDECPP_DATA_DIR", raising=False)
    from specdecpp.prompts import BUNDLED

    assert len(load_prompts("alpaca", "test")) == 2000 and len(load_prompts("alpaca", "train")) == 40_000
    assert len(load_prompts("humaneval")) == 164 and len(load_prompts("gsm8k")) == 1319
    assert load_prompts("gsm8k", limit=1, data_dir=BUNDLED)[0].endswith("Let's think step by step.")


def test_a_local_dataset_folder_loads_through_the_datasets_library(tmp_path):
    folder = tmp_path / "my_prompts"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(json.dumps({"question": f"q{i}?"}) for i in range(5)))
    assert load_prompts(str(folder), "train", field="question") == [f"q{i}?" for i in range(5)]
    with pytest.raises(ValueError, match="has no 'prompt' field"):
        load_prompts(str(folder), "train")


def test_known_hub_ids_give_the_bundled_sets_bodies(monkeypatch):
    """tatsu-lab/alpaca, openai/gsm8k: the datasets library's records formatted as the bundled copies are (the hub
    is unreachable here, so load_dataset is answered from the bundled files)."""
    import datasets

    from specdecpp.prompts import BUNDLED, read_records

    files = {"tatsu-lab/alpaca": "alpaca/alpaca_data.jsonl.gz", "openai/gsm8k": "gsm8k/test.jsonl.gz"}
    asked = []

    def fake_load_dataset(name, config=None, split=None):
        asked.append((name, config, split))
        return datasets.Dataset.from_list(read_records(BUNDLED / files[name]))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_prompts("tatsu-lab/alpaca", "dev", 20) == load_prompts("alpaca", "dev", 20)
    assert load_prompts("openai/gsm8k", "test", 5) == load_prompts("gsm8k", "test", 5)
    assert asked == [("tatsu-lab/alpaca", None, "train"), ("openai/gsm8k", "main", "test")]


@pytest.mark.parametrize("name, match", [("nosuchset", "unknown dataset 'nosuchset'"),
                                         ("someone/not-cached", "could not load dataset 'someone/not-cached'")])
def test_unknown_names_and_unreachable_hub_ids_say_what_was_tried(name, match, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ValueError, match=match):
        load_prompts(name)


def test_adding_prompts_prepares_only_the_new_blocks(tmp_path, monkeypatch):
    prompts = saved_pair_and_prompts(tmp_path)
    monkeypatch.setattr(data, "BLOCK_PROMPTS", 4)
    calls = {"n": 0}
    real = data.label_responses

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(data, "label_responses", counting)
    kwargs = dict(target=str(tmp_path / "t"), draft=str(tmp_path / "d"), dataset=str(prompts), val_prompts=2,
                  max_new_tokens=5, prepare_batch_size=2, cache_dir=str(tmp_path / "c"))
    small = AcceptanceDataModule(**kwargs, train_prompts=4)  # train: prompts 0-3, one block of 2 shards; val 4-5
    small.prepare_data()
    assert calls["n"] == 3
    calls["n"] = 0
    large = AcceptanceDataModule(**kwargs, train_prompts=6)  # train: 0-5 in blocks 0-3 and 4-5; val: 6-7
    large.prepare_data()
    # blocks are keyed by their prompts: 0-3 was the small run's train block, 4-5 its val block; only 6-7 is new
    assert calls["n"] == 1 and large.dirs()["train"] == [small.dirs()["train"][0], small.dirs()["val"][0]]
    large.setup("fit")
    records = large.datasets["train"].records
    assert [r.index for r in records] == list(range(6))
    assert [r.prompt.tolist() for r in records] == [pair_encode(word_tokenizer(WORDS), p) for p in PROMPTS[:6]]


def pair_encode(tok, prompt):
    return ModelPair(None, None, tok).encode(prompt)
