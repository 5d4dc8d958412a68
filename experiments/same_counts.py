"""Do two benchmark runs hold the same counts, record for record? (A refactor of the engine or the replay must not
change what a stored run counted.) Times are ignored.

    git worktree add /tmp/old <rev>
    (cd /tmp/old && PYTHONPATH=/tmp/old python bench.py --config configs/bench/tiny.yaml mode=replay \\
        trace_cache=false prompts_per_dataset=4 max_new_tokens=24 out_dir=/tmp/stored)
    python bench.py --config configs/bench/tiny.yaml mode=replay trace_cache=false prompts_per_dataset=4 \\
        max_new_tokens=24 out_dir=/tmp/new
    python experiments/same_counts.py /tmp/stored /tmp/new
"""

import sys
from pathlib import Path

from specdecpp.bench.summary import read_run_records

KEYS = ["dataset", "prompt_id", "seed", "setting", "new_tokens", "target_calls", "draft_calls", "drafted", "accepted",
        "discarded", "verified_rounds", "round_detail", "stop_log", "wasted_draft_steps"]


def counts(run: Path) -> list[dict]:
    return [{k: r.get(k) for k in KEYS} for r in read_run_records(run)]


if __name__ == "__main__":
    a, b = (counts(Path(p)) for p in sys.argv[1:3])
    differ = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    print(f"{len(a)} vs {len(b)} records; {len(differ)} differ" + (f" (first: record {differ[0]})" if differ else ""))
    sys.exit(1 if differ or len(a) != len(b) else 0)
