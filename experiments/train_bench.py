"""Token-mode training throughput on CPU, and where a step's time goes: frozen draft vs head. The config's data
(default: the demo's) is read as token batches and the head is the paper's (hidden state only, D = 3): the mode in
which every step runs the draft (a statistics head on stored features never does).

    python experiments/train_bench.py --steps 8 --out docs/train-bench.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml
from _report import report

from specdecpp.data import AcceptanceDataModule
from specdecpp.lowp import fp32_linears
from specdecpp.training import AcceptanceHeadModule
from specdecpp.training.metrics import weighted_bce


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/train/demo.yaml")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    cfg = yaml.safe_load(Path(args.config).read_text())
    dm = AcceptanceDataModule(**{**cfg["data"], "features": False})
    dm.prepare_data()
    dm.setup("fit")
    model_args = {**{k: v for k, v in cfg["model"].items() if k != "export_dir"},
                  "head_stats": False, "head_hidden": True, "num_layers": 3}
    module = AcceptanceHeadModule(target=cfg["data"]["target"], draft=cfg["data"]["draft"], **model_args)
    module.configure_model()
    opt = torch.optim.AdamW(module.head.parameters(), lr=1e-3)
    t_draft = t_head = 0.0
    tokens = 0
    for step, batch in enumerate(dm.train_dataloader()):
        if step > args.steps:
            break
        t0 = time.perf_counter()
        with torch.no_grad(), fp32_linears(module.draft):  # as the module's token path runs a bf16 draft on a CPU
            hidden = module.draft.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                                use_cache=False).last_hidden_state
        t1 = time.perf_counter()
        loss = weighted_bce(module.head(hidden), batch["labels"], batch["loss_mask"], module.hparams.w_rej)
        loss.backward()
        opt.step()
        opt.zero_grad()
        t2 = time.perf_counter()
        if step > 0:  # step 0 warms up
            t_draft, t_head = t_draft + t1 - t0, t_head + t2 - t1
            tokens += int(batch["attention_mask"].sum())
    total = t_draft + t_head
    dtype = next(module.draft.parameters()).dtype
    text = (f"`{args.config}`, batch {cfg['data']['batch_size']}, draft in {dtype} on CPU, {args.steps} steps after "
            f"one warm-up "
            f"step: **{tokens / total:.0f} training tokens/s**; frozen draft forward **{t_draft / total:.0%}** of step "
            f"time, head forward + backward + AdamW **{t_head / total:.0%}** "
            f"({total / args.steps * 1000:.0f} ms/step).\n")
    report(text, args.out)


if __name__ == "__main__":
    main()
