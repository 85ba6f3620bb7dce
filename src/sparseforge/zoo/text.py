"""English text that installs offline: the fortune files of Debian's ``fortunes`` package.

Each topic file under ``/usr/share/games/fortunes`` (``science``,
``literature``, ``computers``, ...) holds short texts separated by lines
holding a single ``%``. :func:`fortunes` returns them as a deterministic
calibration / evaluation split: an entry goes to the evaluation split when
the SHA-256 of its text falls in the last ``eval_fraction`` of the hash
range, so the split does not depend on file order, on which topics are read,
or on the package version's other entries.

:func:`labelled_fortunes` gives the same split with each entry's topic as an
integer label (a text-classification task for linear probes), and
:func:`token_stream` / :func:`calibration_batches` (from :mod:`sparseforge.tokens`)
turn texts into token windows for any Hugging Face tokenizer (byte-level BPE or BERT WordPiece).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sparseforge.datasets import Texts, TextSplit, split_texts
from sparseforge.datasets import text_hash as _hash32
from sparseforge.errors import DataError
from sparseforge.tokens import calibration_batches, token_stream

__all__ = [
    "DEFAULT_FORTUNES_DIR", "DEFAULT_TOPICS", "FORTUNES_ENV_VAR", "LABEL_TOPICS", "LabelledSplit", "TextSplit",
    "calibration_batches", "fortunes", "fortunes_dataset", "labelled_fortunes", "read_fortune_file", "read_texts",
    "split_texts", "token_stream",
]

DEFAULT_FORTUNES_DIR = "/usr/share/games/fortunes"
FORTUNES_ENV_VAR = "SPARSEFORGE_FORTUNES"
DEFAULT_TOPICS = ("science", "literature", "computers", "people", "wisdom", "politics", "education", "linux")
# Six topics with over 200 entries of at least 40 characters each in Debian's
# fortunes 1.99 (food, 178, and sports, 142, have too few).
LABEL_TOPICS = ("computers", "politics", "science", "law", "songs-poems", "men-women")


def _fortunes_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    path = Path(data_dir or os.environ.get(FORTUNES_ENV_VAR) or DEFAULT_FORTUNES_DIR)
    if not path.is_dir():
        raise DataError(
            f"fortune files not found in {path}. Install them with `sudo apt-get install fortunes` "
            f"(`make` does this when run as root), or point {FORTUNES_ENV_VAR} / data_dir at a folder of "
            "'%'-separated text files"
        )
    return path


def read_fortune_file(path: str | os.PathLike[str]) -> list[str]:
    """The entries of one ``%``-separated fortune file, stripped, empty ones dropped."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    entries, current = [], []
    for line in text.splitlines():
        if line.strip() == "%":
            entries.append("\n".join(current).strip())
            current = []
        else:
            current.append(line)
    entries.append("\n".join(current).strip())
    return [e for e in entries if e]


