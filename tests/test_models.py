import copy
import json

import pytest
import torch
from conftest import tiny_llama, word_tokenizer

import specdecpp.models
from specdecpp import ConstantK, Margin, SamplingConfig, TargetOnly, load_pair, self_draft, speculative_generate
from specdecpp.lowp import fp32_linears

WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran"]


def save(tmp_path, name, model, tokenizer):
    path = tmp_path / name
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_load_pair_from_local_directories_and_generate(tmp_path):
    tok = word_tokenizer(WORDS)
    target = save(tmp_path, "target", tiny_llama(0, vocab=len(tok)), tok)
    draft = save(tmp_path, "draft", tiny_llama(1, layers=1, vocab=len(tok)), tok)
    pair = load_pair(target, draft)
    out = pair.generate("the cat sat", ConstantK(2), SamplingConfig(0), max_new_tokens=8, chat=False)
    assert len(out.tokens) <= 8 and isinstance(out.text, str)
    assert pair.names == {"target": str(target), "draft": str(draft)}


def test_mismatched_tokenizers_are_refused_naming_both_models(tmp_path):
    tok_a, tok_b = word_tokenizer(WORDS), word_tokenizer(WORDS[::-1])  # same size, different ids
    target = save(tmp_path, "target", tiny_llama(0, vocab=len(tok_a)), tok_a)
    draft = save(tmp_path, "draft", tiny_llama(1, vocab=len(tok_b)), tok_b)
    with pytest.raises(ValueError, match="different tokenizers") as err:
        load_pair(target, draft)
    assert str(target) in str(err.value) and str(draft) in str(err.value)


def test_mismatched_vocabulary_sizes_are_refused(tmp_path):
    tok = word_tokenizer(WORDS)
    target = save(tmp_path, "target", tiny_llama(0, vocab=len(tok)), tok)
    draft = save(tmp_path, "draft", tiny_llama(1, vocab=len(tok) + 6), tok)
    with pytest.raises(ValueError, match="different vocabulary sizes"):
        load_pair(target, draft)


@pytest.mark.parametrize("ref", ["/nonexistent/model", "./missing-dir", "/tmp/nothing-here/model.gguf"])
def test_missing_model_files_are_named(ref):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_pair(ref, ref)


def test_empty_text_prompt_is_refused(tmp_path):
    tok = word_tokenizer(WORDS)
    path = save(tmp_path, "target", tiny_llama(0, vocab=len(tok)), tok)
    pair = load_pair(path, 1)
    with pytest.raises(ValueError, match="prompt is empty"):
        pair.generate("   ", ConstantK(2))


def test_self_draft_runs_the_first_k_layers_of_the_target():
    target = tiny_llama(0, layers=4)
    draft = self_draft(target, 2)
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        hidden = target(ids, output_hidden_states=True).hidden_states[2]  # output of layer 2, before the final norm
        expected = target.lm_head(target.model.norm(hidden))
        assert torch.allclose(draft(ids).logits, expected, atol=1e-5)
    assert draft.lm_head.weight.data_ptr() == target.lm_head.weight.data_ptr()  # shared, not copied
    assert len(draft.model.layers) == 2 and len(target.model.layers) == 4
    with pytest.raises(ValueError, match="num_layers < 4"):
        self_draft(target, 4)


def test_precision_draft_is_the_target_in_another_dtype(tmp_path):
    tok = word_tokenizer(WORDS)
    path = save(tmp_path, "target", tiny_llama(0, vocab=len(tok), sharpness=4.0), tok)
    pair = load_pair(path, "copy:bfloat16")
    assert pair.draft.dtype == torch.bfloat16 and pair.target.dtype == torch.float32
    assert pair.draft is not pair.target and pair.names["draft"] == "copy:bfloat16"
    for name, t in pair.target.state_dict().items():  # the same weights, rounded
        assert torch.equal(pair.draft.state_dict()[name], t.to(torch.bfloat16)), name
    greedy = SamplingConfig(0)
    reference = pair.generate([3, 4, 5], TargetOnly(), greedy, max_new_tokens=24).tokens  # = HF generate elsewhere
    for policy in (ConstantK(4), Margin(0.2, k_max=8)):
        assert pair.generate([3, 4, 5], policy, greedy, max_new_tokens=24).tokens == reference


