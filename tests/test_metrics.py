"""The head's validation metrics against hand computations."""

import math

import pytest
import torch

from specdecpp.calibration import STOP_WINDOWS, soft_ece
from specdecpp.training.metrics import SoftReliability, StopCalibration, WeightedBCE, positions_in_run


def test_positions_in_run_count_each_draft_token_from_its_runs_start():
    mask = torch.tensor([[False, True, True, True, False, True, False, True, True],
                         [True, True, False, False, True, True, True, True, True]])
    assert positions_in_run(mask).tolist() == [[0, 1, 2, 3, 0, 1, 0, 1, 2], [1, 2, 0, 0, 1, 2, 3, 4, 5]]


def test_stop_calibration_is_the_mean_over_every_window_of_k_draft_tokens_in_a_row():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(3, 12, generator=g), torch.rand(3, 12, generator=g)
    mask = torch.rand(3, 12, generator=g) < 0.8
    metric = StopCalibration()
    metric.update(logits, labels, mask)
    got = metric.compute()
    for k in (1, 2, 4):
        pred, true = [], []
        for b in range(3):
            for t in range(1, 12 - k + 1):  # windows (t - 1, t - 1 + k]: the first position never ends a window
                if mask[b, t:t + k].all():
                    pred.append(1 - math.prod(torch.sigmoid(logits[b, t:t + k]).tolist()))
                    true.append(1 - math.prod(labels[b, t:t + k].tolist()))
        assert got[f"stop_pred_k{k}"].item() == pytest.approx(sum(pred) / len(pred), rel=1e-5)
        assert got[f"stop_true_k{k}"].item() == pytest.approx(sum(true) / len(true), rel=1e-5)
    assert f"stop_pred_k{STOP_WINDOWS[-1]}" not in got  # no window of 16 in 12 positions


def test_grouped_reliability_gives_each_groups_own_ece():
    g = torch.Generator().manual_seed(1)
    pred, label, group = torch.rand(500, generator=g), torch.rand(500, generator=g), torch.randint(0, 3, (500,))
    metric = SoftReliability(10, groups=3)
    metric.update(pred, label, group)
    ece = metric.compute()["ece_soft"]
    assert ece.tolist() == pytest.approx([soft_ece(pred[group == d], label[group == d]) for d in range(3)])
    # by hand for one group: sum over bins of |sum pred - sum label| / n
    sel = group == 0
    bins = (pred[sel] * 10).long()
    by_hand = sum(abs(pred[sel][bins == b].sum() - label[sel][bins == b].sum()) for b in range(10)) / sel.sum()
    assert ece[0].item() == pytest.approx(float(by_hand), rel=1e-5)


def test_the_constant_bar_is_the_lowest_loss_of_any_constant_prediction():
    labels = torch.tensor([0.9, 0.2, 1.0, 0.0, 0.6])
    w = 6.0
    bar = WeightedBCE(w, constant=True)
    bar.update(torch.zeros(5), labels)

    def loss_of(c):
        metric = WeightedBCE(w)
        metric.update(torch.full((5,), math.log(c / (1 - c))), labels)
        return metric.compute().item()

    grid = [loss_of(c / 1000) for c in range(1, 1000)]
    assert bar.compute().item() == pytest.approx(min(grid), rel=1e-4)
