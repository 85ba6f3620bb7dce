"""Every file format sparseforge reads and writes, behind one :func:`save` and one :func:`load`.

- :mod:`~sparseforge.io.checkpoint`: plain checkpoints (a safetensors file of
  the state dict, exact zeros included, with digests);
- :mod:`~sparseforge.io.sfz`: the compressed ``.sfz`` format (bitmask plus
  packed values);
- :mod:`~sparseforge.io.hf`: Hugging Face ``save_pretrained`` folders;
- :mod:`~sparseforge.io.front`: :func:`save`, :func:`load` and
  :func:`load_with_metadata` (``sf.save`` / ``sf.load``), over every format of
  :data:`~sparseforge.formats.FORMATS` (adapter folders of
  :mod:`sparseforge.peft` and users' formats included).
"""

from sparseforge.formats import FORMATS, FileFormat
from sparseforge.io.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from sparseforge.io.front import load, load_with_metadata, save
from sparseforge.io.sfz import load_sfz, read_sfz

__all__ = [
    "FORMATS", "FileFormat", "load", "load_checkpoint", "load_sfz", "load_with_metadata", "read_checkpoint",
    "read_sfz", "save", "save_checkpoint",
]
