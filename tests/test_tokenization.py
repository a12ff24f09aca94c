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
from lookahead_ray.prompts import LLAMA2_CHAT_TEMPLATE

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


@pytest.mark.parametrize("system", [None, "", "You are a helpful assistant.", "  padded system  "])
def test_fast_prompt_rendering_equals_the_chat_template_on_every_shape(mistral_tokenizer, tiny_tokenizer, system):
    from lookahead_ray.prompts import SENTINEL, PromptRenderer, render_prompt, user_prompt_messages

    contents = ["How many apples?", "  leading space", "trailing space. ", "\nboth\n ", "multi\nline\ttext",
                "The answer begins with: Let's solve this problem. ", "", "   ", f"has {SENTINEL} in it", "ünïcödé ✓"]
    conversations = [user_prompt_messages(c, system) for c in contents]
    conversations.append([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                          {"role": "user", "content": "c"}])  # multi-turn: rendered in full
    saved = mistral_tokenizer.chat_template
    try:
        for tokenizer, template in ((mistral_tokenizer, LLAMA2_CHAT_TEMPLATE), (tiny_tokenizer, None)):
            if template:
                tokenizer.chat_template = template
            renderer = PromptRenderer(tokenizer)
            for _ in range(2):  # the second pass runs on cached frames
                assert renderer.render_many(conversations) == [render_prompt(tokenizer, m) for m in conversations]
            assert renderer.fast_path_disabled is None
    finally:
        mistral_tokenizer.chat_template = saved


def test_a_template_that_rewrites_the_content_switches_the_fast_path_off(mistral_tokenizer):
    from lookahead_ray.prompts import PromptRenderer, render_prompt, user_prompt_messages

    saved = mistral_tokenizer.chat_template
    mistral_tokenizer.chat_template = ("{% for m in messages %}{{ m['content'] | replace('banana', 'BANANA') }}"
                                       "{% endfor %}{% if add_generation_prompt %} [/INST]{% endif %}")
    try:  # the sentinel frame looks fine; the check on the batch's first prompt catches the rewrite
        conversations = [user_prompt_messages(c) for c in ("banana split", "apple pie", "cat")]
        renderer = PromptRenderer(mistral_tokenizer)
        assert renderer.render_many(conversations) == [render_prompt(mistral_tokenizer, m) for m in conversations]
        assert renderer.fast_path_disabled and "differs" in renderer.fast_path_disabled
    finally:
        mistral_tokenizer.chat_template = saved


def test_sentencepiece_tokenizer_is_converted_once_and_loads_identically(mistral_tokenizer_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from lookahead_ray.modeling import load_tokenizer

    monkeypatch.setenv("LOOKAHEAD_RAY_CACHE", str(tmp_path / "cache"))
    before = sorted(p.name for p in mistral_tokenizer_dir.iterdir())
    first, second = load_tokenizer(str(mistral_tokenizer_dir)), load_tokenizer(str(mistral_tokenizer_dir))
    (converted,) = (tmp_path / "cache" / "tokenizers").iterdir()
    assert second.name_or_path == str(converted) and (converted / "tokenizer.json").exists()
    assert sorted(p.name for p in mistral_tokenizer_dir.iterdir()) == before  # the source is never written to
    reference = AutoTokenizer.from_pretrained(str(mistral_tokenizer_dir))  # converted in place, as transformers does
    texts = [json.loads(x)["answer"] for x in shared_file("gsm8k/train.jsonl").read_text().splitlines()[:300]]
    texts += ["", " leading", "<s>[INST] special [/INST]</s>", "ünïcödé ✓ 12,345.67"]
    expected = reference(texts, add_special_tokens=True)["input_ids"]
    for tokenizer in (first, second):
        assert tokenizer(texts, add_special_tokens=True)["input_ids"] == expected
        assert tokenizer.all_special_ids == reference.all_special_ids and tokenizer.eos_token == reference.eos_token