def test_unknown_precision_draft_dtype_is_refused_by_name(tmp_path):
    tok = word_tokenizer(WORDS)
    path = save(tmp_path, "target", tiny_llama(0, vocab=len(tok)), tok)
    with pytest.raises(ValueError, match="unknown dtype 'int3' in precision draft 'copy:int3'"):
        load_pair(path, "copy:int3")


def test_a_precision_draft_no_faster_than_the_target_is_reported(tmp_path, monkeypatch):
    tok = word_tokenizer(WORDS)
    path = save(tmp_path, "target", tiny_llama(0, vocab=len(tok)), tok)
    monkeypatch.setattr(specdecpp.models, "draft_step_ratio", lambda target, draft: 1.3)
    with pytest.warns(UserWarning, match="steps at 1.30 of the target's time"):
        load_pair(path, "copy:bfloat16")


@pytest.mark.parametrize("device", ["auto", "map"])
def test_a_target_placed_by_a_device_map_decodes_like_one_on_a_device(tmp_path, device):
    """The accelerate placement path ("auto", or a map of modules to devices) on CPU entries. On a GPU node the same
    call spreads a big target over the GPUs and puts the draft on the first one (not run here: no GPUs)."""
    tok = word_tokenizer(WORDS)
    path = save(tmp_path, "target", tiny_llama(0, layers=2, vocab=len(tok), sharpness=4.0), tok)
    if device == "map":
        device = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    placed, plain = load_pair(path, 1, device=device), load_pair(path, 1)
    assert placed.draft.device == placed.target.device
    for policy in (ConstantK(3), TargetOnly()):
        a = placed.generate([3, 4, 5], policy, SamplingConfig(0), max_new_tokens=12).tokens
        assert a == plain.generate([3, 4, 5], policy, SamplingConfig(0), max_new_tokens=12).tokens


def test_the_engine_decodes_through_accelerate_dispatch_hooks():
    """A target dispatched module by module (the hooks that move activations between devices on a multi-GPU map,
    forced here on one CPU): speculative decoding still equals greedy decoding."""
    from accelerate import dispatch_model

    target = tiny_llama(0, layers=2, sharpness=4.0)
    reference = speculative_generate(target, None, [3, 4, 5], TargetOnly(), SamplingConfig(0), max_new_tokens=16)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    hooked = dispatch_model(copy.deepcopy(target), device_map, force_hooks=True)
    assert any(hasattr(m, "_hf_hook") for m in hooked.modules())
    out = speculative_generate(hooked, self_draft(hooked, 1), [3, 4, 5], ConstantK(3), SamplingConfig(0),
                               max_new_tokens=16)
    assert out.tokens == reference.tokens


def test_fp32_linears_keep_a_bf16_models_values_and_restore_it(avx2_only):
    model = tiny_llama(0, layers=2).to(torch.bfloat16).eval()
    ids = torch.randint(0, 64, (3, 9))
    with torch.no_grad():
        native = model(ids).logits.float()
        with fp32_linears(model):
            assert all("forward" in vars(m) for m in model.modules() if isinstance(m, torch.nn.Linear))
            emulated = model(ids).logits
        assert emulated.dtype == torch.bfloat16
        assert not any("forward" in vars(m) for m in model.modules())  # the class's forward again
        assert torch.equal(model(ids).logits.float(), native)
    # fp32 products of the same bf16 values: rounding differences of the order of bf16's step, no more
    step = native.abs().max() * 2 ** -7
    assert (emulated.float() - native).abs().max() <= 4 * step
    assert (emulated.float().argmax(-1) == native.argmax(-1)).float().mean() > 0.9
    fp32 = tiny_llama(0, layers=2).eval()
    with torch.no_grad(), fp32_linears(fp32):  # nothing to do for a float32 model
        assert not any("forward" in vars(m) for m in fp32.modules())


def test_training_forward_of_a_bf16_draft_runs_with_fp32_products(avx2_only):
    """The token path of training runs a bf16 draft's decoder and LM head inside fp32_linears (CPU)."""
    from specdecpp.training import AcceptanceHeadModule

    module = AcceptanceHeadModule(target="tiny", draft="tiny-bf16", head_stats=True)
    module.draft = tiny_llama(0, layers=2).to(torch.bfloat16).eval()
    module.configure_model()
    torch.nn.init.normal_(module.head.out.weight)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        logits = module(ids, torch.ones_like(ids))
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    assert not any("forward" in vars(m) for m in module.draft.modules())


