"""Benchmark sweeps: `python bench.py --config configs/bench/demo.yaml [key=value ...]`."""

import argparse

from specdecpp.bench import load_config, run_benchmark


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Sweep length policies x datasets x seeds; write a run directory.")
    ap.add_argument("--config", help="YAML file (configs/bench/...); omitted: the schema defaults")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. max_new_tokens=32 datasets=[gsm8k]")
    args = ap.parse_args(argv)
    run_benchmark(load_config(args.config, args.overrides))


if __name__ == "__main__":
    main()
