"""Modules the tests share: drivers run as ``python -m tests.helpers.NAME`` and small generated data sets."""
