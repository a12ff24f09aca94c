"""Every path inside a training run's directory, in one place: what ``train`` writes where, and what a resume,
an export, a search or an eval reads back. Each location is a path or a URI (``storage.join`` keeps the scheme).

    <train dir>/                       train.output_dir, or <output_dir>/train
        run_<run_name>.json            the run's identity (run_guard): a rerun resumes or refuses
        prepared_<run_name>/           prepare's output when training straight from data.inputs
        tokens_<run_name>.arrow        the same without Ray (train --local), with its row report
        rows_<run_name>.json
        tensorboard/<run_name>/        TensorBoard's event files
        logs/lookahead.log             the command's log (console.LOG_FILE)
        <run_name>/checkpoint_*/       Ray Train's checkpoints (under train.storage_path when set)
            complete-rank<R>.json      each rank's last file: a checkpoint counts only with every rank's
            ds/  hf/  export_check.pt  DeepSpeed's state, rank 0's export and the batch that checks it
            lookahead_config.yaml
        final/                         the Hugging Face export (export_failed/ when its check failed)
        train_result.json              the final metrics
"""

from __future__ import annotations

import os
import re

from lookahead_ray import storage
from lookahead_ray.config import LookaheadConfig
from lookahead_ray.errors import ConfigError

FINAL_DIR = "final"
FAILED_EXPORT_DIR = "export_failed"
EXPORT_CHECK_FAILED_FILE = "EXPORT_CHECK_FAILED.json"
RESULT_FILE = "train_result.json"
CONFIG_FILE = "lookahead_config.yaml"
"""The run's config, written into every checkpoint and export: the marker that a directory is this tool's."""

CHECKPOINT_PREFIX = "checkpoint_"
DS_SUBDIR = "ds"
"""A checkpoint's DeepSpeed state (every rank's shard)."""
HF_SUBDIR = "hf"
"""A checkpoint's Hugging Face export, written by rank 0."""
EXPORT_CHECK_FILE = "export_check.pt"
"""The training batch and the engine's logits on it, which the export is checked against."""
COMPLETE_MARKER = re.compile(r"complete-rank(\d+)\.json")


def train_dir(cfg: LookaheadConfig) -> str:
    """The absolute run directory of ``train`` (``train.output_dir``, or ``<output_dir>/train``).

    Raises:
        ConfigError: neither is set.
    """
    directory = cfg.stage_dir("train")
    if not directory:
        raise ConfigError("train.output_dir is not set (use --output-dir DIR, or set output_dir for the whole run)")
    return storage.absolute(directory)


def storage_path(cfg: LookaheadConfig) -> str:
    """Where Ray Train keeps the run's checkpoints: ``train.storage_path``, else the train directory."""
    return storage.absolute(cfg.train.storage_path or train_dir(cfg))


def run_dir(cfg: LookaheadConfig) -> str:
    """The run's checkpoint directory on Ray (``<storage path>/<run_name>``)."""
    return storage.join(storage_path(cfg), cfg.train.run_name)


def local_run_dir(output_dir: str, run_name: str) -> str:
    """The run's checkpoint directory of ``train --local`` (always inside its local train directory)."""
    return os.path.join(output_dir, run_name)


def checkpoint(run_location: str, name: str) -> str:
    return storage.join(run_location, name)


def complete_marker(checkpoint_dir: str, rank: int) -> str:
    return storage.join(checkpoint_dir, f"complete-rank{rank}.json")


def ds_dir(checkpoint_dir: str) -> str:
    return os.path.join(checkpoint_dir, DS_SUBDIR)


def final_dir(output_dir: str) -> str:
    return storage.join(output_dir, FINAL_DIR)


def export_dir(output_dir: str, passed: bool) -> str:
    """``final/``, or ``export_failed/`` for an export whose check failed."""
    return storage.join(output_dir, FINAL_DIR if passed else FAILED_EXPORT_DIR)


def result_file(output_dir: str) -> str:
    return storage.join(output_dir, RESULT_FILE)


def run_record(output_dir: str, run_name: str) -> str:
    return storage.join(output_dir, f"run_{run_name}.json")


def prepared_dir(output_dir: str, run_name: str) -> str:
    return storage.join(output_dir, f"prepared_{run_name}")


def local_tokens(output_dir: str, run_name: str) -> str:
    return os.path.join(output_dir, f"tokens_{run_name}.arrow")


def local_rows_report(output_dir: str, run_name: str) -> str:
    return os.path.join(output_dir, f"rows_{run_name}.json")


def tensorboard_dir(cfg: LookaheadConfig) -> str:
    return storage.join(train_dir(cfg), "tensorboard", cfg.train.run_name)


def trial_run_dir(trial_dir: str, run_name: str) -> str:
    """A Tune trial's checkpoint directory (its train directory is ``<trial dir>/train``)."""
    return storage.join(trial_dir, "train", run_name)
