"""sparseforge: make neural networks sparse and small, with savings you can measure.

The public API, re-exported. See docs/architecture.md for the architecture: a sparsity
method is a composition of a Target, a Pattern, a Score, an Allocation, a
Schedule and an Update.
"""

from sparseforge import allocation, distributed, merge, methods, patterns, peft, schedules, scores, targets, updates
from sparseforge import architectures, registry
from sparseforge.allocation import ERK, LAMP, OWL, Allocation, Explicit, Global, Uniform
from sparseforge.errors import DataError, SparseforgeError
from sparseforge.export.compact import CompactReport, compact, load_compacted
from sparseforge.export.sparse_linear import SparseLinear, ToSparseReport, load_sparse_state_dict, to_sparse
from sparseforge.export.sfz import load, save
from sparseforge.methods import GMP, Method
from sparseforge.oneshot import prune
from sparseforge.oneshot.channels import ChannelPruning, prune_channels
from sparseforge.patterns import NM, Block, Channel, Pattern, Unstructured
from sparseforge.report import SparsityReport, report
from sparseforge.schedules import Constant, Cubic, Linear, OneShot, Schedule
from sparseforge.scores import SNIP, GradientMagnitude, L1Norm, L2Norm, Magnitude, Random, Score, Taylor
from sparseforge.sparsifier import Sparsifier
from sparseforge.targets import Target
from sparseforge.updates import HardPrune, Update

__version__ = "0.1.0"

__all__ = [
    "Allocation", "Block", "Channel", "Constant", "Cubic", "DataError", "ERK", "Explicit", "GMP",
    "Global", "GradientMagnitude", "HardPrune", "LAMP", "Linear", "Magnitude", "Method", "NM", "OWL",
    "OneShot", "Pattern", "Random", "SNIP", "Schedule", "Score", "SparseforgeError", "Sparsifier",
    "SparsityReport", "Target", "Taylor", "Uniform", "Unstructured", "Update", "allocation",
    "distributed", "methods", "patterns", "prune", "report", "schedules", "scores", "targets", "updates",
    "ChannelPruning", "CompactReport", "L1Norm", "L2Norm", "compact", "load_compacted", "prune_channels",
    "SparseLinear", "ToSparseReport", "load_sparse_state_dict", "to_sparse",
    "load", "save",
    "merge", "peft",
    "architectures", "registry",
]
