"""What every benchmark script does with its result: print it, and keep it where the README quotes it from."""

from pathlib import Path

from specdecpp.atomic import write_text


def report(text: str, out: Path | None) -> None:
    print(text)
    if out:
        write_text(out, text)  # atomic: an interrupted run leaves the previous page whole

