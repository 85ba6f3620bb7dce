"""Storing and running what is left: checkpoints (and, later, compaction and sparse kernels)."""

from sparseforge.export.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from sparseforge.export.compact import CompactReport, compact, load_compacted

__all__ = ["CompactReport", "compact", "load_checkpoint", "load_compacted", "read_checkpoint", "save_checkpoint"]
