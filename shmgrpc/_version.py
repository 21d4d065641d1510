"""The package version (also in pyproject.toml; a test keeps them equal)."""

__version__ = "0.3.0.dev0"
