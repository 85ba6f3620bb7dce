"""Fashion-MNIST from the standard IDX gzip files, and a fast in-memory batch loader.

The data is read from the four files the Fashion-MNIST project publishes
(``train-images-idx3-ubyte.gz`` and friends). They are looked for in, in order:

1. the ``data_dir`` argument (the CLI's ``--data-dir``),
2. the ``SPARSEFORGE_DATA`` environment variable,
3. ``/usr/share/datasets/fashion-mnist``, where the Debian/Ubuntu package
   ``dataset-fashion-mnist`` installs them.

Every file is checked before use: the gzip stream must be complete, the IDX
header must have the right magic number and dimensions, the payload must be
exactly as long as the header says, the SHA-256 of the decompressed bytes
must match the official release, and labels must be in ``0..9``. A damaged
file is therefore always a :class:`~sparseforge.errors.DataError`, never
silently wrong training data.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from sparseforge.datasets import Classification, TensorLoader
from sparseforge.errors import DataError, SparseforgeError
from sparseforge.files import atomic_path

__all__ = [
    "DEFAULT_DATA_DIR",
    "DATA_ENV_VAR",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_SHA256",
    "FASHION_MNIST_STD",
    "TensorLoader",
    "fashion_mnist",
    "fashion_mnist_dataset",
    "load_fashion_mnist",
    "normalize_images",
    "resolve_data_dir",
    "write_idx_gz",
]

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where ``apt-get install dataset-fashion-mnist`` puts the files."""

DATA_ENV_VAR = "SPARSEFORGE_DATA"
"""Environment variable naming a folder holding the four Fashion-MNIST files."""

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
"""Class names, indexed by label."""

FASHION_MNIST_MEAN = 0.2860
"""Mean pixel value of the training images after scaling to [0, 1]."""

FASHION_MNIST_STD = 0.3530
"""Standard deviation of the training pixels after scaling to [0, 1]."""

FASHION_MNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
"""For each split, the (images, labels) file names."""

# Hashes of the *decompressed* bytes: gzip output differs between compressors
# and distributions (timestamps, levels), the IDX content does not.
FASHION_MNIST_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte.gz": (
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"
    ),
    "train-labels-idx1-ubyte.gz": (
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"
    ),
    "t10k-images-idx3-ubyte.gz": (
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"
    ),
    "t10k-labels-idx1-ubyte.gz": (
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"
    ),
}
"""SHA-256 of the decompressed content of each official file."""

_IDX_MAGIC = {"images": 2051, "labels": 2049}
_IDX_NDIM = {"images": 3, "labels": 1}
_IMAGE_SIDE = 28
_NUM_CLASSES = len(FASHION_MNIST_CLASSES)

_HOW_TO_GET = (
    "Get the files with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu; it puts "
    f"them in {DEFAULT_DATA_DIR}), or download the four files "
    + ", ".join(name for pair in FASHION_MNIST_FILES.values() for name in pair)
    + " from the Fashion-MNIST project (https://github.com/zalandoresearch/fashion-mnist) "
    f"into a folder and pass `--data-dir FOLDER` or set {DATA_ENV_VAR}=FOLDER."
)


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> tuple[Path, str]:
    """Decide which folder to read Fashion-MNIST from.

    Args:
        data_dir: explicit folder; wins over everything else. Default ``None``.

    Returns:
        ``(folder, origin)`` where ``origin`` says where the choice came from
        (the argument, the ``SPARSEFORGE_DATA`` variable, or the default), for
        error messages.

    >>> resolve_data_dir("/tmp/fm")
    (PosixPath('/tmp/fm'), 'the data_dir argument / --data-dir')
    """
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser(), "the data_dir argument / --data-dir"
    env = os.environ.get(DATA_ENV_VAR, "")
    if env:
        return Path(env).expanduser(), f"the {DATA_ENV_VAR} environment variable"
    return DEFAULT_DATA_DIR, "the default location"


