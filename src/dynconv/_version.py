"""The package version, in one place (the package metadata, the CLI and caches read it)."""

__version__ = "0.1.0"
