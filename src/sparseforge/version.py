"""The version of sparseforge, in a module of its own so that the CLI reads it without the whole package facade."""

__version__ = "0.1.0"
