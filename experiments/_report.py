"""What every benchmark script does with its result: print it, and keep it where the README quotes it from."""

import os
import platform
from pathlib import Path

from specdecpp.atomic import write_text


def report(text: str, out: Path | None) -> None:
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text(out, text)  # atomic: an interrupted run leaves the previous page whole


def machine() -> str:
    """The CPU a number came from: model name, cores, and the flags that decide which dtype is fast on it."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.processor() or platform.machine())
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    fast = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16") if f in flags]
    return f"{name}, {os.cpu_count()} cores, {' '.join(fast) or 'no AVX2'}"
