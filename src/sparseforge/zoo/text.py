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
:func:`token_stream` / :func:`calibration_batches` turn texts into token
windows for any Hugging Face tokenizer (byte-level BPE or BERT WordPiece).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sparseforge.errors import DataError

DEFAULT_FORTUNES_DIR = "/usr/share/games/fortunes"
FORTUNES_ENV_VAR = "SPARSEFORGE_FORTUNES"
DEFAULT_TOPICS = ("science", "literature", "computers", "people", "wisdom", "politics", "education", "linux")
# Six topics with over 200 entries of at least 40 characters each in Debian's
# fortunes 1.99 (food, 178, and sports, 142, have too few).
LABEL_TOPICS = ("computers", "politics", "science", "law", "songs-poems", "men-women")


@dataclass(frozen=True)
class TextSplit:
    """Texts for calibration (``calibration``) and for measuring quality (``evaluation``), disjoint."""

    calibration: list[str]
    evaluation: list[str]


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


def _hash32(entry: str) -> int:
    """The first four bytes of the SHA-256 of ``entry``, big-endian: where it falls in the split."""
    return int.from_bytes(hashlib.sha256(entry.encode("utf-8")).digest()[:4], "big")


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


def _separator_id(tokenizer: Any) -> int:
    for name in ("eos_token_id", "sep_token_id"):
        token_id = getattr(tokenizer, name, None)
        if token_id is not None:
            return int(token_id)
    raise DataError(f"{type(tokenizer).__name__} has neither an eos nor a sep token to separate texts with")


def _is_encoder_tokenizer(tokenizer: Any) -> bool:
    """BERT-style: has [CLS] and [SEP] and no end-of-sequence token."""
    return (getattr(tokenizer, "cls_token_id", None) is not None
            and getattr(tokenizer, "sep_token_id", None) is not None
            and getattr(tokenizer, "eos_token_id", None) is None)


def token_stream(tokenizer: Any, texts: Sequence[str]) -> torch.Tensor:
    """All ``texts`` as one 1-D int64 token tensor: ``[S] t0 [S] t1 [S] ... tn [S]``.

    Each text is encoded alone without special tokens; ``[S]`` is the
    tokenizer's end-of-sequence token, or its ``[SEP]`` when it has none
    (BERT WordPiece). Works with any Hugging Face tokenizer.
    """
    if isinstance(texts, str):
        raise DataError("texts must be a sequence of strings, not one string")
    sep = _separator_id(tokenizer)
    encoded = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    ids = [sep]
    for piece in encoded:
        ids.extend(piece)
        ids.append(sep)
    return torch.tensor(ids, dtype=torch.long)


def calibration_batches(
    tokenizer: Any,
    texts: Sequence[str],
    samples: int = 128,
    seq_len: int = 128,
    batch_size: int = 8,
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """Random token windows of ``texts`` for one-shot pruning calibration, as model-input dicts.

    The rule: ``texts`` become one :func:`token_stream`, cut into
    non-overlapping windows of ``seq_len`` tokens after a random shift of
    less than one window; ``samples`` of those windows are drawn without
    replacement (``torch.Generator`` seeded with ``seed``, so the batches
    depend only on the arguments) and grouped into batches of
    ``batch_size`` (the last one smaller when ``samples`` is not a
    multiple). No window repeats text, so the stream must hold at least
    ``samples * seq_len`` tokens, else a :class:`DataError` says how many
    there are.

    Each batch is ``{"input_ids": LongTensor[b, seq_len]}``. For an encoder
    tokenizer (BERT WordPiece, as MiniLM's: ``[CLS]`` and ``[SEP]``, no
    end-of-sequence token) each window is ``[CLS]``, ``seq_len - 2`` text
    tokens, ``[SEP]``, and the batch also holds ``attention_mask`` (all ones).

    Defaults: 128 samples of 128 tokens in batches of 8, seed 0.
    """
    if samples < 1 or batch_size < 1:
        raise DataError(f"samples and batch_size must be positive, got {samples} and {batch_size}")
    encoder = _is_encoder_tokenizer(tokenizer)
    body = seq_len - 2 if encoder else seq_len
    if body < 1 or seq_len < 2:
        raise DataError(f"seq_len {seq_len} is too short for {type(tokenizer).__name__}")
    stream = token_stream(tokenizer, texts)
    available = stream.numel() // body
    if available < samples:
        raise DataError(
            f"calibration text too short: {len(texts)} texts give {stream.numel()} tokens, but {samples} "
            f"non-overlapping windows of {body} tokens need {samples * body}; pass more texts or fewer samples")
    gen = torch.Generator().manual_seed(seed)
    shift = int(torch.randint(0, stream.numel() - available * body + 1, (1,), generator=gen))
    windows = stream[shift:shift + available * body].view(available, body)
    windows = windows[torch.randperm(available, generator=gen)[:samples]]
    if encoder:
        n = windows.shape[0]
        windows = torch.cat([torch.full((n, 1), int(tokenizer.cls_token_id)), windows,
                             torch.full((n, 1), int(tokenizer.sep_token_id))], dim=1)
    batches = []
    for i in range(0, samples, batch_size):
        input_ids = windows[i:i + batch_size].contiguous()
        batch = {"input_ids": input_ids}
        if encoder:
            batch["attention_mask"] = torch.ones_like(input_ids)
        batches.append(batch)
    return batches


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


def split_texts(texts: Sequence[str], eval_fraction: float = 0.1) -> TextSplit:
    """Split ``texts`` into calibration and evaluation by the hash rule of :func:`fortunes` (duplicates dropped).

    Default ``eval_fraction`` 0.1. A text that lands in neither side cannot
    happen; too few texts for both sides is a :class:`DataError`.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    threshold = int((1.0 - eval_fraction) * 2**32)
    calibration: list[str] = []
    evaluation: list[str] = []
    for text in dict.fromkeys(texts):
        (evaluation if _hash32(text) >= threshold else calibration).append(text)
    if not calibration or not evaluation:
        raise DataError(f"{len(texts)} texts are too few to hold out an evaluation split; pass more text")
    return TextSplit(calibration, evaluation)
