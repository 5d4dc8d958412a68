"""Writes that never leave a half-written file under its final name: write a temporary sibling, flush it to disk,
then rename. A rename within one folder is atomic on POSIX, so a reader sees the old file or the new one, never a
mix; the fsync before it means a crash of the machine does not leave the new name on an empty file either."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def writing(path: str | Path) -> Iterator[Path]:
    """`with writing(path) as tmp:` write `tmp` (any writer: safetensors, savefig, open); on success it is synced
    and renamed to `path`, on an exception removed. The temporary name keeps the suffix (writers that infer a
    format from it still work) and starts with a dot (globs for the final files do not see it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    with writing(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_bytes(path: str | Path, data: bytes) -> Path:
    with writing(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def replace_dir(new: Path, final: Path) -> Path:
    """Put the finished folder `new` at `final`; an older `final` is removed only once `new` is in its place."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)
    return final
