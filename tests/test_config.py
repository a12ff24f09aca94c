"""Typed config: YAML loading, dotted overrides, errors naming file and key; every shipped YAML validates."""

from __future__ import annotations

from pathlib import Path

import pytest

from lookahead_ray.config import ConfigError, LookaheadConfig, apply_overrides, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


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
    with pytest.raises(ConfigError, match=r"override preview.m=...: unknown key 'm' in preview"):
        load_config(None, ["preview.m=3"])
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(None, ["preview.mode"])


def test_apply_overrides_takes_typed_values_and_validates_again():
    cfg = apply_overrides(LookaheadConfig(), {"preview.mode": "virtual", "train.learning_rate": 1e-4,
                                              "model.tiny.hidden_size": 32, "data.inputs": ["a.jsonl"]})
    assert (cfg.preview.mode, cfg.train.learning_rate, cfg.model.tiny.hidden_size) == ("virtual", 1e-4, 32)
    assert LookaheadConfig().preview.mode == "real"  # the input config is not modified
    with pytest.raises(ConfigError, match="<overrides>: preview.num_answer_tokens must be int"):
        apply_overrides(cfg, {"preview.num_answer_tokens": "six"})
    with pytest.raises(ConfigError, match="num_answer_tokens must be >= 0"):
        apply_overrides(cfg, {"preview.num_answer_tokens": -1})
    with pytest.raises(ConfigError, match="unknown key train.lr"):
        apply_overrides(cfg, {"train.lr": 1e-4})


def test_base_include_merges_sections_and_the_variant_wins(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "b.yaml").write_text("train:\n  learning_rate: 1.0e-5\n  epochs: 3\npreview:\n  mode: real\n")
    (tmp_path / "v.yaml").write_text("base: base/b.yaml\npreview:\n  mode: virtual\ntrain:\n  epochs: 1\n")
    cfg = load_config(tmp_path / "v.yaml", ["train.seed=7"])
    assert (cfg.preview.mode, cfg.train.learning_rate, cfg.train.epochs, cfg.train.seed) == ("virtual", 1e-5, 1, 7)
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "loop.yaml")


def test_one_run_directory_drives_every_stage_unless_a_stage_names_its_own():
    cfg = load_config(None, ["output_dir=/runs/trial_1", "eval.output_dir=/elsewhere"])
    assert cfg.stage_dir("prepare") == "/runs/trial_1/prepared" and cfg.stage_dir("train") == "/runs/trial_1/train"
    assert cfg.stage_dir("eval") == "/elsewhere" and LookaheadConfig().stage_dir("train") is None
