"""Nothing lost, nothing repeated: outputs never destroy what the tool did not create, every row is counted
on every path, a resumed run continues with the very next batch, and nothing waits forever."""

from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from lookahead_ray.config import DataConfig, LookaheadConfig, ModelConfig, PreviewConfig, RecordConfig, load_config
from lookahead_ray.errors import ConfigError, RowError

REPO = Path(__file__).resolve().parents[1]


def _rows(n: int) -> list[dict]:
    return [{"input": f"How much is {i} plus {i}?", "output": f"{i} plus {i} is {2 * i}.\n#### {2 * i}"} for i in range(n)]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _prepare_cfg(inputs: list[str], output_dir: Path, **data) -> LookaheadConfig:
    return LookaheadConfig(preview=PreviewConfig(mode="real", num_answer_tokens=3), records=RecordConfig(),
                           data=DataConfig(inputs=inputs, output_dir=str(output_dir), **data),
                           model=ModelConfig(tokenizer="builtin:tiny"))


def test_prepare_never_destroys_what_it_did_not_create(ray_local, tmp_path, monkeypatch):
    from lookahead_ray.data.pipeline import run_prepare

    source = _write_jsonl(tmp_path / "inputs" / "data.jsonl", _rows(8))
    monkeypatch.chdir(tmp_path)
    for output in (tmp_path / "inputs", Path("."), tmp_path / "inputs" / "out"):  # the input folder, ".", inside it
        with pytest.raises(ConfigError, match="overlaps the input"):
            run_prepare(_prepare_cfg([str(tmp_path / "inputs")], output))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    with pytest.raises(ConfigError, match="did not write"):
        run_prepare(_prepare_cfg([str(source)], mine))
    assert source.exists() and (mine / "notes.txt").read_text() == "my notes"
    ours = tmp_path / "prepared"
    assert run_prepare(_prepare_cfg([str(source)], ours)).rows_written == 8
    assert run_prepare(_prepare_cfg([str(source)], ours)).rows_written == 8  # its own output is replaced
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".prepared.")]  # no staging or old copies left


def test_preview_output_is_readable_by_others_and_never_the_input(tmp_path):
    from lookahead_ray.data.preview_file import run_preview_file

    source = _write_jsonl(tmp_path / "in.jsonl", _rows(3))
    cfg = LookaheadConfig(preview=PreviewConfig(mode="virtual"))
    old = os.umask(0o022)
    try:
        run_preview_file(cfg, str(source), str(tmp_path / "out.jsonl"), "jsonl", "jsonl")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out.jsonl").stat().st_mode) == 0o644  # mkstemp made it 0600
    with pytest.raises(ConfigError, match="is the input file"):
        run_preview_file(cfg, str(source), str(source), "jsonl", "jsonl")
    assert source.read_text().count("\n") == 3