def fortunes(
    topics: tuple[str, ...] | list[str] = DEFAULT_TOPICS,
    *,
    eval_fraction: float = 0.2,
    min_chars: int = 40,
    data_dir: str | os.PathLike[str] | None = None,
) -> TextSplit:
    """English texts from the fortune topic files, split by a hash of each text.

    Args:
        topics: topic file names. Default: science, literature, computers,
            people, wisdom, politics, education, linux (those present are read;
            a named topic that is missing is an error naming it).
        eval_fraction: share of entries in the evaluation split. Default 0.2.
        min_chars: entries shorter than this are dropped (one-liners carry
            little context). Default 40.
        data_dir: folder of the fortune files. Default ``/usr/share/games/fortunes``
            or ``$SPARSEFORGE_FORTUNES``.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    root = _fortunes_dir(data_dir)
    missing = [t for t in topics if not (root / t).is_file()]
    if missing:
        available = sorted(p.name for p in root.iterdir() if p.is_file() and p.suffix == "")
        raise DataError(f"fortune topics {missing} not found in {root}; available: {', '.join(available)}")
    seen: set[str] = set()
    calibration: list[str] = []
    evaluation: list[str] = []
    threshold = int((1.0 - eval_fraction) * 2**32)
    for topic in topics:
        for entry in read_fortune_file(root / topic):
            if len(entry) < min_chars or entry in seen:
                continue
            seen.add(entry)
            (evaluation if _hash32(entry) >= threshold else calibration).append(entry)
    if not calibration or not evaluation:
        raise DataError(f"too few fortune entries in {root} for topics {list(topics)}")
    return TextSplit(calibration, evaluation)


@dataclass(frozen=True)
class LabelledSplit:
    """Texts with integer topic labels (index into ``topics``), split by text hash like :func:`fortunes`."""

    topics: tuple[str, ...]
    train_texts: list[str]
    train_labels: list[int]
    eval_texts: list[str]
    eval_labels: list[int]


def labelled_fortunes(
    topics: tuple[str, ...] | list[str] = LABEL_TOPICS,
    *,
    eval_fraction: float = 0.2,
    min_chars: int = 40,
    data_dir: str | os.PathLike[str] | None = None,
) -> LabelledSplit:
    """Fortune entries labelled with their topic: a text-classification task for linear probes.

    The label of an entry is the index of its topic file in ``topics``. An
    entry found in more than one of the topics is dropped (its label would be
    ambiguous); one repeated within a topic is kept once. The split is the
    hash rule of :func:`fortunes`, so a text is on the same side in both, and
    the training texts are calibration texts of any :func:`fortunes` call.
    Order: by topic, then file order.

    Args:
        topics: topic file names. Default: computers, politics, science, law,
            songs-poems, men-women (each over 200 entries; 4,600 entries in all).
        eval_fraction: share of entries in the evaluation split. Default 0.2.
        min_chars: entries shorter than this are dropped. Default 40.
        data_dir: folder of the fortune files, as in :func:`fortunes`.
    """
    topics = tuple(topics)
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    if len(set(topics)) != len(topics) or len(topics) < 2:
        raise DataError(f"labelled_fortunes needs at least two distinct topics, got {list(topics)}")
    root = _fortunes_dir(data_dir)
    missing = [t for t in topics if not (root / t).is_file()]
    if missing:
        available = sorted(p.name for p in root.iterdir() if p.is_file() and p.suffix == "")
        raise DataError(f"fortune topics {missing} not found in {root}; available: {', '.join(available)}")
    labels: dict[str, set[int]] = {}
    for label, topic in enumerate(topics):
        for entry in read_fortune_file(root / topic):
            if len(entry) >= min_chars:
                labels.setdefault(entry, set()).add(label)
    threshold = int((1.0 - eval_fraction) * 2**32)
    train_texts: list[str] = []
    train_labels: list[int] = []
    eval_texts: list[str] = []
    eval_labels: list[int] = []
    for entry, found in labels.items():  # insertion order: by topic, then file order
        if len(found) != 1:
            continue
        (label,) = found
        if _hash32(entry) >= threshold:
            eval_texts.append(entry)
            eval_labels.append(label)
        else:
            train_texts.append(entry)
            train_labels.append(label)
    empty = [t for i, t in enumerate(topics) if i not in train_labels or i not in eval_labels]
    if empty:
        raise DataError(f"fortune topics {empty} in {root} have no entries in the training or evaluation split")
    return LabelledSplit(topics, train_texts, train_labels, eval_texts, eval_labels)


def read_texts(path: str | os.PathLike[str] | None = None) -> list[str]:
    """The texts of a file, or of every readable text file under a folder (sorted by path).

    A file with lines holding a single ``%`` is read as fortune entries
    (:func:`read_fortune_file`); any other file is cut into paragraphs at
    blank lines. Files that are not UTF-8 text (the fortune package's
    ``.dat`` indexes) are skipped, and a file linked twice is read once. Default ``path``: the fortunes folder
    (``$SPARSEFORGE_FORTUNES`` or ``/usr/share/games/fortunes``).
    """
    p = _fortunes_dir(None) if path is None else Path(path)
    if not p.exists():
        raise DataError(f"calibration text {p} does not exist: pass a text file or a folder of text files")
    # resolved and deduplicated: the fortune folder links each file again as NAME.u8
    files = sorted({f.resolve() for f in p.rglob("*") if f.is_file()}) if p.is_dir() else [p]
    texts: list[str] = []
    for f in files:
        try:
            raw = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if "\x00" in raw:  # binary that happens to decode (the .dat indexes)
            continue
        if any(line.strip() == "%" for line in raw.splitlines()):
            texts.extend(read_fortune_file(f))
        else:
            texts.extend(t.strip() for t in raw.split("\n\n") if t.strip())
    if not texts:
        raise DataError(f"no UTF-8 text found in {p}")
    return texts


def fortunes_dataset(data_dir: str | os.PathLike[str] | None = None) -> Texts:
    """English texts from Debian's ``fortunes`` package (every topic file), or from any text file or folder
    given as ``data_dir`` (read by :func:`read_texts`).

    Registered as ``fortunes`` in :data:`sparseforge.datasets.DATASETS`: the default calibration text of
    transformers models.
    """
    return Texts(read_texts(data_dir))
