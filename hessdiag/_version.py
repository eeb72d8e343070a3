"""The package version: the one source (pyproject.toml reads it as ``dynamic = ["version"]``)."""

__version__ = "0.1.0"
