"""Training the acceptance head: a frozen draft model feeding a trainable `AcceptanceHead`.

Batches are tokens (the draft runs on them every step) or, for a statistics head, the draft's features prepared
once (`data.features`: hidden states and statistics at each draft token; the draft never runs).

Loss (docs/design.md section 3): soft-label weighted BCE
    sum_i [w_rej (1 - P_i)(-log(1 - P^_i)) + P_i (-log P^_i)] / sum_i [w_rej (1 - P_i) + P_i]
over draft-token positions. With w_rej != 1 the outputs are deliberately not calibrated; validation reports
calibration anyway (reliability diagram, ECE, Brier, AUROC) so the user sees it.

Sharding: under Lightning's `ModelParallelStrategy` (`fully_shard`, FSDP2), `configure_model` shards every draft
layer, the draft and the head over the data-parallel mesh; the same code runs on CPU/gloo and CUDA/nccl.
The draft stays out of the optimizer and out of checkpoints; a checkpoint records which draft it belongs to.
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, Metric, SumMetric
from torchmetrics.classification import BinaryAUROC, BinaryCalibrationError

from .atomic import write_text
from .head import N_STATS, AcceptanceHead, draft_fingerprint, fit_platt, soft_ece, stat_features
from .lowp import fp32_linears
from .models import default_draft, draft_ref, load_draft, precision_draft_dtype
from .sampling import draft_stats

STOP_WINDOWS = (1, 2, 4, 8)


def weighted_bce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, w_rej: float) -> torch.Tensor:
    """Soft-label weighted BCE over masked positions, normalised by the total weight (see module docstring)."""
    logits, labels = logits[mask].float(), labels[mask].float()
    num, den = _bce_terms(logits, labels, w_rej)
    return num / den.clamp_min(1e-12)


def _bce_terms(logits: torch.Tensor, labels: torch.Tensor, w_rej: float) -> tuple[torch.Tensor, torch.Tensor]:
    loss = w_rej * (1 - labels) * -F.logsigmoid(-logits) + labels * -F.logsigmoid(logits)
    return loss.sum(), (w_rej * (1 - labels) + labels).sum()


def binary_kl(p: torch.Tensor, p_hat: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """KL(Bern(P) || Bern(P^)) per position (upstream's metric), with 0 log 0 = 0."""
    p_hat = p_hat.clamp(eps, 1 - eps)
    return torch.xlogy(p, p / p_hat) + torch.xlogy(1 - p, (1 - p) / (1 - p_hat))


class SoftReliability(Metric):
    """Bins predictions; per bin: count, mean prediction, mean soft label. Gives the reliability diagram and
    the soft-label ECE (sum over bins of count/N * |mean prediction - mean label|)."""

    full_state_update = False

    def __init__(self, n_bins: int = 10):
        super().__init__()
        self.n_bins = n_bins
        for name in ("count", "pred", "label"):
            self.add_state(name, torch.zeros(n_bins, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        bins = (pred.detach().double() * self.n_bins).long().clamp(0, self.n_bins - 1)
        self.count += torch.bincount(bins, minlength=self.n_bins).double()
        self.pred += torch.bincount(bins, pred.detach().double(), minlength=self.n_bins)
        self.label += torch.bincount(bins, label.detach().double(), minlength=self.n_bins)

    def compute(self) -> dict:
        n = self.count.clamp_min(1)
        ece = (self.count / self.count.sum().clamp_min(1) * (self.pred / n - self.label / n).abs()).sum()
        return {"ece_soft": ece, "count": self.count, "mean_pred": self.pred / n, "mean_label": self.label / n}


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
        _check_head_shape(saved, model_args)


def _check_head_shape(saved: dict, wanted: dict) -> None:
    given = {k: saved.get(k) for k in HEAD_SHAPE}
    asked = {k: wanted.get(k) for k in HEAD_SHAPE}
    if any(given[k] is not None and asked[k] is not None and given[k] != asked[k] for k in HEAD_SHAPE):
        raise ValueError(f"the checkpoint holds a head with {given} but this run asks for {asked}: drop the --model "
                         f"overrides to resume it, or train a new head without --ckpt_path")


HEAD_SHAPE = ("num_layers", "head_stats", "head_hidden")  # hyperparameters that change the head's tensors


class AcceptanceHeadModule(L.LightningModule):
    """Frozen draft + trainable acceptance head.

    Args:
        target, draft: model references as in `load_pair`; the draft may be a self-draft depth (int) of the target.
        num_layers: D, the number of residual blocks in the head (paper: 3).
        head_stats: the head also reads the draft's statistics of the token it scores (q(Y), entropy, top-2
            margin) and scores it from the forward that proposed it; False is the paper's hidden-state head.
        head_hidden: False makes a statistics head read the statistics only (what does the hidden state add?).
        w_rej: weight of the rejection term (paper: 6).
        lr, weight_decay, warmup_ratio: AdamW with linear warm-up then cosine decay to zero.
        export_dir: where `fit` exports the trained head (default: <log dir>/head).
        export: "best" exports the head of the epoch with the lowest dev loss (early stopping without stopping),
            "last" the final epoch's. Either is Platt-calibrated on its own epoch's dev pass.
    """

    def __init__(self, target: str = "default", draft: str | int | None = None, num_layers: int = 3,
                 head_stats: bool = False, head_hidden: bool = True, w_rej: float = 6.0, lr: float = 1e-3,
                 weight_decay: float = 0.0, warmup_ratio: float = 0.03, n_bins: int = 10,
                 export_dir: str | None = None, export: str = "best"):
        super().__init__()
        if w_rej <= 0:
            raise ValueError(f"w_rej must be > 0, got {w_rej}")
        if export not in ("best", "last"):
            raise ValueError(f"export must be 'best' or 'last', got {export!r}")
        self.save_hyperparameters()
        self.hparams.draft = draft_ref(draft)  # "3" from a command line (LightningCLI passes text): a self-draft depth
        self.strict_loading = False  # checkpoints hold the head only, never the draft
        self.draft: torch.nn.Module | None = None
        self.head: AcceptanceHead | None = None
        self._draft_fingerprint: list[float] | None = None
        self.val_loss_num, self.val_loss_den = SumMetric(), SumMetric()
        self.val_sum_accept, self.val_sum_reject = SumMetric(), SumMetric()  # sum P, sum w_rej (1 - P)
        self.val_kl, self.val_brier_soft, self.val_brier = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_mean_pred, self.val_mean_label = MeanMetric(), MeanMetric()
        self.val_auroc, self.val_ece = BinaryAUROC(), BinaryCalibrationError(n_bins=n_bins, norm="l1")
        self.val_reliability = SoftReliability(n_bins)
        self.val_stop_pred = torch.nn.ModuleList(MeanMetric() for _ in STOP_WINDOWS)
        self.val_stop_true = torch.nn.ModuleList(MeanMetric() for _ in STOP_WINDOWS)
        self._val_preds: list[torch.Tensor] = []
        self._val_pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (logit, soft label) of this validation pass
        self._last_val: tuple[torch.Tensor, torch.Tensor] | None = None  # every rank's, of the last one: calibration
        self._best: dict | None = None  # export="best": the best epoch, its dev loss, whole head state and dev pairs

    # --- models --------------------------------------------------------------------------------------------------

    @property
    def draft_identity(self) -> dict:
        cfg, draft = self.draft.config, self.hparams.draft
        draft = default_draft(self.hparams.target) if draft is None else draft
        of_target = isinstance(draft, int) or precision_draft_dtype(draft) is not None
        return {"name": f"{self.hparams.target}:{draft}" if of_target else str(draft or self.hparams.target),
                "hidden_size": cfg.hidden_size, "num_layers": cfg.num_hidden_layers, "vocab_size": cfg.vocab_size,
                "fingerprint": self._draft_fingerprint}

    def configure_model(self) -> None:
        h = self.hparams
        if self.draft is None:  # (a caller may set `draft` to a model in hand before fitting)
            self.draft = load_draft(h.target, h.draft)[0].requires_grad_(False).eval()
        if self._draft_fingerprint is None:  # before sharding: the sums need whole weights
            self._draft_fingerprint = draft_fingerprint(self.draft)
        if self.head is None:
            self.head = AcceptanceHead(self.draft.config.hidden_size, h.num_layers, self.draft_identity,
                                       N_STATS if h.head_stats else 0, h.head_hidden)
            out = self.draft.get_output_embeddings()
            if h.head_stats and out.weight is self.draft.get_input_embeddings().weight:
                # tied: sharding the decoder would shard the LM head the statistics need; give it its own copy
                out.weight = torch.nn.Parameter(out.weight.detach().clone(), requires_grad=False)
        mesh = getattr(self, "device_mesh", None)
        if mesh is not None and "data_parallel" in (mesh.mesh_dim_names or ()):
            from torch.distributed.fsdp import fully_shard

            dp, decoder = mesh["data_parallel"], self.draft.get_decoder()
            for layer in decoder.layers:
                fully_shard(layer, mesh=dp)
            fully_shard(decoder, mesh=dp)  # the decoder, not the LM: training never runs the LM head
            fully_shard(self.head, mesh=dp)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.draft is not None:
            self.draft.eval()  # frozen: no dropout, whatever Lightning asks of the rest
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Acceptance logits [B, T] of the tokens at each position, from the draft's final hidden states (after its
        last norm): the paper's head reads the state at the token; a statistics head reads the state one before
        (the one that proposed it) and the draft distribution's statistics there (position 0 gets logit 0)."""
        with torch.no_grad(), fp32_linears(self.draft):
            hidden = self.draft.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                              use_cache=False).last_hidden_state
            if self.head.n_stats:
                hidden = hidden[:, :-1]
                stats = stat_features(*draft_stats(self.draft.get_output_embeddings()(hidden), input_ids[:, 1:]))
        if not self.head.n_stats:
            return self.head(hidden)
        return torch.nn.functional.pad(self.head(hidden, stats), (1, 0))

    def batch_logits(self, batch: dict) -> torch.Tensor:
        """[B, T] logits of a token batch (runs the draft) or of a feature batch (`data.features`: no draft)."""
        if "hidden" not in batch:
            return self(batch["input_ids"], batch["attention_mask"])
        if not self.head.n_stats:
            raise ValueError("feature batches (data.features: true) train a statistics head: set model.head_stats: "
                             "true, or train the paper's head on token batches (data.features: false)")
        return self.head(batch["hidden"], stat_features(*batch["stats"].unbind(-1)))

    # --- steps ---------------------------------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self.batch_logits(batch)
        loss = weighted_bce(logits, batch["labels"], batch["loss_mask"], self.hparams.w_rej)
        self.log("train/loss", loss, prog_bar=True, batch_size=int(batch["loss_mask"].sum()))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self.batch_logits(batch).float()
        mask, labels = batch["loss_mask"], batch["labels"].float()
        z, p = logits[mask], labels[mask]
        p_hat = torch.sigmoid(z)
        num, den = _bce_terms(z, p, self.hparams.w_rej)
        self.val_loss_num.update(num)
        self.val_loss_den.update(den)
        self.val_sum_accept.update(p.sum())
        self.val_sum_reject.update(self.hparams.w_rej * (1 - p).sum())
        self.val_kl.update(binary_kl(p, p_hat))
        self.val_brier_soft.update((p_hat - p) ** 2)
        sampled = torch.bernoulli(p, generator=torch.Generator(p.device).manual_seed(batch_idx)).long()
        self.val_brier.update((p_hat - sampled) ** 2)
        self.val_auroc.update(p_hat, sampled)
        self.val_ece.update(p_hat, sampled)
        self.val_reliability.update(p_hat, p)
        self.val_mean_pred.update(p_hat)
        self.val_mean_label.update(p)
        self._val_preds.append(p_hat.detach().cpu())
        self._val_pairs.append((z.detach().float().cpu(), p.detach().float().cpu()))
        self._update_stop_calibration(logits, labels, mask)

    def _update_stop_calibration(self, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> None:
        """P(at least one rejection among k consecutive draft tokens): predicted 1 - prod P^ vs true 1 - prod P."""
        log_pred = F.logsigmoid(logits).masked_fill(~mask, 0).cumsum(-1)
        log_true = labels.clamp_min(1e-12).log().masked_fill(~mask, 0).cumsum(-1)
        run = mask.long().cumsum(-1)
        for k, pred_metric, true_metric in zip(STOP_WINDOWS, self.val_stop_pred, self.val_stop_true):
            if logits.shape[1] <= k:
                continue
            # windows (t - k, t] whose k positions are all draft tokens
            full = (run[:, k:] - run[:, :-k]) == k
            if full.any():
                pred_metric.update(1 - (log_pred[:, k:] - log_pred[:, :-k])[full].exp())
                true_metric.update(1 - (log_true[:, k:] - log_true[:, :-k])[full].exp())

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss_num.compute() / self.val_loss_den.compute().clamp_min(1e-12)
        rel = self.val_reliability.compute()
        # the best constant predictor under the weighted loss, c = sum P / sum (w (1 - P) + P): the bar to beat
        s_acc, s_rej = self.val_sum_accept.compute(), self.val_sum_reject.compute()
        c = (s_acc / (s_acc + s_rej).clamp_min(1e-12)).clamp(1e-6, 1 - 1e-6)
        loss_const = (-s_rej * torch.log1p(-c) - s_acc * torch.log(c)) / (s_acc + s_rej).clamp_min(1e-12)
        metrics = {"val/loss": loss, "val/loss_const": loss_const, "val/kl": self.val_kl.compute(),
                   "val/brier_soft": self.val_brier_soft.compute(),
                   "val/brier": self.val_brier.compute(), "val/auroc": self.val_auroc.compute(),
                   "val/ece": self.val_ece.compute(), "val/ece_soft": rel["ece_soft"],
                   "val/mean_pred": self.val_mean_pred.compute(), "val/mean_label": self.val_mean_label.compute()}
        for k, pm, tm in zip(STOP_WINDOWS, self.val_stop_pred, self.val_stop_true):
            if pm.update_count:
                metrics[f"val/stop_pred_k{k}"], metrics[f"val/stop_true_k{k}"] = pm.compute(), tm.compute()
        self.log_dict({k: v.float() for k, v in metrics.items()}, sync_dist=False)
        self._log_figures(rel)
        with torch.inference_mode(False):  # fresh states must stay normal tensors: a later fit updates them in place
            self._reset_val_metrics()
        self._val_preds = []
        if self._val_pairs and not self.trainer.sanity_checking:
            # collective steps: every rank is here at once and sees the same synced loss, so all take the same branch
            self._last_val = tuple(self._gather(torch.cat(t)) for t in zip(*self._val_pairs))
            better = self._best is None or float(loss) < self._best["val_loss"]
            if self.hparams.export == "best" and self.trainer.state.fn == "fit" and better:
                self._best = {"epoch": self.current_epoch, "val_loss": float(loss), "state": self._full_head_state(),
                              "val": self._last_val}
        self._val_pairs = []

    def _reset_val_metrics(self) -> None:
        for m in [self.val_loss_num, self.val_loss_den, self.val_sum_accept, self.val_sum_reject, self.val_kl,
                  self.val_brier_soft, self.val_brier,
                  self.val_auroc, self.val_ece, self.val_reliability, self.val_mean_pred, self.val_mean_label,
                  *self.val_stop_pred, *self.val_stop_true]:
            m.reset()

    def _log_figures(self, rel: dict) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger

        if self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        tb = next((lg for lg in self.loggers if isinstance(lg, TensorBoardLogger)), None)
        if tb is None:
            return
        from .plots import reliability_figure

        tb.experiment.add_figure("val/reliability", reliability_figure(rel), self.global_step)
        if self._val_preds:
            tb.experiment.add_histogram("val/predictions", torch.cat(self._val_preds), self.global_step)

    # --- optimisation, checkpoints, export -----------------------------------------------------------------------

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.head.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = int(self.hparams.warmup_ratio * total)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))

        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, schedule),
                                                   "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if "state_dict" in checkpoint:
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("draft.")}
        checkpoint["draft_identity"] = self.draft_identity
        if self._best is not None:  # a resumed run still exports the best epoch seen before the interruption
            checkpoint["best_head"] = self._best

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("draft_identity")
        if self.draft is not None and saved is not None:
            ours = self.draft_identity
            if {k: v for k, v in saved.items() if k in ours} != {k: v for k, v in ours.items() if k in saved}:
                raise ValueError(f"this checkpoint was trained on draft {saved}, not on {ours}")
        # strict_loading is off (the draft is never in a checkpoint), so compare the head's shape by hand
        _check_head_shape(checkpoint.get("hyper_parameters", {}), dict(self.hparams))
        self._best = checkpoint.get("best_head", self._best)

    def _full_head_state(self) -> dict:
        """The head's whole state on CPU (rank 0; empty on other ranks); collective under FSDP."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.head, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach().clone() for k, v in state.items()}  # on one CPU process these are the live tensors

    def restore_best(self) -> dict | None:
        """Put the best epoch's head and dev pass back (export="best"); collective under FSDP. None if none kept."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if self._best is None or self.hparams.export != "best":
            return None
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=self.trainer.world_size > 1)
        set_model_state_dict(self.head, self._best["state"], options=options)
        self._last_val = self._best["val"]
        return {"epoch": self._best["epoch"], "val_loss": self._best["val_loss"]}

    def export_head(self, path: str | Path) -> Path | None:
        """Gather the (possibly sharded) head and save it unsharded; collective under FSDP, rank 0 writes."""
        state = self._full_head_state()
        if not self.trainer.is_global_zero:
            return None
        plain = AcceptanceHead(self.head.hidden_size, self.head.num_layers, self.draft_identity, self.head.n_stats,
                               self.head.use_hidden)
        plain.load_state_dict(state)
        return plain.save_pretrained(path)

    def calibrate(self) -> dict | None:
        """Platt-scale the head on the last validation pass (every rank's positions): sets head.calibration."""
        if self._last_val is None:
            return None
        z, p = self._last_val
        a, b = fit_platt(z, p)
        with torch.no_grad():
            self.head.calibration.copy_(torch.tensor([a, b]))
        report = {"scale": a, "bias": b, "positions": z.numel(), "ece_soft_before": soft_ece(torch.sigmoid(z), p),
                  "ece_soft_after": soft_ece(torch.sigmoid(a * z + b), p),
                  "mean_pred_before": float(torch.sigmoid(z).mean()), "mean_pred_after":
                  float(torch.sigmoid(a * z + b).mean()), "mean_label": float(p.mean())}
        return report

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        """All ranks' 1-D tensors of different lengths, concatenated (the tensor itself on one process)."""
        if self.trainer.world_size == 1:
            return t
        sizes = self.all_gather(torch.tensor([t.numel()], device=self.device)).flatten().tolist()
        padded = torch.zeros(max(sizes), device=self.device)
        padded[: t.numel()] = t.to(self.device)
        gathered = self.all_gather(padded).reshape(len(sizes), -1).cpu()
        return torch.cat([row[:n] for row, n in zip(gathered, sizes)])

    def on_fit_end(self) -> None:
        log_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        best = self.restore_best()
        report = self.calibrate()
        path = self.export_head(self.hparams.export_dir or log_dir / "head")
        if path is not None:
            if best is not None:
                print(f"\nexporting the head of epoch {best['epoch']} (lowest dev loss, {best['val_loss']:.4f}; "
                      f"--model.export last takes the final epoch's)")
            if report is not None:
                report.update(best or {})
                write_text(path / "calibration.json", json.dumps(report, indent=2))  # atomic, like the head
                print(f"\ncalibration (Platt, dev split): soft-label ECE {report['ece_soft_before']:.4f} -> "
                      f"{report['ece_soft_after']:.4f}; mean prediction {report['mean_pred_before']:.4f} -> "
                      f"{report['mean_pred_after']:.4f} (mean label {report['mean_label']:.4f})")
            print(f"\nacceptance head exported to {path}\nTensorBoard logs: tensorboard --logdir {log_dir}")


class ShardingReport(L.Callback):
    """Writes, per rank, how the head's parameters are laid out and which precision runs (for checks and debugging).

    Read after the first optimizer step: FSDP2 keeps a root module's parameters gathered between a forward and
    its backward (and after a no-grad validation pass), and reshards them after backward.
    """

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: AcceptanceHeadModule, outputs, batch,
                           batch_idx: int) -> None:
        import json

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
        out = Path(trainer.log_dir or trainer.default_root_dir) / f"sharding_rank{trainer.global_rank}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
