"""Tests for sparseforge.zoo: Fashion-MNIST loading and verification, models, training loop."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sparseforge.errors import DataError, SparseforgeError
from sparseforge.zoo.data import (
    DEFAULT_DATA_DIR,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_FILES,
    TensorLoader,
    fashion_mnist,
    load_fashion_mnist,
    write_idx_gz,
)
from sparseforge.zoo.models import Conv4, LeNet300100, ResNet20, build_model, classifier_names
from sparseforge.zoo.training import evaluate, train_epoch

REAL_DIR = DEFAULT_DATA_DIR
needs_real_data = pytest.mark.skipif(
    not all((REAL_DIR / f).is_file() for pair in FASHION_MNIST_FILES.values() for f in pair),
    reason=f"Fashion-MNIST not installed in {REAL_DIR} (apt-get install dataset-fashion-mnist)",
)


@pytest.fixture(autouse=True)
def _no_data_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's SPARSEFORGE_DATA must not change what these tests read.
    monkeypatch.delenv("SPARSEFORGE_DATA", raising=False)


def _synthetic_split(
    folder: Path, split: str = "train", n: int = 20, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Write a small random split in IDX format and return its arrays."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    images_name, labels_name = FASHION_MNIST_FILES[split]
    folder.mkdir(parents=True, exist_ok=True)
    write_idx_gz(folder / images_name, images, "images")
    write_idx_gz(folder / labels_name, labels, "labels")
    return images, labels


# --------------------------------------------------------------------------- real files


@needs_real_data
def test_real_train_split() -> None:
    images, labels = load_fashion_mnist("train")
    assert images.shape == (60000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (60000,) and labels.dtype == torch.int64
    assert int(labels.min()) == 0 and int(labels.max()) == 9
    assert torch.equal(labels.bincount(), torch.full((10,), 6000))


@needs_real_data
def test_real_test_split_and_cache_returns_copies() -> None:
    images, labels = load_fashion_mnist("test", data_dir=REAL_DIR)
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10000,)
    assert set(labels.tolist()) == set(range(10))
    images[0] = 0  # the cache must hand out copies, not its own tensors
    again, _ = load_fashion_mnist("test", data_dir=REAL_DIR)
    assert int(again[0].sum()) > 0


@needs_real_data
def test_fashion_mnist_loaders_real() -> None:
    train, test = fashion_mnist(batch_size=100, limit_train=300, limit_test=200)
    assert len(train) == 3 and len(test) == 2
    xb, yb = next(iter(test))
    assert xb.shape == (100, 1, 28, 28) and xb.dtype == torch.float32
    assert yb.dtype == torch.int64
    raw, _ = load_fashion_mnist("test")
    expected = (raw[:100].float() / 255 - 0.2860) / 0.3530
    assert torch.allclose(xb[:, 0], expected)
    flat_train, _ = fashion_mnist(limit_train=10, limit_test=10, flatten=True)
    assert next(iter(flat_train))[0].shape == (10, 784)


# --------------------------------------------------------------------------- errors


def test_unknown_split() -> None:
    with pytest.raises(SparseforgeError, match="'train', 'test'"):
        load_fashion_mnist("validation")


def test_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    with pytest.raises(DataError) as info:
        load_fashion_mnist("train", data_dir=missing)
    msg = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert str(missing) in msg
    assert "SPARSEFORGE_DATA" in msg and "--data-dir" in msg
    assert "github.com/zalandoresearch/fashion-mnist" in msg


def test_missing_file_is_named(tmp_path: Path) -> None:
    _synthetic_split(tmp_path, "train")
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz") as info:
        load_fashion_mnist("train", data_dir=tmp_path, verify_checksum=False)
    assert str(tmp_path) in str(info.value)
    assert "apt-get install dataset-fashion-mnist" in str(info.value)


def test_truncated_gzip_synthetic(tmp_path: Path) -> None:
    _synthetic_split(tmp_path, "test", n=50)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated or corrupted") as info:
        load_fashion_mnist("test", data_dir=tmp_path, verify_checksum=False)
    assert str(path.resolve()) in str(info.value)
    # A flipped byte inside the deflate stream: a zlib or CRC error, same report.
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(damaged))
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz.*truncated or corrupted"):
        load_fashion_mnist("test", data_dir=tmp_path, verify_checksum=False)


def test_header_too_short(tmp_path: Path) -> None:
    _synthetic_split(tmp_path, "train", n=5)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01"))
    with pytest.raises(DataError, match="too short for an IDX labels header"):
        load_fashion_mnist("train", data_dir=tmp_path, verify_checksum=False)


@needs_real_data
def test_truncated_real_file(tmp_path: Path) -> None:
    for name in FASHION_MNIST_FILES["test"]:
        shutil.copy(REAL_DIR / name, tmp_path / name)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz.*truncated"):
        load_fashion_mnist("test", data_dir=tmp_path)


def test_not_gzip(tmp_path: Path) -> None:
    _synthetic_split(tmp_path, "train")
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.decompress(path.read_bytes()))  # plain IDX, not gzipped
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz"):
        load_fashion_mnist("train", data_dir=tmp_path, verify_checksum=False)


def test_short_payload_with_valid_gzip(tmp_path: Path) -> None:
    _synthetic_split(tmp_path, "train", n=5)
    images = np.zeros((5, 28, 28), dtype=np.uint8)
    write_idx_gz(tmp_path / "train-images-idx3-ubyte.gz", images, "images", dims=(6, 28, 28))
    with pytest.raises(DataError, match="header announces 6x28x28"):
        load_fashion_mnist("train", data_dir=tmp_path, verify_checksum=False)


def test_wrong_magic_and_wrong_image_size(tmp_path: Path) -> None:
    _synthetic_split(tmp_path, "train", n=5)
    # A labels file where the images file should be.
    shutil.copy(tmp_path / "train-labels-idx1-ubyte.gz", tmp_path / "train-images-idx3-ubyte.gz")
    with pytest.raises(DataError, match="magic number 2049, expected 2051"):
        load_fashion_mnist("train", data_dir=tmp_path, verify_checksum=False)
    small = np.zeros((5, 14, 14), dtype=np.uint8)
    write_idx_gz(tmp_path / "train-images-idx3-ubyte.gz", small, "images")
    with pytest.raises(DataError, match="14x14"):
        load_fashion_mnist("train", data_dir=tmp_path, verify_checksum=False)


def test_label_out_of_range_and_count_mismatch(tmp_path: Path) -> None:
    _synthetic_split(tmp_path, "train", n=5)
    write_idx_gz(
        tmp_path / "train-labels-idx1-ubyte.gz", np.array([0, 1, 2, 3, 10], np.uint8), "labels"
    )
    with pytest.raises(DataError, match="label 10"):
        load_fashion_mnist("train", data_dir=tmp_path, verify_checksum=False)
    write_idx_gz(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(4, np.uint8), "labels")
    with pytest.raises(DataError, match="5 images but .* 4 labels"):
        load_fashion_mnist("train", data_dir=tmp_path, verify_checksum=False)


@needs_real_data
def test_corrupted_content_fails_checksum(tmp_path: Path) -> None:
    shutil.copy(REAL_DIR / "t10k-images-idx3-ubyte.gz", tmp_path)
    raw = bytearray(gzip.decompress((REAL_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    raw[100] = (raw[100] + 1) % 10  # still a valid label: only the checksum can tell
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError, match="checksum") as info:
        load_fashion_mnist("test", data_dir=tmp_path)
    assert "t10k-labels-idx1-ubyte.gz" in str(info.value)
    # Structurally the file is fine, so skipping the checksum loads it.
    _, labels = load_fashion_mnist("test", data_dir=tmp_path, verify_checksum=False)
    assert labels.shape == (10000,)


def test_synthetic_files_fail_checksum(tmp_path: Path) -> None:
    _synthetic_split(tmp_path, "test")
    with pytest.raises(DataError, match="checksum"):
        load_fashion_mnist("test", data_dir=tmp_path)


def test_env_var_is_honoured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images, labels = _synthetic_split(tmp_path / "env", "train", n=12, seed=1)
    monkeypatch.setenv("SPARSEFORGE_DATA", str(tmp_path / "env"))
    got_images, got_labels = load_fashion_mnist("train", verify_checksum=False)
    assert np.array_equal(got_images.numpy(), images)
    assert np.array_equal(got_labels.numpy(), labels)
    # An explicit data_dir wins over the environment variable.
    other_images, _ = _synthetic_split(tmp_path / "arg", "train", n=7, seed=2)
    got_images, _ = load_fashion_mnist("train", data_dir=tmp_path / "arg", verify_checksum=False)
    assert np.array_equal(got_images.numpy(), other_images)
    # The error for a bad env var names the variable and the folder.
    monkeypatch.setenv("SPARSEFORGE_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="SPARSEFORGE_DATA") as info:
        load_fashion_mnist("train")
    assert str(tmp_path / "nowhere") in str(info.value)


def test_rewritten_file_is_not_served_from_cache(tmp_path: Path) -> None:
    _synthetic_split(tmp_path, "train", n=5)
    load_fashion_mnist("train", data_dir=tmp_path, verify_checksum=False)
    write_idx_gz(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((6, 28, 28), np.uint8), "images")
    with pytest.raises(DataError, match="6 images but"):
        load_fashion_mnist("train", data_dir=tmp_path, verify_checksum=False)


def test_fashion_mnist_synthetic(tmp_path: Path) -> None:
    _synthetic_split(tmp_path, "train", n=30)
    images, labels = _synthetic_split(tmp_path, "test", n=10)
    train, test = fashion_mnist(batch_size=8, data_dir=tmp_path, verify_checksum=False)
    assert len(train) == 4 and len(test) == 2
    assert train.shuffle and not test.shuffle
    xb, yb = next(iter(test))
    assert xb.shape == (8, 1, 28, 28)
    expected = (torch.from_numpy(images[:8]).float() / 255 - 0.2860) / 0.3530
    assert torch.allclose(xb[:, 0], expected)
    assert torch.equal(yb, torch.from_numpy(labels[:8]).long())
    train, test = fashion_mnist(
        data_dir=tmp_path, verify_checksum=False, limit_train=3, limit_test=100, flatten=True
    )
    assert train.num_examples == 3 and test.num_examples == 10
    assert train.x.shape == (3, 784)
    with pytest.raises(SparseforgeError, match="limit_train"):
        fashion_mnist(data_dir=tmp_path, verify_checksum=False, limit_train=0)


def test_classes() -> None:
    assert len(FASHION_MNIST_CLASSES) == 10
    assert FASHION_MNIST_CLASSES[0] == "T-shirt/top" and FASHION_MNIST_CLASSES[9] == "Ankle boot"


# --------------------------------------------------------------------------- TensorLoader


def _epoch_order(loader: TensorLoader) -> list[int]:
    return [int(v) for _, yb in loader for v in yb]


def test_tensor_loader_shuffle_covers_everything_once() -> None:
    n = 103
    loader = TensorLoader(torch.arange(n).float().unsqueeze(1), torch.arange(n), 10, shuffle=True)
    assert len(loader) == 11
    orders = [_epoch_order(loader) for _ in range(3)]
    for order in orders:
        assert sorted(order) == list(range(n))
    assert orders[0] != orders[1] != orders[2]  # reshuffled every epoch
    assert orders[0] != list(range(n))
    for xb, yb in loader:  # inputs and targets stay paired
        assert torch.equal(xb[:, 0].long(), yb)


def test_tensor_loader_same_seed_same_order() -> None:
    x = torch.arange(50)
    a = TensorLoader(x, x, 7, shuffle=True, seed=3)
    b = TensorLoader(x, x, 7, shuffle=True, seed=3)
    c = TensorLoader(x, x, 7, shuffle=True, seed=4)
    assert [_epoch_order(a) for _ in range(3)] == [_epoch_order(b) for _ in range(3)]
    assert _epoch_order(TensorLoader(x, x, 7, shuffle=True, seed=3)) != _epoch_order(c)


def test_tensor_loader_state_dict_resume() -> None:
    x = torch.arange(40)
    original = TensorLoader(x, x, 6, shuffle=True, seed=11)
    _epoch_order(original)
    _epoch_order(original)
    state = original.state_dict()
    assert state["epoch"] == 2
    resumed = TensorLoader(x, x, 6, shuffle=True, seed=11)
    resumed.load_state_dict(state)
    assert _epoch_order(resumed) == _epoch_order(original)
    assert resumed.epoch == original.epoch == 3
    with pytest.raises(SparseforgeError):
        resumed.load_state_dict({"epoch": -1})


def test_tensor_loader_sequential_and_drop_last() -> None:
    x = torch.arange(10)
    loader = TensorLoader(x, x * 2, batch_size=4)
    assert [yb.tolist() for _, yb in loader] == [[0, 2, 4, 6], [8, 10, 12, 14], [16, 18]]
    dropped = TensorLoader(x, x, batch_size=4, drop_last=True)
    assert len(dropped) == 2 and [len(xb) for xb, _ in dropped] == [4, 4]
    with pytest.raises(SparseforgeError, match="batch_size"):
        TensorLoader(x, x, batch_size=0)
    with pytest.raises(DataError):
        TensorLoader(x, x[:5])


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize("name", classifier_names())
def test_model_forward_shape(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name)
    assert model.input_shape == (1, 28, 28)
    assert model.num_classes == 10
    out = model(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10)
    assert build_model(name, num_classes=3)(torch.randn(2, 1, 28, 28)).shape == (2, 3)


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts() -> None:
    # 784*300+300 + 300*100+100 + 100*10+10
    assert _num_params(LeNet300100()) == 266_610
    # convs (weights + biases): 1*64*9+64, 64*64*9+64, 64*128*9+128, 128*128*9+128
    # fcs: 128*7*7*256+256, 256*256+256, 256*10+10
    conv4 = 640 + 36_928 + 73_856 + 147_584 + 1_605_888 + 65_792 + 2_570
    assert conv4 == 1_933_258
    assert _num_params(Conv4()) == conv4
    # Bias-free convs, BN has weight+bias per channel (running stats are buffers).
    stem = 1 * 16 * 9 + 2 * 16
    stage1 = 3 * 2 * (16 * 16 * 9 + 2 * 16)
    # First block of a stage: two convs + two BNs, plus the 1x1 projection + BN.
    stage2 = (16 * 32 * 9 + 32 * 32 * 9 + 2 * 2 * 32) + (16 * 32 + 2 * 32)
    stage2 += 2 * 2 * (32 * 32 * 9 + 2 * 32)
    stage3 = (32 * 64 * 9 + 64 * 64 * 9 + 2 * 2 * 64) + (32 * 64 + 2 * 64)
    stage3 += 2 * 2 * (64 * 64 * 9 + 2 * 64)
    fc = 64 * 10 + 10
    resnet = stem + stage1 + stage2 + stage3 + fc
    assert resnet == 272_186
    assert _num_params(ResNet20()) == resnet
    assert _num_params(ResNet20(width=8)) < resnet


def test_model_names_are_readable() -> None:
    names = {n for n, _ in ResNet20().named_modules()}
    assert {"conv1", "bn1", "layer1.0.conv1", "layer2.0.shortcut.0", "layer3.2.bn2", "fc"} <= names
    assert "layer1.0.shortcut.0" not in names  # identity shortcut where shapes match
    assert {"conv1", "conv2", "conv3", "conv4", "fc1", "fc2", "fc3"} <= {
        n for n, _ in Conv4().named_modules()
    }
    assert [n for n, _ in LeNet300100().named_modules()][1:] == ["fc1", "fc2", "fc3"]


def test_build_model_errors() -> None:
    with pytest.raises(SparseforgeError,
                       match=r"unknown architecture 'vgg16' \(known: lenet300, conv4, resnet20, hf\)"):
        build_model("vgg16")
    with pytest.raises(SparseforgeError, match="did you mean 'resnet20'"):
        build_model("resnet-2O")
    with pytest.raises(SparseforgeError, match="width"):
        build_model("lenet300", width=8)
    with pytest.raises(SparseforgeError, match="num_classes"):
        build_model("conv4", num_classes=0)


# --------------------------------------------------------------------------- training


def test_train_epoch_hooks_and_evaluate_restores_mode() -> None:
    torch.manual_seed(0)
    x = torch.randn(40, 1, 28, 28)
    y = torch.randint(0, 10, (40,))
    model = ResNet20(width=4)
    loader = TensorLoader(x, y, batch_size=16)
    steps: list[int] = []
    seen: list[tuple[int, int]] = []
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    stats = train_epoch(
        model,
        loader,
        opt,
        on_step=lambda: steps.append(1),
        progress=lambda i, n, loss: seen.append((i, n)),
    )
    assert len(steps) == 3 and seen == [(0, 3), (1, 3), (2, 3)]
    assert stats["examples"] == 40 and 0 <= stats["accuracy"] <= 100
    model.train()
    result = evaluate(model, loader)
    assert model.training
    model.eval()
    evaluate(model, loader)
    assert not model.training
    assert set(result) >= {"loss", "accuracy"} and result["loss"] > 0
    with pytest.raises(SparseforgeError):
        evaluate(model, TensorLoader(x[:0], y[:0]))


@needs_real_data
def test_one_epoch_of_lenet_learns() -> None:
    torch.manual_seed(0)
    train, _ = fashion_mnist(batch_size=32, seed=0, limit_train=512, limit_test=10)
    model = LeNet300100()
    before = evaluate(model, train)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    stats = train_epoch(model, train, opt)
    after = evaluate(model, train)
    assert stats["steps"] == 16
    assert after["loss"] < before["loss"] - 0.5
    assert after["accuracy"] > 50.0


def test_every_zoo_model_is_in_the_architecture_table_files_rebuild_from() -> None:
    """io rebuilds models from a file's arch name through the architecture registry, which must list
    every zoo model and recognise each one's class."""
    from sparseforge.architectures import ARCHITECTURES, HF, build, name_of
    from sparseforge.zoo.models import Conv4, LeNet300100, ResNet20, classifier_names

    zoo = {"lenet300": LeNet300100, "conv4": Conv4, "resnet20": ResNet20}
    assert sorted(classifier_names()) == sorted(zoo) and HF in ARCHITECTURES
    for name, cls in zoo.items():
        model = build(name, num_classes=7)
        assert type(model) is cls and name_of(model) == name
    assert name_of(torch.nn.Linear(2, 2)) is None
