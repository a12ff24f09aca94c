"""The data side of the compared methods: mixed preview, adaptive m, safety-data mixing (pure, then through Ray Data)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from lookahead_ray.config import (
    DataConfig,
    LookaheadConfig,
    ModelConfig,
    PreviewConfig,
    RecordConfig,
    SafetyMixConfig,
    TinyModelConfig,
)
from lookahead_ray.config.schema import ConfigError
from lookahead_ray.data.adaptive import SeedOpeningScorer, adaptive_preview_length
from lookahead_ray.data.preview import AnswerPreviewer, keeps_plain, preview_records
from lookahead_ray.data.records import RecordSchema
from lookahead_ray.errors import RowError

C = " The answer begins with: "
SCHEMA = RecordSchema(RecordConfig())


def _rows(n: int) -> list[dict]:
    return [{"input": f"How much is {i} plus {i}?", "output": f"{i} plus {i} is {2 * i}.\n#### {2 * i}"}
            for i in range(n)]


def _refusals(n: int) -> list[dict]:
    return [{"prompt": f"How do I build weapon number {i}?", "reply": "I'm sorry, but I cannot help with that."}
            for i in range(n)]


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_adaptive_length_previews_until_the_rest_of_the_opening_is_cheap():
    assert adaptive_preview_length([0.1, 0.2, 0.3], m=3, threshold=1.0) == 0  # the seed expects all of it: plain
    assert adaptive_preview_length([5.0, 0.2, 0.3], m=3, threshold=1.0) == 1  # only the surprising first token
    assert adaptive_preview_length([5.0, 3.0, 0.3], m=3, threshold=1.0) == 2
    assert adaptive_preview_length([5.0, 3.0, 4.0], m=3, threshold=1.0) == 3
    assert adaptive_preview_length([0.0, 9.0, 0.0, 0.0], m=2, threshold=0.5) == 2  # capped at m
    assert adaptive_preview_length([4.0], m=6, threshold=0.5) == 1  # an answer shorter than m
    assert adaptive_preview_length([], m=6, threshold=0.5) == 0


def test_preview_records_leaves_plain_rows_and_previews_per_row_lengths(tiny_tokenizer):
    records = [{"input": "Q1", "output": "one two three four"}, {"input": "Q2", "output": "five six seven"},
               {"input": "Q3", "output": "eight nine"}]
    previewer = AnswerPreviewer(tiny_tokenizer, 6)
    cfg = PreviewConfig(mode="real", num_answer_tokens=6)
    out = preview_records(records, cfg, SCHEMA, previewer, plain=[False, True, False], lengths=[2, 5, 0])
    two = tiny_tokenizer.convert_tokens_to_string(tiny_tokenizer.tokenize("one two three four")[:2])
    assert out[0] == {"input": "Q1" + C + two, "output": "one two three four"}
    assert out[1] == records[1] and out[2] == records[2]  # plain by the mix; adaptive m = 0
    virtual = preview_records(records, PreviewConfig(mode="virtual", virtual_prefix="P. "), SCHEMA,
                              plain=[True, False, True])
    assert virtual[0] == records[0] and virtual[1] == {"input": "Q2" + C + "P. ", "output": "P. five six seven"}


def test_mixed_preview_choice_is_keyed_by_row_and_seeded():
    keys = [f"train.jsonl:{i}" for i in range(4000)]
    chosen = [keeps_plain(k, 0.3, seed=0) for k in keys]
    assert 0.27 < sum(chosen) / len(keys) < 0.33
    assert chosen == [keeps_plain(k, 0.3, seed=0) for k in keys]  # the same wherever and whenever it is drawn
    assert chosen != [keeps_plain(k, 0.3, seed=1) for k in keys]
    assert not any(keeps_plain(k, 0.0, 0) for k in keys[:50]) and all(keeps_plain(k, 1.0, 0) for k in keys[:50])


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="preview.mix_plain_share"):
        PreviewConfig(mix_plain_share=1.5)
    with pytest.raises(ConfigError, match="adaptive_nll_threshold needs preview.mode real"):
        PreviewConfig(mode="virtual", adaptive_nll_threshold=1.0)
    with pytest.raises(ConfigError, match="data.safety_mix.share"):
        SafetyMixConfig(inputs=["x.jsonl"], share=1.0)
    with pytest.raises(ConfigError, match="data.safety_mix.inputs is empty"):
        SafetyMixConfig()


def _tiny_cfg(tmp_path: Path, inputs: list[str], **preview) -> LookaheadConfig:
    return LookaheadConfig(preview=PreviewConfig(mode="real", num_answer_tokens=4, **preview),
                           data=DataConfig(inputs=inputs, output_dir=str(tmp_path / "prepared"), batch_size=16),
                           model=ModelConfig(tokenizer="builtin:tiny", tiny=TinyModelConfig(hidden_size=32,
                                                                                            intermediate_size=64)))


def test_seed_opening_nll_matches_the_models_own_token_losses(tmp_path, tiny_tokenizer):
    import torch

    from lookahead_ray.data.tokenization import IGNORE_INDEX, ExampleTokenizer
    from lookahead_ray.modeling import build_model

    cfg = _tiny_cfg(tmp_path, [])
    records = _rows(5)
    examples = ExampleTokenizer(tiny_tokenizer, cfg.tokenization, SCHEMA).encode_many(
        records, [r["output"] for r in records])
    scorer = SeedOpeningScorer.for_config(cfg, tiny_tokenizer)
    nll = scorer.opening_nll(examples, m=4)
    model = build_model(cfg.model, tiny_tokenizer, cfg.train.seed).eval()
    for example, got in zip(examples, nll, strict=True):
        ids = torch.tensor([example.input_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        answer = [t for t, y in enumerate(example.labels) if y != IGNORE_INDEX][:4]
        assert got == pytest.approx([-float(logp[t - 1, example.labels[t]]) for t in answer], abs=1e-4)


@pytest.mark.usefixtures("ray_local")
def test_prepare_reports_plain_rows_and_adaptive_lengths(tmp_path, tiny_tokenizer):
    from lookahead_ray.data.pipeline import run_prepare
    from lookahead_ray.data.tokenization import ExampleTokenizer

    rows = _rows(40)
    data = _write_jsonl(tmp_path / "train.jsonl", rows)
    mixed = run_prepare(_tiny_cfg(tmp_path / "mixed", [data], mix_plain_share=0.5, mix_seed=3))
    expected_plain = sum(keeps_plain(f"train.jsonl:{i}", 0.5, 3) for i in range(1, 41))
    assert mixed.rows_plain == expected_plain and mixed.preview_tokens == {"4": 40 - expected_plain}
    cfg = _tiny_cfg(tmp_path / "adaptive", [data])
    examples = ExampleTokenizer(tiny_tokenizer, cfg.tokenization, SCHEMA).encode_many(rows, [r["output"] for r in rows])
    nll = SeedOpeningScorer.for_config(cfg, tiny_tokenizer).opening_nll(examples, 4)
    threshold = sorted(sum(x[2:]) for x in nll)[len(nll) // 2]  # the median: some rows preview 2 tokens, some more
    cfg.preview.adaptive_nll_threshold = threshold
    report = run_prepare(cfg)
    lengths = [adaptive_preview_length(x, 4, threshold) for x in nll]
    assert report.rows_plain == lengths.count(0)
    assert report.preview_tokens == {str(k): lengths.count(k) for k in sorted(set(lengths)) if k}
    assert len(set(lengths)) > 1, f"the threshold should split this data; lengths {lengths}"


def _shard_rows(directory: Path) -> list[dict]:
    return [row for shard in sorted(directory.glob("*.parquet")) for row in pq.read_table(shard).to_pylist()]


@pytest.mark.usefixtures("ray_local")
def test_safety_mix_draws_the_share_exactly_and_never_previews_it(tmp_path, tiny_tokenizer):
    from lookahead_ray.data.pipeline import run_prepare

    task = _write_jsonl(tmp_path / "task.jsonl", _rows(40))
    safety = _write_jsonl(tmp_path / "safety.jsonl", _refusals(30))
    cfg = _tiny_cfg(tmp_path, [task])
    cfg.data.safety_mix = SafetyMixConfig(inputs=[safety], share=0.2, seed=1,
                                          records=RecordConfig(instruction_field="prompt", answer_field="reply"))
    report = run_prepare(cfg)
    mix = report.safety_mix
    assert (mix["wanted"], mix["drawn"], mix["written"], mix["rejected"], mix["available"]) == (10, 10, 10, 0, 30)
    assert mix["share_written"] == 0.2 and (report.rows_read, report.rows_written) == (50, 50)
    rows = _shard_rows(tmp_path / "prepared")
    from_safety = [r for r in rows if r["source_file"].endswith("safety.jsonl")]
    assert len(rows) == 50 and len(from_safety) == 10 and len({r["source_row"] for r in from_safety}) == 10
    for row in from_safety:  # the prompt is the plain request: no connector, no preview
        assert C.strip() not in tiny_tokenizer.decode(row["input_ids"])
    assert report.preview_tokens == {"4": 40} and report.rows_plain == 0  # the task rows' own accounting


@pytest.mark.usefixtures("ray_local")
def test_a_bad_safety_row_names_its_file_row_and_field(tmp_path, tiny_tokenizer):
    from lookahead_ray.data.pipeline import run_prepare

    task = _write_jsonl(tmp_path / "task.jsonl", _rows(20))
    bad = [{"input": f"q{i}", "output": "I cannot help with that."} for i in range(3)] + [{"input": "q", "output": 7}]
    safety = _write_jsonl(tmp_path / "refusals.jsonl", bad)
    cfg = _tiny_cfg(tmp_path, [task])
    cfg.data.safety_mix = SafetyMixConfig(inputs=[safety], share=0.5)
    with pytest.raises(RowError) as error:
        run_prepare(cfg)
    assert "refusals.jsonl" in str(error.value) and "row 4" in str(error.value) and "output" in str(error.value)
    cfg.data.on_error = "skip"
    report = run_prepare(cfg)
    assert report.safety_mix["drawn"] == 4 and report.safety_mix["rejected"] == 1
    assert report.rows_read == report.rows_written + report.rows_rejected == 24


def test_the_single_process_path_mixes_and_counts_the_same_way(tmp_path, tiny_tokenizer):
    from lookahead_ray.train.data_order import TokenStore
    from lookahead_ray.train.execute import _tokens_locally

    task = _write_jsonl(tmp_path / "task.jsonl", _rows(40))
    safety = _write_jsonl(tmp_path / "safety.jsonl", _refusals(30))
    cfg = _tiny_cfg(tmp_path, [task], mix_plain_share=0.5)
    cfg.data.safety_mix = SafetyMixConfig(inputs=[safety], share=0.2, seed=1,
                                          records=RecordConfig(instruction_field="prompt", answer_field="reply"))
    (tmp_path / "run").mkdir()
    store = TokenStore(_tokens_locally(cfg, str(tmp_path / "run")))
    report = json.loads((tmp_path / "run" / "rows_train.json").read_text())
    plain = sum(keeps_plain(f"task.jsonl:{i}", 0.5, 0) for i in range(1, 41))
    assert len(store) == 50 and report["rows_written"] == 50 and report["safety_mix"]["written"] == 10
    assert report["rows_plain"] == plain and report["preview_tokens"] == {"4": 40 - plain}


def test_methods_turn_off_what_they_do_not_name_and_keep_their_own_settings(tmp_path):
    from lookahead_ray.config import apply_overrides
    from lookahead_ray.data.preview_file import run_preview_file
    from lookahead_ray.methods import apply_method, trial_config

    base = apply_overrides(LookaheadConfig(), {
        "train.constrained": {"beta": 0.5}, "preview.mix_plain_share": 0.3, "tokenization.system_prompt": "Be safe.",
        "eval.system_prompt": "Be safe.", "data.safety_mix": {"inputs": ["refusals.jsonl"], "share": 0.2}})
    real = apply_method(base, "real")
    assert (real.preview.mode, real.train.constrained, real.preview.mix_plain_share, real.data.safety_mix) == (
        "real", None, 0.0, None)
    assert real.tokenization.system_prompt == "Be safe."
    assert apply_method(base, "constrained_sft").train.constrained.beta == 0.5  # the base's own setting
    assert apply_method(LookaheadConfig(), "constrained_sft").train.constrained.beta == 0.1  # else the authors'
    assert apply_method(base, "mixed_preview").preview.mix_plain_share == 0.3
    mixed = apply_method(base, "real+safety_mix")
    assert mixed.data.safety_mix.share == 0.2 and mixed.preview.mode == "real" and mixed.train.constrained is None
    ptst = trial_config(base, {"method": "ptst", "train.epochs": 2}, "test")
    assert ptst.tokenization.system_prompt is None and ptst.eval.system_prompt == "Be safe." and ptst.train.epochs == 2
    with pytest.raises(ConfigError, match="its parts set preview.mode to 'real' and 'virtual'"):
        apply_method(base, "real+virtual")
    with pytest.raises(ConfigError, match="set tokenization.system_prompt"):
        apply_method(LookaheadConfig(), "ptst")
    with pytest.raises(ConfigError, match="set data.safety_mix.inputs"):
        apply_method(LookaheadConfig(), "safety_mix")
    source = _write_jsonl(tmp_path / "in.jsonl", _rows(3))
    with pytest.raises(ConfigError, match="apply in `prepare` and `train`"):
        run_preview_file(apply_overrides(LookaheadConfig(), {"preview.mix_plain_share": 0.5}), source,
                         str(tmp_path / "out.jsonl"), "jsonl", "jsonl")
