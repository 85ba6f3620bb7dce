"""Deprecated alias: the ``export`` package was split into :mod:`sparseforge.io` (file formats),
:mod:`sparseforge.compact` (compaction) and :mod:`sparseforge.kernels` (sparse modules)."""

import warnings

from sparseforge.compact import CompactReport, compact
from sparseforge.io import load, load_checkpoint, read_checkpoint, read_sfz, save, save_checkpoint
from sparseforge.io.checkpoint import load_compacted
from sparseforge.kernels import SparseLinear, ToSparseReport, load_sparse_state_dict, to_sparse

warnings.warn("sparseforge.export is deprecated: import from sparseforge.io, sparseforge.compact or "
              "sparseforge.kernels (or the top-level sparseforge names)", DeprecationWarning, stacklevel=2)

__all__ = [
    "CompactReport", "SparseLinear", "ToSparseReport", "compact", "load", "load_checkpoint", "load_compacted",
    "load_sparse_state_dict", "read_checkpoint", "read_sfz", "save", "save_checkpoint", "to_sparse",
]
