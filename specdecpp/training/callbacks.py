"""Training callbacks: exporting the trained head, and a report of how FSDP laid it out."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from ..atomic import write_text
from ..calibration import soft_ece
from ..head import AcceptanceHead, fit_platt


class HeadExport(L.Callback):
    """At the end of `fit`: puts back the head of the best epoch (ModelCheckpoint's best, with `export="best"`) or
    keeps the last, Platt-calibrates it on that epoch's own dev pass, and writes it unsharded with calibration.json
    to `export_dir` (default <log dir>/head). Collective under FSDP: every rank calls it, rank 0 writes."""

    def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        best, dev = None, module.dev_pass
        ckpt = next((c for c in trainer.checkpoint_callbacks if c.monitor == "val/loss"), None)
        if module.hparams.export == "best" and ckpt is not None and ckpt.best_model_path:
            saved = torch.load(ckpt.best_model_path, map_location="cpu", weights_only=True)
            state = {k.removeprefix("head."): v for k, v in saved["state_dict"].items() if k.startswith("head.")}
            set_model_state_dict(module.head, state, options=StateDictOptions(full_state_dict=True))
            best, dev = {"epoch": saved["epoch"], "val_loss": float(ckpt.best_model_score)}, saved.get("dev_pass")
        report = calibrate(module.head, dev)
        state = get_model_state_dict(module.head, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # collective: every rank asks
        if not trainer.is_global_zero:
            return
        h = module.head
        plain = AcceptanceHead(h.hidden_size, h.num_layers, module.draft_identity, h.n_stats, h.use_hidden)
        plain.load_state_dict(state)
        path = plain.save_pretrained(module.hparams.export_dir or log_dir / "head")
        if best is not None:
            print(f"\nexporting the head of epoch {best['epoch']} (lowest dev loss, {best['val_loss']:.4f}; "
                  f"--model.export last takes the final epoch's)")
        if report is not None:
            write_text(path / "calibration.json", json.dumps(report | (best or {}), indent=2))
            print(f"\ncalibration (Platt, dev split): soft-label ECE {report['ece_soft_before']:.4f} -> "
                  f"{report['ece_soft_after']:.4f}; mean prediction {report['mean_pred_before']:.4f} -> "
                  f"{report['mean_pred_after']:.4f} (mean label {report['mean_label']:.4f})")
        print(f"\nacceptance head exported to {path}\nTensorBoard logs: tensorboard --logdir {log_dir}")


def calibrate(head: AcceptanceHead, dev: tuple[torch.Tensor, torch.Tensor] | None) -> dict | None:
    """Platt-scale `head` on a dev pass (logits, soft labels of every rank's positions): sets head.calibration and
    says what it changed. None (and the head untouched) without a dev pass."""
    if dev is None:
        return None
    z, p = dev
    a, b = fit_platt(z, p)
    with torch.no_grad():
        head.calibration.copy_(torch.tensor([a, b]))
    before, after = torch.sigmoid(z), torch.sigmoid(a * z + b)
    return {"scale": a, "bias": b, "positions": z.numel(), "ece_soft_before": soft_ece(before, p),
            "ece_soft_after": soft_ece(after, p), "mean_pred_before": float(before.mean()),
            "mean_pred_after": float(after.mean()), "mean_label": float(p.mean())}


class ShardingReport(L.Callback):
    """Writes, per rank, how the head's parameters are laid out and which precision runs (for checks and debugging).

    Read after the first optimizer step: FSDP2 keeps a root module's parameters gathered between a forward and
    its backward (and after a no-grad validation pass), and reshards them after backward.
    """

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if batch_idx != 0 or trainer.current_epoch != 0:
            return
        params = {}
        for name, p in pl_module.head.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            params[name] = {"global_shape": list(p.shape), "local_shape": list(local.shape),
                            "placements": [str(x) for x in getattr(p, "placements", [])], "dtype": str(p.dtype)}
        report = {"rank": trainer.global_rank, "world_size": trainer.world_size, "precision": trainer.precision,
                  "strategy": type(trainer.strategy).__name__, "head": params,
                  "draft_sharded": any(hasattr(p, "placements") for p in pl_module.draft.parameters())}
        write_text(Path(trainer.log_dir or trainer.default_root_dir) / f"sharding_rank{trainer.global_rank}.json",
                   json.dumps(report, indent=2))
