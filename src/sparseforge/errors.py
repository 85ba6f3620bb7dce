"""Errors raised by sparseforge.

Every error a user can cause by bad input is a :class:`SparseforgeError`, so
that the CLI can print it as one line and exit non-zero, and so that library
users can catch it without also catching bugs.
"""

from __future__ import annotations


class SparseforgeError(ValueError):
    """Bad input to sparseforge: the message names what is wrong and what to do."""


class DataError(SparseforgeError):
    """A data file is missing, truncated or corrupted."""
