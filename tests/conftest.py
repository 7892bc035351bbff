"""Shared fixtures: tiny model folders of every supported family and a tiny text dataset file.

The builders live in tests/tiny_models.py (a plain module, so tests can import them).
"""
from __future__ import annotations

from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from tiny_models import corpus, make_model, make_tokenizer, save_model


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tiny_tokenizer):
    """`model_dir(family)`: a saved tiny random model of that family (built once per session)."""
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            folder = tmp_path_factory.mktemp(f"model-{family}")
            made[family] = save_model(make_model(family), folder, tiny_tokenizer)
        return made[family]

    return get


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    """A .txt dataset: paragraphs separated by blank lines (one document each)."""
    path = tmp_path_factory.mktemp("data") / "tiny.txt"
    path.write_text("\n\n".join(corpus()) + "\n", encoding="utf-8")
    return path
