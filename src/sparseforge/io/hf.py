"""Hugging Face ``transformers`` models: load a model folder, save one, and keep them in sparseforge's files.

Any ``transformers`` model with Linear (or GPT-2 ``Conv1D``) layers works:
the one-shot methods (:func:`sparseforge.prune` with calibration data) select
its layers by module name (BERT-, GPT-2- and LLaMA-style names alike), and
the pruned model leaves here in either of two forms:

- :func:`save_pretrained`: a ``save_pretrained`` folder (dense tensors with
  exact zeros) that ``transformers`` loads as usual, written atomically, with
  a ``sparseforge.json`` beside it saying what was done and a ``SHA256SUMS``
  of every file (``sha256sum -c SHA256SUMS`` checks it; so does
  :func:`load_pretrained`);
- sparseforge's checkpoint and ``.sfz`` files: the model's class and config
  travel in the file's metadata (:func:`arch_kwargs`), so ``sf.load(path)``,
  ``load_checkpoint`` and the CLI rebuild it without being given the model,
  compacted ones included.

How good such a model is (perplexity, embedding fidelity) is measured by
:mod:`sparseforge.quality`. Install with ``pip install 'sparseforge[hf]'``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from torch import nn

from sparseforge.architectures import HF
from sparseforge.errors import SparseforgeError
from sparseforge.files import atomic_dir
from sparseforge.formats import FORMATS, FileFormat
from sparseforge.layers import is_hf_model
from sparseforge.oserrors import write_errors

__all__ = [
    "ARCH", "ARCHITECTURE", "HF_FORMAT", "HFFormat", "arch_kwargs", "build_from_metadata", "check_output_folder", "is_pretrained_dir", "load_pretrained",
    "save_pretrained", "verify_checksums",
]

#: the ``arch`` name sparseforge files give a transformers model
ARCH = HF
HF_HINT = "install the Hugging Face extra: pip install 'sparseforge[hf]'"
METADATA_FILE = "sparseforge.json"
#: the checksums of a folder's files, in the format of ``sha256sum`` (``sha256sum -c SHA256SUMS`` checks them)
CHECKSUM_FILE = "SHA256SUMS"
_SUMS_HEAD = "# SHA-256 of the files sparseforge wrote here; check them with: sha256sum -c SHA256SUMS"


def _transformers():
    try:
        import transformers
    except ImportError:
        raise SparseforgeError(f"transformers is not installed: {HF_HINT}") from None
    return transformers


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """Without transformers' per-file progress bars ("Loading weights", "Writing model shards")."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def is_pretrained_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder holding a ``config.json`` (a ``save_pretrained`` folder)."""
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _write_checksums(folder: Path) -> None:
    """Write :data:`CHECKSUM_FILE` listing every file under ``folder`` (relative paths, sorted).

    ``sha256sum``'s format, between two comment lines (which ``sha256sum -c``
    skips): the last one counts the files, so that a truncated list is an error.
    """
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUM_FILE)
    lines = [f"{_file_digest(p)}  {p.relative_to(folder).as_posix()}\n" for p in files]
    (folder / CHECKSUM_FILE).write_text(f"{_SUMS_HEAD}\n{''.join(lines)}# {len(lines)} files\n")


def verify_checksums(path: str | os.PathLike[str]) -> bool:
    """Check the files of a folder against its :data:`CHECKSUM_FILE`; False when it has none (other writers).

    Raises :class:`SparseforgeError` naming the first file that is missing
    or does not match (a corrupted file, or one changed after the folder was
    written), or when the checksum file itself is malformed or truncated.
    Files not listed (added later) are not checked.
    """
    folder = Path(path)
    sums = folder / CHECKSUM_FILE
    if not sums.is_file():
        return False
    try:
        text = sums.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SparseforgeError(f"{sums} cannot be read ({e}): the folder is corrupted") from None
    lines = [line for line in text.splitlines() if not line.startswith("# SHA-256 ")]
    if not text.endswith("\n") or not lines or lines[-1] != f"# {len(lines) - 1} files":
        raise SparseforgeError(f"{sums} is truncated or corrupted (its last line must count the files listed); "
                               "write the folder again")
    for line in lines[:-1]:
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or not name or name.startswith("/") or ".." in Path(name).parts:
            raise SparseforgeError(f"{sums} is corrupted: malformed line {line[:80]!r}")
        target = folder / name
        if not target.is_file():
            raise SparseforgeError(f"{target} is missing: {CHECKSUM_FILE} lists it; write the folder again")
        if _file_digest(target) != digest:
            raise SparseforgeError(f"{target} does not match its checksum in {CHECKSUM_FILE}: the file is corrupted "
                                   f"(or was changed after sparseforge wrote it; then delete {CHECKSUM_FILE})")
    return True


