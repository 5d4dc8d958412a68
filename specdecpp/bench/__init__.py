"""Benchmark sweeps of adaptive speculative decoding: one module generates (`benchmark`), callbacks observe
(`callbacks`); `config` is the sweep's schema and `summary` turns records into rows with intervals."""

from .benchmark import Benchmark, run_benchmark
from .callbacks import Callback, default_callbacks
from .config import BenchConfig, PolicySpec, Setting, expand_settings, load_config
from .summary import best_by_policy, best_setting, format_summary, summarize

__all__ = ["BenchConfig", "Benchmark", "Callback", "PolicySpec", "Setting", "best_by_policy", "best_setting",
           "default_callbacks", "expand_settings", "format_summary", "load_config", "run_benchmark", "summarize"]
