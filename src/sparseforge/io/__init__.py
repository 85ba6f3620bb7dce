"""Every file format sparseforge reads and writes.

- :mod:`~sparseforge.io.checkpoint`: plain checkpoints (a safetensors file of
  the state dict, exact zeros included, with digests);
- :mod:`~sparseforge.io.sfz`: the compressed ``.sfz`` format (bitmask plus
  packed values), behind :func:`sparseforge.save` / :func:`sparseforge.load`;
- :mod:`~sparseforge.io.hf`: Hugging Face ``save_pretrained`` folders.
"""

from sparseforge.io.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from sparseforge.io.sfz import load, load_sfz, read_sfz, save

__all__ = ["load", "load_checkpoint", "load_sfz", "read_checkpoint", "read_sfz", "save", "save_checkpoint"]
