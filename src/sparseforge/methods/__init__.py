"""Named sparsity methods: each a short preset of the shared parts."""

from sparseforge.method import METHODS, Method
from sparseforge.methods.fixed import FixedMask
from sparseforge.methods.global_magnitude import GlobalMagnitude
from sparseforge.methods.gmp import GMP
from sparseforge.methods.imp import IMP, IMPResult, IMPRound, Ticket
from sparseforge.methods.issp import ISSP
from sparseforge.methods.nm_training import SRSTE, ProgressiveNM
from sparseforge.methods.sparse_training import SET, GraNet, RigL, StaticRandom

__all__ = ["METHODS", "Method", "GMP", "GraNet", "ISSP", "RigL", "SET", "StaticRandom"]
__all__ += ["FixedMask", "GlobalMagnitude", "IMP", "IMPResult", "IMPRound", "Ticket"]
__all__ += ["ProgressiveNM", "SRSTE"]
