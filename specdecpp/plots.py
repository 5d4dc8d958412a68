"""Figures people would rather look at than read: reliability diagrams (and, in the benchmark, Pareto fronts)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def reliability_figure(rel: dict, title: str = "acceptance head calibration (soft labels)"):
    """Mean true acceptance against mean predicted acceptance per bin; bar height below shows the bin counts."""
    count, pred, label = (rel[k].detach().cpu().float() for k in ("count", "mean_pred", "mean_label"))
    used = count > 0
    fig, (ax, axc) = plt.subplots(2, 1, figsize=(4.5, 5.5), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="calibrated")
    ax.plot(pred[used], label[used], "o-", label=f"head (ECE {float(rel['ece_soft']):.3f})")
    ax.set(ylabel="mean true P(accept)", title=title, xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left")
    n = len(count)
    axc.bar([(i + 0.5) / n for i in range(n)], count.tolist(), width=0.9 / n)
    axc.set(xlabel="predicted P(accept)", ylabel="positions")
    fig.tight_layout()
    return fig
