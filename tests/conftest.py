"""Shared fixtures: where ../shared/data is, and skips with a one-line reason when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    """`GPT2_SHARED_DATA`, else ../shared/data beside the checkout."""
    return Path(os.environ.get("GPT2_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not (path / "gpt2-tokenizer" / "encoder.json").is_file():
        pytest.skip(f"shared data not found at {path} (set GPT2_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(shared_data: Path) -> Path:
    return shared_data / "gpt2-tokenizer"
