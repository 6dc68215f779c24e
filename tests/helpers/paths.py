"""The repository root, for tests that read its files or start its scripts (one place, whatever a test's depth)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
