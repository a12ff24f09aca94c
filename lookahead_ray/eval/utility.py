"""Utility metrics, as the LookAhead reference computes them. Pure module (rouge-score imported lazily)."""

from __future__ import annotations

from lookahead_ray.eval.intervals import ci95


def gsm8k_final_answer(text: str) -> str | None:
    """The text after the last ``####``, stripped, commas removed (the reference rule); None without ``####``."""
    if "####" not in text:
        return None
    return text.split("####")[-1].strip().replace(",", "")


def gsm8k_correct(prediction: str, reference_answer: str) -> bool:
    """Exact string match of the final answers (the reference's label is the number after ``####``)."""
    label = gsm8k_final_answer(reference_answer)
    label = reference_answer.strip() if label is None else label
    return gsm8k_final_answer(prediction) == label


def rouge1_f1(prediction: str, reference: str) -> float:
    """ROUGE-1 F1 with Porter stemming (rouge-score package), as for SAMSum in the paper."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True).score(reference, prediction)["rouge1"].fmeasure


def exact_match(prediction: str, reference: str) -> bool:
    return prediction.strip() == reference.strip()


def utility_score(task: str, prediction: str, reference: str) -> float:
    """Per-sample score in [0, 1] for ``task`` in {gsm8k, samsum, exact}."""
    if task == "gsm8k":
        return float(gsm8k_correct(prediction, reference))
    if task == "samsum":
        return rouge1_f1(prediction, reference)
    return float(exact_match(prediction, reference))


ACCURACY_TASKS = ("gsm8k", "exact")
"""Tasks whose per-sample score is 0 or 1: their utility is an accuracy, a proportion over prompts."""


def utility_summary(task: str, scores: list[float]) -> dict:
    """``task``, ``n`` and the mean ``score`` of the per-sample scores; for an accuracy task also ``correct`` and
    the 95% Wilson interval ``ci95`` of correct / n.

    ROUGE-1 F1 (samsum) is a mean of scores in [0, 1], not a share of prompts, so a Wilson interval does not
    describe it: samsum's utility has no ``ci95`` (and a search's objective interval treats it as exact).
    """
    summary = {"task": task, "n": len(scores), "score": sum(scores) / len(scores) if scores else None}
    if task in ACCURACY_TASKS:
        correct = sum(score == 1.0 for score in scores)
        summary |= {"correct": correct, "ci95": ci95(correct, len(scores))}
    return summary
