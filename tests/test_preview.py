"""The pure preview transform: modes, field mappings, chat records and edge cases."""

from __future__ import annotations

import copy

import pytest

from lookahead_ray.config import ConfigError, PreviewConfig, RecordConfig
from lookahead_ray.data.preview import AnswerPreviewer, preview_record, preview_records, reference_preview_text
from lookahead_ray.data.records import RecordSchema
from lookahead_ray.errors import RowError

C = " The answer begins with: "
P = "Let's solve this problem. "


class WordTokenizer:
    """A real (if simple) tokenizer: words and punctuation, spaces as a marker like SentencePiece's."""

    def tokenize(self, text: str) -> list[str]:
        tokens, word = [], ""
        for ch in text:
            if ch == " ":
                if word:
                    tokens.append(word)
                word = "▁"
            elif ch.isalnum():
                word += ch
            else:
                if word:
                    tokens.append(word)
                tokens.append(ch)
                word = ""
        return tokens + ([word] if word else [])

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join(tokens).replace("▁", " ")


FLAT = RecordSchema(RecordConfig())
QA = RecordSchema(RecordConfig(instruction_field="question", answer_field="answer"))


def test_defaults_are_the_papers():
    cfg = PreviewConfig()
    assert (cfg.mode, cfg.num_answer_tokens, cfg.virtual_prefix, cfg.connector) == ("real", 6, P, C)


def test_real_preview_appends_first_m_tokens_and_keeps_answer():
    record = {"input": "What is 2+3?", "output": "Two plus three is five, so 5."}
    out = preview_record(record, PreviewConfig(mode="real", num_answer_tokens=3), FLAT, WordTokenizer())
    assert out == {"input": "What is 2+3?" + C + "Two plus three", "output": record["output"]}


def test_virtual_preview_prefixes_prompt_and_answer():
    record = {"question": "Q?", "answer": "A.", "id": 7}
    out = preview_record(record, PreviewConfig(mode="virtual"), QA)
    assert out == {"question": "Q?" + C + P, "answer": P + "A.", "id": 7}
    assert list(out) == ["question", "answer", "id"]


def test_vanilla_returns_an_equal_copy():
    record = {"input": "x", "output": "y"}
    out = preview_record(record, PreviewConfig(mode="vanilla"), FLAT)
    assert out == record and out is not record


@pytest.mark.parametrize("mode", ["real", "virtual", "vanilla"])
def test_input_record_is_never_mutated(mode):
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}
    before = copy.deepcopy(record)
    preview_record(record, PreviewConfig(mode=mode), RecordSchema(RecordConfig(format="chat")), WordTokenizer())
    assert record == before


def test_m_larger_than_answer_previews_whole_answer():
    out = preview_record({"input": "q", "output": "a b"}, PreviewConfig(num_answer_tokens=50), FLAT, WordTokenizer())
    assert out["input"] == "q" + C + "a b"


def test_m_zero_previews_nothing_but_keeps_connector():
    out = preview_record({"input": "q", "output": "a b"}, PreviewConfig(num_answer_tokens=0), FLAT, WordTokenizer())
    assert out["input"] == "q" + C


def test_empty_strings():
    out = preview_record({"input": "", "output": "a b"}, PreviewConfig(), FLAT, WordTokenizer())
    assert out == {"input": C + "a b", "output": "a b"}
    assert preview_record({"input": "", "output": "a"}, PreviewConfig(mode="virtual"), FLAT) == {
        "input": C + P, "output": P + "a"}
    with pytest.raises(RowError, match="empty_answer"):  # as prepare rejects it: nothing to train on
        preview_record({"input": "q", "output": " "}, PreviewConfig(), FLAT, WordTokenizer())


def test_unicode_answer_reference_artefact_and_exact_span(tiny_tokenizer):
    answer = "Ünïcödé 日本語 🙂 answer follows here with more words"
    out = preview_record({"input": "q", "output": answer}, PreviewConfig(num_answer_tokens=4), FLAT, tiny_tokenizer)
    assert out["input"] == "q" + C + reference_preview_text(answer, 4, tiny_tokenizer)
    # Byte-level tokens can split a character: the reference-compatible preview then holds U+FFFD ...
    assert "\ufffd" in out["input"]
    # ... while the exact-span variant previews a clean prefix of the original answer.
    exact = preview_record({"input": "q", "output": answer}, PreviewConfig(num_answer_tokens=4, exact_span=True),
                           FLAT, tiny_tokenizer)
    preview = exact["input"][len("q" + C):]
    assert preview and answer.startswith(preview) and "\ufffd" not in preview


