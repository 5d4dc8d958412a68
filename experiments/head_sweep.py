"""Which statistics head on the prepared features: variants trained on the train split, compared on the dev split.

    python experiments/head_sweep.py --config configs/train/bf16_greedy_50k.yaml --out docs/head-sweep-greedy.md

Each variant is `train.py fit` on the config with a few overrides (features prepared once, so each takes a minute
or two on a CPU); the table gives the dev split's weighted BCE at the last epoch and its best epoch, against the
best constant predictor, and the AUROC. Reference rows: logistic regressions on the log top-2 margin alone and on
the three statistics, fitted on the train split with the same weighted loss (what the statistics say without a
head). Nothing here reads test prompts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from _report import report
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchmetrics.functional.classification import binary_auroc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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


def logistic_reference(dm) -> list[str]:
    """Weighted-BCE logistic regressions on the statistics (train split), scored on the dev split."""
    from specdecpp.head import stat_features
    from specdecpp.module import weighted_bce

    def xy(split):
        recs = dm.datasets[split].records
        return stat_features(*torch.cat([r.stats for r in recs]).unbind(-1)), torch.cat([r.p_acc for r in recs])

    (x, y), (xv, yv) = xy("train"), xy("val")
    rows = []
    for cols, name in (([2], "logistic on log top-2 margin"), ([0, 1, 2], "logistic on the three statistics")):
        w = torch.zeros(len(cols) + 1, dtype=torch.float64, requires_grad=True)

        def design(a, cols=cols):  # the chosen columns and an intercept
            return torch.cat([a[:, cols].double(), torch.ones(len(a), 1, dtype=torch.float64)], 1)

        opt = torch.optim.LBFGS([w], max_iter=500, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = weighted_bce(design(x) @ w, y, torch.ones_like(y, dtype=torch.bool), 6.0)
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            z = design(xv) @ w
            loss = weighted_bce(z, yv, torch.ones_like(yv, dtype=torch.bool), 6.0)
            sampled = torch.bernoulli(yv, generator=torch.Generator().manual_seed(0)).long()  # as validation does
            auroc = binary_auroc(z.float(), sampled)
        rows.append(f"| {name} (reference) | {float(loss):.4f} | | | {float(auroc):.4f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/train/bf16_greedy_50k.yaml")
    ap.add_argument("--root", type=Path, default=Path("runs/head-sweep"))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import train
    from specdecpp.data import AcceptanceDataModule

    rows, const = [], None
    for i, (name, overrides) in enumerate(VARIANTS.items()):
        out = args.root / Path(args.config).stem / f"v{i}"
        train.main(["fit", "--config", args.config, *BASE, *overrides, "--trainer.default_root_dir", str(out),
                    "--model.export_dir", str(out / "head")])
        curve = dev_curve(max((out / "lightning_logs").iterdir()))
        const = curve["val/loss_const"][-1]
        best = min(range(len(curve["val/loss"])), key=curve["val/loss"].__getitem__)
        rows.append(f"| {name} | {curve['val/loss'][-1]:.4f} | {curve['val/loss'][best]:.4f} (epoch {best + 1}) | "
                    f"{const:.4f} | {curve['val/auroc'][-1]:.4f} |")
    import yaml

    data_args = yaml.safe_load(Path(args.config).read_text())["data"]
    dm = AcceptanceDataModule(**{**data_args, "features": True, "prepare": False})
    dm.setup("fit")
    rows += logistic_reference(dm)
    text = (f"Statistics heads on the features of `{args.config}` (train split: training; dev split: every number "
            f"below). Weighted BCE (w_rej = 6) on the dev split at the last epoch, its best epoch, the best constant "
            f"predictor's, and the AUROC at the last epoch (against labels sampled from the soft labels: exact for "
            f"greedy labels).\n\n| variant | dev weighted BCE, last epoch | best epoch | constant | dev AUROC |\n"
            f"|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    report(text, args.out)


if __name__ == "__main__":
    main()
