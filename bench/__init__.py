"""Benchmarks; a package so that tests import their inputs and references as ``from bench import ...``."""
