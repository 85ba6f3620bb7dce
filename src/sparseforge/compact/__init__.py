"""Making a pruned model smaller: dependency groups and the removal of pruned channels and heads.

- :mod:`~sparseforge.compact.dependency`: which tensor slices are tied to one
  channel (fx-traced models);
- :mod:`~sparseforge.compact.compactor`: :func:`compact` for fx-traced models;
- :mod:`~sparseforge.compact.transformer`: the same for Hugging Face
  transformers, whose blocks are recognised by name.
"""

from sparseforge.compact.compactor import CompactReport, compact, resize_modules
from sparseforge.compact.dependency import ChannelGroup, DependencyGraph, HeadGroup, analyze

__all__ = ["ChannelGroup", "CompactReport", "DependencyGraph", "HeadGroup", "analyze", "compact", "resize_modules"]
