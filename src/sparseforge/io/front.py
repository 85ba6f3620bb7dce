"""One ``save`` and one ``load`` for every file format: :func:`save`, :func:`load`, :func:`load_with_metadata`.

The formats are the :class:`~sparseforge.formats.FileFormat` objects of
:data:`~sparseforge.formats.FORMATS`: plain checkpoints, ``.sfz`` files and
Hugging Face folders (this package) and adapter folders
(:mod:`sparseforge.peft`), each registered when its module is imported
(which this module makes sure of), and any a user registers. Writing picks
the format from the path's name (or ``format=``); reading tells it from the
content, so a checkpoint renamed to ``model.bin`` still loads as one.

    >>> import os, tempfile, torch, sparseforge as sf
    >>> from sparseforge.zoo import build_model
    >>> model = build_model("lenet300")
    >>> folder = tempfile.mkdtemp()
    >>> _ = sf.save(model, os.path.join(folder, "m.sfz"), values="fp32")      # sfz, by the name
    >>> _ = sf.save(model, os.path.join(folder, "m.bin"), format="checkpoint")
    >>> again, meta = load_with_metadata(os.path.join(folder, "m.bin"))        # a checkpoint, by its content
    >>> meta["format"], all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
    ...                                                        sf.load(os.path.join(folder, "m.sfz")).state_dict().values()))
    ('checkpoint', True)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

# Imported for what they register in FORMATS: every built-in format is there once this module is
# (in this order, the order FORMATS lists them in).
import sparseforge.io.checkpoint  # noqa: F401  # isort: skip
import sparseforge.io.sfz  # noqa: F401  # isort: skip
import sparseforge.io.hf  # noqa: F401  # isort: skip
import sparseforge.peft.saving  # noqa: F401  # isort: skip
from sparseforge.formats import check_options, format_for_loading, format_for_saving

__all__ = ["load", "load_with_metadata", "save"]


def save(model: nn.Module, path: str | os.PathLike[str], format: str | None = None, **options: Any) -> Path:
    """Write ``model`` to ``path`` in ``format`` (a name of :data:`~sparseforge.formats.FORMATS`); returns the path.

    Without ``format``, the name decides: ``.sfz`` an sfz file, ``.safetensors``
    a plain checkpoint, a name without a suffix of a format a folder (a
    Hugging Face folder for a ``transformers`` model, an adapter folder for
    a model with adapters). ``options`` go to the format's writer, unchanged:
    ``values="int8"`` for sfz; ``arch``, ``arch_kwargs`` and ``extra`` for
    checkpoints and sfz; ``tokenizer`` and ``extra`` for Hugging Face folders.

    Raises:
        SparseforgeError: an unknown format (the closest known one
            suggested), a name that says no format, an option the writer
            does not take, or whatever the writer refuses.
    """
    name, fmt = format_for_saving(path, model, format)
    check_options(fmt.save, options, f"the {name} writer")
    return fmt.save(model, path, **options)


def load_with_metadata(path: str | os.PathLike[str], model: nn.Module | None = None, *, format: str | None = None,
                       **options: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Read ``path`` (a file or folder of any registered format, told by its content): (model, metadata).

    ``model``: the model to load into; None builds the one the file
    describes (an adapter needs its base model). ``format``: read as this
    format; an error when the content is another one. ``options`` go to the
    format's reader unchanged. The metadata is what the format's reader
    returns (``arch``, ``arch_kwargs``, ``extra``, ...) plus ``format``, the
    name of the format read.

    Raises:
        SparseforgeError: the path does not exist, is in none of the known
            formats (the message lists them), is another format than
            ``format``, or the reader refuses it (corrupted, truncated,
            newer, does not fit ``model``).
    """
    name, fmt = format_for_loading(path, format)
    check_options(fmt.load, options, f"the {name} reader")
    loaded, meta = fmt.load(path, model, **options)
    return loaded, {**meta, "format": name}


def load(path: str | os.PathLike[str], model: nn.Module | None = None, *, format: str | None = None,
         **options: Any) -> nn.Module:
    """Read ``path`` in whichever format it is (see :func:`load_with_metadata`); returns the model.

    Example:
        >>> import os, tempfile, torch, sparseforge as sf
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3))
        >>> path = sf.save(model, os.path.join(tempfile.mkdtemp(), "m.safetensors"))
        >>> loaded = sf.load(path, torch.nn.Sequential(torch.nn.Linear(4, 3)))
        >>> torch.equal(loaded[0].weight, model[0].weight)
        True
    """
    return load_with_metadata(path, model, format=format, **options)[0]
