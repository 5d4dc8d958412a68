import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import run_script
from torch.utils.data import DataLoader

from specdecpp.calibration import soft_ece
from specdecpp.data import AcceptanceDataModule, EpochSampler, MixedDataset, Record, collate
from specdecpp.head import AcceptanceHead, fit_platt
from specdecpp.training import AcceptanceHeadModule
from specdecpp.training.metrics import binary_kl, weighted_bce

ROOT = Path(__file__).resolve().parents[1]


def test_weighted_bce_matches_the_formula_computed_by_hand():
    logits = torch.tensor([[0.3, -1.2, 2.0, 0.0], [1.5, -0.4, 0.7, -2.2]])
    labels = torch.tensor([[0.9, 0.1, 1.0, 0.5], [0.0, 0.6, 0.3, 0.8]])
    mask = torch.tensor([[True, True, False, True], [True, False, True, True]])
    w = 6.0
    num = den = 0.0
    for z, p, m in zip(logits.flatten().tolist(), labels.flatten().tolist(), mask.flatten().tolist()):
        if m:
            p_hat = 1 / (1 + math.exp(-z))
            num += w * (1 - p) * -math.log(1 - p_hat) + p * -math.log(p_hat)
            den += w * (1 - p) + p
    assert weighted_bce(logits, labels, mask, w).item() == pytest.approx(num / den, rel=1e-6)
    # w_rej = 1 and hard labels: plain BCE
    hard = (labels > 0.5).float()
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[mask], hard[mask])
    assert weighted_bce(logits, hard, mask, 1.0).item() == pytest.approx(expected.item(), rel=1e-6)


def test_binary_kl_is_zero_at_the_label_and_positive_elsewhere():
    p = torch.tensor([0.0, 0.3, 1.0])
    assert torch.allclose(binary_kl(p, p), torch.zeros(3), atol=1e-5)
    assert (binary_kl(p, torch.tensor([0.5, 0.9, 0.2])) > 0).all()


def test_head_blocks_are_independent_and_save_and_load(tmp_path):
    sizes = [sum(p.numel() for p in AcceptanceHead(16, d).parameters()) for d in range(4)]
    assert sizes == [17 + d * (16 * 16 + 16) for d in range(4)]  # no weight tying between blocks
    head = AcceptanceHead(16, 3, {"name": "x", "hidden_size": 16})
    x = torch.randn(5, 16)
    loaded = AcceptanceHead.from_pretrained(head.save_pretrained(tmp_path / "h"))
    assert torch.allclose(loaded(x), head(x)) and loaded.draft["name"] == "x"
    with pytest.raises(ValueError, match=r"hidden_size 16 \(trained\) vs 32"):
        loaded.check_draft(type("Cfg", (), {"hidden_size": 32})())


def test_a_statistics_only_head_ignores_the_hidden_state_and_round_trips(tmp_path):
    head = AcceptanceHead(16, 3, {"name": "x"}, n_stats=3, use_hidden=False)
    assert sum(p.numel() for p in head.parameters()) == 3 * 32 + 32 + 32 + 1  # the statistics path only
    stats = torch.randn(5, 3)
    assert torch.equal(head(torch.randn(5, 16), stats), head(torch.randn(5, 16), stats))
    loaded = AcceptanceHead.from_pretrained(head.save_pretrained(tmp_path / "h"))
    assert not loaded.use_hidden and torch.equal(loaded(torch.zeros(5, 16), stats), head(torch.zeros(5, 16), stats))
    with pytest.raises(ValueError, match="must read the draft's statistics"):
        AcceptanceHead(16, 3, use_hidden=False)


def test_head_loads_the_upstream_checkpoint_layout(tmp_path):
    h, depth = 8, 3
    block_w, block_b = torch.randn(h, h), torch.randn(h)
    out_w, out_b = torch.randn(2, h), torch.randn(2)
    state = {f"model.{i}.linear.weight": block_w for i in range(depth)}  # upstream's blocks are one tied block
    state |= {f"model.{i}.linear.bias": block_b for i in range(depth)}
    state |= {f"model.{depth}.weight": out_w, f"model.{depth}.bias": out_b}
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": h, "num_layers": depth}))
    head = AcceptanceHead.from_pretrained(tmp_path)
    x = torch.randn(4, h)
    y = x
    for _ in range(depth):
        y = y + torch.nn.functional.silu(y @ block_w.T + block_b)
    upstream_p_accept = (y @ out_w.T + out_b).softmax(-1)[:, 1]
    assert torch.allclose(torch.sigmoid(head(x)), upstream_p_accept, atol=1e-5)


