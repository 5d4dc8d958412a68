"""Figures people would rather look at than read: reliability diagrams and, in the benchmark, Pareto fronts,
speedups with their intervals, stop calibration and what-if curves."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure  # the object API: no pyplot state, no backend forced on a notebook

from . import atomic


def reliability_figure(rel: dict, title: str = "acceptance head calibration (soft labels)"):
    """Mean true acceptance against mean predicted acceptance per bin; bar height below shows the bin counts."""
    count, pred, label = (rel[k].detach().cpu().float() for k in ("count", "mean_pred", "mean_label"))
    used = count > 0
    fig = Figure(figsize=(4.5, 5.5))
    ax, axc = fig.subplots(2, 1, gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="calibrated")
    ax.plot(pred[used], label[used], "o-", label=f"head (ECE {float(rel['ece_soft']):.3f})")
    ax.set(ylabel="mean true P(accept)", title=title, xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left")
    n = len(count)
    axc.bar([(i + 0.5) / n for i in range(n)], count.tolist(), width=0.9 / n)
    axc.set(xlabel="predicted P(accept)", ylabel="positions")
    fig.tight_layout()
    return fig


def reliability_by_position_figure(rel: dict, title: str = "calibration by position in a draft run"):
    """One reliability curve per position of a draft token in its run (a round's position: 1, 2, ..., the last
    position pooling the rest), from a grouped `SoftReliability`; the legend gives each position's soft ECE."""
    count, pred, label = (rel[k].detach().cpu().float() for k in ("count", "mean_pred", "mean_label"))
    fig = Figure(figsize=(5, 4.5))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="calibrated")
    for d in range(len(count)):
        used = count[d] > 0
        if used.any():
            name = f"{d + 1}+" if d == len(count) - 1 else str(d + 1)
            ece = float(rel["ece_soft"][d])
            ax.plot(pred[d][used], label[d][used], "o-", ms=3, label=f"position {name} (ECE {ece:.3f})")
    ax.set(xlabel="predicted P(accept)", ylabel="mean true P(accept)", title=title, xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    return fig


STYLES = {"constant": ("o", "tab:blue"), "specdecpp": ("*", "tab:red"), "heuristic": ("s", "tab:green"),
          "confidence": ("^", "tab:purple"), "adaptive_confidence": ("v", "tab:pink"), "svip": ("<", "tab:olive"),
          "adaedl": (">", "tab:cyan"), "margin": ("P", "tab:orange"), "online_confidence": ("h", "tab:brown"),
          "ceiling": ("d", "tab:gray"), "oracle": ("D", "black"), "target": ("x", "silver")}


def save(fig, path: Path) -> Path:
    """Write `fig` as a PNG under `path` atomically (a temporary sibling, then a rename): an interrupted redraw
    leaves the previous figure whole. Nothing is clipped: the image grows to hold a title wider than the axes."""
    with atomic.writing(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png", bbox_inches="tight")  # a long title or label widens the image
    return Path(path)


def style(policy: str) -> tuple[str, str | None]:
    """(marker, colour) of a policy; one not listed in STYLES gets matplotlib's next colour."""
    return STYLES.get(policy, ("o", None))


def variant(row: dict) -> str:
    """A summary row's policy, with what makes it another policy: per-position calibration, online recalibration of a
    head, the threshold-free stop ("auto": nothing to tune), and the head's path as the config gives it where the
    setting names its own head (the whole path: two heads exported to runs/a/head-stats and runs/b/head-stats are
    two policies, not one)."""
    params = row.get("params", {})
    head = params.get("head")
    kind = [label for label, on in (("per-position", params.get("per_position")), ("recalibrated", params.get(
        "online_lr")), ("auto", params.get("threshold") == "auto"), ("persist", params.get("persist"))) if on]
    return row["policy"] + "".join(f" {k}" for k in kind) + (f" ({head})" if head else "")


def pareto_figure(rows: list[dict], title: str = ""):
    """Discard rate (y) against verification rate (x), the SpecDec++ paper's hardware-free axes; lower left wins.
    One series per policy and head (a policy's second head is drawn hollow); settings are named on the points of
    small series only (constant K's k), the rest are in the run's tables."""
    fig = Figure(figsize=(5.5, 4.2))
    ax = fig.subplots()
    names = [variant(r) for r in rows]
    for name in dict.fromkeys([*(p for p in STYLES if p in names), *names]):
        policy = name.split(" ")[0]
        marker, color = style(policy)
        pts = sorted((r["verification_rate"], r["discard_rate"], r["setting"], r.get("verification_rate_ci"),
                      r.get("discard_rate_ci")) for r, n in zip(rows, names) if n == name)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, marker=marker, color=color, ls="-" if len(pts) > 1 else "", ms=9 if marker == "*" else 6,
                mfc="none" if name != policy else None, label=name)
        if all(p[3] and p[4] for p in pts):  # 95% bootstrap intervals over prompts
            ax.errorbar(xs, ys, xerr=[[max(x - p[3][0], 0) for x, p in zip(xs, pts)],
                                      [max(p[3][1] - x, 0) for x, p in zip(xs, pts)]],
                        yerr=[[max(y - p[4][0], 0) for y, p in zip(ys, pts)],
                              [max(p[4][1] - y, 0) for y, p in zip(ys, pts)]],
                        fmt="none", ecolor=color, alpha=0.5, lw=1)
        for x, y, label, *_ in pts if len(pts) <= 8 else ():
            ax.annotate(label.split(" ", 1)[-1] if " " in label else "", (x, y), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    ax.set(xlabel="verification rate (target calls / token)", ylabel="discard rate (discarded / token)",
           title=f"Pareto: {title}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def speedup_figure(rows: list[dict], title: str = ""):
    """Each setting's speedup over target-only with its 95% interval over prompts, one row per setting in the run's
    order (target-only, the 1.0 line, left out), coloured by policy: the intervals that overlap are read at a glance."""
    rows = [r for r in rows if r["policy"] != "target"]
    fig = Figure(figsize=(6, 1.2 + 0.32 * len(rows)))
    ax = fig.subplots()
    ax.axvline(1.0, ls="--", c="grey", lw=1)  # target-only
    for y, r in enumerate(rows):
        marker, color = style(r["policy"])
        lo, hi = r.get("speedup_ci") or (r["speedup"], r["speedup"])
        # a percentile interval of a ratio of sums may leave out its own estimate (few prompts, skewed
        # resamples): the bar then ends at the point rather than refusing to draw
        err = [[max(r["speedup"] - lo, 0.0)], [max(hi - r["speedup"], 0.0)]]
        ax.errorbar([r["speedup"]], [y], xerr=err, fmt=marker, color=color, ms=9 if marker == "*" else 6, capsize=3)
    ax.set_yticks(range(len(rows)), [r["setting"] for r in rows], fontsize=7)
    ax.invert_yaxis()  # the run's first setting on top
    ax.set(xlabel="speedup over target-only (95% interval over prompts)", title=f"speedup: {title}")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def stop_calibration_figure(tables: dict[str, list[dict]], title: str = ""):
    """Predicted P(>= 1 rejection) at each stop against the share of rounds where one happened, binned; one series
    per setting (`tables`: setting -> bins of bench.summary.stop_calibration), marker area by rounds."""
    fig = Figure(figsize=(5, 4.2))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    for setting, table in tables.items():
        ax.scatter([t["predicted"] for t in table], [t["realised"] for t in table],
                   s=[10 + 2 * t["rounds"] for t in table], alpha=0.7, label=setting)
    ax.set(xlabel="predicted P(>= 1 rejection) at stop", ylabel="realised share of rounds with a rejection",
           xlim=(0, 1), ylim=(0, 1), title=f"stop calibration: {title}" if title else "stop calibration")
    ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def whatif_figure(draft_costs: list[float], best: dict[str, list[float]], measured: float, title: str = ""):
    """Predicted speedup over target-only of each policy's best setting as the draft step cost varies."""
    fig = Figure(figsize=(5.5, 4.2))
    ax = fig.subplots()
    for policy, ys in best.items():
        marker, color = style(policy)
        ax.plot(draft_costs, ys, marker=marker, color=color, ms=4, label=policy, lw=2 if policy == "specdecpp" else 1)
    ax.axvline(measured, color="grey", ls="--", lw=1, label=f"measured c = {measured:.2f}")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set(xscale="log", xlabel="draft step cost c (target calls)", ylabel="predicted speedup (best setting)",
           title=f"what if: {title}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
