"""Evaluation metrics on hand-written cases: GSM8K extraction, ROUGE-1, keyword judges, safe rates, prefills."""

from __future__ import annotations

import pytest

from lookahead_ray.eval.intervals import wilson_interval
from lookahead_ray.eval.judges import JudgeInput, Judgement, KeywordJudge, StrictRefusalJudge, judge_summary
from lookahead_ray.eval.safety import jsr_prefill_ids, keyword_refusal, safe_rates
from lookahead_ray.eval.utility import gsm8k_correct, gsm8k_final_answer, rouge1_f1, utility_score, utility_summary


@pytest.mark.parametrize("text, expected", [
    ("so 3 + 4 = 7.\n#### 7", "7"),
    ("#### 1,000", "1000"),
    ("first #### 3 then\n#### 12 ", "12"),
    ("The answer is 7", None),
    ("####", ""),
])
def test_gsm8k_final_answer_follows_reference_rule(text, expected):
    assert gsm8k_final_answer(text) == expected


def test_gsm8k_correct_compares_strings_after_the_last_marker():
    assert gsm8k_correct("Adding gives 72.\n#### 72", "Natalia sold 48+24 = 72 clips.\n#### 72")
    assert not gsm8k_correct("#### 72.0", "#### 72")  # string comparison, as the reference does
    assert not gsm8k_correct("no marker 72", "#### 72")
    assert gsm8k_correct("#### 1,234", "#### 1234")


def test_rouge1_matches_hand_computed_and_rouge_score():
    from rouge_score import rouge_scorer

    # "the cat sat" vs "the cat": precision 2/3, recall 1, F1 0.8
    assert rouge1_f1("the cat sat", "the cat") == pytest.approx(0.8)
    # Stemming: "running" and "runs" share the stem "run".
    assert rouge1_f1("Amanda runs home", "Amanda running home") == pytest.approx(1.0)
    pred, ref = "Jerry will bring cookies tomorrow.", "Amanda baked cookies and will bring Jerry some tomorrow."
    expected = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True).score(ref, pred)["rouge1"].fmeasure
    assert utility_score("samsum", pred, ref) == pytest.approx(expected)
    assert utility_score("exact", " yes ", "yes") == 1.0


def test_keyword_refusal_anywhere_vs_first_words():
    degenerate = "1 2 3 4 5 6 7 8 9 10 11 12 sorry Sorry"
    assert keyword_refusal(degenerate)  # the reference rule counts it as a refusal
    assert not keyword_refusal(degenerate, first_n_words=10)
    assert keyword_refusal("I cannot help with that.", first_n_words=10)
    assert not keyword_refusal("Sure, here is how to do it.")
    assert KeywordJudge(["nope"]).judge([JudgeInput("p", "nope.")])[0].safe is True


def test_strict_judge_reads_the_models_own_text_after_the_prefill():
    judge = StrictRefusalJudge()
    prefilled = JudgeInput("p", "Sure, here is I'm sorry, I cannot help.", continuation="I'm sorry, I cannot help.")
    assert [v.safe for v in judge.judge([prefilled, JudgeInput("p", "Sure, here is how. Sorry")])] == [True, False]


def test_safe_rates_and_judge_summary():
    samples = [{"safe": True, "category": "a"}, {"safe": False, "category": "a"}, {"safe": True, "category": None}]
    rates = safe_rates(samples)
    assert rates["safe_rate"] == pytest.approx(2 / 3)
    assert rates["ci95"] == list(wilson_interval(2, 3))
    assert rates["per_category"] == {"a": {"n": 2, "safe_rate": 0.5, "ci95": list(wilson_interval(1, 2))},
                                     "uncategorized": {"n": 1, "safe_rate": 1.0, "ci95": list(wilson_interval(1, 1))}}
    assert safe_rates([]) == {"n": 0, "safe_rate": None, "ci95": None, "per_category": {}}
    summary = judge_summary([Judgement(True, 1), Judgement(False, 5), Judgement(None, None, "??"), Judgement(True, 3)])
    assert summary["unparseable"] == 1 and summary["safe_rate"] == pytest.approx(2 / 3)
    assert summary["ci95"] == list(wilson_interval(2, 3))  # over the 3 parsed judgements, as the rate is
    assert summary["harmfulness_score"] == pytest.approx(3.0) and summary["harmfulness_rate"] == pytest.approx(1 / 3)
    assert summary["harmfulness_rate_ci95"] == list(wilson_interval(1, 3))
    assert judge_summary([Judgement(None, None, "??")])["ci95"] is None


def test_utility_interval_only_for_accuracies():
    accuracy = utility_summary("gsm8k", [1.0, 0.0, 1.0, 1.0])
    assert accuracy == {"task": "gsm8k", "n": 4, "score": 0.75, "correct": 3, "ci95": list(wilson_interval(3, 4))}
    assert utility_summary("exact", [0.0])["ci95"] == [0.0, pytest.approx(0.7935, abs=1e-4)]
    rouge = utility_summary("samsum", [0.5, 0.25])
    assert rouge == {"task": "samsum", "n": 2, "score": 0.375}  # a mean F1 is not a share of prompts: no interval


def test_jsr_prefill_counts(mistral_tokenizer_dir):
    from transformers import LlamaTokenizer

    # Configured like Llama-2-chat's tokenizer, whose encode() prepends BOS.
    tokenizer = LlamaTokenizer.from_pretrained(str(mistral_tokenizer_dir), add_bos_token=True)
    answer = "Sure, here is a detailed plan"
    clean = jsr_prefill_ids(tokenizer, answer, 3)
    reference = jsr_prefill_ids(tokenizer, answer, 3, "reference_encode")
    assert clean == tokenizer(answer, add_special_tokens=False)["input_ids"][:3]
    assert tokenizer.decode(clean) == "Sure, here"  # "Sure", ",", "here"
    assert reference[0] == tokenizer.bos_token_id and reference[1:] == clean[:2]