def _model_class(transformers: Any, config: Any) -> Any:
    """The class named first in the config's ``architectures``; ``AutoModel`` when none is named."""
    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def _read_config(transformers: Any, folder: Path) -> Any:
    """The folder's config, or a :class:`SparseforgeError` saying what is wrong with ``config.json``."""
    path = folder / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SparseforgeError(f"{path} is not valid JSON (truncated or corrupted?): {e}; restore it from "
                               "where the model came from") from None
    except OSError as e:
        raise SparseforgeError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise SparseforgeError(f"{path} must hold a JSON object (the model's config), got {type(data).__name__}")
    try:
        return transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SparseforgeError(f"{path} does not describe a transformers model: {e}") from None


def load_pretrained(path: str | os.PathLike[str]) -> tuple[nn.Module, Any]:
    """Load a ``save_pretrained`` folder offline: (model in eval mode, float32; tokenizer or None).

    The model class is the first of the config's ``architectures`` (so a
    causal LM keeps its LM head), else ``AutoModel``. Raises
    :class:`SparseforgeError` when the folder does not exist, holds no
    ``config.json`` or a broken one, or its weights cannot be read.
    """
    p = Path(path)
    if not p.exists():
        raise SparseforgeError(f"model folder {p} does not exist")
    if not is_pretrained_dir(p):
        raise SparseforgeError(f"{p} is not a Hugging Face model folder (no config.json in it)")
    verify_checksums(p)
    transformers = _transformers()
    config = _read_config(transformers, p)
    cls = _model_class(transformers, config)
    try:
        with _quiet_progress():
            model = cls.from_pretrained(str(p), local_files_only=True, dtype="float32")
    except (OSError, SafetensorError) as e:
        raise SparseforgeError(f"cannot load the model in {p} (a weights file missing, truncated or "
                               f"corrupted?): {e}") from None
    tokenizer = None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError, TypeError):  # a folder without tokenizer files: fine for weights-only use
        tokenizer = None
    return model.eval(), tokenizer