def _check_split(split: str) -> None:
    if split not in FASHION_MNIST_FILES:
        raise SparseforgeError(
            f"unknown Fashion-MNIST split {split!r}; valid splits are: "
            + ", ".join(repr(s) for s in FASHION_MNIST_FILES)
        )


def _file_path(folder: Path, origin: str, name: str) -> Path:
    """Return ``folder/name``, or raise a DataError explaining how to get it."""
    if not folder.exists():
        raise DataError(
            f"Fashion-MNIST folder {folder} (from {origin}) does not exist, so {name} "
            f"was not found. {_HOW_TO_GET}"
        )
    if not folder.is_dir():
        raise DataError(
            f"Fashion-MNIST location {folder} (from {origin}) is not a folder, so {name} "
            f"was not found there. {_HOW_TO_GET}"
        )
    path = folder / name
    if not path.is_file():
        raise DataError(
            f"Fashion-MNIST file {name} is missing from {folder} (from {origin}). {_HOW_TO_GET}"
        )
    return path


def _read_idx(
    path: Path, kind: Literal["images", "labels"], expected_sha256: str | None
) -> np.ndarray:
    """Decompress, verify and decode one IDX gzip file into a uint8 array."""
    reinstall = (
        "Reinstall it (`apt-get install --reinstall dataset-fashion-mnist`) or download "
        "it again from https://github.com/zalandoresearch/fashion-mnist."
    )
    try:
        compressed = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read Fashion-MNIST file {path}: {exc}") from exc
    try:
        raw = gzip.decompress(compressed)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(
            f"Fashion-MNIST file {path} is truncated or corrupted (gzip error: {exc}). "
            + reinstall
        ) from exc

    ndim = _IDX_NDIM[kind]
    header_len = 4 + 4 * ndim
    too_short = DataError(
        f"Fashion-MNIST file {path} is truncated or corrupted: {len(raw)} bytes after "
        f"decompression, too short for an IDX {kind} header ({header_len} bytes). " + reinstall
    )
    if len(raw) < 4:
        raise too_short
    # The magic number comes first so that a swapped file (labels where images
    # belong) is reported as such rather than as a short header.
    (magic,) = struct.unpack(">i", raw[:4])
    if magic != _IDX_MAGIC[kind]:
        raise DataError(
            f"Fashion-MNIST file {path} is not an IDX {kind} file: magic number {magic}, "
            f"expected {_IDX_MAGIC[kind]}. " + reinstall
        )
    if len(raw) < header_len:
        raise too_short
    dims = struct.unpack(f">{ndim}I", raw[4:header_len])
    if kind == "images" and dims[1:] != (_IMAGE_SIDE, _IMAGE_SIDE):
        raise DataError(
            f"Fashion-MNIST file {path} holds images of {dims[1]}x{dims[2]} pixels, "
            f"expected {_IMAGE_SIDE}x{_IMAGE_SIDE}. " + reinstall
        )
    expected_len = math.prod(dims)
    payload_len = len(raw) - header_len
    if payload_len != expected_len:
        raise DataError(
            f"Fashion-MNIST file {path} is truncated or corrupted: its header announces "
            f"{'x'.join(map(str, dims))} = {expected_len} bytes of data but it holds "
            f"{payload_len}. " + reinstall
        )
    if expected_sha256 is not None:
        actual = hashlib.sha256(raw).hexdigest()
        if actual != expected_sha256:
            raise DataError(
                f"Fashion-MNIST file {path} failed its checksum: the SHA-256 of its "
                f"decompressed content is {actual}, expected {expected_sha256}; the file is "
                "corrupted or is not the official Fashion-MNIST release. " + reinstall
            )
    array = np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)
    if kind == "labels" and array.size and int(array.max()) >= _NUM_CLASSES:
        raise DataError(
            f"Fashion-MNIST file {path} holds label {int(array.max())}; labels must be in "
            f"0..{_NUM_CLASSES - 1}. " + reinstall
        )
    return array


