"""Shared fixtures: one local Ray per session, tokenizers built or found locally (never downloaded)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from ray_hygiene import ray_left_as_found  # noqa: F401  (autouse: every Ray test leaves Ray as it found it)
from services import free_port

from lookahead_ray.runtime import TRAIN_POLL_ENV, TRAIN_POLL_S

# Set, not defaulted: the suite starts its own Ray instances and must not join (or need the token of) a cluster a
# developer's shell points at.
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.pop("RAY_ADDRESS", None)
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
# Ray Train's controller polls its workers every 2 s by default: each fit's start, report and end wait for a poll.
# Every Ray of the session (the shared one, the tests' heads and nodes) inherits this before it starts.
os.environ.setdefault(TRAIN_POLL_ENV, TRAIN_POLL_S)
# The S3 API server's address is fixed before any Ray starts, so every Ray worker of the session (the shared local
# Ray's, a test cluster's) inherits the endpoint and the test credentials; the server starts only when a test asks
# for it (the ``s3`` fixture). Set, not defaulted: a test must never reach a real bucket with a developer's keys.
os.environ["LOOKAHEAD_TEST_S3_PORT"] = os.environ.get("LOOKAHEAD_TEST_S3_PORT") or str(free_port())
os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{os.environ['LOOKAHEAD_TEST_S3_PORT']}",
                   "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                   "AWS_EC2_METADATA_DISABLED": "true"})

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
    from ray_hygiene import start_session_ray

    # The dashboard serves Ray's state API, which the leak check after each test (ray_hygiene) reads.
    start_session_ray(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
                      log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    yield ray
    ray.shutdown()




@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3 API server (moto's, started here, stopped by its process group) with one bucket; yields the
    bucket's URI. Clients find it through AWS_ENDPOINT_URL, as pyarrow and Ray do on a real cluster."""
    pytest.importorskip("moto", reason="the S3 tests run moto's S3 API server (pip install 'moto[server]')")
    from services import S3Server

    server = S3Server(int(os.environ["LOOKAHEAD_TEST_S3_PORT"]), tmp_path_factory.mktemp("s3") / "moto.log")
    try:
        yield server.create_bucket("lookahead-test")
    finally:
        server.stop()
