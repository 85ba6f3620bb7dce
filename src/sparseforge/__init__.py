"""sparseforge: make neural networks sparse and small, with savings you can measure.

The public API, re-exported. See docs/architecture.md for the architecture: a sparsity
method is a composition of a Target, a Pattern, a Score, an Allocation, a
Schedule and an Update.
"""

from sparseforge import allocation, distributed, io, kernels, merge, methods, patterns, peft, schedules, scores, targets, updates
from sparseforge import architectures, datasets, registry, training
from sparseforge.allocation import ERK, LAMP, OWL, Allocation, Explicit, Global, Uniform
from sparseforge.errors import DataError, SparseforgeError
from sparseforge.compact import CompactReport, compact
from sparseforge.kernels import PackedLinear, SparseLinear, ToSparseReport, load_sparse_state_dict, to_sparse
from sparseforge.io.checkpoint import load_checkpoint, load_compacted, save_checkpoint
from sparseforge.io import load, save
from sparseforge.methods import GMP, Method
from sparseforge.oneshot import prune, prune_channels
from sparseforge.patterns import NM, Block, Channel, ChannelGroups, Pattern, Unstructured
from sparseforge.report import PruneReport, SparsityReport, report
from sparseforge.schedules import Constant, Cubic, Linear, OneShot, Schedule
from sparseforge.scores import SNIP, GradientMagnitude, L1Norm, L2Norm, Magnitude, Random, Score, Taylor, Wanda
from sparseforge.sparsifier import Sparsifier
from sparseforge.targets import Target
from sparseforge.training import fit
from sparseforge.updates import HardPrune, Update
from sparseforge.version import __version__

__all__ = [
    "Allocation", "Block", "Channel", "Constant", "Cubic", "DataError", "ERK", "Explicit", "GMP",
    "Global", "GradientMagnitude", "HardPrune", "LAMP", "Linear", "Magnitude", "Method", "NM", "OWL",
    "OneShot", "Pattern", "Random", "SNIP", "Schedule", "Score", "SparseforgeError", "Sparsifier",
    "SparsityReport", "Target", "Taylor", "Uniform", "Unstructured", "Update", "allocation",
    "distributed", "methods", "patterns", "prune", "report", "schedules", "scores", "targets", "updates",
    "ChannelGroups", "PruneReport", "Wanda", "CompactReport", "L1Norm", "L2Norm", "compact", "load_compacted", "prune_channels",
    "PackedLinear", "SparseLinear", "ToSparseReport", "load_sparse_state_dict", "to_sparse",
    "load", "load_checkpoint", "save", "save_checkpoint",
    "io", "kernels", "merge", "peft",
    "fit", "training",
    "architectures", "registry",
    "datasets",
]


def __getattr__(name: str) -> object:
    # ``sparseforge.export`` (split into io, compact and kernels) still answers, with a DeprecationWarning,
    # for code written as ``sf.export.save_checkpoint``; it is imported only when asked for.
    if name == "export":
        import importlib

        return importlib.import_module("sparseforge.export")
    raise AttributeError(f"module 'sparseforge' has no attribute {name!r}")
