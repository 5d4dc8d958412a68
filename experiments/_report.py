"""What every benchmark script does with its result: print it, and keep it where the README quotes it from."""

from pathlib import Path


def report(text: str, out: Path | None) -> None:
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
