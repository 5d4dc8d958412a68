"""Training the acceptance head: a frozen draft model feeding a trainable `AcceptanceHead`.

Batches are tokens (the draft runs on them every step) or, for a statistics head, the draft's features prepared
once (`data.features`: hidden states and statistics at each draft token; the draft never runs). The loss and the
validation metrics are in `metrics.py`; choosing the best epoch is `ModelCheckpoint(monitor="val/loss")`'s job, and
calibrating and exporting the head is `callbacks.HeadExport`'s, both attached by `configure_callbacks`.

Sharding: under Lightning's `ModelParallelStrategy` (`fully_shard`, FSDP2), `configure_model` shards every draft
layer, the draft and the head over the data-parallel mesh; the same code runs on CPU/gloo and CUDA/nccl.
The draft stays out of the optimizer and out of checkpoints; a checkpoint records which draft it belongs to.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from transformers import get_cosine_schedule_with_warmup

from ..head import N_STATS, AcceptanceHead, draft_fingerprints, stat_features
from ..lowp import fp32_linears
from ..models import default_draft, draft_ref, load_draft, precision_draft_dtype
from ..sampling import draft_stats
from .callbacks import HeadExport
from .checkpoints import check_head_shape
from .metrics import ValidationMetrics, weighted_bce


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
        self._draft_fingerprints: dict[str, list[float]] | None = None
        self.val = ValidationMetrics(w_rej, n_bins)
        self.dev_pass: tuple[torch.Tensor, torch.Tensor] | None = None  # (logits, soft labels) of the last dev pass

    @property  # what a checkpoint or an exported head records of its draft
    def draft_identity(self) -> dict:
        cfg, draft = self.draft.config, self.hparams.draft
        draft = default_draft(self.hparams.target) if draft is None else draft
        of_target = isinstance(draft, int) or precision_draft_dtype(draft) is not None
        return {"name": f"{self.hparams.target}:{draft}" if of_target else str(draft or self.hparams.target),
                "hidden_size": cfg.hidden_size, "num_layers": cfg.num_hidden_layers, "vocab_size": cfg.vocab_size,
                "fingerprints": self._draft_fingerprints}  # fp32, bf16 and fp16: the head fits the draft's casts

    def configure_model(self) -> None:
        h = self.hparams
        if self.draft is None:  # (a caller may set `draft` to a model in hand before fitting)
            self.draft = load_draft(h.target, h.draft)[0].requires_grad_(False).eval()
        if self._draft_fingerprints is None:  # before sharding: the sums need whole weights
            self._draft_fingerprints = draft_fingerprints(self.draft)
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

    def configure_callbacks(self) -> list[L.Callback]:
        """Checkpoints of the last epoch and (export="best") of the lowest dev loss, under the root folder: a resumed
        run in a later log version still finds the best epoch and its score. They replace the trainer's own."""
        root = f"{self.trainer.default_root_dir}/checkpoints"
        callbacks = [ModelCheckpoint(dirpath=root, filename="latest-{epoch}", save_last=True), HeadExport()]
        if self.hparams.export == "best":
            callbacks.append(ModelCheckpoint(dirpath=root, monitor="val/loss", mode="min", filename="best-{epoch}",
                                             save_on_train_epoch_end=True))
        return callbacks

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

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = weighted_bce(self.batch_logits(batch), batch["labels"], batch["loss_mask"], self.hparams.w_rej)
        self.log("train/loss", loss, prog_bar=True, batch_size=int(batch["loss_mask"].sum()))
        return loss

    def on_validation_epoch_start(self) -> None:
        self.val.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.val.update(self.batch_logits(batch), batch["labels"], batch["loss_mask"], seed=batch_idx)
        self.log_dict({f"val/{name}": m for name, m in self.val.scalars.items()}, on_epoch=True)

    def on_validation_epoch_end(self) -> None:
        rest = self.val.compute_rest()  # collective: every rank is here at once
        self.log_dict({f"val/{k}": v for k, v in rest["scalars"].items()})
        if self.trainer.sanity_checking:
            return
        self.dev_pass = rest["dev"]
        tb = next((lg for lg in self.loggers if isinstance(lg, TensorBoardLogger)), None)
        if tb is not None and self.trainer.is_global_zero:
            from ..plots import reliability_by_position_figure, reliability_figure

            tb.experiment.add_figure("val/reliability", reliability_figure(rest["reliability"]), self.global_step)
            tb.experiment.add_figure("val/reliability_by_position", reliability_by_position_figure(
                rest["by_position"]), self.global_step)
            if rest["dev"] is not None:
                tb.experiment.add_histogram("val/predictions", torch.sigmoid(rest["dev"][0]), self.global_step)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.head.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        schedule = get_cosine_schedule_with_warmup(opt, int(self.hparams.warmup_ratio * total), total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if "state_dict" in checkpoint:
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("draft.")}
        checkpoint["draft_identity"] = self.draft_identity
        checkpoint["dev_pass"] = self.dev_pass  # the best checkpoint's head is Platt-calibrated on its own dev pass

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("draft_identity")
        if self.draft is not None and saved is not None:
            ours = self.draft_identity
            if {k: v for k, v in saved.items() if k in ours} != {k: v for k, v in ours.items() if k in saved}:
                raise ValueError(f"this checkpoint was trained on draft {saved}, not on {ours}")
        # strict_loading is off (the draft is never in a checkpoint), so compare the head's shape by hand
        check_head_shape(checkpoint.get("hyper_parameters", {}), dict(self.hparams))
        self.dev_pass = checkpoint.get("dev_pass", self.dev_pass)
