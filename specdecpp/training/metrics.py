"""The acceptance head's validation metrics: the loss as a pure function, the rest as torchmetrics `Metric`s, which
sync across ranks themselves (a ragged `CatMetric` gather included).

Loss (docs/design.md section 3): soft-label weighted BCE
    sum_i [w_rej (1 - P_i)(-log(1 - P^_i)) + P_i (-log P^_i)] / sum_i [w_rej (1 - P_i) + P_i]
over draft-token positions. With w_rej != 1 the outputs are deliberately not calibrated; validation reports
calibration anyway (reliability per bin and per position in a draft run, ECE, Brier, AUROC) so the user sees it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import CatMetric, MeanMetric, Metric
from torchmetrics.classification import BinaryAUROC, BinaryCalibrationError

from ..calibration import STOP_WINDOWS, bins_ece, reliability_bins

POSITIONS = 8  # positions in a run of draft tokens reported apart: 1 .. 7, then 8 and beyond together


def weighted_bce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, w_rej: float) -> torch.Tensor:
    """Soft-label weighted BCE over masked positions, normalised by the total weight (see the module docstring)."""
    num, den = bce_terms(logits[mask].float(), labels[mask].float(), w_rej)
    return num / den.clamp_min(1e-12)


def bce_terms(logits: torch.Tensor, labels: torch.Tensor, w_rej: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of weighted terms, sum of weights) of the loss over 1-D logits and soft labels."""
    loss = w_rej * (1 - labels) * -F.logsigmoid(-logits) + labels * -F.logsigmoid(logits)
    return loss.sum(), (w_rej * (1 - labels) + labels).sum()


