"""Storing and running what is left: checkpoints (and, later, compaction and sparse kernels)."""

from sparseforge.export.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from sparseforge.export.compact import CompactReport, compact, load_compacted
from sparseforge.export.sparse_linear import SparseLinear, ToSparseReport, load_sparse_state_dict, to_sparse
from sparseforge.export.sfz import load, read_sfz, save

__all__ = [
    "CompactReport", "SparseLinear", "ToSparseReport", "compact", "load_checkpoint", "load_compacted",
    "load_sparse_state_dict", "read_checkpoint", "save_checkpoint", "to_sparse",
    "load", "read_sfz", "save",
]