def test_parquet_preview_keeps_every_key_and_names_the_row_of_a_late_one(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from lookahead_ray.data import preview_file

    monkeypatch.setattr(preview_file, "CHUNK_ROWS", 2)
    rows = [{"input": "a", "output": "b"}, {"input": "c", "output": "d", "note": "x"}, {"input": "e", "output": "f"}]
    cfg = LookaheadConfig(preview=PreviewConfig(mode="virtual"))
    source = _write_jsonl(tmp_path / "in.jsonl", rows)
    preview_file.run_preview_file(cfg, str(source), str(tmp_path / "out.parquet"), "jsonl", "parquet")
    assert [r["note"] for r in pq.read_table(tmp_path / "out.parquet").to_pylist()] == [None, "x", None]
    _write_jsonl(source, rows + [{"input": "g", "output": "h", "late": 1}])
    with pytest.raises(RowError) as info:
        preview_file.run_preview_file(cfg, str(source), str(tmp_path / "out2.parquet"), "jsonl", "parquet")
    assert (info.value.row, info.value.field, info.value.reason) == (4, "late", "schema_mismatch")
    assert not (tmp_path / "out2.parquet").exists()


def test_readers_bound_rows_in_bytes_and_skip_hidden_folders(tmp_path):
    from lookahead_ray.data.readers import RowReader, expand_inputs

    reader = RowReader(max_row_bytes=64)
    endless = io.BytesIO(b"x" * (3 * (4 << 20) + 5))  # no newline at all: one too-large row, bounded memory
    assert list(reader.rows(endless, "f", "jsonl")) == [(1, None, "row_too_large: 12582917 bytes > "
                                                                   "data.max_row_bytes 64")]
    wide = json.dumps([{"input": "é" * 20, "output": "b"}, {"input": "e" * 20, "output": "b"}]).encode()
    rows = list(reader.rows(io.BytesIO(wide), "f", "json"))  # 48 characters but 68 bytes, then 48 bytes
    assert rows[0][2].startswith("row_too_large: 68 bytes") and rows[1][1] is not None
    _write_jsonl(tmp_path / "d" / "a.jsonl", _rows(2))
    _write_jsonl(tmp_path / "d" / ".ipynb_checkpoints" / "a-checkpoint.jsonl", _rows(2))
    assert [Path(f).name for f in expand_inputs(DataConfig(inputs=[str(tmp_path / "d")]))] == ["a.jsonl"]


def test_a_non_string_answer_prefix_is_a_counted_row_error(tiny_tokenizer):
    from lookahead_ray.config import TokenizationConfig
    from lookahead_ray.data.records import RecordSchema
    from lookahead_ray.data.tokenization import ExampleTokenizer

    schema = RecordSchema(RecordConfig(answer_prefix_field="prefix"))
    encoder = ExampleTokenizer(tiny_tokenizer, TokenizationConfig(), schema)
    records = [{"input": "q", "output": "a", "prefix": 3}, {"input": "q", "output": "a", "prefix": "Sure"}]
    out = encoder.encode_many(records, ["a", "a"])
    assert isinstance(out[0], RowError) and (out[0].reason, out[0].field) == ("not_a_string", "prefix")
    assert not isinstance(out[1], RowError)


def test_a_lost_or_duplicated_block_fails_the_row_accounting():
    from collections import Counter

    from lookahead_ray.data.accounting import check_accounting

    counts = {"declared": Counter({"a": 10}), "arrived": Counter({"a": 10}), "read": 10, "written": 9}
    check_accounting(counts, ["a"], rejected=1)
    for arrived in (Counter({"a": 8}), Counter({"a": 12})):
        with pytest.raises(RuntimeError, match="row accounting broken for a"):
            check_accounting({**counts, "arrived": arrived}, ["a"], rejected=1)
    with pytest.raises(RuntimeError, match="row accounting broken for b"):  # a file whose end never arrived
        check_accounting(counts, ["a", "b"], rejected=1)


def test_epochs_are_reshuffled_by_seed_and_dealt_equally_to_workers():
    from lookahead_ray.train.data_order import epoch_batches

    first = epoch_batches(103, epoch=0, seed=7, rank=0, world_size=2, micro_batch_size=4)
    assert [b.tolist() for b in first] == [b.tolist() for b in epoch_batches(103, 0, 7, 0, 2, 4)]  # reproducible
    assert [b.tolist() for b in first] != [b.tolist() for b in epoch_batches(103, 1, 7, 0, 2, 4)]  # reshuffled
    other = epoch_batches(103, 0, 7, 1, 2, 4)
    assert len(first) == len(other) == 12  # 51 rows per rank -> 12 whole micro-batches each
    assert not set(np.concatenate(first)) & set(np.concatenate(other))


def _local_cfg(tmp_path: Path, *overrides: str) -> LookaheadConfig:
    data = _write_jsonl(tmp_path / "train.jsonl", _rows(48))
    return load_config(REPO / "configs" / "tiny_cpu.yaml", [
        f"data.inputs=[{data}]", f"train.output_dir={tmp_path / 'run'}", "train.precision=fp32",
        "train.max_steps=20", "train.checkpoint_every_steps=5", "train.report_every_steps=5", *overrides])


@pytest.mark.slow
@pytest.mark.parametrize("layout", [[], ["train.packing=true", "train.micro_batch_size=2"],
                                    ["train.group_by_length=true"], ["train.lora={dropout: 0.0}"]],
                         ids=["padded", "packed", "grouped", "lora"])
def test_a_run_stopped_mid_epoch_resumes_at_the_next_batch_and_ends_where_an_uninterrupted_run_ends(
        tmp_path, monkeypatch, layout):
    from safetensors.torch import load_file

    from lookahead_ray.train import loop
    from lookahead_ray.train.execute import run_training_local

    straight = run_training_local(_local_cfg(tmp_path / "straight", *layout))
    report = loop._report

    def crash_after_step_13(engine, io, cfg, metrics, position):  # 12 micro-batches an epoch: mid-epoch 2
        report(engine, io, cfg, metrics, position)
        if metrics["step"] == 13:
            raise RuntimeError("simulated kill")

    monkeypatch.setattr(loop, "_report", crash_after_step_13)
    with pytest.raises(RuntimeError, match="simulated kill"):
        run_training_local(_local_cfg(tmp_path / "stopped", *layout))
    monkeypatch.undo()
    resumed = run_training_local(_local_cfg(tmp_path / "stopped", *layout))
    assert resumed.metrics["resumed_from_step"] == 10 and resumed.metrics["step"] == 20
    assert resumed.metrics["data_sha"] == straight.metrics["data_sha"]  # the same batches, in the same order
    a = load_file(str(Path(straight.final_dir) / "model.safetensors"))
    b = load_file(str(Path(resumed.final_dir) / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    report_file = json.loads((tmp_path / "stopped" / "run" / "rows_tiny_cpu.json").read_text())
    assert report_file["rows_read"] == 48 and report_file["rows_written"] == 48  # the row report of the run


@pytest.mark.slow
def test_training_from_inputs_counts_every_row_it_skips(ray_local, tmp_path):
    from lookahead_ray.train.execute import run_training

    data = tmp_path / "train.jsonl"
    _write_jsonl(data, _rows(40))
    with open(data, "a") as f:
        f.write('{"input": "no answer"}\nnot json\n')
    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml", [
        f"data.inputs=[{data}]", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2", "data.on_error=skip",
        "train.checkpoint_every_steps=0", "train.num_workers=1"])
    run_training(cfg)
    report = json.loads((tmp_path / "run" / "prepared_tiny_cpu" / "prepare_report.json").read_text())
    assert (report["rows_read"], report["rows_written"], report["rows_rejected"]) == (42, 40, 2)
    assert report["rejected_by_reason"] == {"invalid_json": 1, "missing_field": 1}


def test_work_that_cannot_be_scheduled_fails_before_it_waits(ray_local, tmp_path):
    from lookahead_ray.data.pipeline import run_prepare
    from lookahead_ray.train.execute import run_training

    source = _write_jsonl(tmp_path / "in.jsonl", _rows(8))
    with pytest.raises(ConfigError, match="data.num_actors x data.cpus_per_actor: .* needs 4.5 CPU"):
        run_prepare(_prepare_cfg([str(source)], tmp_path / "out", num_actors=4, cpus_per_actor=1.0))
    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml", [f"data.inputs=[{source}]", "train.use_gpu=true",
                                                           f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="needs 2 GPU but this Ray has 0"):
        run_training(cfg)
