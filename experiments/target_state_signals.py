"""Does the target's free state predict acceptance beyond the draft's own q(Y)? After each verifying call the
target has scored the round's last position for free: its distribution p and the hidden state that produced it. A
token drafted d positions into the next round sees that state at position j - d.

On the prepared T = 1 records of the sibling pair (X ~ p, Y_j ~ q(. | X_<j), soft label min(1, p/q) at Y_j) this
runs the target once over each prompt + X, draws each position's round offset d from 1..8 (as far as the response
allows), and fits soft-label logistic regressions on the train prompts, each L2 penalty chosen by 4-fold
cross-validation over train prompts (the dev prompts choose nothing):
  * q-stats: the statistics head's inputs (log q(Y), entropy and log top-2 margin of q);
  * + target scalars: entropy and top probability of p_(j-d), log p_(j-d)(X_(j-d)), d;
  * + target hidden: the same and the target's 1536-d final hidden state at j - d;
  * + last round: the scalars and the accepted fraction of the round that ended at j - d (length from 1..8,
    outcomes drawn from the soft labels).
On the unseen dev prompts: AUROC against hard labels drawn from the soft ones (mean of 20 draws), soft log loss, and
each AUROC gain over q-stats with a 95% bootstrap interval over prompts.

    python experiments/target_state_signals.py --out docs/target-state-signals.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _report import report
from torchmetrics.functional.classification import binary_auroc
from tqdm import tqdm

from specdecpp.atomic import writing
from specdecpp.data import load_prepared
from specdecpp.fetch import cache_dir
from specdecpp.head import stat_features
from specdecpp.lowp import cpu_description
from specdecpp.models import load_model

K_MAX = 8


@torch.inference_mode()
def target_states(model, records) -> list[dict]:
    """Per record: p's entropy, top probability and log p(X_i), and the final hidden state producing p_i."""
    out = []
    for r in tqdm(records, desc="target pass", unit="record"):
        ids = torch.cat([r.prompt, r.target])[None]
        hidden = model.model(input_ids=ids).last_hidden_state[0, len(r.prompt) - 1: -1]  # [L, H]: produces p_i
        logp = torch.log_softmax(model.lm_head(hidden).float(), -1)
        p = logp.exp()
        out.append({"entropy": -(p * logp).sum(-1), "top": p.max(-1).values,
                    "logp_x": logp.gather(-1, r.target[:, None])[:, 0], "hidden": hidden.float()})
    return out


def features(records, states, seed: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Feature blocks, soft labels and each position's prompt number, for positions j >= 1."""
    g, g_round = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 100)
    blocks = {"q": [], "scalars": [], "hidden": [], "round": []}
    labels, groups = [], []
    for n, (r, s) in enumerate(zip(records, states)):
        j = torch.arange(1, len(r.target))
        d = torch.minimum(torch.randint(1, K_MAX + 1, (len(j),), generator=g), j)
        at = j - d
        blocks["q"].append(stat_features(*r.stats[j].unbind(-1)))
        blocks["scalars"].append(torch.stack([s["entropy"][at], s["top"][at], s["logp_x"][at].clamp_min(-30),
                                              d.float()], -1))
        blocks["hidden"].append(s["hidden"][at])
        accepted = torch.cat([torch.zeros(1), (torch.rand(len(r.target), generator=g_round) < r.p_acc).cumsum(0)])
        first = (at + 1 - torch.randint(1, K_MAX + 1, (len(j),), generator=g_round)).clamp_min(0)
        blocks["round"].append(((accepted[at + 1] - accepted[first]) / (at + 1 - first))[:, None])
        labels.append(r.p_acc[j].float())
        groups.append(torch.full((len(j),), n))
    return {k: torch.cat(v) for k, v in blocks.items()}, torch.cat(labels), torch.cat(groups)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float) -> torch.Tensor:
    """Weights (bias last) of a soft-label logistic regression with an L2 penalty, by L-BFGS."""
    x = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1, max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w, y.double()) + l2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def predict(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(len(x), 1)], 1).double() @ w


def cross_validated_loss(x: torch.Tensor, y: torch.Tensor, groups: torch.Tensor, l2: float, folds: int = 4) -> float:
    """Soft-label log loss of held-out prompts, each fold of prompts predicted by a fit on the others."""
    fold = groups % folds
    loss = 0.0
    for f in range(folds):
        w = fit_logistic(x[fold != f], y[fold != f], l2)
        loss += float(torch.nn.functional.binary_cross_entropy_with_logits(
            predict(w, x[fold == f]), y[fold == f].double(), reduction="sum"))
    return loss / len(y)


