"""How well each signal predicts acceptance of the draft's greedy token, on replay traces of held-out prompts.

Along a trace, position j holds the draft's greedy token D_j given prompt + X_<j, accepted iff D_j == X_j: the
label a greedy round sees when it drafts D_j after accepting everything before it. Signals: the draft's own
statistics (q(D_j), -entropy, top-2 margin) and each acceptance head, fed as the engine feeds it: a statistics head
reads the state that proposed D_j and its statistics; the paper's head reads the state *at* D_j (the next
position's state when D_j == X_j, else the first state of the branch after D_j).
"""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import binary_auroc

from .calibration import STOP_WINDOWS, soft_ece
from .head import stat_features
from .replay import Trace


@torch.inference_mode()
def trace_signals(trace: Trace, heads: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Per position of `trace` (the last one dropped: the paper's head has no state for it): the label (1 =
    accepted) and every signal's score, higher meaning more likely accepted; heads give P(accept)."""
    if len(trace.target) < 2:
        return {}
    n = len(trace.target) - 1

    def has_state_at(j: int) -> bool:  # the state *at* D_j: the next position's, or the branch's first step
        b = trace.branches.get(j)
        return trace.draft[j] == trace.target[j] or (b is not None and len(b.steps) >= 1)

    # a mismatch whose D_j is EOS has no branch (drafting stops there): left out of every signal alike
    keep = [j for j in range(max(n, 0)) if has_state_at(j)]
    if not keep:
        return {}
    toks = [trace.tokens[j] for j in keep]
    out = {"label": torch.tensor([float(trace.draft[j] == trace.target[j]) for j in keep]),
           "draft prob": torch.tensor([t.prob for t in toks]),
           "-entropy": -torch.tensor([t.entropy for t in toks]),
           "top-2 margin": torch.tensor([t.margin for t in toks])}
    for name, head in heads.items():
        if head.n_stats:
            stats = stat_features(out["draft prob"], -out["-entropy"], out["top-2 margin"])
            logits = head(torch.stack([t.hidden for t in toks]).float(), stats)
        else:
            at = [trace.tokens[j + 1].hidden if trace.draft[j] == trace.target[j] else trace.branch(j, 1)[1].hidden
                  for j in keep]
            logits = head(torch.stack(at).float())
        out[name] = torch.sigmoid(logits.float())
    return out


def signal_report(signals: list[dict[str, torch.Tensor]], heads: list[str]) -> dict:
    """AUROC of every signal for acceptance; for heads also ECE and the stop-event calibration along the traces:
    mean predicted P(>= 1 rejection among k tokens from j) = 1 - prod P^ against how often one happened."""
    cat = {k: torch.cat([s[k] for s in signals if s]) for k in signals[0]}
    label = cat["label"]
    report = {"positions": label.numel(), "rejections": int((label == 0).sum()),
              "auroc": {k: float(binary_auroc(v, label.long())) for k, v in cat.items() if k != "label"},
              "ece": {h: soft_ece(cat[h], label) for h in heads}, "stop_events": {}}
    for h in heads:
        rows = {}
        for k in STOP_WINDOWS:
            pred, real = [], []
            for s in signals:
                if not s or len(s["label"]) < k:
                    continue
                win = s[h].unfold(0, k, 1)  # [n - k + 1, k]
                pred.append(1 - win.prod(-1))
                real.append((s["label"].unfold(0, k, 1) == 0).any(-1).float())
            if pred:
                rows[f"k={k}"] = {"predicted": float(torch.cat(pred).mean()), "realised": float(torch.cat(real).mean())}
        report["stop_events"][h] = rows
    return report
