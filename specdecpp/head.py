"""The acceptance prediction head: draft hidden state -> logit of P(Y_i accepted | Y_<i accepted, prefix).

D independent residual blocks x + SiLU(Linear(x)), then Linear(H -> 1). Plain `nn.Module`, no Lightning, so
the decoder imports it alone. Also loads upstream SpecDec++ checkpoints (2 logits, tied blocks).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG, WEIGHTS = "config.json", "model.safetensors"


class ResBlock(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + nn.functional.silu(self.linear(x))


class AcceptanceHead(nn.Module):
    def __init__(self, hidden_size: int, num_layers: int = 3, draft: dict | None = None):
        super().__init__()
        if hidden_size < 1 or num_layers < 0:
            raise ValueError(f"need hidden_size >= 1 and num_layers >= 0, got {hidden_size}, {num_layers}")
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.draft = draft or {}  # identity of the draft it was trained on (name, hidden size, depth)
        self.blocks = nn.ModuleList(ResBlock(hidden_size) for _ in range(num_layers))
        self.out = nn.Linear(hidden_size, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [...] acceptance logits."""
        for block in self.blocks:
            hidden = block(hidden)
        return self.out(hidden)[..., 0]

    def check_draft(self, draft_config) -> None:
        """Refuse a draft whose hidden size differs from the head's."""
        if draft_config.hidden_size != self.hidden_size:
            raise ValueError(f"acceptance head expects hidden size {self.hidden_size} (trained on draft "
                             f"{self.draft.get('name', '?')!r}), but this draft has {draft_config.hidden_size}")

    def save_pretrained(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = {"hidden_size": self.hidden_size, "num_layers": self.num_layers, "draft": self.draft,
                  "format": "specdecpp"}
        (path / CONFIG).write_text(json.dumps(config, indent=2))
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, path / WEIGHTS)
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str = "cpu") -> AcceptanceHead:
        path = Path(path)
        if not (path / CONFIG).is_file():
            raise FileNotFoundError(f"no acceptance head at {path} (expected {CONFIG} and weights)")
        config = json.loads((path / CONFIG).read_text())
        if config.get("format") == "specdecpp":
            head = cls(config["hidden_size"], config["num_layers"], config.get("draft"))
            head.load_state_dict(load_file(path / WEIGHTS, device=map_location), strict=True)
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
        head.load_state_dict(mapped, strict=True)
        return head
