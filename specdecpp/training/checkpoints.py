"""Refusing a checkpoint that cannot be resumed, by name, before Lightning reads it."""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch

HEAD_SHAPE = ("num_layers", "head_stats", "head_hidden")  # hyperparameters that change the head's tensors


def check_checkpoint(path: str | Path | None, model_args: dict | None = None) -> None:
    """Refuse a checkpoint that is missing or not a whole torch archive (a truncated copy), or whose head's shape
    differs from `model_args` (the module's arguments asked for), by name."""
    if path is None or str(path) in ("last", "best", "hpc", "registry"):  # Lightning's own names, resolved by it
        return
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"checkpoint {path} is damaged or truncated ({e}): use another one (e.g. an earlier "
                         f"epoch's) or start without --ckpt_path") from None
    if bad is not None:
        raise ValueError(f"checkpoint {path} is damaged: its member {bad} fails its CRC check")
    if model_args:
        saved = torch.load(path, map_location="cpu", weights_only=True).get("hyper_parameters", {})
        check_head_shape(saved, model_args)


def check_head_shape(saved: dict, wanted: dict) -> None:
    given = {k: saved.get(k) for k in HEAD_SHAPE}
    asked = {k: wanted.get(k) for k in HEAD_SHAPE}
    if any(given[k] is not None and asked[k] is not None and given[k] != asked[k] for k in HEAD_SHAPE):
        raise ValueError(f"the checkpoint holds a head with {given} but this run asks for {asked}: drop the --model "
                         f"overrides to resume it, or train a new head without --ckpt_path")
