"""The drop-in ``preview`` command: reference-identical bytes, formats, and errors naming file/line/field."""

from __future__ import annotations

import json

import pytest
from conftest import shared_file

from lookahead_ray.cli import main
from lookahead_ray.config import LookaheadConfig, ModelConfig, PreviewConfig, RecordConfig
from lookahead_ray.data.preview import AnswerPreviewer
from lookahead_ray.data.preview_file import run_preview_file
from lookahead_ray.errors import RowError

C = " The answer begins with: "
P = "Let's solve this problem. "


def _expected_reference_output(rows: list[dict], mode: str, tokenizer, fmt: str) -> bytes:
    """The output defined by the reference algorithm: full-answer tokenize, m=6, json.dumps / json.dump."""
    out = []
    for row in rows:
        item = dict(row)
        if mode == "real":
            preview = tokenizer.convert_tokens_to_string(tokenizer.tokenize(item["answer"])[:6])
            item["question"] = item["question"] + C + preview
        else:
            item["question"], item["answer"] = item["question"] + C + P, P + item["answer"]
        out.append(item)
    if fmt == "jsonl":
        return "".join(json.dumps(item) + "\n" for item in out).encode()
    return json.dumps(out, ensure_ascii=False, indent=4).encode()


def test_previewer_matches_definition_on_gsm8k_with_mistral_tokenizer(mistral_tokenizer):
    rows = [json.loads(line) for line in shared_file("gsm8k/train.jsonl").read_text().splitlines()]
    answers = [r["answer"] for r in rows]
    for m in (1, 6, 16):
        expected = [mistral_tokenizer.convert_tokens_to_string(mistral_tokenizer.tokenize(a)[:m]) for a in answers]
        assert AnswerPreviewer(mistral_tokenizer, m).preview_many(answers) == expected


@pytest.mark.parametrize("mode, fmt, workers", [("real", "jsonl", 2), ("real", "json", 1), ("virtual", "jsonl", 1),
                                                ("virtual", "json", 2)])
def test_cli_reproduces_reference_bytes_on_gsm8k(tmp_path, mistral_tokenizer, mistral_tokenizer_dir, mode, fmt,
                                                  workers):
    source = shared_file("gsm8k/train.jsonl")
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    output = tmp_path / f"out.{fmt}"
    argv = ["preview", "--input_file", str(source), "--output_file", str(output), "--input_format", "jsonl",
            "--output_format", fmt, "--input_field", "question", "--output_field", "answer", "--mode", mode,
            "--tokenizer_path", str(mistral_tokenizer_dir), "--workers", str(workers)]
    assert main(argv) == 0
    assert output.read_bytes() == _expected_reference_output(rows, mode, mistral_tokenizer, fmt)


def _cfg(mode="virtual", **records) -> LookaheadConfig:
    return LookaheadConfig(preview=PreviewConfig(mode=mode), records=RecordConfig(**records),
                           model=ModelConfig(tokenizer="builtin:tiny"))


def test_parquet_round_trip_and_vanilla(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [{"input": f"q{i}", "output": f"a{i} answer"} for i in range(10)]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_preview_file(_cfg("virtual"), str(src), str(tmp_path / "v.parquet"), "jsonl", "parquet")
    table = pq.read_table(tmp_path / "v.parquet").to_pylist()
    assert table[3] == {"input": "q3" + C + P, "output": P + "a3 answer"}
    stats = run_preview_file(_cfg("vanilla"), str(tmp_path / "v.parquet"), str(tmp_path / "back.jsonl"), "parquet",
                             "jsonl")
    assert stats.rows == 10
    assert [json.loads(x) for x in (tmp_path / "back.jsonl").read_text().splitlines()] == table


def test_empty_json_list_and_blank_lines(tmp_path):
    (tmp_path / "empty.json").write_text("[]")
    run_preview_file(_cfg(), str(tmp_path / "empty.json"), str(tmp_path / "o.json"), "json", "json")
    assert (tmp_path / "o.json").read_text() == json.dumps([], ensure_ascii=False, indent=4)
    (tmp_path / "gaps.jsonl").write_text('{"input": "a", "output": "b"}\n\n   \n{"input": "c", "output": "d"}\n')
    assert run_preview_file(_cfg(), str(tmp_path / "gaps.jsonl"), str(tmp_path / "o.jsonl"), "jsonl", "jsonl").rows == 2


@pytest.mark.parametrize("content, reason, line, field", [
    (b'{"input": "a", "output": "b"}\n{"input": "a", "output": \n', "invalid_json", 2, None),
    (b'{"input": "a", "output": "b"}\n\n{"input": "a"}\n', "missing_field", 3, "output"),
    (b'{"input": "a", "output": 5}\n', "not_a_string", 1, "output"),
    (b'{"input": "a", "output": "b"}\n{"input": "\xff\xfe", "output": "b"}\n', "invalid_utf8", 2, None),
])
def test_bad_rows_name_file_line_and_field_and_leave_no_output(tmp_path, content, reason, line, field):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(content)
    out = tmp_path / "out.jsonl"
    with pytest.raises(RowError) as info:
        run_preview_file(_cfg(), str(src), str(out), "jsonl", "jsonl")
    error = info.value
    assert (error.file, error.row, error.reason, error.field) == (str(src), line, reason, field)
    assert str(src) in str(error) and f"row {line}" in str(error)
    assert list(tmp_path.iterdir()) == [src]  # atomic: no partial output, no temp file left


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"question": "a"}\n')
    code = main(["preview", "--input_file", str(src), "--output_file", str(tmp_path / "o.jsonl"), "--input_format",
                 "jsonl", "--output_format", "jsonl", "--input_field", "question", "--mode", "virtual"])
    assert code == 2
    err = capsys.readouterr().err
    assert "bad.jsonl, row 1, field 'output': missing_field" in err
    assert main(["preview", "--input_file", str(src), "--output_file", "x", "--input_format", "jsonl",
                 "--output_format", "jsonl", "--mode", "real"]) == 2
    assert "--tokenizer_path is required" in capsys.readouterr().err


def test_config_file_supplies_settings(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("preview: {mode: virtual, virtual_prefix: 'First, '}\nrecords: {instruction_field: q, "
                        "answer_field: a}\n")
    (tmp_path / "in.jsonl").write_text('{"q": "x", "a": "y"}\n')
    assert main(["preview", "--config", str(cfg_file), "--input_file", str(tmp_path / "in.jsonl"), "--output_file",
                 str(tmp_path / "o.jsonl"), "--input_format", "jsonl", "--output_format", "jsonl"]) == 0
    assert json.loads((tmp_path / "o.jsonl").read_text()) == {"q": "x" + C + "First, ", "a": "First, y"}
