"""How well a trained statistics head ranks acceptance on its dev split, against the draft's own statistics.

    python experiments/head_dev_signals.py --config configs/train/qwen_t1.yaml --head runs/qwen-t1/head-stats \
        --out docs/qwen-head-dev.md

Reads the dev records that `train.py fit --config ...` prepared (with `data.features: true`), so it runs no model.
At T = 1 a position's label is soft (min(1, p/q) at the draft's sample): AUROC is taken against Bernoulli draws of
it, averaged over `--draws` seeds, the way the training module's val/auroc is.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml
from _report import report
from torchmetrics.functional.classification import binary_auroc

from specdecpp.calibration import soft_ece
from specdecpp.data import AcceptanceDataModule, load_blocks, summarize
from specdecpp.head import AcceptanceHead, stat_features


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="the train config whose dev split to read")
    ap.add_argument("--head", required=True, help="exported head directory")
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    data_args = yaml.safe_load(Path(args.config).read_text())["data"]
    dm = AcceptanceDataModule(**{**data_args, "prepare": False})
    records, skipped = load_blocks(dm.dirs()["val"])
    if not records or records[0].stats is None:
        raise SystemExit("the dev split holds no draft features: prepare it with data.features: true")
    stats = torch.cat([r.stats for r in records]).float()  # [N, 3] q(Y), entropy, top-2 margin
    hidden = torch.cat([r.hidden for r in records]).float()
    labels = torch.cat([r.p_acc for r in records]).float()
    head = AcceptanceHead.from_pretrained(args.head).eval()
    with torch.no_grad():
        pred = torch.sigmoid(head(hidden, stat_features(*stats.unbind(-1))))
    signals = {"head (Platt-calibrated)": pred, "draft prob q(Y)": stats[:, 0], "-entropy": -stats[:, 1],
               "top-2 margin": stats[:, 2]}
    draws = [torch.bernoulli(labels, generator=torch.Generator().manual_seed(s)).long() for s in range(args.draws)]
    rows = []
    for name, score in signals.items():
        aurocs = torch.stack([binary_auroc(score, y) for y in draws])
        rows.append(f"| {name} | {aurocs.mean():.3f} ({aurocs.min():.3f}-{aurocs.max():.3f}) |")
    summary = summarize(records, skipped)
    lines = [f"# Dev-split signals: {args.head}", "",
             f"`python experiments/head_dev_signals.py --config {args.config} --head {args.head}`", "",
             f"{summary['positions']:,} dev positions of {summary['prompts']} prompts, mean label "
             f"{summary['mean_p_acc']:.3f}; AUROC against {args.draws} Bernoulli draws of the soft label "
             "(mean, min-max).", "",
             "| signal | AUROC |", "|---|---|", *rows, "",
             f"Head calibration on these positions (its Platt fit was made on its training run's dev split): mean "
             f"prediction {pred.mean():.3f} against mean label {labels.mean():.3f}, soft-label ECE "
             f"{soft_ece(pred, labels):.4f}.",
             ""]
    report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
