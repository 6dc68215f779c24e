"""beit's tests, in folders that mirror the package (see tests/meta/test_layout.py for the rule)."""