def check_output_folder(out_dir: str | os.PathLike[str]) -> Path:
    """Refuse an ``out_dir`` that a command line should not hand to :func:`save_pretrained`; returns it.

    :func:`save_pretrained` replaces ``out_dir`` whole, whatever it holds (its
    callers decide). A user's ``--out`` may be missing, empty, or a model
    folder (one with ``config.json``); a file, or a folder holding other
    files, is a :class:`SparseforgeError`: replacing it would delete what it
    holds (``--out .`` or ``--out ~``).
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SparseforgeError(f"{out} exists and is not a folder")
    if out.is_dir() and not is_pretrained_dir(out) and any(out.iterdir()):
        raise SparseforgeError(f"{out} is a folder that holds other files, not a model folder: give the name of "
                               "a new folder (an earlier model folder there is replaced whole)")
    return out


def save_pretrained(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    tokenizer: Any = None,
    metadata: dict[str, Any] | None = None,
    metadata_file: str = METADATA_FILE,
) -> Path:
    """Write ``model`` (and ``tokenizer``) with ``save_pretrained`` into ``out_dir``, atomically.

    The folder is written beside ``out_dir`` under a temporary name and
    swapped into place (:func:`sparseforge.files.atomic_dir`), so a crash
    leaves any earlier folder whole, and its files get the user's umask.
    ``metadata`` (e.g. the pruning report) goes to ``metadata_file``
    (default ``sparseforge.json``), the files' SHA-256 to ``SHA256SUMS``.
    Weights are dense safetensors with exact zeros. A model whose layers
    :func:`sparseforge.compact` resized cannot be described by its config
    (sizes differ per layer): that is an error pointing to
    :func:`sparseforge.save` instead.
    """
    if not is_hf_model(model):
        raise SparseforgeError(f"save_pretrained needs a transformers model, not {type(model).__name__}")
    if getattr(model, "sparseforge_compact", None):
        raise SparseforgeError("a compacted transformers model has per-layer sizes its config cannot state: "
                               "save it with sparseforge.save (or save_checkpoint) instead")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SparseforgeError(f"{out} exists and is not a folder")
    with write_errors(out), atomic_dir(out) as tmp:
        with _quiet_progress():
            model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / metadata_file).write_text(json.dumps(metadata or {}, indent=2) + "\n")
        _write_checksums(tmp)
    return out


def arch_kwargs(model: nn.Module) -> dict[str, Any]:
    """What sparseforge files store to rebuild a transformers model: its class name and config."""
    return {"class": type(model).__name__, "config": model.config.to_dict()}


def build_from_metadata(**kwargs: Any) -> nn.Module:
    """A freshly initialised transformers model of the ``class`` and ``config`` in ``kwargs`` (see :func:`arch_kwargs`).

    The builder of the ``"hf"`` architecture (:mod:`sparseforge.architectures`).
    """
    transformers = _transformers()
    cls = getattr(transformers, str(kwargs.get("class", "")), None)
    if cls is None or "config" not in kwargs:
        raise SparseforgeError(f"the file names transformers class {kwargs.get('class')!r}, which this "
                               f"transformers {transformers.__version__} does not have")
    config = cls.config_class.from_dict(dict(kwargs["config"]))
    return cls(config).eval()


class HFArchitecture:
    """Hugging Face ``transformers`` models, rebuilt from the class name and config a file stores."""

    def __call__(self, **kwargs: Any) -> nn.Module:
        return build_from_metadata(**kwargs)

    @staticmethod
    def matches(model: nn.Module) -> bool:
        return is_hf_model(model)

    @staticmethod
    def arch_kwargs(model: nn.Module) -> dict[str, Any]:
        return arch_kwargs(model)


ARCHITECTURE = HFArchitecture()
"""The entry of :data:`~sparseforge.architectures.ARCHITECTURES` named ``hf`` (registered there lazily)."""


class HFFormat(FileFormat):
    """A Hugging Face `save_pretrained` folder (config.json, dense safetensors weights with exact zeros, the
    tokenizer), with sparseforge.json and SHA256SUMS beside them; written for `transformers` models."""

    name = "hf"
    folder = True
    noun = "a Hugging Face model folder"

    def detect(self, path: Path) -> bool:
        """:func:`is_pretrained_dir`: a folder holding a ``config.json``."""
        return is_pretrained_dir(path)

    def can_save(self, model: nn.Module) -> bool:
        """Only ``transformers`` models have a config to write."""
        return is_hf_model(model)

    def save(self, model: nn.Module, path: str | os.PathLike[str], *, tokenizer: Any = None,
             extra: dict[str, Any] | None = None) -> Path:
        """:func:`save_pretrained`, with ``tokenizer``; ``extra`` goes to ``sparseforge.json``."""
        return save_pretrained(model, path, tokenizer, metadata=extra)

    def load(self, path: str | os.PathLike[str], model: nn.Module | None = None) -> tuple[nn.Module, dict[str, Any]]:
        """:func:`load_pretrained`; metadata: ``arch`` (``"hf"``), ``arch_kwargs``, ``extra`` (what
        ``sparseforge.json`` holds, ``{}`` without one) and ``tokenizer`` (None when the folder has none).

        With ``model``, the folder's weights are loaded into it (they must fit it exactly).
        """
        loaded, tokenizer = load_pretrained(path)
        if model is not None:
            try:
                model.load_state_dict(loaded.state_dict(), strict=True)
            except RuntimeError as e:
                first = str(e).splitlines()[0:3]
                raise SparseforgeError(f"{path} does not fit the model: {' '.join(first)}") from None
            loaded = model
        return loaded, {"arch": ARCH, "arch_kwargs": arch_kwargs(loaded), "extra": _read_metadata(Path(path)),
                        "tokenizer": tokenizer}


def _read_metadata(folder: Path) -> dict[str, Any]:
    """What :func:`save_pretrained` wrote to ``sparseforge.json`` (``{}`` for a folder without one)."""
    path = folder / METADATA_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SparseforgeError(f"{path} cannot be read as JSON ({e}): the file is corrupted; write the folder "
                               "again") from None
    return data if isinstance(data, dict) else {}


HF_FORMAT = FORMATS.register(HFFormat())
"""The ``hf`` entry of :data:`~sparseforge.formats.FORMATS`."""
