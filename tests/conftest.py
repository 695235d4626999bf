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


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(path, params, ModelFile, GPT2Model) of the tiny random F32 model (tests/synthetic.py), per module."""
    from synthetic import T, build_gguf

    from gpt2cli.gguf_file import ModelFile
    from gpt2cli.model import GPT2Model

    path = tmp_path_factory.mktemp("tiny") / "tiny-f32.gguf"
    params = build_gguf(path, T.F32)
    mf = ModelFile(path)
    return path, params, mf, GPT2Model(mf.weights, mf.config)
