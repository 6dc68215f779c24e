"""The package's version, the one place it is written (pyproject reads it; ``beit --version``, run.json)."""

__version__ = "0.1.0"
