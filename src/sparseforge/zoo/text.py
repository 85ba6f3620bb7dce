"""English text that installs offline: the fortune files of Debian's ``fortunes`` package.

Each topic file under ``/usr/share/games/fortunes`` (``science``,
``literature``, ``computers``, ...) holds short texts separated by lines
holding a single ``%``. :func:`fortunes` returns them as a deterministic
calibration / evaluation split: an entry goes to the evaluation split when
the SHA-256 of its text falls in the last ``eval_fraction`` of the hash
range, so the split does not depend on file order, on which topics are read,
or on the package version's other entries.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from sparseforge.errors import DataError

DEFAULT_FORTUNES_DIR = "/usr/share/games/fortunes"
FORTUNES_ENV_VAR = "SPARSEFORGE_FORTUNES"
DEFAULT_TOPICS = ("science", "literature", "computers", "people", "wisdom", "politics", "education", "linux")


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
            h = int.from_bytes(hashlib.sha256(entry.encode("utf-8")).digest()[:4], "big")
            (evaluation if h >= threshold else calibration).append(entry)
    if not calibration or not evaluation:
        raise DataError(f"too few fortune entries in {root} for topics {list(topics)}")
    return TextSplit(calibration, evaluation)
