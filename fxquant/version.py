"""The package version, importable without importing the package (reports and checkpoints record it)."""

__version__ = "0.1.0"
