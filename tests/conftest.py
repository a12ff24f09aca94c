"""Shared fixtures: one local Ray per session, tokenizers built or found locally (never downloaded)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]


def shared_file(relative: str) -> Path:
    """A file under ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"{path} is absent (shared test data lives in ../shared/data next to the checkout)")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from lookahead_ray.config import ModelConfig
    from lookahead_ray.modeling import tokenizer_for

    return tokenizer_for(ModelConfig(tokenizer="builtin:tiny"))


@pytest.fixture(scope="session")
def mistral_tokenizer_dir(tmp_path_factory) -> Path:
    """Mistral-7B's SentencePiece model as shipped in the mistral_common package (Apache-2.0)."""
    mistral_common = pytest.importorskip("mistral_common", reason="mistral_common provides a real Llama-family tokenizer")
    model = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not model.exists():
        pytest.skip(f"{model} is not in this mistral_common version")
    directory = tmp_path_factory.mktemp("mistral-tokenizer")
    shutil.copy(model, directory / "tokenizer.model")
    return directory


@pytest.fixture(scope="session")
def mistral_tokenizer(mistral_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(mistral_tokenizer_dir))


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray with 2 CPUs (like CI), shared by every Ray test of the session."""
    ray = pytest.importorskip("ray")
    from ray.data import DataContext

    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