def test_checkpoint_from_another_draft_is_refused():
    module = AcceptanceHeadModule(target="tiny-random", draft=2)
    module.configure_model()
    other = {"name": "tiny-random:3", "hidden_size": 64, "num_layers": 3, "vocab_size": 49152}
    with pytest.raises(ValueError, match="trained on draft"):
        module.on_load_checkpoint({"draft_identity": other})


def test_checkpoint_holds_the_head_not_the_draft():
    module = AcceptanceHeadModule(target="tiny-random", draft=2)
    module.configure_model()
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    assert ckpt["state_dict"] and all(k.startswith("head.") for k in ckpt["state_dict"])


def toy_loaders(seed=0, invert_val=False):
    """A learnable task: acceptance is 1 for tokens 200..209 and 0 for tokens 300..309 (the reverse in the
    validation loader if invert_val: a dev set that training can only get worse on)."""
    return [toy_loader(seed, shuffle=True), toy_loader(seed, shuffle=False, invert=invert_val)]


def toy_loader(seed, shuffle, invert=False):
    g = torch.Generator().manual_seed(seed)
    records = []
    for _ in range(48):
        draft = torch.cat([torch.arange(200, 210), torch.arange(300, 310)])[torch.randperm(20, generator=g)][:12]
        label = ((draft < 300) != invert).float()
        records.append(Record(torch.tensor([1, 2, 3]), draft, draft, label, label, label))
    ds = MixedDataset(records, mixing_ratio=0.0)
    return DataLoader(ds, batch_size=8, sampler=EpochSampler(ds, 1, 0, shuffle=shuffle, seed=0), collate_fn=collate)


def test_validation_loss_goes_down_on_a_learnable_toy_task(tmp_path):
    L.seed_everything(0)
    module = AcceptanceHeadModule(target="tiny-random", draft=2, num_layers=2, w_rej=1.0, lr=3e-3, warmup_ratio=0.0)
    train, val = toy_loaders()
    trainer = L.Trainer(max_epochs=15, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    before = trainer.validate(module, val, verbose=False)[0]["val/loss"]
    trainer.fit(module, train, val)
    after = trainer.callback_metrics["val/loss"].item()
    assert after < 0.5 * before and trainer.callback_metrics["val/auroc"] > 0.9


class EpochRecorder(L.Callback):
    """Each epoch's dev loss and head weights, read after its validation pass."""

    def __init__(self):
        self.losses, self.states, self.dev_pairs = [], [], []

    def on_train_epoch_end(self, trainer, module):
        self.losses.append(trainer.callback_metrics["val/loss"].item())
        self.dev_pairs.append(module.dev_pass)
        self.states.append({k: v.clone() for k, v in module.head.state_dict().items() if k != "calibration"})


@pytest.mark.parametrize("export", ["best", "last"])
def test_fit_exports_the_head_of_the_lowest_dev_loss_epoch_or_the_last(tmp_path, export):
    L.seed_everything(0)
    module = AcceptanceHeadModule(target="tiny-random", draft=2, num_layers=2, w_rej=1.0, lr=3e-3, warmup_ratio=0.0,
                                  export=export, export_dir=str(tmp_path / "head"))
    recorder = EpochRecorder()
    trainer = L.Trainer(max_epochs=4, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
                        callbacks=[recorder])
    trainer.fit(module, *toy_loaders(invert_val=True))
    best = min(range(4), key=recorder.losses.__getitem__)
    assert best != 3, recorder.losses  # the dev set is the training task reversed: the last epoch is not the best
    exported = AcceptanceHead.from_pretrained(tmp_path / "head").state_dict()
    wanted = recorder.states[best if export == "best" else 3]
    assert all(torch.equal(exported[k], v) for k, v in wanted.items())
    calibration = json.loads((tmp_path / "head" / "calibration.json").read_text())
    assert calibration.get("epoch") == (best if export == "best" else None)
    # Platt scaling is fitted on the exported epoch's own dev pass
    a, b = fit_platt(*recorder.dev_pairs[best if export == "best" else 3])
    assert [calibration["scale"], calibration["bias"]] == pytest.approx([a, b], rel=1e-5, abs=1e-6)


def test_a_resumed_fit_still_exports_the_best_epoch_from_before_the_interruption(tmp_path):
    def fit(epochs, ckpt=None):
        L.seed_everything(0)
        module = AcceptanceHeadModule(target="tiny-random", draft=2, num_layers=2, w_rej=1.0, lr=3e-3,
                                      warmup_ratio=0.0, export_dir=str(tmp_path / f"head{epochs}"))
        recorder = EpochRecorder()
        trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
                            callbacks=[recorder])
        trainer.fit(module, *toy_loaders(invert_val=True), ckpt_path=ckpt)
        return recorder

    first = fit(2)
    second = fit(4, tmp_path / "checkpoints" / "last.ckpt")  # the module's ModelCheckpoint keeps them there
    assert len(second.losses) == 2 and min(second.losses) > first.losses[0]  # epoch 0, before the stop, is the best
    exported = AcceptanceHead.from_pretrained(tmp_path / "head4").state_dict()
    assert all(torch.equal(exported[k], v) for k, v in first.states[0].items())
    assert json.loads((tmp_path / "head4" / "calibration.json").read_text())["epoch"] == 0


