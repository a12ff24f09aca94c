"""Evaluation: safety (RSR, JSR; keyword and LLM judges), utility (GSM8K, ROUGE-1) and first-token drift."""
