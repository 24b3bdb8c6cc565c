"""Shared fixtures: real models, loaded once per session."""

import os
from pathlib import Path

import pytest

from melora_pyro.models import load_base_model

SHARED_DIR = Path(os.environ.get("MELORA_SHARED_DIR", Path(__file__).resolve().parents[1].parent / "shared"))
STORIES_DIR = SHARED_DIR / "models" / "stories260K"


@pytest.fixture(scope="session")
def stories():
    """(model, tokenizer) of stories260K, a real 260K-parameter LLaMA, from the shared directory."""
    if not STORIES_DIR.is_dir():
        pytest.skip(f"{STORIES_DIR} not found (set MELORA_SHARED_DIR)")
    return load_base_model(str(STORIES_DIR))


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct from the cache ($MELORA_CACHE or
    ~/.cache/melora-pyro), converted there on first use (about 40 s). Use it from slow tests only."""
    return load_base_model("smollm2-135m")
