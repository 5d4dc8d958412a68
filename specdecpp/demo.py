"""The main job on the embedded default pair, end to end: prepare data, train the head, sweep the policies.

    python -m specdecpp.demo

Equivalent to `python train.py fit --config configs/train/demo.yaml` then
`python bench.py --config configs/bench/demo.yaml`. Prepared data is cached, so a second run skips step 1.
"""

from __future__ import annotations

import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from .bench import load_config, run_benchmark
    from .cli import main as train

    start = time.perf_counter()
    print("== 1-2/3: prepare acceptance labels and train the head (configs/train/demo.yaml)", flush=True)
    train(["fit", "--config", str(ROOT / "configs/train/demo.yaml")])
    print(f"\n== 3/3: sweep the length policies (configs/bench/demo.yaml), {time.perf_counter() - start:.0f} s so far",
          flush=True)
    run_benchmark(load_config(ROOT / "configs/bench/demo.yaml", ["overwrite=true"]))  # a re-run replaces the last
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