def mean_auroc(score: torch.Tensor, soft: torch.Tensor, draws: torch.Tensor) -> float:
    return float(torch.stack([binary_auroc(score, (u < soft).long()) for u in draws]).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", type=Path, default=cache_dir() / "data" / "8041d9a2f01737c1",
                    help="prepared T = 1 records with features (configs/train/qwen_t1.yaml's train split)")
    ap.add_argument("--dev", type=Path, default=cache_dir() / "data" / "3712eb39865023d3")
    ap.add_argument("--target", default="qwen2.5-coder-1.5b")
    ap.add_argument("--l2", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2, 1e-1, 1.0], help="candidates")
    ap.add_argument("--boot", type=int, default=300)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    train, dev = load_prepared(args.train, prompt_order=True)[0], load_prepared(args.dev, prompt_order=True)[0]
    states = cache_dir() / "target_states" / f"{args.train.name}-{args.dev.name}.pt"  # the target pass: minutes
    if not states.is_file():
        model = load_model(args.target, "float32").eval()
        computed = {"train": target_states(model, train), "dev": target_states(model, dev)}
        with writing(states) as tmp:  # an interrupted save never leaves a truncated cache to load next time
            torch.save(computed, tmp)
    states = torch.load(states)
    xs_train, y_train, g_train = features(train, states["train"], seed=0)
    xs_dev, y_dev, g_dev = features(dev, states["dev"], seed=1)
    variants = {"q(Y) alone (no fit)": None, "q-stats": ["q"], "+ target scalars": ["q", "scalars"],
                "+ target hidden": ["q", "scalars", "hidden"], "target scalars alone": ["scalars"],
                "+ target scalars + last round": ["q", "scalars", "round"]}
    scores, chosen = {}, {}
    for name, parts in variants.items():
        if parts is None:
            scores[name] = xs_dev["q"][:, 0].double()
            continue
        x_train = torch.cat([xs_train[p] for p in parts], 1)
        mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
        x_train = (x_train - mean) / std
        chosen[name] = min(args.l2, key=lambda l2: cross_validated_loss(x_train, y_train, g_train, l2))
        w = fit_logistic(x_train, y_train, chosen[name])
        scores[name] = predict(w, (torch.cat([xs_dev[p] for p in parts], 1) - mean) / std)
    gen = torch.Generator().manual_seed(0)
    draws = torch.rand(20, len(y_dev), generator=gen)
    positions = [torch.nonzero(g_dev == n)[:, 0] for n in g_dev.unique()]
    boot = [torch.cat([positions[i] for i in rows])
            for rows in torch.randint(len(positions), (args.boot, len(positions)), generator=gen)]
    lines = [f"# The target's free state as acceptance signal\n\n{cpu_description()}. Train: {len(train)} prompts, "
             f"{len(y_train)} positions; dev (unseen prompts): {len(dev)} prompts, {len(y_dev)} positions; T = 1 "
             f"records of `configs/train/qwen_t1.yaml` (Alpaca), round offsets d ~ U{{1..{K_MAX}}}; logistic "
             f"regressions with soft labels, L2 chosen from {args.l2} by 4-fold cross-validation over train prompts."
             f"\n\n`python experiments/target_state_signals.py`\n",
             "| signal | L2 | dev AUROC | soft log loss | AUROC gain over q-stats [95% interval over prompts] |",
             "|---|---|---|---|---|"]
    base = scores["q-stats"]
    for name, score in scores.items():
        auc = mean_auroc(score, y_dev, draws)
        loss = "-" if name == "q(Y) alone (no fit)" else \
            f"{float(torch.nn.functional.binary_cross_entropy_with_logits(score, y_dev.double())):.4f}"
        gains = []
        for keep in boot:  # resampled prompts, each with all its positions (a prompt drawn twice counts twice)
            gains.append(mean_auroc(score[keep], y_dev[keep], draws[:2, keep])
                         - mean_auroc(base[keep], y_dev[keep], draws[:2, keep]))
        lo, hi = torch.quantile(torch.tensor(gains), torch.tensor([0.025, 0.975])).tolist()
        gain = auc - mean_auroc(base, y_dev, draws)
        lines.append(f"| {name} | {chosen.get(name, '-')} | {auc:.4f} | {loss} | {gain:+.4f} "
                     f"[{lo:+.4f}, {hi:+.4f}] |")
    report("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