def test_fp32_copies_are_kept_with_the_model_and_follow_its_weights(avx2_only):
    from specdecpp.lowp import FP32_FROM_ROWS, has_slow_linears, rows_products

    model = tiny_llama(0, layers=1).to(torch.bfloat16).eval()
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        with fp32_linears(model):
            first = model(ids).logits
        copies = dict(model.__dict__["_fp32_copies"])
        with fp32_linears(model):  # the second entry converts nothing
            assert torch.equal(model(ids).logits, first)
        assert all(model.__dict__["_fp32_copies"][k][2] is c[2] for k, c in copies.items())
        model.lm_head.weight.mul_(2)  # a weight changed in place: its copy is made again
        with fp32_linears(model):
            assert not torch.equal(model(ids).logits, first)
        assert model.lm_head.weight.dtype == torch.bfloat16
        assert torch.equal(model.__dict__["_fp32_copies"][id(model.lm_head.weight)][2],
                           model.lm_head.weight.float())
    assert "_fp32_copies" not in model.state_dict()
    assert has_slow_linears(model) and not has_slow_linears(tiny_llama(0, layers=1))
    with rows_products(model, FP32_FROM_ROWS - 1, True):
        assert not any("forward" in vars(m) for m in model.modules())
    with rows_products(model, FP32_FROM_ROWS, True):
        assert any("forward" in vars(m) for m in model.modules())
    with rows_products(model, FP32_FROM_ROWS, False):
        assert not any("forward" in vars(m) for m in model.modules())


def test_a_cpu_with_native_bf16_kernels_runs_a_bf16_model_on_them_and_an_fp16_one_through_fp32(monkeypatch):
    import specdecpp.lowp as lowp

    monkeypatch.setattr(lowp, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))
    bf16, fp16 = (tiny_llama(0, layers=1).to(dtype).eval() for dtype in (torch.bfloat16, torch.float16))
    assert not lowp.has_slow_linears(bf16) and lowp.has_slow_linears(fp16)
    with fp32_linears(bf16):
        assert not any("forward" in vars(m) for m in bf16.modules())
    monkeypatch.setattr(lowp, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "amx_bf16", "amx_fp16"}))
    assert not lowp.has_slow_linears(bf16) and not lowp.has_slow_linears(fp16)


def test_copy_auto_picks_the_faster_copy_and_caches_the_choice_per_cpu(tmp_path, monkeypatch):
    """A fake timer makes fp16 the faster copy: chosen; the choice is cached for this CPU and model (no second
    measurement), and measured again on a CPU whose flags differ."""
    import specdecpp.probe as probe

    target = tiny_llama(0)
    timed = []

    def fake_ratio(target, draft):
        timed.append(draft.dtype)
        return {torch.bfloat16: 0.8, torch.float16: 0.5}[draft.dtype]

    cache = tmp_path / "copy_dtype.json"
    monkeypatch.setattr(probe, "cpu_description", lambda: "Some CPU, 2 cores, avx2")
    dtype, ratios = probe.choose_copy_dtype(target, "tiny", cache, fake_ratio)
    assert dtype == torch.float16 and ratios == {"bfloat16": 0.8, "float16": 0.5} and len(timed) == 2
    assert probe.choose_copy_dtype(target, "tiny", cache, fake_ratio)[0] == torch.float16 and len(timed) == 2
    monkeypatch.setattr(probe, "cpu_description", lambda: "Some CPU, 2 cores, avx2 avx512f avx512_bf16")
    probe.choose_copy_dtype(target, "tiny", cache, lambda t, d: {torch.bfloat16: 0.4, torch.float16: 0.9}[d.dtype])
    assert probe.choose_copy_dtype(target, "tiny", cache, fake_ratio)[0] == torch.bfloat16  # its own entry
    assert len(json.loads(cache.read_text())) == 2


