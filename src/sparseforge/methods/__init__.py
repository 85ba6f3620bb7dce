"""Named sparsity methods: each a short preset of the shared parts."""

from sparseforge.methods.base import Method
from sparseforge.methods.gmp import GMP

__all__ = ["Method", "GMP"]