def test_export_must_be_best_or_last():
    with pytest.raises(ValueError, match="export must be"):
        AcceptanceHeadModule(target="tiny-random", draft=2, export="first")


def run(args):
    return run_script("train.py", *args)


def test_tiny_config_trains_end_to_end_and_logs_calibration(tiny_train_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir, out = tiny_train_run
    assert f"acceptance head exported to {log_dir / 'head'}" in out.stdout
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"val/loss", "val/loss_const", "val/kl", "val/brier", "val/brier_soft", "val/ece", "val/ece_soft",
            "val/auroc", "val/mean_pred", "val/mean_label", "val/stop_pred_k2", "val/stop_true_k2",
            "val/ece_soft_position1", "val/ece_soft_position2", "train/loss"} <= scalars
    assert {"val/reliability", "val/reliability_by_position"} <= set(events.Tags()["images"])
    assert AcceptanceHead.from_pretrained(log_dir / "head").hidden_size == 64
    calibration = json.loads((log_dir / "head" / "calibration.json").read_text())  # Platt, fitted on the dev split
    assert calibration["ece_soft_after"] <= calibration["ece_soft_before"] + 1e-6
    assert AcceptanceHead.from_pretrained(log_dir / "head").calibration.tolist() == \
        pytest.approx([calibration["scale"], calibration["bias"]])


@pytest.mark.parametrize("features", ["false", "true"])  # true: trained on prepared features, without the draft
def test_a_statistics_head_trains_and_exports(tmp_path, features):
    out = run(["fit", "--config", "configs/train/tiny.yaml", "--model.head_stats", "true", "--trainer.max_epochs",
               "1", "--trainer.default_root_dir", str(tmp_path), "--data.features", features,
               "--data.cache_dir", str(tmp_path / "data")])
    assert out.returncode == 0, out.stderr[-3000:]
    head = AcceptanceHead.from_pretrained(tmp_path / "lightning_logs" / "version_0" / "head")
    assert head.n_stats == 3 and not head.lagged
    assert head(torch.randn(2, 64), torch.randn(2, 3)).shape == (2,)
    with pytest.raises(ValueError, match="pass `stats`"):
        head(torch.randn(2, 64))


def test_platt_scaling_recovers_a_known_temperature():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20000, generator=g) * 3
    labels = torch.bernoulli(torch.sigmoid(z / 2.5), generator=g)  # true P = sigmoid(z / T), T = 2.5
    a, b = fit_platt(z, labels)
    assert a == pytest.approx(1 / 2.5, abs=0.02) and b == pytest.approx(0.0, abs=0.05)
    assert soft_ece(torch.sigmoid(a * z + b), torch.sigmoid(z / 2.5)) < 0.01 < soft_ece(torch.sigmoid(z), labels)