def _file_stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=8)
def _load_cached(
    images_path: Path,
    labels_path: Path,
    verify_checksum: bool,
    stamps: tuple[tuple[int, int], tuple[int, int]],
) -> tuple[torch.Tensor, torch.Tensor]:
    # ``stamps`` is part of the key only so that a file replaced on disk is
    # decoded again instead of served stale from the cache.
    del stamps
    images = _read_idx(
        images_path, "images", FASHION_MNIST_SHA256[images_path.name] if verify_checksum else None
    )
    labels = _read_idx(
        labels_path, "labels", FASHION_MNIST_SHA256[labels_path.name] if verify_checksum else None
    )
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"Fashion-MNIST files disagree: {images_path} holds {images.shape[0]} images but "
            f"{labels_path} holds {labels.shape[0]} labels. Reinstall or re-download them."
        )
    # frombuffer views are read-only; one copy makes tensors torch can own.
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def load_fashion_mnist(
    split: str = "train",
    data_dir: str | os.PathLike[str] | None = None,
    verify_checksum: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split of Fashion-MNIST as tensors.

    Decoded tensors are cached in-process (keyed by file path, split and file
    modification stamp), so repeated calls cost only a copy.

    Args:
        split: ``"train"`` (60000 examples) or ``"test"`` (10000). Default ``"train"``.
        data_dir: folder holding the IDX gzip files. Default ``None``: the
            ``SPARSEFORGE_DATA`` environment variable if set, else
            ``/usr/share/datasets/fashion-mnist``.
        verify_checksum: check the SHA-256 of the decompressed files against the
            official release. Default ``True``; pass ``False`` only for your own
            files in the same format (the structural checks still run).

    Returns:
        ``(images, labels)``: uint8 ``[N, 28, 28]`` and int64 ``[N]`` tensors,
        fresh copies the caller may modify.

    Raises:
        SparseforgeError: ``split`` is not ``"train"`` or ``"test"``.
        DataError: a file is missing, truncated, corrupted or has a wrong checksum;
            the message says how to get good files.
    """
    _check_split(split)
    folder, origin = resolve_data_dir(data_dir)
    images_name, labels_name = FASHION_MNIST_FILES[split]
    images_path = _file_path(folder, origin, images_name).resolve()
    labels_path = _file_path(folder, origin, labels_name).resolve()
    images, labels = _load_cached(
        images_path,
        labels_path,
        bool(verify_checksum),
        (_file_stamp(images_path), _file_stamp(labels_path)),
    )
    return images.clone(), labels.clone()


def write_idx_gz(
    path: str | os.PathLike[str],
    array: np.ndarray,
    kind: Literal["images", "labels"],
    dims: Sequence[int] | None = None,
) -> Path:
    """Write ``array`` as an IDX gzip file, the format Fashion-MNIST ships in.

    Meant for tests and for converting your own data; files written here do not
    match the official checksums, so read them with ``verify_checksum=False``.

    Args:
        path: file to write (parent folders must exist).
        array: uint8 array, ``[N, 28, 28]`` for images or ``[N]`` for labels.
        kind: ``"images"`` or ``"labels"``.
        dims: header dimensions to write instead of ``array.shape``. Default
            ``None``. Only useful to produce deliberately inconsistent files.

    Returns:
        The path written.

    >>> import tempfile, numpy as np
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = write_idx_gz(f"{d}/l.gz", np.arange(3, dtype=np.uint8), "labels")
    ...     gzip.decompress(p.read_bytes())
    b'\\x00\\x00\\x08\\x01\\x00\\x00\\x00\\x03\\x00\\x01\\x02'
    """
    if kind not in _IDX_MAGIC:
        raise SparseforgeError(f"unknown IDX kind {kind!r}; valid kinds are 'images', 'labels'")
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise DataError(f"IDX {kind} must be uint8, got dtype {array.dtype}")
    if array.ndim != _IDX_NDIM[kind]:
        raise DataError(
            f"IDX {kind} must have {_IDX_NDIM[kind]} dimensions, got shape {array.shape}"
        )
    header_dims = tuple(int(d) for d in (array.shape if dims is None else dims))
    if len(header_dims) != _IDX_NDIM[kind]:
        raise DataError(f"IDX {kind} header needs {_IDX_NDIM[kind]} dims, got {header_dims}")
    header = struct.pack(f">i{len(header_dims)}I", _IDX_MAGIC[kind], *header_dims)
    out = Path(path)

    with atomic_path(out) as tmp:
        # mtime=0 keeps the output byte-identical across runs.
        tmp.write_bytes(gzip.compress(header + np.ascontiguousarray(array).tobytes(), mtime=0))
    return out


def _check_limit(name: str, value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SparseforgeError(f"{name} must be a positive integer or None, got {value!r}")


def normalize_images(images: torch.Tensor, flatten: bool = False) -> torch.Tensor:
    """uint8 images ``[N, 28, 28]`` as float32 scaled to [0, 1] and standardized with the training-set
    statistics, ``(x / 255 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD``: ``[N, 1, 28, 28]``, or ``[N, 784]``
    with ``flatten``."""
    x = images.to(torch.float32).div_(255.0).sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD)
    return x.reshape(x.shape[0], -1) if flatten else x.unsqueeze(1)


def fashion_mnist_dataset(
    data_dir: str | os.PathLike[str] | None = None,
    limit_train: int | None = None,
    limit_test: int | None = None,
    flatten: bool = False,
    verify_checksum: bool = True,
) -> Classification:
    """Fashion-MNIST (Xiao, Rasul & Vollgraf 2017): 28x28 grayscale images of clothing in 10 classes,
    60,000 for training and 10,000 for testing, standardized.

    Registered as ``fashion-mnist`` in :data:`sparseforge.datasets.DATASETS`. Pixels are scaled to
    [0, 1] then standardized with the training-set statistics: ``(x / 255 - 0.2860) / 0.3530``
    (:func:`normalize_images`); only the first ``limit_train`` / ``limit_test`` images are converted.
    Other arguments as :func:`fashion_mnist`.
    """
    _check_limit("limit_train", limit_train)
    _check_limit("limit_test", limit_test)
    splits = []
    for split, limit in (("train", limit_train), ("test", limit_test)):
        images, labels = load_fashion_mnist(split, data_dir, verify_checksum=verify_checksum)
        splits += [normalize_images(images[:limit], flatten), labels[:limit]]
    return Classification(*splits)


fashion_mnist_dataset.num_train = 60000  # type: ignore[attr-defined]  # known without reading the files


def fashion_mnist(
    batch_size: int = 128,
    data_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    limit_train: int | None = None,
    limit_test: int | None = None,
    flatten: bool = False,
    verify_checksum: bool = True,
) -> tuple[TensorLoader, TensorLoader]:
    """Fashion-MNIST train and test loaders of normalized float32 images.

    Pixels are scaled to [0, 1] then standardized with the training-set
    statistics: ``(x / 255 - 0.2860) / 0.3530``.

    Args:
        batch_size: examples per batch for both loaders. Default 128.
        data_dir: folder with the IDX gzip files. Default ``None`` (see
            :func:`load_fashion_mnist`).
        seed: seed of the training loader's shuffling. Default 0.
        limit_train: keep only the first this many training examples (all if
            larger than the split). Default ``None``: all 60000.
        limit_test: same for the test split. Default ``None``: all 10000.
        flatten: images as ``[N, 784]`` instead of ``[N, 1, 28, 28]``.
            Default ``False``.
        verify_checksum: passed to :func:`load_fashion_mnist`. Default ``True``.

    Returns:
        ``(train_loader, test_loader)``; the first shuffles every epoch, the
        second keeps file order.
    """
    data = fashion_mnist_dataset(data_dir, limit_train, limit_test, flatten, verify_checksum)
    return data.loaders(batch_size, seed)
