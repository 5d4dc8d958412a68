"""Which statistics head on the prepared features: variants trained on the train split, compared on the dev split.

    python experiments/head_sweep.py --config configs/train/bf16_greedy_50k.yaml --out docs/head-sweep-greedy.md

Each variant is `train.py fit` on the config with a few overrides (features prepared once, so each takes a minute
or two on a CPU); the table gives the dev split's weighted BCE at the last epoch and its best epoch, against the
best constant predictor, and the AUROC at both. Reference rows: logistic regressions on the log top-2 margin alone,
on the three statistics, and on those plus the standardised hidden state at five L2 strengths, fitted on the train
split with the same weighted loss (what the features say without a head). Nothing here reads test prompts.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch
from _report import report
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchmetrics.functional.classification import binary_auroc

VARIANTS = {
    "statistics + hidden, D = 3, lr 1e-3, 30 epochs": [],
    "statistics + hidden, D = 3, lr 1e-3, 4 epochs": ["--trainer.max_epochs", "4"],
    "statistics + hidden, D = 1, lr 1e-3, 6 epochs": ["--model.num_layers", "1", "--trainer.max_epochs", "6"],
    "statistics + hidden, D = 0, lr 1e-3, 10 epochs": ["--model.num_layers", "0", "--trainer.max_epochs", "10"],
    "statistics + hidden, D = 0, lr 3e-2, 30 epochs": ["--model.num_layers", "0", "--model.lr", "3e-2"],
    "statistics only, lr 1e-3, 10 epochs": ["--model.head_hidden", "false", "--trainer.max_epochs", "10"],
    "statistics only, lr 3e-2, 30 epochs": ["--model.head_hidden", "false", "--model.lr", "3e-2"],
}
BASE = ["--model.head_stats", "true", "--data.features", "true", "--trainer.max_epochs", "30", "--model.num_layers",
        "3", "--model.lr", "1e-3", "--model.head_hidden", "true", "--trainer.enable_progress_bar", "false"]


def dev_curve(log_dir: Path) -> dict[str, list[float]]:
    ea = EventAccumulator(str(log_dir))
    ea.Reload()
    return {tag: [e.value for e in ea.Scalars(tag)] for tag in ("val/loss", "val/loss_const", "val/auroc")}


def logistic_reference(dm, w_rej: float) -> list[str]:
    """Weighted-BCE logistic regressions (train split), scored on the dev split: on the statistics, and on the
    statistics plus the draft's hidden state, standardised on the train split (the hidden state's dimensions run
    from 1 to 30 in scale), at five L2 strengths on the hidden state's weights (the strongest approaches the
    statistics alone). A convex, well-conditioned fit: what the hidden state adds on unseen prompts, whatever a
    head's optimiser makes of it."""
    from specdecpp.head import stat_features
    from specdecpp.training.metrics import weighted_bce

    def xy(split):
        recs = dm.datasets[split].records
        stats = stat_features(*torch.cat([r.stats for r in recs]).unbind(-1))
        return torch.cat([stats, torch.cat([r.hidden for r in recs])], 1).double(), torch.cat([r.p_acc for r in recs])

    (x, y), (xv, yv) = xy("train"), xy("val")
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x, xv = (x - mean) / std, (xv - mean) / std
    fits = [("log top-2 margin", [2], 0.0), ("the three statistics", [0, 1, 2], 0.0)] + [
        (f"the three statistics + the hidden state, L2 {lam:g}", list(range(x.shape[1])), lam)
        for lam in (1e-3, 1e-2, 1e-1, 1.0, 10.0)]
    rows = []
    for name, cols, lam in fits:
        w = torch.zeros(len(cols) + 1, dtype=torch.float64, requires_grad=True)

        def design(a, cols=cols):  # the chosen columns and an intercept
            return torch.cat([a[:, cols], torch.ones(len(a), 1, dtype=torch.float64)], 1)

        opt = torch.optim.LBFGS([w], max_iter=500, line_search_fn="strong_wolfe")

        def closure(cols=cols, lam=lam, w=w, opt=opt, design=design):
            opt.zero_grad()
            loss = weighted_bce(design(x) @ w, y, torch.ones_like(y, dtype=torch.bool), w_rej)
            (loss + lam * w[3:-1].square().sum()).backward()  # the hidden state's weights only
            return loss

        opt.step(closure)
        with torch.no_grad():
            z = design(xv) @ w
            loss = weighted_bce(z, yv, torch.ones_like(yv, dtype=torch.bool), w_rej)
            sampled = torch.bernoulli(yv, generator=torch.Generator().manual_seed(0)).long()  # as validation does
            auroc = binary_auroc(z.float(), sampled)
        rows.append(f"| logistic on {name} (reference) | {float(loss):.4f} | | | {float(auroc):.4f} | |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/train/bf16_greedy_50k.yaml")
    ap.add_argument("--root", type=Path, default=Path("runs/head-sweep"))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from specdecpp.cli import main as train
    from specdecpp.data import AcceptanceDataModule

    rows, const = [], None
    for i, (name, overrides) in enumerate(VARIANTS.items()):
        out = args.root / Path(args.config).stem / f"v{i}"
        train(["fit", "--config", args.config, *BASE, *overrides, "--trainer.default_root_dir", str(out),
                    "--model.export_dir", str(out / "head")])
        curve = dev_curve(max((out / "lightning_logs").glob("version_*"), key=lambda d: int(d.name.split("_")[1])))
        const = curve["val/loss_const"][-1]
        best = min(range(len(curve["val/loss"])), key=curve["val/loss"].__getitem__)
        rows.append(f"| {name} | {curve['val/loss'][-1]:.4f} | {curve['val/loss'][best]:.4f} (epoch {best + 1}) | "
                    f"{const:.4f} | {curve['val/auroc'][-1]:.4f} | {curve['val/auroc'][best]:.4f} |")
    import yaml

    config = yaml.safe_load(Path(args.config).read_text())
    dm = AcceptanceDataModule(**{**config["data"], "features": True, "prepare": False})
    dm.setup("fit")
    rows += logistic_reference(dm, float(config["model"].get("w_rej", 6.0)))
    text = (f"Heads on the features of `{args.config}` (train split: training; dev split: every number below). "
            f"Weighted BCE (the config's w_rej) on the dev split at the last epoch, its best epoch, the best constant "
            f"predictor's, and the AUROC at the last and at the best epoch, the one a head exports (against labels "
            f"sampled from the soft labels: exact for greedy labels).\n\n| variant | dev weighted BCE, last epoch | "
            f"best epoch | constant | dev AUROC, last epoch | at the best epoch |\n|---|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n")
    if args.out:  # the page says which command made it
        text = f"`python {shlex.join(sys.argv)}`\n\n{text}"
    report(text, args.out)


if __name__ == "__main__":
    main()