def test_a_calibrated_head_round_trips(tmp_path):
    head = AcceptanceHead(16, 2, {"name": "x", "hidden_size": 16}, n_stats=3)
    head.calibration.copy_(torch.tensor([0.4, -1.5]))
    x, stats = torch.randn(5, 16), torch.randn(5, 3)
    loaded = AcceptanceHead.from_pretrained(head.save_pretrained(tmp_path / "h"))
    assert loaded.calibration.tolist() == pytest.approx([0.4, -1.5]) and loaded.n_stats == 3
    assert torch.allclose(loaded(x, stats), head(x, stats))
    raw = AcceptanceHead(16, 2, n_stats=3)
    raw.load_state_dict({k: v for k, v in head.state_dict().items() if k != "calibration"}, strict=False)
    assert torch.allclose(loaded(x, stats), 0.4 * raw(x, stats) - 1.5, atol=1e-6)


def test_unknown_config_key_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "configs/train/tiny.yaml").read_text().replace("w_rej: 6.0", "w_reject: 6.0"))
    out = run(["fit", "--config", str(bad)])
    assert out.returncode != 0 and "w_reject" in out.stderr


def test_fsdp_two_processes_shard_train_in_bf16_save_resume_and_export(tmp_path):
    """2 ranks over gloo with FSDP2 (ModelParallelStrategy + fully_shard), bf16 autocast: the real sharding path."""
    base = ["fit", "--config", "configs/train/tiny.yaml", "--config", "configs/train/fsdp_cpu.yaml",
            "--trainer.default_root_dir", str(tmp_path), "--data.cache_dir", str(tmp_path / "prep2"),
            "--trainer.max_epochs", "1"]
    first = run(base)
    assert first.returncode == 0, first.stderr[-3000:]
    # preparation was spread over the 2 ranks (shard i on rank i % 2) and gives a 1-process run's files
    assert "prepare train (rank 1)" in first.stderr
    one = AcceptanceDataModule(target="tiny-random", draft=2, train_prompts=32, val_prompts=16, max_new_tokens=16,
                               prepare_batch_size=16, cache_dir=str(tmp_path / "prep1"))
    one.prepare_data()
    two = {p.parent.name + "/" + p.name: p.read_text() for p in (tmp_path / "prep2").glob("*/shard_*.sha256")}
    assert len(two) == 3 and two == {p.parent.name + "/" + p.name: p.read_text()
                                     for p in (tmp_path / "prep1").glob("*/shard_*.sha256")}
    log_dir = tmp_path / "lightning_logs" / "version_0"
    reports = [json.loads((log_dir / f"sharding_rank{r}.json").read_text()) for r in range(2)]
    for report in reports:
        assert report["world_size"] == 2 and report["precision"] == "bf16-mixed" and report["draft_sharded"]
        w = report["head"]["blocks.0.linear.weight"]
        assert w["placements"] == ["S(0)"] and w["global_shape"] == [64, 64] and w["local_shape"] == [32, 64]
    assert "gloo" in first.stdout + first.stderr
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert not any(k.startswith("draft.") for k in state["state_dict"])
    resumed = run(base[:-1] + ["2", "--ckpt_path", str(ckpt)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored all states" in resumed.stdout + resumed.stderr
    head = AcceptanceHead.from_pretrained(tmp_path / "lightning_logs" / "version_1" / "head")  # a plain module
    assert head.hidden_size == 64 and head(torch.randn(3, 64)).shape == (3,)


def test_gpu_check_runs_its_cpu_dry_run(tmp_path):
    """scripts/gpu_check.sh cannot run here (no GPU): its dry run takes the same steps on tiny shapes on the CPU."""
    import os
    import subprocess
    import sys

    out = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert out.returncode == 0, out.stderr[-3000:]
    table = (tmp_path / "gpu_check.md").read_text()
    assert "head sharded: True" in table and "ours / assisted" in table
    assert "prompts whose four outputs differ: 0" in table and "engine batched" in table
    assert not (ROOT / "head").exists()  # the training check exports its head under the output folder
