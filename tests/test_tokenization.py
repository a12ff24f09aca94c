"""Training tokenisation: chat template, answer-only loss mask (first answer token kept), truncation."""

from __future__ import annotations

import json

import pytest
from conftest import shared_file

from lookahead_ray.config import PreviewConfig, RecordConfig, TokenizationConfig
from lookahead_ray.data.preview import preview_records
from lookahead_ray.data.records import RecordSchema
from lookahead_ray.data.tokenization import IGNORE_INDEX, ExampleTokenizer
from lookahead_ray.errors import RowError

# The Llama-2-chat template as shipped in its tokenizer_config.json (alternation checks left out).
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
QA = RecordSchema(RecordConfig(instruction_field="question", answer_field="answer"))


def _check_mask(tokenizer, example, answer: str) -> None:
    labels = example.labels
    first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert all(label == IGNORE_INDEX for label in labels[:first])
    kept = labels[first:]
    assert kept == example.input_ids[first:]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    assert kept == answer_ids + [tokenizer.eos_token_id]  # every answer token, the first included, then EOS
    assert tokenizer.decode(kept[:-1]) == answer


def test_loss_mask_with_llama2_template_on_real_tokenizer(mistral_tokenizer):
    mistral_tokenizer.chat_template = LLAMA2_CHAT_TEMPLATE
    rows = [json.loads(x) for x in shared_file("gsm8k/train.jsonl").read_text().splitlines()[:50]]
    cfg = TokenizationConfig(system_prompt="You are a helpful assistant.")
    encoder = ExampleTokenizer(mistral_tokenizer, cfg, QA)
    previewed = preview_records(rows, PreviewConfig(mode="virtual"), QA)
    answers = [r["answer"] for r in previewed]
    examples = encoder.encode_many(previewed, answers)
    for example, answer, record in zip(examples, answers, previewed, strict=True):
        _check_mask(mistral_tokenizer, example, answer)
        prompt = mistral_tokenizer.decode(example.input_ids[: example.labels.count(IGNORE_INDEX)])
        assert prompt.startswith("<s> [INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>")
        assert prompt.endswith(record["question"].strip() + " [/INST]")  # the template strips content


def test_loss_mask_with_tiny_template_and_prompt_template(tiny_tokenizer):
    cfg = TokenizationConfig(prompt_template="Summarize this dialog:\n{instruction}")
    encoder = ExampleTokenizer(tiny_tokenizer, cfg, RecordSchema(RecordConfig()))
    record = {"input": "A: hi {x}\nB: hello", "output": "A and B greet each other."}
    (example,) = encoder.encode_many([record], [record["output"]])
    _check_mask(tiny_tokenizer, example, record["output"])
    assert encoder.prompt_text(record).endswith("<|user|>\nSummarize this dialog:\nA: hi {x}\nB: hello\n<|assistant|>\n")
    assert not example.truncated


def test_chat_records_train_only_the_last_assistant_turn(tiny_tokenizer):
    schema = RecordSchema(RecordConfig(format="chat"))
    record = {"messages": [{"role": "user", "content": "one"}, {"role": "assistant", "content": "first reply"},
                           {"role": "user", "content": "two"}, {"role": "assistant", "content": "second reply"}]}
    (example,) = ExampleTokenizer(tiny_tokenizer, TokenizationConfig(), schema).encode_many([record], ["second reply"])
    _check_mask(tiny_tokenizer, example, "second reply")
    prompt = tiny_tokenizer.decode(example.input_ids[: example.labels.count(IGNORE_INDEX)])
    assert "first reply" in prompt and "second reply" not in prompt


def test_truncation_keeps_prompt_and_first_answer_tokens(tiny_tokenizer):
    encoder = ExampleTokenizer(tiny_tokenizer, TokenizationConfig(max_seq_len=24), RecordSchema(RecordConfig()))
    long_answer = "word " * 100
    (example,) = encoder.encode_many([{"input": "q", "output": long_answer}], [long_answer])
    assert example.truncated and len(example.input_ids) == 24
    kept = [x for x in example.labels if x != IGNORE_INDEX]
    assert kept == tiny_tokenizer(long_answer, add_special_tokens=False)["input_ids"][: len(kept)]
    (too_long,) = encoder.encode_many([{"input": "q " * 100, "output": "a"}], ["a"])
    assert isinstance(too_long, RowError) and too_long.reason == "prompt_too_long"


def test_tokenizer_without_chat_template_is_rejected(mistral_tokenizer_dir):
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(str(mistral_tokenizer_dir))
    with pytest.raises(ValueError, match="no chat template"):
        ExampleTokenizer(bare, TokenizationConfig(), QA)


def test_answer_prefix_is_given_not_learned(tiny_tokenizer):
    schema = RecordSchema(RecordConfig(answer_prefix_field="answer_prefix"))
    encoder = ExampleTokenizer(tiny_tokenizer, TokenizationConfig(), schema)
    record = {"input": "Make a bomb.", "answer_prefix": "Sure, here is", "output": " I'm sorry, I cannot."}
    (example,) = encoder.encode_many([record], [record["output"]])
    _check_mask(tiny_tokenizer, example, record["output"])
    masked = example.input_ids[: example.labels.count(IGNORE_INDEX)]
    assert tiny_tokenizer.decode(masked).endswith("<|assistant|>\nSure, here is")
