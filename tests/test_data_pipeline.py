"""The Ray Data preparation pipeline on a real local Ray: formats, many files, row accounting, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from lookahead_ray.config import DataConfig, LookaheadConfig, ModelConfig, PreviewConfig, RecordConfig
from lookahead_ray.data.pipeline import run_prepare
from lookahead_ray.data.report import read_report
from lookahead_ray.data.tokenization import IGNORE_INDEX
from lookahead_ray.errors import RowError

pytestmark = pytest.mark.usefixtures("ray_local")
C = " The answer begins with: "


def _rows(n: int, start: int = 0) -> list[dict]:
    return [{"input": f"How much is {i} plus {i}?", "output": f"{i} plus {i} is {2 * i}.\n#### {2 * i}"}
            for i in range(start, start + n)]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(tmp_path: Path, inputs: list[str], **data) -> LookaheadConfig:
    return LookaheadConfig(preview=PreviewConfig(mode="real", num_answer_tokens=3), records=RecordConfig(),
                           data=DataConfig(inputs=inputs, output_dir=str(tmp_path / "prepared"), **data),
                           model=ModelConfig(tokenizer="builtin:tiny"))


def _read_shards(directory: Path) -> list[dict]:
    return [row for shard in sorted(directory.glob("*.parquet")) for row in pq.read_table(shard).to_pylist()]


def test_many_files_of_every_format_are_all_accounted_for(tmp_path, tiny_tokenizer):
    datasets = pytest.importorskip("datasets")
    src = tmp_path / "src"
    (src / "nested").mkdir(parents=True)
    expected = 0
    for i in range(6):  # many JSONL files, one in a subdirectory
        _write_jsonl(src / ("nested" if i == 5 else "") / f"part{i}.jsonl", _rows(30, 100 * i))
        expected += 30
    (src / "list.json").write_text(json.dumps(_rows(7, 1000)))
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(_rows(11, 2000)), src / "table.parquet")
    hf_dir = tmp_path / "hf"
    datasets.Dataset.from_list(_rows(13, 3000)).save_to_disk(str(hf_dir))
    expected += 7 + 11 + 13
    report = run_prepare(_cfg(tmp_path, [str(src), str(hf_dir)], rows_per_shard=64))
    assert (report.rows_read, report.rows_written, report.rows_rejected) == (expected, expected, 0)
    assert len(report.input_files) == 9
    assert read_report(tmp_path / "prepared")["rows_written"] == expected
    rows = _read_shards(tmp_path / "prepared")
    assert len(rows) == expected
    assert {Path(r["source_file"]).name for r in rows} >= {"part5.jsonl", "list.json", "table.parquet"}
    # Each example is prompt (masked) + answer + EOS, and the prompt carries the real preview.
    row = next(r for r in rows if r["source_file"].endswith("part0.jsonl") and r["source_row"] == 3)
    labels = row["labels"]
    first = next(i for i, x in enumerate(labels) if x != IGNORE_INDEX)
    answer = _rows(3)[2]["output"]
    assert labels[first:] == tiny_tokenizer(answer, add_special_tokens=False)["input_ids"] + [
        tiny_tokenizer.eos_token_id]
    preview = tiny_tokenizer.convert_tokens_to_string(tiny_tokenizer.tokenize(answer)[:3])
    assert (_rows(3)[2]["input"] + C + preview) in tiny_tokenizer.decode(row["input_ids"][:first])
    assert row["attention_mask"] == [1] * len(row["input_ids"])
    assert report.answer_tokens_written == sum(sum(x != IGNORE_INDEX for x in r["labels"]) for r in rows)


BAD_LINES = {
    "invalid_json": b'{"input": "q", "output": \n',
    "missing_field": b'{"input": "q"}\n',
    "not_a_string": b'{"input": ["q"], "output": "a"}\n',
    "empty_answer": b'{"input": "q", "output": "  "}\n',
    "invalid_utf8": b'{"input": "\xc3\x28", "output": "a"}\n',
    "row_too_large": b'{"input": "' + b"x" * 1_000_000 + b'", "output": "a"}\n',
}


def _file_with_bad_lines(path: Path) -> Path:
    good = [json.dumps(r).encode() + b"\n" for r in _rows(20)]
    lines = good[:5] + list(BAD_LINES.values()) + good[5:]
    path.write_bytes(b"".join(lines))
    return path


def test_skip_counts_every_rejected_row_by_reason(tmp_path):
    src = _file_with_bad_lines(tmp_path / "mixed.jsonl")
    report = run_prepare(_cfg(tmp_path, [str(src)], on_error="skip", max_row_bytes=512 * 1024))
    assert report.rows_read == 26 and report.rows_written == 20 and report.rows_rejected == 6
    assert report.rejected_by_reason == {reason: 1 for reason in BAD_LINES}
    where = {e["reason"]: (e["row"], e["field"]) for e in report.rejected_examples}
    assert where["invalid_json"] == (6, None)
    assert where["missing_field"] == (7, "output")
    assert where["not_a_string"] == (8, "input")
    assert where["empty_answer"] == (9, "output")
    assert where["row_too_large"][0] == 11
    assert all(e["file"] == str(src) for e in report.rejected_examples)
    assert len(_read_shards(tmp_path / "prepared")) == 20


@pytest.mark.parametrize("reason", ["missing_field", "invalid_utf8", "row_too_large"])
def test_fail_names_file_row_and_field_and_writes_nothing(tmp_path, reason):
    good = [json.dumps(r).encode() + b"\n" for r in _rows(4)]
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b"".join(good[:2] + [BAD_LINES[reason]] + good[2:]))
    with pytest.raises(RowError) as info:
        run_prepare(_cfg(tmp_path, [str(src)], max_row_bytes=512 * 1024))
    assert (info.value.file, info.value.row, info.value.reason) == (str(src), 3, reason)
    assert str(src) in str(info.value) and "row 3" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]  # no output, no staging directory


def test_truncation_is_counted(tmp_path):
    rows = _rows(5) + [{"input": "q", "output": "long answer " * 200}]
    src = _write_jsonl(tmp_path / "t.jsonl", rows)
    cfg = _cfg(tmp_path, [str(src)])
    cfg.tokenization.max_seq_len = 64
    report = run_prepare(cfg)
    assert (report.rows_written, report.rows_truncated) == (6, 1)
    assert max(len(r["input_ids"]) for r in _read_shards(tmp_path / "prepared")) == 64


def test_missing_inputs_fail_before_ray_work(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        run_prepare(_cfg(tmp_path, [str(tmp_path / "nope*.jsonl")]))
    (tmp_path / "broken.json").write_text('[{"input": "a", "output": "b"},')
    with pytest.raises(RowError, match="broken.json"):
        run_prepare(_cfg(tmp_path, [str(tmp_path / "broken.json")]))


def test_preview_only_output_and_the_token_columns_training_reads(tmp_path):
    src = _write_jsonl(tmp_path / "d.jsonl", _rows(40))
    cfg = _cfg(tmp_path, [str(src)], tokenize=False)
    cfg.preview.mode = "virtual"
    report = run_prepare(cfg)
    records = [json.loads(r["record"]) for r in _read_shards(tmp_path / "prepared")]
    assert report.rows_written == 40 and records[0]["output"].startswith("Let's solve this problem. ")
    tokenized = _cfg(tmp_path, [str(src)])  # what training reads: every row's token columns, nothing dropped
    tokenized.data.output_dir = str(tmp_path / "tokenized")
    assert run_prepare(tokenized).rows_written == 40
    rows = _read_shards(tmp_path / "tokenized")
    assert len(rows) == 40 and all({"input_ids", "attention_mask", "labels"} <= set(r) for r in rows)
    assert all(len(r["input_ids"]) == len(r["labels"]) == len(r["attention_mask"]) for r in rows)


def test_line_ranges_cover_the_file_and_keep_every_line_number(tmp_path):
    from lookahead_ray.data.readers import ByteWindow, RowReader, line_ranges

    lines = [json.dumps(r) for r in _rows(300)]
    lines[10] = ""  # a blank line is not a row, but it is a line
    lines[50] = "x" * 5000  # longer than a range
    src = tmp_path / "big.jsonl"
    src.write_text("\n".join(lines))  # no newline at the end
    reader = RowReader(max_row_bytes=4096)
    with open(src, "rb") as f:
        whole = list(reader.rows(f, str(src), "jsonl"))
    for target in (1, 700, 4096, 10**9):
        ranges = line_ranges(str(src), target)
        assert ranges[0][0] == 0 and ranges[-1][1] == src.stat().st_size
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))  # contiguous
        pieces = []
        with open(src, "rb") as f:
            for start, end, before in ranges:
                f.seek(start)
                pieces += list(reader.rows(ByteWindow(f, end - start), str(src), "jsonl", before))
        assert pieces == whole, target
    assert len(line_ranges(str(src), 700)) > 20 and ("x" * 10) not in str(whole[49])  # row 51 is row_too_large


def test_a_large_jsonl_file_is_read_in_ranges_with_the_same_output(tmp_path):
    src = _write_jsonl(tmp_path / "big.jsonl", _rows(500))
    whole = run_prepare(_cfg(tmp_path / "a", [str(src)]))
    split = run_prepare(_cfg(tmp_path / "b", [str(src)], read_split_bytes=4096))  # about 8 ranges
    assert (split.rows_read, split.rows_written) == (whole.rows_read, whole.rows_written) == (500, 500)
    def by_row(directory):
        return sorted((r["source_row"], r["input_ids"], r["labels"]) for r in _read_shards(directory / "prepared"))
    assert by_row(tmp_path / "b") == by_row(tmp_path / "a")
    with pytest.raises(RowError) as info:  # a bad row in a later range keeps its own line number
        bad = tmp_path / "bad.jsonl"
        bad.write_text(src.read_text() + "{not json\n")
        run_prepare(_cfg(tmp_path / "c", [str(bad)], read_split_bytes=4096))
    assert info.value.row == 501
