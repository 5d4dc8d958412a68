"""Writes that never leave a half-written file under its final name: write a temporary sibling, then rename.

A rename within one folder is atomic on POSIX, so a reader sees the old file or the new one, never a mix.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def replace_dir(new: Path, final: Path) -> Path:
    """Put the finished folder `new` at `final`; an older `final` is removed only once `new` is in its place."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)
    return final
