"""Named sparsity methods: each a short preset of the shared parts."""

from sparseforge.methods.base import Method
from sparseforge.methods.gmp import GMP
from sparseforge.methods.nm_training import SRSTE, ProgressiveNM
from sparseforge.methods.sparse_training import SET, GraNet, RigL, StaticRandom

__all__ = ["Method", "GMP", "GraNet", "RigL", "SET", "StaticRandom"]
__all__ += ["ProgressiveNM", "SRSTE"]
