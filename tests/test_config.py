"""Typed config: YAML loading, dotted overrides, errors naming file and key; every shipped YAML validates."""

from __future__ import annotations

from pathlib import Path

import pytest

from lookahead_ray.config import ConfigError, LookaheadConfig, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates_and_documents_its_command(path):
    cfg = load_config(path)
    assert isinstance(cfg, LookaheadConfig)
    header = path.read_text().splitlines()[0]
    assert header.startswith("# "), f"{path.name} must start with a comment saying what it is for"
    assert "lookahead-ray " in path.read_text(), f"{path.name} must give the exact command"


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config(None, ["preview.mode=virtual", "preview.num_answer_tokens=3", "data.inputs=[a.jsonl, b]",
                             "tokenization.system_prompt=null", "data.cpus_per_actor=1"])
    assert (cfg.preview.mode, cfg.preview.num_answer_tokens, cfg.data.inputs) == ("virtual", 3, ["a.jsonl", "b"])
    assert cfg.tokenization.system_prompt is None and cfg.data.cpus_per_actor == 1.0
    assert LookaheadConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("text, message", [
    ("preview:\n  nmu_answer_tokens: 3\n", "unknown key preview.nmu_answer_tokens"),
    ("preview:\n  num_answer_tokens: three\n", "preview.num_answer_tokens must be int"),
    ("preview:\n  mode: both\n", "preview.mode must be one of"),
    ("preview:\n  num_answer_tokens: -1\n", "num_answer_tokens must be >= 0"),
    ("data:\n  on_error: ignore\n", "data.on_error must be one of"),
    ("tokenization:\n  prompt_template: 'no slot'\n", "must contain '{instruction}'"),
    ("- a list\n", "top level must be a mapping"),
])
def test_bad_config_names_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_bad_override_is_rejected():
    with pytest.raises(ConfigError, match="unknown key preview.m"):
        load_config(None, ["preview.m=3"])
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(None, ["preview.mode"])