def binary_kl(p: torch.Tensor, p_hat: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """KL(Bern(P) || Bern(P^)) per position (upstream's metric), with 0 log 0 = 0."""
    p_hat = p_hat.clamp(eps, 1 - eps)
    return torch.xlogy(p, p / p_hat) + torch.xlogy(1 - p, (1 - p) / (1 - p_hat))


def positions_in_run(mask: torch.Tensor) -> torch.Tensor:
    """[B, T] -> each masked position's place in its run of consecutive masked positions (1, 2, ...; 0 off the mask):
    in a mixed sequence, a draft token's position in the round that drafted it."""
    idx = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    start = torch.where(~mask, idx, torch.full_like(idx, -1)).cummax(-1).values
    return torch.where(mask, idx - start, torch.zeros_like(idx))


class SoftReliability(Metric):
    """Bins predictions (and optionally groups them, e.g. by position in a run); per bin: count, mean prediction,
    mean soft label. Gives the reliability diagram and the soft-label ECE per group."""

    full_state_update = False

    def __init__(self, n_bins: int = 10, groups: int = 1):
        super().__init__()
        self.n_bins, self.groups = n_bins, groups
        for name in ("count", "pred", "label"):
            self.add_state(name, torch.zeros(groups, n_bins, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, label: torch.Tensor, group: torch.Tensor | None = None) -> None:
        bins = reliability_bins(pred, label, self.n_bins, group, self.groups)
        self.count += bins[0]
        self.pred += bins[1]
        self.label += bins[2]

    def compute(self) -> dict:
        """Per group (dim 0; squeezed for one group): count, mean_pred, mean_label per bin, ece_soft."""
        n = self.count.clamp_min(1)
        out = {"ece_soft": bins_ece(torch.stack([self.count, self.pred, self.label])), "count": self.count,
               "mean_pred": self.pred / n, "mean_label": self.label / n}
        return {k: v.squeeze(0) for k, v in out.items()} if self.groups == 1 else out


class WeightedBCE(Metric):
    """The epoch's weighted BCE; `constant=True`: the loss of the best constant predictor under it,
    c = sum P / sum (w_rej (1 - P) + P), the bar a head must beat."""

    full_state_update = False

    def __init__(self, w_rej: float, constant: bool = False):
        super().__init__()
        self.w_rej, self.constant = w_rej, constant
        for name in ("num", "den", "accept", "reject"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        num, den = bce_terms(logits, labels, self.w_rej)
        self.num += num.double()
        self.den += den.double()
        self.accept += labels.double().sum()
        self.reject += self.w_rej * (1 - labels.double()).sum()

    def compute(self) -> torch.Tensor:
        if not self.constant:
            return (self.num / self.den.clamp_min(1e-12)).float()
        total = (self.accept + self.reject).clamp_min(1e-12)
        c = (self.accept / total).clamp(1e-6, 1 - 1e-6)
        return ((-self.reject * torch.log1p(-c) - self.accept * torch.log(c)) / total).float()


class StopCalibration(Metric):
    """P(at least one rejection among k consecutive draft tokens), for k in STOP_WINDOWS: the mean of the predicted
    1 - prod P^ and of the true 1 - prod P over every window of k draft tokens in a row."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        for name in ("pred", "true", "count"):
            self.add_state(name, torch.zeros(len(STOP_WINDOWS), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> None:
        log_pred = F.logsigmoid(logits.double()).masked_fill(~mask, 0).cumsum(-1)
        log_true = labels.double().clamp_min(1e-12).log().masked_fill(~mask, 0).cumsum(-1)
        run = mask.long().cumsum(-1)
        for i, k in enumerate(STOP_WINDOWS):
            if logits.shape[1] <= k:
                continue
            full = (run[:, k:] - run[:, :-k]) == k  # windows (t - k, t] whose k positions are all draft tokens
            self.pred[i] += (1 - (log_pred[:, k:] - log_pred[:, :-k])[full].exp()).sum()
            self.true[i] += (1 - (log_true[:, k:] - log_true[:, :-k])[full].exp()).sum()
            self.count[i] += full.sum()

    def compute(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, k in enumerate(STOP_WINDOWS):
            if self.count[i] > 0:
                out[f"stop_pred_k{k}"] = (self.pred[i] / self.count[i]).float()
                out[f"stop_true_k{k}"] = (self.true[i] / self.count[i]).float()
        return out


class ValidationMetrics(torch.nn.Module):
    """Every validation metric of a head. `scalars` are logged as Metric objects (Lightning computes them);
    `compute_rest` computes the ones that return several values; `reset` starts a pass."""

    def __init__(self, w_rej: float, n_bins: int = 10):
        super().__init__()
        self.scalars = torch.nn.ModuleDict({
            "loss": WeightedBCE(w_rej), "loss_const": WeightedBCE(w_rej, constant=True), "kl": MeanMetric(),
            "brier_soft": MeanMetric(), "brier": MeanMetric(), "auroc": BinaryAUROC(),
            "ece": BinaryCalibrationError(n_bins=n_bins, norm="l1"), "mean_pred": MeanMetric(),
            "mean_label": MeanMetric()})
        self.reliability = SoftReliability(n_bins)
        self.by_position = SoftReliability(n_bins, groups=POSITIONS)
        self.stops = StopCalibration()
        self.logits, self.labels = CatMetric(), CatMetric()  # the dev pass itself: Platt scaling fits on it

    def update(self, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, seed: int) -> None:
        """[B, T] logits and soft labels; `mask` marks draft tokens; hard labels are drawn from the soft ones by
        `seed` (AUROC, hard ECE and Brier need them)."""
        logits, labels = logits.float(), labels.float()
        z, p = logits[mask], labels[mask]
        p_hat = torch.sigmoid(z)
        sampled = torch.bernoulli(p, generator=torch.Generator(p.device).manual_seed(seed)).long()
        s = self.scalars
        s["loss"].update(z, p)
        s["loss_const"].update(z, p)
        s["kl"].update(binary_kl(p, p_hat))
        s["brier_soft"].update((p_hat - p) ** 2)
        s["brier"].update((p_hat - sampled) ** 2)
        s["auroc"].update(p_hat, sampled)
        s["ece"].update(p_hat, sampled)
        s["mean_pred"].update(p_hat)
        s["mean_label"].update(p)
        self.reliability.update(p_hat, p)
        self.by_position.update(p_hat, p, positions_in_run(mask)[mask] - 1)
        self.stops.update(logits, labels, mask)
        self.logits.update(z.detach())
        self.labels.update(p.detach())

    def compute_rest(self) -> dict:
        """Collective: the reliability (pooled and per position), the stop windows' scalars and the dev pass."""
        reliability = self.reliability.compute()
        by_position = self.by_position.compute()
        scalars = {"ece_soft": reliability["ece_soft"].float(), **self.stops.compute()}
        for d in range(POSITIONS):
            if by_position["count"][d].sum() > 0:
                scalars[f"ece_soft_position{d + 1}"] = by_position["ece_soft"][d].float()
        dev = (self.logits.compute().cpu(), self.labels.compute().cpu()) if self.logits.update_count else None
        return {"scalars": scalars, "reliability": reliability, "by_position": by_position, "dev": dev}

    def reset(self) -> None:
        """Fresh states for a pass. They are made as normal tensors even inside inference mode: a `validate` runs in
        it, a later `fit` may validate under no_grad (FSDP) and update them in place."""
        with torch.inference_mode(False):
            for m in self.modules():
                if isinstance(m, Metric):
                    m.reset()