def test_alpaca_preview_goes_to_end_of_prompt():
    schema = RecordSchema(RecordConfig(format="alpaca"))
    cfg = PreviewConfig(mode="virtual")
    with_input = preview_record({"instruction": "Add.", "input": "2 and 3", "output": "5"}, cfg, schema)
    assert with_input == {"instruction": "Add.", "input": "2 and 3" + C + P, "output": P + "5"}
    without = preview_record({"instruction": "Say hi.", "input": "", "output": "hi"}, cfg, schema)
    assert without == {"instruction": "Say hi." + C + P, "input": "", "output": P + "hi"}
    assert schema.prompt_messages(with_input)[0]["content"] == "Add.\n\n2 and 3" + C + P


def test_chat_preview_uses_last_user_and_last_assistant_turns():
    schema = RecordSchema(RecordConfig(format="chat"))
    record = {"messages": [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "first"}, {"role": "assistant", "content": "one"},
        {"role": "user", "content": "second"}, {"role": "assistant", "content": "two three four"}]}
    out = preview_record(record, PreviewConfig(num_answer_tokens=2), schema, WordTokenizer())
    assert [m["content"] for m in out["messages"]] == ["sys", "first", "one", "second" + C + "two three",
                                                       "two three four"]
    virtual = preview_record(record, PreviewConfig(mode="virtual"), schema)
    assert virtual["messages"][3]["content"] == "second" + C + P
    assert virtual["messages"][4]["content"] == P + "two three four"
    assert virtual["messages"][2]["content"] == "one"


@pytest.mark.parametrize("record, reason, field", [
    ({"input": "q"}, "missing_field", "output"),
    ({"input": 3, "output": "a"}, "not_a_string", "input"),
    (["not", "a", "dict"], "not_an_object", None),
])
def test_bad_flat_records_raise_row_error(record, reason, field):
    with pytest.raises(RowError) as info:
        preview_records([{"input": "ok", "output": "ok"}, record], PreviewConfig(mode="virtual"), FLAT)
    assert (info.value.reason, info.value.field, info.value.row) == (reason, field, 1)


@pytest.mark.parametrize("messages, field", [
    ([{"role": "user", "content": "q"}], "messages[0].role"),
    ([{"role": "assistant", "content": "a"}], "messages"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": None}], "messages[1].content"),
    ("nope", "messages"),
])
def test_bad_chat_records_name_the_field(messages, field):
    with pytest.raises(RowError) as info:
        preview_record({"messages": messages}, PreviewConfig(mode="virtual"), RecordSchema(RecordConfig(format="chat")))
    assert info.value.field == field


def test_real_mode_without_tokenizer_is_a_config_error():
    with pytest.raises(ConfigError):
        preview_record({"input": "q", "output": "a"}, PreviewConfig(mode="real"), FLAT)


def test_previewer_matches_reference_on_long_and_odd_answers(tiny_tokenizer):
    answers = ["", "x", "word " * 200, "a" * 900, "  two  spaces   and more   words here to preview", "\n\nlead",
               "x" * 40 + " tail words after a long first token"]
    for m in (0, 1, 6, 30):
        fast = AnswerPreviewer(tiny_tokenizer, m).preview_many(answers)
        assert fast == [reference_preview_text(a, m, tiny_tokenizer) for a in answers]
    slow = AnswerPreviewer(WordTokenizer(), 6).preview_many(answers)
    assert slow == [reference_preview_text(a, 6, WordTokenizer()) for a in answers]


def test_exact_span_takes_original_text(tiny_tokenizer):
    answer = "Natalia  sold 48/2 = 24 clips in May."
    text = AnswerPreviewer(tiny_tokenizer, 3, exact_span=True).preview_many([answer])[0]
    assert answer.startswith(text) and len(text) > 0
    encoding = tiny_tokenizer.backend_tokenizer.encode(answer, add_special_tokens=False)
    assert text == answer[: encoding.offsets[2][1]]
    with pytest.raises(ConfigError):
        AnswerPreviewer(WordTokenizer(), 3, exact_span=True)
