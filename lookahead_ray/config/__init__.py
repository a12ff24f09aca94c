"""The typed config of a run: sections in ``schema``, YAML loading and overrides in ``loader``. Pure package."""

from lookahead_ray.config.loader import apply_overrides, load_config, parse_overrides
from lookahead_ray.config.schema import (
    ClusterConfig,
    ConstrainedSFTConfig,
    DataConfig,
    EarlyStoppingConfig,
    EvalConfig,
    JudgeConfig,
    LookaheadConfig,
    LoraConfig,
    ModelConfig,
    ObjectiveConfig,
    PreviewConfig,
    PromptSetConfig,
    RecordConfig,
    SafetyMixConfig,
    SearchConfig,
    TinyModelConfig,
    TokenizationConfig,
    TrainConfig,
)
from lookahead_ray.errors import ConfigError

__all__ = ["ClusterConfig", "ConfigError", "ConstrainedSFTConfig", "DataConfig", "EarlyStoppingConfig", "EvalConfig",
           "JudgeConfig", "LookaheadConfig", "LoraConfig", "ModelConfig", "ObjectiveConfig", "PreviewConfig",
           "PromptSetConfig", "RecordConfig", "SafetyMixConfig", "SearchConfig", "TinyModelConfig", "TokenizationConfig",
           "TrainConfig", "apply_overrides", "load_config", "parse_overrides"]
