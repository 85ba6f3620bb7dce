"""Making a pruned model smaller: dependency groups, per-layer handlers, and the removal of pruned channels and heads.

- :mod:`~sparseforge.compact.handlers`: what compaction knows about each layer
  type, in a table that :func:`register_handler` extends with your own layers;
- :mod:`~sparseforge.compact.dependency`: which tensor slices are tied to one
  channel (fx-traced models);
- :mod:`~sparseforge.compact.compactor`: :func:`compact`, for fx-traced models
  and (through :mod:`~sparseforge.compact.transformer`) Hugging Face
  transformers, whose blocks are described by the layouts of
  :mod:`~sparseforge.compact.layouts` (:data:`LAYOUTS`, open to your own);
- :mod:`~sparseforge.compact.plan`: the report, applying the decided slices
  with an output check, and :func:`resize_modules` for loading.

As an attribute, ``sparseforge.compact`` is the function :func:`compact`
(``sf.compact(model)``); import this package's names with
``from sparseforge.compact import ...`` (``import sparseforge.compact.x as y``
would find the function).
"""

from sparseforge.compact.compactor import channel_values, compact
from sparseforge.compact.dependency import ChannelGroup, DependencyGraph, HeadGroup, analyze
from sparseforge.compact.handlers import (
    BatchNormHandler, ChannelwiseHandler, Conv1DHandler, Conv2dHandler, FlattenHandler, LayerHandler, LinearHandler,
    handler_for, register_handler,
)
from sparseforge.compact.layouts import LAYOUTS, AttentionLayout, FFNLayout
from sparseforge.compact.plan import CompactReport, resize_modules
from sparseforge.compact.transformer import compact_transformer

__all__ = [
    "LAYOUTS", "AttentionLayout", "BatchNormHandler", "ChannelGroup", "ChannelwiseHandler", "CompactReport",
    "Conv1DHandler", "Conv2dHandler", "DependencyGraph", "FFNLayout", "FlattenHandler", "HeadGroup", "LayerHandler",
    "LinearHandler", "analyze", "channel_values", "compact", "compact_transformer", "handler_for", "register_handler",
    "resize_modules",
]