def test_pair_dtype_auto_picks_the_fastest_round_and_caches_it_per_cpu(tmp_path, monkeypatch):
    """A fake timer makes bf16 the fastest round: chosen, cached for this CPU and pair, measured again on a CPU whose
    flags differ; the real timer runs a round of the engine's shape on the tiny pair."""
    import specdecpp.probe as probe

    target, draft = tiny_llama(0), tiny_llama(1)
    timed = []

    def fake_round(t, d):
        assert t.dtype == d.dtype  # both models of the pair in the candidate dtype
        timed.append(t.dtype)
        return {torch.float32: 0.30, torch.bfloat16: 0.20, torch.float16: 0.25}[t.dtype]

    cache = tmp_path / "pair_dtype.json"
    monkeypatch.setattr(probe, "cpu_description", lambda: "Some CPU, 2 cores, avx2")
    dtype, seconds = probe.choose_pair_dtype(target, draft, "t drafted by d", cache, fake_round)
    assert dtype == torch.bfloat16 and seconds == {"float32": 0.30, "bfloat16": 0.20, "float16": 0.25}
    assert probe.choose_pair_dtype(target, draft, "t drafted by d", cache, fake_round)[0] == torch.bfloat16
    assert len(timed) == 3 * probe.PASSES and target.dtype == draft.dtype == torch.float32  # cached; fp32 untouched
    monkeypatch.setattr(probe, "cpu_description", lambda: "Some CPU, 2 cores, avx2 avx512f")
    assert probe.choose_pair_dtype(target, draft, "t drafted by d", cache,
                                   lambda t, d: 0.1 if t.dtype == torch.float32 else 0.5)[0] == torch.float32
    assert len(json.loads(cache.read_text())) == 2
    assert 0 < probe.round_seconds(target, draft, k=3, repeats=1) < 10


def test_pair_probe_candidates_take_turns_so_a_load_arriving_midway_does_not_decide(tmp_path):
    """A load that starts after the first pass (three rounds) adds 0.5 s to every later round: the candidates take
    turns in their order, and each keeps its best round, the unloaded one, so the load decides nothing."""
    import specdecpp.probe as probe

    order = []

    def loaded_round(t, d):
        order.append(t.dtype)
        return {torch.float32: 0.30, torch.bfloat16: 0.20, torch.float16: 0.25}[t.dtype] + 0.5 * (len(order) > 3)

    dtype, seconds = probe.choose_pair_dtype(tiny_llama(0), tiny_llama(1), "t drafted by d", None, loaded_round, 2)
    assert dtype == torch.bfloat16 and seconds == {"float32": 0.30, "bfloat16": 0.20, "float16": 0.25}
    assert order == list(probe.PAIR_CANDIDATES) * 2


def test_load_pair_dtype_auto_loads_both_models_in_the_measured_dtype(tmp_path, monkeypatch, capsys):
    import specdecpp.probe as probe

    tok = word_tokenizer(WORDS)
    target = save(tmp_path, "target", tiny_llama(0, vocab=len(tok)), tok)
    draft = save(tmp_path, "draft", tiny_llama(1, vocab=len(tok)), tok)
    monkeypatch.setenv("SPECDECPP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(probe, "round_seconds", lambda t, d: {torch.float32: 0.3, torch.bfloat16: 0.4,
                                                              torch.float16: 0.2}[t.dtype])
    pair = load_pair(target, draft, dtype="auto")
    assert pair.target.dtype == pair.draft.dtype == torch.float16
    assert "dtype auto -> float16" in capsys.readouterr().out
    with pytest.raises(ValueError, match="picks one dtype for both models"):
        load_pair(target, "copy:bfloat16", dtype="auto")


def test_load_pair_resolves_copy_auto_to_the_measured_dtype(tmp_path, monkeypatch, capsys):
    import specdecpp.probe as probe

    tok = word_tokenizer(WORDS)
    path = save(tmp_path, "target", tiny_llama(0, vocab=len(tok)), tok)
    monkeypatch.setenv("SPECDECPP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(probe, "draft_step_ratio", lambda t, d: {torch.bfloat16: 0.6, torch.float16: 0.7}[d.dtype])
    monkeypatch.setattr(specdecpp.models, "draft_step_ratio", lambda target, draft: 0.6)
    pair = load_pair(path, "copy:auto")
    assert pair.draft.dtype == torch.bfloat16 and pair.names["draft"] == "copy:bfloat16"
    assert "copy:auto -> copy:bfloat16" in capsys.readouterr().out
