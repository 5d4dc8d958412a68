"""Calibration maths shared by training, the benchmark and the replay's signal report: soft-label reliability bins,
their ECE, and the stop windows every report uses."""

from __future__ import annotations

import torch

STOP_WINDOWS = (1, 2, 4, 8, 16)  # k of "P(at least one rejection among k consecutive draft tokens)", everywhere


def reliability_bins(pred: torch.Tensor, label: torch.Tensor, n_bins: int = 10, group: torch.Tensor | None = None,
                     groups: int = 1) -> torch.Tensor:
    """[3, groups, n_bins] float64: per (group, equal-width bin of the prediction) the count, the sum of predictions
    and the sum of (soft) labels. `group` (ints in [0, groups)) splits positions, e.g. by position in a round."""
    pred, label = pred.detach().double().flatten(), label.detach().double().flatten()
    cell = (pred * n_bins).long().clamp(0, n_bins - 1)
    if group is not None:
        cell = cell + group.flatten().long().clamp(0, groups - 1) * n_bins
    size = groups * n_bins
    return torch.stack([torch.bincount(cell, w, minlength=size).view(groups, n_bins) for w in (None, pred, label)])


def bins_ece(bins: torch.Tensor) -> torch.Tensor:
    """ECE per group of `reliability_bins`: sum over bins of share * |mean prediction - mean label|."""
    count, pred, label = bins
    return (pred - label).abs().sum(-1) / count.sum(-1).clamp_min(1)


def soft_ece(pred: torch.Tensor, label: torch.Tensor, n_bins: int = 10) -> float:
    """Expected calibration error against soft labels (equal-width bins)."""
    return float(bins_ece(reliability_bins(pred, label, n_bins))[0])
