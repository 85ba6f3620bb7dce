"""Storing and running what is left: checkpoints (and, later, compaction and sparse kernels)."""

from sparseforge.export.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint

__all__ = ["load_checkpoint", "read_checkpoint", "save_checkpoint"]
