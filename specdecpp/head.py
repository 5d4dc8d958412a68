"""The acceptance prediction head: draft hidden state -> logit of P(Y_i accepted | Y_<i accepted, prefix).

D independent residual blocks x + SiLU(Linear(x)), then Linear(H -> 1). Plain `nn.Module`, no Lightning, so
the decoder imports it alone. Also loads upstream SpecDec++ checkpoints (2 logits, tied blocks).

With `n_stats > 0` the head also reads the draft's statistics of the token it scores (log q(Y), entropy, log of
the top-2 margin: `stat_features`) through their own small path, whose logit is added to the hidden-state
path's. Such a head scores Y_i from the forward that proposed it (no one-token lag): the hidden state that
produced q_i and q_i's statistics. The paper's head (n_stats = 0) scores the token its hidden state sits on.
With `use_hidden=False` a statistics head reads the statistics only (an ablation: what the hidden state adds).
"""

from __future__ import annotations

import json
import shutil
import weakref
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import replace_dir
from .lowp import dtype_name

CONFIG, WEIGHTS = "config.json", "model.safetensors"


class ResBlock(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + nn.functional.silu(self.linear(x))


N_STATS = 3
STATS_WIDTH = 32


def stat_features(prob: torch.Tensor, entropy: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """[...] draft statistics -> [..., 3] head inputs, log scales where near-ties and low confidence live."""
    return torch.stack([prob.float().clamp_min(1e-6).log(), entropy.float(), margin.float().clamp_min(1e-4).log()], -1)


FINGERPRINT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@torch.no_grad()
def draft_fingerprint(model: nn.Module, dtype: torch.dtype | None = None) -> list[float]:
    """Sums of the draft's first and last weight tensors (cast to `dtype` first, if given): tells two drafts of one
    shape apart, cheaply."""
    params = list(model.parameters())
    return [float(params[i].to(dtype or params[i].dtype).double().sum()) for i in (0, -1)]


def draft_fingerprints(model: nn.Module) -> dict[str, list[float]]:
    """The draft's fingerprint in each dtype it may run in: a head trained on an fp32 draft then recognises that
    draft's own bf16 or fp16 copy (the same cast of the same weights), and nothing else."""
    return {dtype_name(dt): draft_fingerprint(model, dt) for dt in FINGERPRINT_DTYPES}


def _same(a, b) -> bool:
    if isinstance(a, list) and isinstance(b, list):  # fingerprints: sums in float64 of the same weights
        return len(a) == len(b) and all(abs(x - y) <= 1e-6 * max(1.0, abs(x)) for x, y in zip(a, b))
    return a == b


class AcceptanceHead(nn.Module):
    def __init__(self, hidden_size: int, num_layers: int = 3, draft: dict | None = None, n_stats: int = 0,
                 use_hidden: bool = True):
        super().__init__()
        if hidden_size < 1 or num_layers < 0 or n_stats not in (0, N_STATS):
            raise ValueError(f"need hidden_size >= 1, num_layers >= 0 and n_stats 0 or {N_STATS}, got "
                             f"{hidden_size}, {num_layers}, {n_stats}")
        if not (use_hidden or n_stats):
            raise ValueError("a head that reads no hidden state must read the draft's statistics (n_stats > 0)")
        self.hidden_size, self.num_layers, self.n_stats, self.use_hidden = hidden_size, num_layers, n_stats, use_hidden
        self.draft = draft or {}  # identity of the draft it was trained on (name, hidden size, depth, fingerprint)
        self._fits: weakref.WeakSet = weakref.WeakSet()  # draft models check_draft accepted
        self.blocks = nn.ModuleList(ResBlock(hidden_size) for _ in range(num_layers if use_hidden else 0))
        self.out = nn.Linear(hidden_size, 1) if use_hidden else None
        if n_stats and use_hidden:  # the hidden-state path starts silent, so the head starts from the statistics
            nn.init.zeros_(self.out.weight)
        if n_stats:
            self.stats = nn.Sequential(nn.Linear(n_stats, STATS_WIDTH), nn.SiLU(), nn.Linear(STATS_WIDTH, 1))
        # post-hoc Platt scaling (a, b): logit -> a logit + b, fitted on the dev split after training (else identity)
        self.register_buffer("calibration", torch.tensor([1.0, 0.0]))

    @property
    def lagged(self) -> bool:
        """True for the paper's head: it scores the token its hidden state sits on (one behind the newest)."""
        return self.n_stats == 0

    def forward(self, hidden: torch.Tensor, stats: torch.Tensor | None = None) -> torch.Tensor:
        """[..., H] (and [..., n_stats] from `stat_features`) -> [...] acceptance logits."""
        if self.n_stats and stats is None:
            raise ValueError("this acceptance head reads the draft's statistics: pass `stats`")
        logit = 0
        if self.use_hidden:
            x = hidden.to(self.out.weight.dtype)
            for block in self.blocks:
                x = block(x)
            logit = self.out(x)[..., 0]
        if self.n_stats:
            stats_in = self.stats[0].weight
            logit = logit + self.stats(stats.to(stats_in.dtype))[..., 0]
        return logit * self.calibration[0] + self.calibration[1]

    def check_draft(self, draft) -> None:
        """Refuse a draft (a model, or its config) other than the one the head was trained on: its hidden size,
        depth and vocabulary, and with a model its weights' fingerprint, where the head recorded them."""
        if draft in self._fits:
            return
        config = getattr(draft, "config", draft)
        seen = {k: getattr(config, attr, None) for k, attr in (("hidden_size", "hidden_size"),
                ("num_layers", "num_hidden_layers"), ("vocab_size", "vocab_size"))}
        trained = {**self.draft, "hidden_size": self.hidden_size}
        if isinstance(draft, nn.Module) and ("fingerprint" in trained or "fingerprints" in trained):
            dtype = next(draft.parameters()).dtype
            seen["fingerprint"] = draft_fingerprint(draft)
            if "fingerprints" in trained:  # one per dtype; a head from before them knows its draft's own dtype only
                trained["fingerprint"] = trained.pop("fingerprints").get(dtype_name(dtype), f"none for {dtype}")
        differ = {k: (trained[k], v) for k, v in seen.items()
                  if k in trained and v is not None and not _same(trained[k], v)}
        if differ:
            raise ValueError(f"acceptance head trained on draft {self.draft.get('name', '?')!r} does not fit this "
                             f"draft: " + ", ".join(f"{k} {a} (trained) vs {b} (given)" for k, (a, b) in differ.items())
                             + "; train a head for this draft, or pass the draft it was trained on")
        if isinstance(draft, nn.Module):
            self._fits.add(draft)  # checked once per draft model: the fingerprint reads its largest weights

    def save_pretrained(self, path: str | Path) -> Path:
        """Write config and weights to a new folder, then put it in `path`'s place: an interrupted export leaves
        the previous head whole (never new config beside old weights)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        config = {"hidden_size": self.hidden_size, "num_layers": self.num_layers, "n_stats": self.n_stats,
                  "use_hidden": self.use_hidden, "calibration": self.calibration.tolist(), "draft": self.draft,
                  "format": "specdecpp"}
        (tmp / CONFIG).write_text(json.dumps(config, indent=2))
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, tmp / WEIGHTS)
        return replace_dir(tmp, path)

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str = "cpu") -> AcceptanceHead:
        """A head exported by `save_pretrained` (or an upstream SpecDec++ checkpoint); a damaged folder is refused
        with the file and what is wrong with it."""
        path = Path(path)
        if not (path / CONFIG).is_file():
            raise FileNotFoundError(f"no acceptance head at {path} (expected {CONFIG} and weights)")
        try:
            config = json.loads((path / CONFIG).read_text())
            if not isinstance(config, dict):
                raise ValueError(f"a JSON object was expected, got {type(config).__name__}")
        except ValueError as e:
            raise ValueError(f"acceptance head {path}: {path / CONFIG} is not a valid head config ({e})") from None
        try:
            return cls._load(path, config, map_location)
        except (SafetensorError, KeyError, RuntimeError, OSError, ValueError) as e:
            raise ValueError(f"acceptance head {path} is damaged or incomplete: {type(e).__name__}: {e} (files: "
                             f"{sorted(f.name for f in path.iterdir())}); export it again") from None

    @classmethod
    def _load(cls, path: Path, config: dict, map_location: str) -> AcceptanceHead:
        if config.get("format") == "specdecpp":
            head = cls(config["hidden_size"], config["num_layers"], config.get("draft"), config.get("n_stats", 0),
                       config.get("use_hidden", True))
            state = load_file(path / WEIGHTS, device=map_location)
            state.setdefault("calibration", head.calibration)  # heads saved before calibration existed
            head.load_state_dict(state, strict=True)
            return head
        return cls._from_upstream(path, config, map_location)

    @classmethod
    def _from_upstream(cls, path: Path, config: dict, map_location: str) -> AcceptanceHead:
        """Upstream layout: keys model.{i}.linear.* (i < D) and model.{D}.* with 2 logits [reject, accept].

        softmax(l)[1] = sigmoid(l1 - l0), so the two output rows collapse into one acceptance logit.
        """
        files = [path / WEIGHTS, path / "pytorch_model.bin"]
        found = next((f for f in files if f.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"no weights in {path} (looked for {WEIGHTS} and pytorch_model.bin)")
        state = (load_file(found, device=map_location) if found.suffix == ".safetensors"
                 else torch.load(found, map_location=map_location, weights_only=True))
        depth = config["num_layers"]
        head = cls(config["hidden_size"], depth, {"name": "upstream", "hidden_size": config["hidden_size"]})
        mapped = {f"blocks.{i}.linear.{p}": state[f"model.{i}.linear.{p}"] for i in range(depth)
                  for p in ("weight", "bias")}
        w, b = state[f"model.{depth}.weight"], state[f"model.{depth}.bias"]
        mapped["out.weight"], mapped["out.bias"] = (w[1] - w[0])[None], (b[1] - b[0])[None]
        mapped["calibration"] = head.calibration
        head.load_state_dict(mapped, strict=True)
        return head


def fit_platt(logits: torch.Tensor, labels: torch.Tensor, steps: int = 200) -> tuple[float, float]:
    """Platt scaling: (a, b) minimising the unweighted log loss of sigmoid(a z + b) against (soft) labels.
    A head trained with w_rej != 1 predicts low on purpose; this maps its logits back to probabilities."""
    z, p = logits.detach().double().flatten(), labels.detach().double().flatten()
    ab = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([ab], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(ab[0] * z + ab[1], p)
        loss.backward()
        return loss

    opt.step(closure)
    a, b = ab.detach().tolist()
    return a, b

