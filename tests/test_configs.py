"""Every shipped config parses against its schema (LightningCLI for training, the sweep schema for the benchmark)."""

from pathlib import Path

import pytest
import yaml

from specdecpp.cli import main as train

ROOT = Path(__file__).resolve().parents[1]
TRAIN = sorted((ROOT / "configs" / "train").glob("*.yaml"))


@pytest.mark.parametrize("path", TRAIN, ids=lambda p: p.name)
def test_train_config_parses(path, capsys):
    layers = ["--config", "configs/train/tiny.yaml"] if path.name == "fsdp_cpu.yaml" else []  # an overlay
    with pytest.raises(SystemExit) as done:
        train(["fit", *layers, "--config", str(path), "--print_config"])
    assert done.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["target"] and "target" not in printed["model"]  # linked: the model takes data's pair


def test_train_configs_exist():
    assert {p.name for p in TRAIN} >= {"tiny.yaml", "demo.yaml", "paper.yaml", "fsdp_cpu.yaml"}


BENCH = sorted((ROOT / "configs" / "bench").glob("*.yaml"))


@pytest.mark.parametrize("path", BENCH, ids=lambda p: p.name)
def test_bench_config_parses_and_expands(path):
    from specdecpp.bench import expand_settings, load_config

    cfg = load_config(path)
    settings = expand_settings(cfg)
    assert settings[0].name == "target" and len(settings) > 1


def test_bench_configs_exist():
    assert {p.name for p in BENCH} >= {"tiny.yaml", "demo.yaml", "paper.yaml"}
