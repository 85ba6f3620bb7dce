"""The CLI, the demo's run folder, checkpoints and the benchmark runner, end to end (small sizes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sparseforge as sf
from sparseforge.cli import main
from sparseforge.io.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from sparseforge.zoo import build_model
from sparseforge.zoo.data import DEFAULT_DATA_DIR

needs_data = pytest.mark.skipif(
    not (Path(DEFAULT_DATA_DIR) / "train-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)",
)


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    torch.manual_seed(0)
    model = build_model("lenet300")
    path = tmp_path / "model.safetensors"
    save_checkpoint(model, path)
    return path


# -- checkpoints -----------------------------------------------------------------


def test_checkpoint_round_trip_is_bit_identical(tmp_path):
    torch.manual_seed(1)
    model = build_model("resnet20")
    sf.prune(model, sparsity=0.7, allocation="global")
    path = save_checkpoint(model, tmp_path / "r.safetensors", extra={"note": "x"})
    loaded, meta = load_checkpoint(path)
    assert meta["arch"] == "resnet20" and meta["extra"] == {"note": "x"}
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_checkpoint_rebuilds_a_non_default_zoo_model_at_its_own_size(tmp_path):
    model = build_model("resnet20", width=8, num_classes=7)
    path = save_checkpoint(model, tmp_path / "w.safetensors")
    loaded, meta = load_checkpoint(path)
    assert meta["arch_kwargs"] == {"num_classes": 7, "width": 8}
    assert loaded.conv1.out_channels == 8 and loaded.fc.out_features == 7


def test_checkpoint_corruption_is_detected_and_names_the_tensor(checkpoint):
    data = bytearray(checkpoint.read_bytes())
    data[-5] ^= 0xFF  # flip a byte inside the last tensor's data
    checkpoint.write_bytes(bytes(data))
    with pytest.raises(sf.SparseforgeError, match="corrupted: tensor"):
        read_checkpoint(checkpoint)


def test_checkpoint_truncated_and_foreign_files(tmp_path, checkpoint):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(checkpoint.read_bytes()[:4000])
    with pytest.raises(sf.SparseforgeError, match="truncated or corrupted"):
        read_checkpoint(cut)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(sf.SparseforgeError, match="not a sparseforge checkpoint"):
        read_checkpoint(foreign)


def test_checkpoint_newer_version_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "future.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "sparseforge-checkpoint", "format_version": "99"})
    with pytest.raises(sf.SparseforgeError, match="newer sparseforge"):
        read_checkpoint(path)


def test_failed_write_keeps_the_old_file(checkpoint):
    before = checkpoint.read_bytes()

    class Broken(torch.nn.Module):
        def state_dict(self, *a, **k):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_checkpoint(Broken(), checkpoint)
    assert checkpoint.read_bytes() == before
    assert [p.name for p in checkpoint.parent.iterdir()] == [checkpoint.name]


# -- CLI -------------------------------------------------------------------------------


def test_cli_prune_then_inspect(checkpoint, tmp_path, capsys):
    out = tmp_path / "pruned.safetensors"
    assert main(["prune", str(checkpoint), "--sparsity", "0.75", "--allocation", "global", "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert abs(printed["sparsity"] - 0.75) < 1e-5
    assert main(["inspect", str(out), "--json"]) == 0
    inspected = json.loads(capsys.readouterr().out)
    assert inspected["layer_nonzeros"] == printed["layer_nonzeros"]
    assert inspected["extra"]["pruned"]["allocation"] == "global"
    assert main(["inspect", str(out)]) == 0
    table = capsys.readouterr().out
    assert "fc1" in table and "75.00%" in table


def test_cli_prune_nm_pattern(checkpoint, tmp_path, capsys):
    out = tmp_path / "nm.safetensors"
    assert main(["prune", str(checkpoint), "--pattern", "2:4", "--out", str(out)]) == 0
    model, _ = load_checkpoint(out)
    groups = model.fc2.weight.reshape(100, -1, 4)
    assert bool(((groups != 0).sum(-1) <= 2).all())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["inspect", "/nonexistent/model.safetensors"], "does not exist"),
        (["prune", "{ckpt}", "--sparsity", "1.0", "--out", "{tmp}/x.safetensors"], "sparsity must be in [0, 1)"),
        (["prune", "{ckpt}", "--sparsity", "0.5", "--pattern", "3:7", "--out", "{tmp}/x.safetensors"], "divisible by 7"),
        (["prune", "{ckpt}", "--sparsity", "0.5", "--include", "nope*", "--out", "{tmp}/x.safetensors"], "'nope*' matches no"),
        (["prune", "{ckpt}", "--sparsity", "0.5", "--pattern", "zigzag", "--out", "{tmp}/x.safetensors"], "unknown pattern"),
        (["prune", "{ckpt}", "--sparsity", "0.5", "--score", "vibes", "--out", "{tmp}/x.safetensors"], "unknown score"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(argv, message, checkpoint, tmp_path, capsys):
    argv = [a.format(ckpt=checkpoint, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparseforge: error: ") and message in err
    assert err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_cli_help_runs_as_a_program():
    result = subprocess.run([sys.executable, "-m", "sparseforge", "prune", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--allocation" in result.stdout


# -- demo -----------------------------------------------------------------------------


@needs_data
def test_demo_writes_its_run_folder(tmp_path, capsys):
    argv = ["demo", "--runs-dir", str(tmp_path), "--name", "smoke", "--dense-epochs", "1", "--sparse-epochs", "2",
            "--limit-train", "2048", "--limit-test", "512"]
    assert main(argv) == 0
    run = tmp_path / "smoke"
    metrics = json.loads((run / "metrics.json").read_text())
    assert abs(metrics["sparse"]["report"]["sparsity"] - 0.9) < 1e-4
    assert metrics["dense"]["report"]["sparsity"] == 0.0
    assert [h["phase"] for h in metrics["history"]] == ["dense", "base", "base", "sparse", "sparse"]
    assert (run / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model, _ = load_checkpoint(run / "model.safetensors")
    assert abs(sf.report(model).sparsity - 0.9) < 1e-4
    assert "accuracy drop" in capsys.readouterr().out


def test_demo_missing_data_is_a_clear_error(tmp_path, capsys):
    assert main(["demo", "--data-dir", str(tmp_path / "empty"), "--runs-dir", str(tmp_path)]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


# -- benchmark runner ------------------------------------------------------------------


def test_bench_help_lists_every_benchmark():
    # a "%" in a benchmark's first docstring line once crashed argparse's help formatting
    from sparseforge.bench import benchmarks

    result = subprocess.run([sys.executable, "-m", "sparseforge.bench", "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert all(name in result.stdout for name in benchmarks())


def test_overhead_bench_quick_writes_well_formed_json(tmp_path):
    from sparseforge.bench.__main__ import main as bench_main

    out = tmp_path / "overhead.json"
    assert bench_main(["overhead", "--quick", "--models", "lenet300", "--rounds", "3", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    (row,) = result["results"]
    assert row["model"] == "lenet300" and row["dense_ms"] > 0 and row["masked_ms"] > 0
    assert row["overhead_pct"] == pytest.approx((row["masked_ms"] / row["dense_ms"] - 1) * 100, abs=0.05)
