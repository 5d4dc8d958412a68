"""The statistics head against constant K, the margin cut-off and the oracle on the replay sweep's saved traces.

Runs configs/bench/replay.yaml (dev, then test) keeping only the constant K, margin and oracle grids and the
SpecDec++ settings that name a head (the statistics head), then the dev/test table:

    python scripts/replay_head_stats.py     # -> runs/replay-v2-dev, runs/replay-v2, docs/replay-results-head-stats.md
"""

import subprocess
import sys
from pathlib import Path

from specdecpp.bench import load_config, run_benchmark

ROOT = Path(__file__).resolve().parents[1]

for overrides in (["datasets=[alpaca]", "split=dev", "prompts_per_dataset=50", "out_dir=runs/replay-v2-dev"],
                  ["out_dir=runs/replay-v2"]):
    cfg = load_config(ROOT / "configs/bench/replay.yaml", overrides)
    cfg.policies = [p for p in cfg.policies if p.name in ("constant", "margin", "oracle") or p.params.get("head")]
    run_benchmark(cfg)
subprocess.run([sys.executable, str(ROOT / "scripts/dev_test_table.py"), "--dev", "runs/replay-v2-dev", "--test",
                "runs/replay-v2", "--out", "docs/replay-results-head-stats.md"], check=True)
